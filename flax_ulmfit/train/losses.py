"""Losses and penalties: flat cross-entropy (also fused with the decoder's matmul), label smoothing,
accuracy, AWD-LSTM's AR/TAR."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from flax_ulmfit import parallel

REDUCTIONS = ('none', 'mean', 'sum')


def _check_logits(fn: str, logits: jax.Array, targets: jax.Array) -> None:
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f'{fn}: got shape {logits.shape} logits and {targets.shape} targets; '
                     'expected logits (..., C) for integer targets (...)')
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f'{fn}: targets must be integer class indices, got dtype {targets.dtype}')


def reduce_loss(losses: jax.Array, reduction: str, fn: str = 'reduce_loss') -> jax.Array:
  """Reduces per-sample losses by 'none', 'mean' or 'sum' (fastai's `reduce_loss`); `fn` names the caller in errors."""
  if reduction not in REDUCTIONS:
    raise ValueError(f'{fn}: reduction must be one of {REDUCTIONS}, got {reduction=}')
  if reduction == 'none':
    return losses
  return losses.mean() if reduction == 'mean' else losses.sum()


def cross_entropy(logits: jax.Array, targets: jax.Array, reduction: str = 'mean') -> jax.Array:
  """Cross-entropy of (..., C) logits against integer (...) targets, computed in fp32.

  With `reduction='mean'` this is fastai's `CrossEntropyLossFlat`: every position counts
  equally; `'none'` gives the per-position losses (what mixup needs).
  """
  _check_logits('cross_entropy', logits, targets)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return reduce_loss(losses, reduction, 'cross_entropy')


def cross_entropy_flat(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy of (..., V) logits against integer (...) targets (language models)."""
  return cross_entropy(logits, targets, 'mean')


def linear_cross_entropy(features: jax.Array, weight: jax.Array, bias: jax.Array | None,
                         targets: jax.Array, chunk_rows: int = 256) -> jax.Array:
  """Mean cross-entropy of the logits `features @ weight.T + bias` against `targets`, in chunks.

  The value of `cross_entropy_flat(features @ weight.T + bias, targets)` (fastai's
  `LinearDecoder` then `CrossEntropyLossFlat`), without ever holding the (N, V) logits: rows
  go through `chunk_rows` at a time, and when differentiated the forward pass forms the
  gradients chunk by chunk (a custom VJP), so the backward pass only scales them. On a 2-core
  CPU this took 65 ms off a 570 ms AWD-LSTM step (V = 10k, 2304 rows).

  The matmuls run in `weight.dtype` with fp32 accumulation; softmax, sums and gradients are
  fp32. What meets the compute dtype in the backward matmuls is `softmax - onehot` (in [-1, 1]);
  the 1/N of the mean and any loss scale are applied afterwards in fp32, so fp16 gradients
  do not underflow on the way.

  Args:
    features: (..., E) decoder inputs.
    weight: (V, E) output weight (a tied embedding matrix), in the dtype the matmuls use.
    bias: (V,) or None.
    targets: (...) integer ids in [0, V).
    chunk_rows: rows of logits formed at once.
  """
  if features.shape[:-1] != targets.shape or weight.ndim != 2 or weight.shape[1] != features.shape[-1]:
    raise ValueError(f'linear_cross_entropy: got features {features.shape}, weight {weight.shape} and '
                     f'targets {targets.shape}; expected features (..., E), weight (V, E), targets (...)')
  if bias is not None and bias.shape != weight.shape[:1]:
    raise ValueError(f'linear_cross_entropy: bias has shape {bias.shape}, expected ({weight.shape[0]},)')
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f'linear_cross_entropy: targets must be integer ids, got dtype {targets.dtype}')
  if targets.size == 0 or chunk_rows < 1:
    raise ValueError(f'linear_cross_entropy: needs at least one row and chunk_rows >= 1, got '
                     f'{targets.size} rows and {chunk_rows=}')
  return _linear_cross_entropy(features.reshape(-1, features.shape[-1]), weight, bias,
                               targets.reshape(-1), min(chunk_rows, targets.size))


def _chunked_cross_entropy(features, weight, bias, targets, chunk_rows, with_grads):
  """Sum over rows of the cross-entropy and, `with_grads`, the unnormalised gradients (fp32)."""
  n, n_classes = features.shape[0], weight.shape[0]
  n_chunks = -(-n // chunk_rows)
  pad = n_chunks * chunk_rows - n
  chunks = (jnp.pad(features, ((0, pad), (0, 0))).reshape(n_chunks, chunk_rows, -1),
            jnp.pad(targets, (0, pad)).reshape(n_chunks, chunk_rows),
            (jnp.arange(n_chunks * chunk_rows) < n).reshape(n_chunks, chunk_rows))

  def one_chunk(carry, chunk):
    x, y, valid = chunk
    x = x.astype(weight.dtype)
    logits = jnp.dot(x, weight.T, preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    total = carry[0] + jnp.sum(jnp.where(valid, lse - picked, 0.0))
    if not with_grads:
      return (total,), None
    d_logits = jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(y, n_classes, dtype=jnp.float32)
    d_logits = jnp.where(valid[:, None], d_logits, 0.0)
    d_weight = carry[1] + jnp.dot(d_logits.astype(weight.dtype).T, x, preferred_element_type=jnp.float32)
    d_bias = carry[2] + d_logits.sum(0)
    return (total, d_weight, d_bias), jnp.dot(d_logits.astype(weight.dtype), weight,
                                              preferred_element_type=jnp.float32)

  init = (jnp.zeros([], jnp.float32),)
  if with_grads:
    init += (jnp.zeros(weight.shape, jnp.float32), jnp.zeros(weight.shape[:1], jnp.float32))
  carry, d_features = jax.lax.scan(one_chunk, init, chunks)
  if not with_grads:
    return carry[0], None
  return carry[0], (d_features.reshape(n_chunks * chunk_rows, -1)[:n], carry[1], carry[2])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _linear_cross_entropy(features, weight, bias, targets, chunk_rows):
  total, _ = _chunked_cross_entropy(features, weight, bias, targets, chunk_rows, with_grads=False)
  return total / features.shape[0]


def _linear_cross_entropy_fwd(features, weight, bias, targets, chunk_rows):
  total, grads = _chunked_cross_entropy(features, weight, bias, targets, chunk_rows, with_grads=True)
  return total / features.shape[0], (grads, features, weight, bias)


def _linear_cross_entropy_bwd(chunk_rows, residuals, cotangent):
  (d_features, d_weight, d_bias), features, weight, bias = residuals
  scale = cotangent / features.shape[0]
  return ((d_features * scale).astype(features.dtype), (d_weight * scale).astype(weight.dtype),
          None if bias is None else (d_bias * scale).astype(bias.dtype), None)


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def label_smoothing_cross_entropy(logits: jax.Array, targets: jax.Array, eps: float = 0.1,
                                  reduction: str = 'mean') -> jax.Array:
  """fastai's `LabelSmoothingCrossEntropy`: `eps / c * sum_j(-log p_j) + (1 - eps) * nll`.

  Computed in fp32 over the last axis of `logits` (c classes).

  References:
    Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", 2016.
  """
  _check_logits('label_smoothing_cross_entropy', logits, targets)
  if not 0.0 <= eps < 1.0:
    raise ValueError(f'label_smoothing_cross_entropy: eps must be in [0, 1), got {eps=}')
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  smooth = -log_p.sum(axis=-1) * (eps / logits.shape[-1])
  nll = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
  return reduce_loss(smooth + (1.0 - eps) * nll, reduction, 'label_smoothing_cross_entropy')


def accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Fraction of positions whose arg-max over the last axis of `logits` equals `targets`."""
  _check_logits('accuracy', logits, targets)
  return jnp.mean(jnp.argmax(logits, axis=-1) == targets)


def kept_mean(values: jax.Array, keep: jax.Array) -> jax.Array:
  """The mean of per-row `values` over the rows where `keep` (padding rows skipped), as a
  data-parallel step's per-device term (`parallel.shard_mean`: averaged over the devices, it is
  the global batch's mean); the plain masked mean outside such a step."""
  return parallel.shard_mean(jnp.where(keep, values, 0).sum(), keep.sum())


def ar_tar(raw: jax.Array, dropped: jax.Array, alpha: float = 2.0, beta: float = 1.0) -> jax.Array:
  """AWD-LSTM activation regularisation (AR) plus temporal activation regularisation (TAR).

  fastai's `RNNRegularizer` (TextLearner defaults alpha=2, beta=1), for training only:
  `alpha * mean(dropped ** 2) + beta * mean((raw[:, 1:] - raw[:, :-1]) ** 2)`. As in fastai,
  TAR is left out for a batch of one row (its guard `len(h) > 1` is on the batch axis); it is
  also left out for one time step, where fastai's mean over nothing would be NaN.

  Args:
    raw: (B, T, E) last-layer LSTM output before output dropout.
    dropped: (B, T, E) the same after output dropout.
    alpha: AR weight.
    beta: TAR weight.

  References:
    Merity, Keskar & Socher, "Regularizing and Optimizing LSTM Language Models", 2017.
  """
  raw = raw.astype(jnp.float32)
  ar = jnp.mean(jnp.square(dropped.astype(jnp.float32)))
  tar = jnp.mean(jnp.square(raw[:, 1:] - raw[:, :-1])) if raw.shape[0] > 1 and raw.shape[1] > 1 else 0.0
  return alpha * ar + beta * tar
