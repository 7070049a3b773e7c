"""Losses and penalties: flat cross-entropy for language models, AWD-LSTM's AR/TAR."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy_flat(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy of (..., V) logits against integer (...) targets, computed in fp32.

  fastai's `CrossEntropyLossFlat`: every position counts equally.
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f'cross_entropy_flat: got shape {logits.shape} logits and '
                     f'{targets.shape} targets; expected logits (..., V) for targets (...)')
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return losses.mean()


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
