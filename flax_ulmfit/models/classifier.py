"""fastai's text classifier: an AWD-LSTM read in chunks (BPT3C), masked concat pooling and
a head of BatchNorm/dropout/linear blocks (`get_text_classifier(AWD_LSTM, ...)`).

Tokens come padded as `flax_ulmfit.text.data.ClasLoader` pads them: whole `seq_len` chunks
of padding first, the text, then fewer than `seq_len` pads. Dropout masks are drawn per
chunk inside the scan from one key per call; the parity tests pass them all instead
(`TextClassifier.sample_masks`' layout).

References:
  Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification", 2018.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_ulmfit import parallel
from flax_ulmfit.models.awd_lstm import AWDLSTM, awd_lstm_clas_config, check_tokens, scale_dropouts
from flax_ulmfit.models.dropout import dropout_mask
from flax_ulmfit.models.heads import LinBnDrop

Masks = dict[str, Any]
# torch's default Linear init, uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)): fastai leaves the
# classifier head's linear layers with it.
torch_linear_init = jax.nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def check_padding(tokens: np.ndarray, seq_len: int, pad_idx: int, where: str) -> None:
  """Raises ValueError unless every row is whole `seq_len` chunks of padding, then its text
  (starting on a chunk boundary), then fewer than `seq_len` pads (fastai's `pad_input_chunk`)."""
  real = np.asarray(tokens) != pad_idx
  n_tokens = real.shape[1]
  empty = np.flatnonzero(~real.any(1))
  if empty.size:
    raise ValueError(f'{where}: row {int(empty[0])} is all padding (id {pad_idx}); every row needs '
                     'at least one token')
  first = real.argmax(1)
  trailing = real[:, ::-1].argmax(1)
  bad = np.flatnonzero(first % seq_len)
  if bad.size:
    row = int(bad[0])
    raise ValueError(f'{where}: row {row} starts its text at column {int(first[row])}, not on a '
                     f'multiple of {seq_len=}; pad as ClasLoader/pad_chunk do (whole chunks of '
                     'padding first, the rest after the text)')
  bad = np.flatnonzero(trailing >= seq_len)
  if bad.size:
    row = int(bad[0])
    raise ValueError(f'{where}: row {row} ends with {int(trailing[row])} pads, at least {seq_len=}; '
                     f'the padded length {n_tokens} has a whole chunk of padding after the text')


def masked_concat_pool(outputs: jax.Array, pad: jax.Array) -> jax.Array:
  """fastai's `masked_concat_pool`: (B, L, E) outputs and their (B, L) padding mask ->
  (B, 3E) = [output at the last real token, max over real tokens, mean over real tokens]."""
  real = ~pad
  n_tokens = pad.shape[1]
  last = n_tokens - 1 - jnp.argmax(real[:, ::-1], axis=1)
  last_out = jnp.take_along_axis(outputs, last[:, None, None], axis=1)[:, 0]
  max_pool = jnp.where(pad[..., None], -jnp.inf, outputs).max(1)
  avg_pool = jnp.where(pad[..., None], 0.0, outputs).sum(1) / real.sum(1, keepdims=True).astype(outputs.dtype)
  return jnp.concatenate([last_out, max_pool, avg_pool], axis=1)


class SentenceEncoder(nnx.Module):
  """fastai's `SentenceEncoder`: runs `module` (an `AWDLSTM`) over `seq_len` chunks, carrying
  its state, and returns the outputs of the chunks in the last `max_len` tokens.

  As in fastai, every chunk is a separate forward pass: the state passed on is detached (no
  gradient crosses chunks), training draws fresh dropout masks per chunk, and a row starts
  from a zero state at its first chunk of text (fastai runs only the rows that have started;
  here all rows run and a row's state is zeroed until its text begins, which gives the same
  numbers). A chunk at column i is kept if `L - i <= max_len`; earlier chunks only feed the
  state and run without gradients. Chunks where no row has started are skipped.

  Args:
    seq_len: chunk length (fastai's `bptt`, 72).
    module: the AWD-LSTM encoder.
    pad_idx: padding id.
    max_len: tokens kept for pooling, a multiple of `seq_len` (None keeps all).
    rngs: its `dropout` stream gives each call's key when neither masks nor a key are passed.
  """

  def __init__(self, seq_len: int, module: AWDLSTM, pad_idx: int = 1, max_len: int | None = 1440, *,
               rngs: nnx.Rngs):
    if seq_len < 1:
      raise ValueError(f'SentenceEncoder: seq_len must be >= 1, got {seq_len=}')
    if max_len is not None and (max_len < seq_len or max_len % seq_len):
      raise ValueError(f'SentenceEncoder: max_len must be a positive multiple of {seq_len=} (whole '
                       f'chunks are kept), got {max_len=}')
    self.seq_len, self.module, self.pad_idx, self.max_len = seq_len, module, pad_idx, max_len
    self.deterministic = False
    self.rngs = rngs['dropout'].fork()

  def chunks(self, n_tokens: int) -> tuple[int, int]:
    """(chunks before the kept window, chunks kept) for a padded length `n_tokens`."""
    if n_tokens < 1 or n_tokens % self.seq_len:
      raise ValueError(f'SentenceEncoder: the padded length must be a positive multiple of seq_len='
                       f'{self.seq_len}, got {n_tokens} tokens; pad with ClasLoader/pad_chunk')
    n_chunks = n_tokens // self.seq_len
    kept = n_chunks if self.max_len is None else min(n_chunks, self.max_len // self.seq_len)
    return n_chunks - kept, kept

  def sample_masks(self, key: jax.Array, batch_size: int, n_tokens: int) -> Masks:
    """Every chunk's dropout masks, stacked on a leading chunk axis: `AWDLSTM.sample_masks`'
    dict with `embed` (C, V, 1), `input` (C, B, 1, E), `weight` [(C, 4H, H)], `hidden`
    [(C, B, 1, H)] for C = n_tokens / seq_len chunks. Equals what a call with `key` draws."""
    n_chunks = sum(self.chunks(n_tokens))
    return jax.vmap(lambda k: self.module.sample_masks(k, batch_size))(jax.random.split(key, n_chunks))

  def __call__(self, tokens: jax.Array, masks: Masks | None = None, *,
               key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Encodes (B, L) padded tokens.

    Args:
      tokens: (B, L) int ids, L a multiple of `seq_len`.
      masks: per-chunk dropout masks (`sample_masks`' layout); ignored in eval mode.
      key: draws the masks chunk by chunk (train mode, `masks` None); None takes one from `rngs`.

    Returns:
      `(outputs (B, Lk, E) float32, pad (B, Lk) bool)` over the kept window of Lk tokens;
      outputs are zero where a row's text has not started (as fastai's).
    """
    batch_size, n_tokens = tokens.shape
    n_before, n_kept = self.chunks(n_tokens)
    chunks = jnp.swapaxes(tokens.reshape(batch_size, n_before + n_kept, self.seq_len), 0, 1)  # (C, B, s)
    train = not self.deterministic
    if train and masks is None:
      key = self.rngs() if key is None else key
      per_chunk = jax.random.split(key, n_before + n_kept)
    else:
      per_chunk = masks if train else None
    graphdef, params, rest = nnx.split(self.module, nnx.Param, ...)
    outputs = _read_chunks(graphdef, params, rest, chunks, per_chunk, n_before=n_before, pad_idx=self.pad_idx,
                           draw=train and masks is None)
    return outputs, tokens[:, n_before * self.seq_len:] == self.pad_idx


@functools.partial(jax.jit, static_argnames=('graphdef', 'n_before', 'pad_idx', 'draw'))
def _read_chunks(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, chunks: jax.Array, per_chunk: Any, *,
                 n_before: int, pad_idx: int, draw: bool) -> jax.Array:
  """`SentenceEncoder`'s scan over (C, B, s) chunks of an `AWDLSTM` split into (graphdef, params,
  rest); `per_chunk` holds each chunk's masks, or its key (`draw`), or None (eval). Returns the
  (B, Ck * s, E) outputs of the kept chunks. Jitted so that eager calls reuse the compiled scans."""
  n_chunks, batch_size, seq_len = chunks.shape
  encoder = nnx.merge(graphdef, params, rest)
  emb_sz = encoder.emb_sz

  def step(params, carry, xs):
    state, started = carry
    chunk, extra = xs
    begins = chunk[:, 0] != pad_idx
    state = jax.tree.map(lambda a: jnp.where(started[:, None], a, 0.0), state)  # new rows start at zero
    active = started | begins

    def run(state):
      module = nnx.merge(graphdef, params, rest)
      out, state = module(chunk, state, key=extra) if draw else module(chunk, state, extra)
      return jnp.where(active[:, None, None], out, 0.0), state  # fastai pads unstarted rows with zeros

    def skip(state):
      return jnp.zeros((batch_size, seq_len, emb_sz), jnp.float32), state

    out, state = jax.lax.cond(active.any(), run, skip, state)
    return (jax.lax.stop_gradient(state), active), out

  carry = (encoder.zero_state(batch_size), jnp.zeros((batch_size,), bool))
  xs = (chunks, per_chunk)
  if n_before:
    frozen = jax.lax.stop_gradient(params)  # chunks before the window need no backward
    carry, _ = jax.lax.scan(lambda c, x: (step(frozen, c, x)[0], None), carry,
                            jax.tree.map(lambda a: a[:n_before], xs))
  _, outputs = jax.lax.scan(lambda c, x: step(params, c, x), carry, jax.tree.map(lambda a: a[n_before:], xs))
  return jnp.swapaxes(outputs, 0, 1).reshape(batch_size, (n_chunks - n_before) * seq_len, emb_sz)


class PoolingLinearClassifier(nnx.Module):
  """fastai's `PoolingLinearClassifier`: masked concat pooling, then `LinBnDrop` blocks
  (BatchNorm1d -> dropout -> Linear without bias) with ReLU between them.

  Args:
    dims: feature sizes, `[3 * emb_sz, *lin_ftrs, n_class]`.
    ps: one dropout probability per block.
    dtype: compute dtype of the linear layers (None: float32); logits are float32.
  """

  def __init__(self, dims: Sequence[int], ps: Sequence[float], *, dtype=None, rngs: nnx.Rngs):
    if len(ps) != len(dims) - 1:
      raise ValueError(f'PoolingLinearClassifier: {len(dims) - 1} blocks for dims={list(dims)} need as many '
                       f'dropout values, got ps={list(ps)}')
    self.ps = tuple(ps)
    self.layers = nnx.List([LinBnDrop(n_in, n_out, p=p, kernel_init=torch_linear_init, dtype=dtype, rngs=rngs)
                            for n_in, n_out, p in zip(dims[:-1], dims[1:], ps)])

  def sample_masks(self, key: jax.Array, batch_size: int) -> list[jax.Array]:
    """One (B, n_in) scaled keep-mask per block (ones where p = 0); in a data-parallel step this
    device's rows of the global batch's masks."""
    keys = jax.random.split(key, len(self.layers))

    def draw(rows):
      return [dropout_mask(k, (rows, layer.linear.in_features), p) for k, layer, p in zip(keys, self.layers, self.ps)]
    return parallel.local_rows(draw, batch_size)

  def __call__(self, outputs: jax.Array, pad: jax.Array, masks: Sequence[jax.Array] | None = None) -> jax.Array:
    """(B, L, E) encoder outputs and their (B, L) padding mask -> (B, n_class) float32 logits."""
    x = masked_concat_pool(outputs.astype(jnp.float32), pad)
    masks = [None] * len(self.layers) if masks is None else masks
    for i, (layer, mask) in enumerate(zip(self.layers, masks, strict=True)):
      x = layer(x, mask)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x.astype(jnp.float32)


class TextClassifier(nnx.Module):
  """fastai's `get_text_classifier(AWD_LSTM, vocab_sz, n_class, ...)`: `clf(tokens) -> logits`.

  `clf.encoder` is the `SentenceEncoder` (`clf.encoder.module` the `AWDLSTM`), `clf.head` the
  `PoolingLinearClassifier`; parameters live under `encoder/module/...` and `head/layers/...`.

  Args:
    vocab_sz: vocabulary size V.
    n_class: number of classes.
    config: overrides of `awd_lstm_clas_config` (fastai merges it over that default).
    drop_mult: multiplies every dropout probability of the config (fastai's
      `text_classifier_learner` default, 0.5); the head's `ps` are not scaled.
    seq_len: chunk length (fastai's `bptt`).
    max_len: tokens at the end of each text that are pooled (a multiple of `seq_len`).
    lin_ftrs: hidden sizes of the head (default [50]).
    ps: dropout of each hidden block of the head (default 0.1 each); the first block's is
      the config's `output_p`.
    dtype: compute dtype (None: float32); parameters, state and logits stay float32.
    rngs: `params` for the initialisation, `dropout` for masks drawn on demand.
  """

  def __init__(self, vocab_sz: int, n_class: int, config: dict | None = None, drop_mult: float = 0.5, *,
               seq_len: int = 72, max_len: int | None = 1440, lin_ftrs: Sequence[int] | None = None,
               ps: Sequence[float] | None = None, dtype=None, rngs: nnx.Rngs):
    unknown = set(config or {}) - set(awd_lstm_clas_config)
    if unknown:
      raise ValueError(f'TextClassifier: unknown config keys {sorted(unknown)}; expected keys of '
                       f'awd_lstm_clas_config: {sorted(awd_lstm_clas_config)}')
    if n_class < 1:
      raise ValueError(f'TextClassifier: n_class must be >= 1, got {n_class=}')
    config = scale_dropouts({**awd_lstm_clas_config, **(config or {})}, drop_mult)
    output_p = config.pop('output_p')
    lin_ftrs = [50] if lin_ftrs is None else list(lin_ftrs)
    ps = [0.1] * len(lin_ftrs) if ps is None else list(ps)
    if len(ps) != len(lin_ftrs):
      raise ValueError(f'TextClassifier: ps={ps} must give one dropout per hidden size in lin_ftrs={lin_ftrs}')
    self.n_class = n_class
    module = AWDLSTM(vocab_sz, **config, dtype=dtype, rngs=rngs)
    self.encoder = SentenceEncoder(seq_len, module, config['pad_token'], max_len, rngs=rngs)
    self.head = PoolingLinearClassifier([3 * config['emb_sz'], *lin_ftrs, n_class], [output_p, *ps],
                                        dtype=dtype, rngs=rngs)

  def sample_masks(self, key: jax.Array, batch_size: int, n_tokens: int) -> Masks:
    """Every dropout mask of one call on (batch_size, n_tokens) tokens: `{'encoder':
    SentenceEncoder.sample_masks(...), 'head': [(B, n_in) per block]}`. `clf(tokens,
    clf.sample_masks(key, B, L))` equals `clf(tokens, key=key)`."""
    k_encoder, k_head = jax.random.split(key)
    return {'encoder': self.encoder.sample_masks(k_encoder, batch_size, n_tokens),
            'head': self.head.sample_masks(k_head, batch_size)}

  def check_input(self, tokens) -> None:
    """Raises ValueError unless `tokens` are (B, L) ids of this vocabulary padded as ClasLoader
    pads them. Values are checked on concrete arrays only (not inside `jit`)."""
    module = self.encoder.module
    check_tokens(tokens, module.vocab_sz, 'TextClassifier')
    self.encoder.chunks(tokens.shape[1])
    if not isinstance(tokens, jax.core.Tracer):
      check_padding(np.asarray(tokens), self.encoder.seq_len, self.encoder.pad_idx, 'TextClassifier')

  def __call__(self, tokens: jax.Array, masks: Masks | None = None, *, key: jax.Array | None = None) -> jax.Array:
    """(B, L) padded tokens -> (B, n_class) float32 logits.

    Args:
      tokens: int ids, padded as `ClasLoader` pads them (L a multiple of `seq_len`).
      masks: dropout masks (`sample_masks`' layout; an entry left out is drawn); ignored in eval.
      key: draws the masks (train mode); None takes one from the `dropout` stream.
    """
    return self.classify(tokens, masks, key=key)[0]

  def classify(self, tokens: jax.Array, masks: Masks | None = None, *,
               key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`(logits, outputs)`: the logits and the (B, Lk, E) encoder outputs over the kept window,
    what fastai's classifier returns beside its logits and its AR/TAR regularizer reads."""
    self.check_input(tokens)
    masks = masks or {}
    train = not self.encoder.deterministic
    encoder_masks, head_masks = masks.get('encoder'), masks.get('head')
    if train and key is None and (encoder_masks is None or head_masks is None):
      key = self.encoder.rngs()
    k_encoder, k_head = jax.random.split(key) if key is not None else (None, None)
    if train and head_masks is None:
      head_masks = self.head.sample_masks(k_head, tokens.shape[0])
    outputs, pad = self.encoder(tokens, encoder_masks, key=k_encoder)
    return self.head(outputs, pad, head_masks if train else None), outputs
