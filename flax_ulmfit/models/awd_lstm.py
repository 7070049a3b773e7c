"""AWD-LSTM (Merity et al. 2017) and its language model, with fastai v2's semantics.

Recurrent state is explicit: `lm(tokens, state) -> (logits, state, extras)`; the caller
carries `state` between batches and stops its gradient (fastai's detach). Dropout masks
are a dict (see `AWDLSTM.sample_masks`); any mask left out is drawn from `nnx.Rngs`.

References:
  Merity, Keskar & Socher, "Regularizing and Optimizing LSTM Language Models", 2017.
  Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification", 2018.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_ulmfit.models.dropout import EmbeddingDropout, RNNDropout, WeightDropout
from flax_ulmfit.models.lstm import LSTM, LSTMState

# fastai v2's `awd_lstm_lm_config` and `awd_lstm_clas_config`.
awd_lstm_lm_config = dict(emb_sz=400, n_hid=1152, n_layers=3, pad_token=1, bidir=False,
                          output_p=0.1, hidden_p=0.15, input_p=0.25, embed_p=0.02,
                          weight_p=0.2, tie_weights=True, out_bias=True)
awd_lstm_clas_config = dict(emb_sz=400, n_hid=1152, n_layers=3, pad_token=1, bidir=False,
                            output_p=0.4, hidden_p=0.3, input_p=0.4, embed_p=0.05,
                            weight_p=0.5)

State = tuple[LSTMState, ...]  # one (h, c) per layer, each (B, H_l), float32
Masks = dict[str, Any]


class LMExtras(NamedTuple):
  """What AR/TAR need besides the logits."""
  raw: jax.Array  # (B, T, E) last LSTM layer's output
  dropped: jax.Array  # (B, T, E) the same after the decoder's output dropout


def scale_dropouts(config: dict, drop_mult: float) -> dict:
  """A copy of `config` with every `*_p` multiplied by `drop_mult` (fastai's `drop_mult`)."""
  return {k: v * drop_mult if k.endswith('_p') else v for k, v in config.items()}


def check_tokens(tokens: jax.Array, vocab_sz: int, where: str) -> None:
  """Raises ValueError unless `tokens` is a (B, T) integer array with ids in [0, vocab_sz).

  The range is checked only on concrete arrays (never inside jit, which has no host sync).
  """
  if tokens.ndim != 2:
    raise ValueError(f'{where}: tokens must be (batch, seq_len), got shape {tokens.shape}')
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'{where}: tokens must be integer ids, got dtype {tokens.dtype}')
  if not isinstance(tokens, jax.core.Tracer) and tokens.size:
    values = np.asarray(tokens)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab_sz:
      raise ValueError(f'{where}: token ids must be in [0, {vocab_sz}), got ids from {low} '
                       f'to {high}; is the vocabulary the one this model was built for?')


