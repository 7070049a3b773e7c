"""Losses and penalties: flat cross-entropy, label smoothing, accuracy, AWD-LSTM's AR/TAR."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

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


def ar_tar(raw: jax.Array, dropped: jax.Array, alpha: float = 2.0, beta: float = 1.0) -> jax.Array:
  """AWD-LSTM activation regularisation (AR) plus temporal activation regularisation (TAR).

  fastai's `RNNRegularizer` (TextLearner defaults alpha=2, beta=1), for training only:
  `alpha * mean(dropped ** 2) + beta * mean((raw[:, 1:] - raw[:, :-1]) ** 2)`.

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
  tar = jnp.mean(jnp.square(raw[:, 1:] - raw[:, :-1])) if raw.shape[1] > 1 else 0.0
  return alpha * ar + beta * tar
