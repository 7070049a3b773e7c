"""AWD-LSTM state_dicts (fastai's key names) <-> Flax `AWDLSTM` / `LanguageModel`."""
from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from flax_ulmfit.interop._checks import check_keys
from flax_ulmfit.models.awd_lstm import AWDLSTM, LanguageModel

# fastai key suffix -> attribute of our LSTM layer (torch's LSTM has two biases; we keep both).
_LAYER_KEYS = {'weight_hh_l0_raw': 'weight_hh', 'module.weight_ih_l0': 'weight_ih',
               'module.bias_ih_l0': 'bias_ih', 'module.bias_hh_l0': 'bias_hh'}


def _encoder_shapes(encoder: AWDLSTM, prefix: str) -> dict[str, tuple[int, ...]]:
  shape = tuple(encoder.encoder.shape)
  shapes = {f'{prefix}encoder.weight': shape, f'{prefix}encoder_dp.emb.weight': shape}
  for l, rnn in enumerate(encoder.rnns):
    for key, attr in _LAYER_KEYS.items():
      shapes[f'{prefix}rnns.{l}.{key}'] = tuple(getattr(rnn, attr).shape)
  return shapes


def _expected_shapes(model: AWDLSTM | LanguageModel) -> dict[str, tuple[int, ...]]:
  if isinstance(model, AWDLSTM):
    return _encoder_shapes(model, '')
  shapes = _encoder_shapes(model.encoder, '0.')
  shapes['1.decoder.weight'] = tuple(model.encoder.encoder.shape)
  if model.decoder.bias is not None:
    shapes['1.decoder.bias'] = tuple(model.decoder.bias.shape)
  return shapes


def _check_tied(arrays: dict[str, np.ndarray], keys: list[str], what: str) -> None:
  for key in keys[1:]:
    if not np.array_equal(arrays[keys[0]], arrays[key]):
      raise ValueError(f'{what}: state_dict[{key!r}] differs from state_dict[{keys[0]!r}], but the '
                       'model ties them (one tensor in fastai); was the state_dict edited?')


def awd_lstm_to_flax(state_dict: Mapping, model: AWDLSTM | LanguageModel) -> AWDLSTM | LanguageModel:
  """Fills `model` in place from a fastai/torch state_dict and returns it."""
  what = f'torch_to_flax({type(model).__name__})'
  arrays = check_keys(state_dict, _expected_shapes(model), what)
  encoder, prefix = (model, '') if isinstance(model, AWDLSTM) else (model.encoder, '0.')
  tied = [f'{prefix}encoder.weight', f'{prefix}encoder_dp.emb.weight']
  if isinstance(model, LanguageModel) and model.decoder.tied:
    tied.append('1.decoder.weight')
  _check_tied(arrays, tied, what)  # every check before the first write: no half-filled model
  if isinstance(model, LanguageModel):
    if not model.decoder.tied:
      model.decoder.weight[...] = jnp.array(arrays['1.decoder.weight'], jnp.float32, copy=True)
    if model.decoder.bias is not None:
      model.decoder.bias[...] = jnp.array(arrays['1.decoder.bias'], jnp.float32, copy=True)
  encoder.encoder[...] = jnp.array(arrays[tied[0]], jnp.float32, copy=True)
  for l, rnn in enumerate(encoder.rnns):
    for key, attr in _LAYER_KEYS.items():
      getattr(rnn, attr)[...] = jnp.array(arrays[f'{prefix}rnns.{l}.{key}'], jnp.float32, copy=True)
  return model


def awd_lstm_to_torch(model: AWDLSTM | LanguageModel) -> dict[str, np.ndarray]:
  """The state_dict (numpy arrays, fastai's key names) that fastai's model loads strictly."""
  encoder, prefix = (model, '') if isinstance(model, AWDLSTM) else (model.encoder, '0.')
  embedding = np.array(encoder.encoder[...])
  out = {f'{prefix}encoder.weight': embedding, f'{prefix}encoder_dp.emb.weight': embedding.copy()}
  for l, rnn in enumerate(encoder.rnns):
    for key, attr in _LAYER_KEYS.items():
      out[f'{prefix}rnns.{l}.{key}'] = np.array(getattr(rnn, attr)[...])
  if isinstance(model, LanguageModel):
    out['1.decoder.weight'] = embedding.copy() if model.decoder.tied else np.array(model.decoder.weight[...])
    if model.decoder.bias is not None:
      out['1.decoder.bias'] = np.array(model.decoder.bias[...])
  return out