class AWDLSTM(nnx.Module):
  """fastai's `AWD_LSTM` encoder: embedding (with embedding dropout), input dropout, then
  `n_layers` weight-dropped LSTMs with hidden dropout between them.

  Layer l reads emb_sz (l = 0) or n_hid features and writes n_hid, except the last, which
  writes emb_sz so the decoder can tie its weight to the embedding.
  """

  def __init__(self, vocab_sz: int, emb_sz: int, n_hid: int, n_layers: int, pad_token: int = 1,
               hidden_p: float = 0.2, input_p: float = 0.6, embed_p: float = 0.1,
               weight_p: float = 0.5, bidir: bool = False, *, dtype=None, rngs: nnx.Rngs):
    if bidir:
      raise NotImplementedError('AWDLSTM: bidir=True is not supported (language models are '
                                'unidirectional); use bidir=False')
    self.vocab_sz, self.emb_sz, self.n_layers, self.pad_token = vocab_sz, emb_sz, n_layers, pad_token
    self.dtype = dtype
    init = jax.nn.initializers.uniform(0.2)
    self.encoder = nnx.Param(init(rngs.params(), (vocab_sz, emb_sz)) - 0.1)  # uniform(-0.1, 0.1)
    self.encoder_dp = EmbeddingDropout(embed_p, rngs=rngs)
    self.input_dp = RNNDropout(input_p, rngs=rngs)
    sizes = [emb_sz] + [n_hid] * (n_layers - 1) + [emb_sz]
    self.rnns = nnx.List([LSTM(sizes[l], sizes[l + 1], dtype=dtype, rngs=rngs)
                          for l in range(n_layers)])
    self.weight_dps = nnx.List([WeightDropout(weight_p, rngs=rngs) for _ in range(n_layers)])
    self.hidden_dps = nnx.List([RNNDropout(hidden_p, rngs=rngs) for _ in range(n_layers - 1)])

  def zero_state(self, batch_size: int) -> State:
    """The state at the start of a text: zeros for every layer."""
    return tuple(rnn.zero_state(batch_size) for rnn in self.rnns)

  def _site_keys(self, key: jax.Array) -> dict[str, Any]:
    """One key per dropout site, in `sample_masks`' layout."""
    k_embed, k_input, k_weight, k_hidden = jax.random.split(key, 4)
    return dict(embed=k_embed, input=k_input, weight=list(jax.random.split(k_weight, self.n_layers)),
                hidden=list(jax.random.split(k_hidden, max(self.n_layers - 1, 1)))[:self.n_layers - 1])

  def sample_masks(self, key: jax.Array, batch_size: int) -> Masks:
    """Draws every dropout mask of one forward pass (all ones where p = 0); `self(tokens,
    key=key)` draws the same ones.

    Returns a dict: `embed` (V, 1), `input` (B, 1, E), `weight` one (4H_l, H_l) per layer,
    `hidden` one (B, 1, H_l) per layer but the last.
    """
    keys = self._site_keys(key)
    return dict(
        embed=self.encoder_dp.draw((self.vocab_sz, 1), keys['embed']),
        input=self.input_dp.draw(self.input_dp.mask_shape(batch_size, self.emb_sz), keys['input']),
        weight=[dp.draw(rnn.weight_hh.shape, k) for dp, rnn, k in zip(self.weight_dps, self.rnns, keys['weight'])],
        hidden=[dp.draw(dp.mask_shape(batch_size, rnn.hidden_size), k)
                for dp, rnn, k in zip(self.hidden_dps, self.rnns, keys['hidden'])])

  def _check_state(self, state: State, batch_size: int) -> None:
    expected = [(batch_size, rnn.hidden_size) for rnn in self.rnns]
    got = [tuple(tuple(a.shape) for a in layer) for layer in state] if isinstance(state, (tuple, list)) else state
    if not isinstance(state, (tuple, list)) or len(state) != self.n_layers or any(
        len(layer) != 2 or any(tuple(a.shape) != shape for a in layer)
        for layer, shape in zip(state, expected)):
      raise ValueError(f'AWDLSTM: state must be {self.n_layers} pairs (h, c) of shapes {expected} '
                       f'for batch size {batch_size}, got {got}; pass state=None to start from zeros')

  def embed(self, tokens: jax.Array, mask: jax.Array | None = None, *, key: jax.Array | None = None) -> jax.Array:
    """Looks up (T, B) tokens in the (dropped) embedding; the padding row gets no gradient."""
    weight = self.encoder_dp(self.encoder[...], mask, key=key)
    vectors = weight[tokens]
    is_pad = (tokens == self.pad_token)[..., None]
    return jnp.where(is_pad, jax.lax.stop_gradient(vectors), vectors)

  def __call__(self, tokens: jax.Array, state: State | None = None,
               masks: Masks | None = None, *, key: jax.Array | None = None) -> tuple[jax.Array, State]:
    """Encodes a batch.

    Args:
      tokens: (B, T) integer ids.
      state: per-layer `(h, c)` from the previous batch, or None for zeros.
      masks: dropout masks (`sample_masks`' layout); missing ones are drawn. Ignored in eval.
      key: draws the missing masks as `sample_masks(key, B)` would (else each site's stream);
        weight masks drawn here are redrawn in the backward pass rather than kept.

    Returns:
      `(output (B, T, E) float32, new state)`; output is the last layer's, without dropout.
    """
    check_tokens(tokens, self.vocab_sz, 'AWDLSTM')
    batch_size = tokens.shape[0]
    state = self.zero_state(batch_size) if state is None else state
    self._check_state(state, batch_size)
    masks = masks or {}
    keys = self._site_keys(key) if key is not None else dict(embed=None, input=None, weight=[None] * self.n_layers,
                                                           hidden=[None] * (self.n_layers - 1))
    weight_masks = masks.get('weight') or [None] * self.n_layers
    hidden_masks = masks.get('hidden') or [None] * (self.n_layers - 1)
    x = self.input_dp(self.embed(tokens.T, masks.get('embed'), key=keys['embed']), masks.get('input'), key=keys['input'])
    new_state = []
    for l, (rnn, weight_dp) in enumerate(zip(self.rnns, self.weight_dps)):
      weight_hh = weight_dp(rnn.weight_hh[...], weight_masks[l], key=keys['weight'][l])
      x, layer_state = rnn(x, state[l], weight_hh=weight_hh)
      new_state.append(layer_state)
      if l < self.n_layers - 1:
        x = self.hidden_dps[l](x, hidden_masks[l], key=keys['hidden'][l])
    return jnp.swapaxes(x, 0, 1).astype(jnp.float32), tuple(new_state)


