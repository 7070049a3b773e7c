"""Mixup as pure functions: mix a batch from an RNG key, then lerp the per-sample losses.

Inside a data-parallel step (`flax_ulmfit.parallel`) the weights and the permutation are drawn
for the global batch and a sample's partner may sit on another device: each device keeps its
rows of the `Mix` (whose `perm` indexes the global batch) and takes partners from the gathered
batch, so any number of devices mixes as one device does.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from flax_ulmfit import parallel
from flax_ulmfit.train.losses import reduce_loss


class Mix(NamedTuple):
  """How a batch was mixed: sample i was blended with sample `perm[i]` with weight `lam[i]`."""
  lam: jax.Array   # shape=(B,), dtype=float32, in [0.5, 1]
  perm: jax.Array  # shape=(B,), dtype=int32, rows of the global batch


def sample_mix(key: jax.Array, batch_size: int, alpha: float = 0.4) -> Mix:
  """Draws fastai's mixup weights: lam ~ Beta(alpha, alpha), lam = max(lam, 1 - lam), a permutation."""
  if alpha <= 0:
    raise ValueError(f'sample_mix: alpha must be > 0, got {alpha=}')
  k_lam, k_perm = jax.random.split(key)

  def draw(rows):
    lam = jax.random.beta(k_lam, alpha, alpha, (rows,), jnp.float32)
    return Mix(jnp.maximum(lam, 1.0 - lam), jax.random.permutation(k_perm, rows).astype(jnp.int32))
  return parallel.local_rows(draw, batch_size)


def mix_inputs(x: jax.Array, mix: Mix) -> jax.Array:
  """`lerp(x[perm], x, lam)` per sample (fastai's MixUp.before_batch), in x's dtype."""
  if x.shape[0] != mix.lam.shape[0]:
    raise ValueError(f'mix_inputs: batch of {x.shape[0]} samples but {mix.lam.shape[0]} mixup weights')
  lam = mix.lam.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  shuffled = parallel.gather_batch(x)[mix.perm]
  return shuffled + lam * (x - shuffled)


def mixup_loss(per_sample_loss, preds: jax.Array, targets: jax.Array, mix: Mix,
               reduction: str = 'mean') -> jax.Array:
  """`lerp(L(preds, targets[perm]), L(preds, targets), lam)`, reduced after mixing.

  Args:
    per_sample_loss: `(preds, targets) -> (B,)` unreduced losses (e.g. `cross_entropy` or
      `label_smoothing_cross_entropy` with `reduction='none'`).
    preds: the model's output on the mixed inputs.
    targets: the batch's (unmixed) targets.
    mix: the `Mix` used for the inputs.
    reduction: 'mean', 'sum' or 'none'.
  """
  loss_b = per_sample_loss(preds, parallel.gather_batch(targets)[mix.perm])
  loss_a = per_sample_loss(preds, targets)
  if loss_a.shape != mix.lam.shape:
    raise ValueError(f'mixup_loss: per_sample_loss must return one loss per sample, shape '
                     f'{mix.lam.shape}; got {loss_a.shape} (pass reduction="none")')
  return reduce_loss(loss_b + mix.lam * (loss_a - loss_b), reduction, 'mixup_loss')
