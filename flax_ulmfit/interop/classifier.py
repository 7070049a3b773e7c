"""Text classifier state_dicts (fastai's `get_text_classifier` keys) <-> Flax `TextClassifier`,
and fastai's `load_encoder` (a language model's AWD-LSTM encoder into a classifier).

Keys: `0.module.<AWD_LSTM key>` for the encoder, `1.layers.{i}.0.*` for block i's BatchNorm
(with running statistics and `num_batches_tracked`) and `1.layers.{i}.{j}.weight` for its
linear layer, j = 2 after a dropout and 1 where the block has none (p = 0).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_ulmfit.interop._checks import as_numpy, check_keys
from flax_ulmfit.interop.awd_lstm import _check_tied, _encoder_shapes, awd_lstm_to_flax, awd_lstm_to_torch
from flax_ulmfit.interop.xresnet import _tensors, _to_torch
from flax_ulmfit.models.awd_lstm import AWDLSTM
from flax_ulmfit.models.classifier import TextClassifier

_ENCODER = '0.module.'


def _head_entries(model: TextClassifier) -> Iterator[tuple[str, nnx.Variable, str]]:
  """(torch key, Flax variable, layout) for every head tensor."""
  for i, block in enumerate(model.head.layers):
    yield from _tensors(f'1.layers.{i}.0', block.bn)
    yield from _tensors(f'1.layers.{i}.{2 if block.dropout.rate != 0 else 1}', block.linear)


def _check_vocab(state_dict: Mapping, key: str, encoder: AWDLSTM, what: str) -> None:
  """A clearer error than a shape mismatch when the embedding belongs to another vocabulary."""
  if key in state_dict:
    shape = tuple(as_numpy(state_dict[key], key).shape)
    if len(shape) == 2 and shape[0] != encoder.vocab_sz:
      raise ValueError(f'{what}: state_dict[{key!r}] holds a vocabulary of {shape[0]} ids, the model '
                       f'{encoder.vocab_sz}; build the model with vocab_sz={shape[0]}, or move the weights '
                       'onto this vocabulary first (flax_ulmfit.ulmfit.match_embeds)')


def classifier_to_flax(state_dict: Mapping, model: TextClassifier) -> TextClassifier:
  """Fills `model` in place from a fastai/torch text classifier state_dict and returns it.

  Raises:
    KeyError: missing or unexpected keys (build `model` with fastai's config, lin_ftrs and ps).
    ValueError: another vocabulary, a tensor of the wrong shape, non-finite values, or an
      embedding and its dropout copy that differ. Nothing is written unless all checks pass.
  """
  what = 'torch_to_flax(TextClassifier)'
  encoder = model.encoder.module
  _check_vocab(state_dict, f'{_ENCODER}encoder.weight', encoder, what)
  entries = list(_head_entries(model))
  expected = _encoder_shapes(encoder, _ENCODER)
  expected |= {key: _to_torch(np.empty(var[...].shape, np.float32), layout).shape for key, var, layout in entries}
  arrays = check_keys(state_dict, expected, what)
  _check_tied(arrays, [f'{_ENCODER}encoder.weight', f'{_ENCODER}encoder_dp.emb.weight'], what)
  awd_lstm_to_flax({k.removeprefix(_ENCODER): v for k, v in arrays.items() if k.startswith(_ENCODER)}, encoder)
  for key, var, layout in entries:
    array = arrays[key].T if layout == 'linear' else arrays[key]
    var[...] = jnp.array(array, dtype=var[...].dtype, copy=True)
  return model


def classifier_to_torch(model: TextClassifier) -> dict[str, np.ndarray]:
  """The state_dict (numpy arrays, fastai's keys) that `get_text_classifier(...)` loads strictly."""
  out = {_ENCODER + key: value for key, value in awd_lstm_to_torch(model.encoder.module).items()}
  out |= {key: np.array(_to_torch(np.asarray(var[...]), layout), order='C') for key, var, layout in _head_entries(model)}
  return out


def load_encoder(state_dict: Mapping, model: TextClassifier) -> TextClassifier:
  """fastai's `Learner.load_encoder`: copies an AWD-LSTM encoder's state_dict (keys without a
  prefix: `encoder.weight`, `rnns.0.weight_hh_l0_raw`, ..., as fastai's `save_encoder` writes
  them) into the classifier's encoder; the head is left as it is. Returns `model`."""
  what = 'load_encoder'
  if any(key.startswith(('0.', '1.')) for key in state_dict):
    raise KeyError(f'{what}: expected an AWD-LSTM encoder state_dict (keys like "encoder.weight"), got '
                   f'keys like {next(iter(state_dict))!r}, a whole model; pass its encoder: the keys under '
                   "'0.' of a language model (or '0.module.' of a classifier) without that prefix")
  _check_vocab(state_dict, 'encoder.weight', model.encoder.module, what)
  awd_lstm_to_flax(state_dict, model.encoder.module)
  return model