class LinearDecoder(nnx.Module):
  """fastai's `LinearDecoder`: output dropout, then a linear map to the vocabulary.

  With `tied=True` it owns no weight: the caller passes the encoder's embedding at call time
  (one parameter, used twice, as in fastai's tied decoder).
  """

  def __init__(self, n_out: int, n_hid: int, output_p: float = 0.1, tied: bool = False,
               bias: bool = True, *, dtype=None, rngs: nnx.Rngs):
    self.dtype = dtype
    self.output_dp = RNNDropout(output_p, rngs=rngs)
    if not tied:
      init = jax.nn.initializers.uniform(0.2)
      self.weight = nnx.Param(init(rngs.params(), (n_out, n_hid)) - 0.1)  # uniform(-0.1, 0.1)
    self.tied = tied
    self.bias = nnx.Param(jnp.zeros((n_out,))) if bias else nnx.data(None)

  def drop(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Output dropout of (B, T, E) features (a (B, 1, E) mask shared over time)."""
    return jnp.swapaxes(self.output_dp(jnp.swapaxes(x, 0, 1), mask), 0, 1)

  def weights(self, tied_weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """The (V, E) weight in the compute dtype and the float32 (V,) bias (None without one)."""
    if self.tied == (tied_weight is None):
      raise ValueError('LinearDecoder: pass tied_weight exactly when built with tied=True')
    weight = tied_weight if self.tied else self.weight[...]
    return weight.astype(self.dtype or jnp.float32), None if self.bias is None else self.bias[...]

  def logits(self, dropped: jax.Array, tied_weight: jax.Array | None = None) -> jax.Array:
    """Float32 (B, T, V) logits of already dropped (B, T, E) features."""
    weight, bias = self.weights(tied_weight)
    logits = jnp.dot(dropped.astype(weight.dtype), weight.T, preferred_element_type=jnp.float32)
    return logits if bias is None else logits + bias

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               tied_weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Maps (B, T, E) features to float32 (B, T, V) logits; also returns the dropped input."""
    dropped = self.drop(x, mask)
    return self.logits(dropped, tied_weight), dropped


class LanguageModel(nnx.Module):
  """fastai's `get_language_model(AWD_LSTM, vocab_sz, config, drop_mult)`.

  `lm(tokens, state=None, masks=None) -> (logits (B, T, V), state, LMExtras(raw, dropped))`.

  Args:
    vocab_sz: vocabulary size V.
    config: a dict like `awd_lstm_lm_config` (None = that default).
    drop_mult: multiplies every dropout probability in `config`.
    dtype: compute dtype (None = float32); parameters stay float32, logits are float32.
    rngs: `params` for the initialisation, `dropout` for masks drawn on demand.
  """

  def __init__(self, vocab_sz: int, config: dict | None = None, drop_mult: float = 1.0, *,
               dtype=None, rngs: nnx.Rngs):
    config = scale_dropouts(awd_lstm_lm_config if config is None else config, drop_mult)
    unknown = set(config) - set(awd_lstm_lm_config)
    if unknown:
      raise ValueError(f'LanguageModel: unknown config keys {sorted(unknown)}; '
                       f'expected keys of awd_lstm_lm_config: {sorted(awd_lstm_lm_config)}')
    output_p = config.pop('output_p', 0.1)
    tie_weights = config.pop('tie_weights', True)
    out_bias = config.pop('out_bias', True)
    self.encoder = AWDLSTM(vocab_sz, **config, dtype=dtype, rngs=rngs)
    self.decoder = LinearDecoder(vocab_sz, self.encoder.emb_sz, output_p,
                                 tied=tie_weights, bias=out_bias, dtype=dtype, rngs=rngs)

  def zero_state(self, batch_size: int) -> State:
    return self.encoder.zero_state(batch_size)

  def sample_masks(self, key: jax.Array, batch_size: int) -> Masks:
    """Every dropout mask of one forward pass: the encoder's plus `output` (B, 1, E)."""
    k_encoder, k_output = jax.random.split(key)
    masks = self.encoder.sample_masks(k_encoder, batch_size)
    dp = self.decoder.output_dp
    masks['output'] = dp.draw(dp.mask_shape(batch_size, self.encoder.emb_sz), k_output)
    return masks

  def encode(self, tokens: jax.Array, state: State | None = None,
             masks: Masks | None = None) -> tuple[State, LMExtras]:
    """Everything but the decoder's matmul: the new state and `LMExtras(raw, dropped)`, where
    `dropped` is the decoder's input. With `output_layer()` a loss can fuse the matmul
    (`flax_ulmfit.train.losses.linear_cross_entropy`), which is how `train.lm.lm_loss` trains."""
    raw, state = self.encoder(tokens, state, masks)
    return state, LMExtras(raw, self.decoder.drop(raw, (masks or {}).get('output')))

  def _tied_weight(self) -> jax.Array | None:
    return self.encoder.encoder[...] if self.decoder.tied else None

  def output_layer(self) -> tuple[jax.Array, jax.Array | None]:
    """The decoder's (V, E) weight (the embedding when tied), in the compute dtype, and its bias."""
    return self.decoder.weights(self._tied_weight())

  def __call__(self, tokens: jax.Array, state: State | None = None,
               masks: Masks | None = None) -> tuple[jax.Array, State, LMExtras]:
    state, extras = self.encode(tokens, state, masks)
    return self.decoder.logits(extras.dropped, self._tied_weight()), state, extras
