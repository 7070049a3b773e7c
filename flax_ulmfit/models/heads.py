"""Transfer-learning heads: fastai's AdaptiveConcatPool2d and create_head, Flax NNX."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flax_ulmfit.models.batchnorm import BatchNorm
from flax_ulmfit.models.dropout import Dropout
from flax_ulmfit.models.conv import adaptive_avg_pool, adaptive_max_pool
from flax_ulmfit.models.xresnet import kaiming_normal


def adaptive_concat_pool(x: jax.Array) -> jax.Array:
  """fastai's AdaptiveConcatPool2d + Flatten: (N, H, W, C) -> (N, 2C), max features then mean."""
  return jnp.concatenate([adaptive_max_pool(x), adaptive_avg_pool(x)], axis=-1)


class LinBnDrop(nnx.Module):
  """fastai's LinBnDrop: [BatchNorm1d (weight 1, bias 1e-3)] -> [Dropout(p)] -> Linear(bias=not bn).

  `kernel_init` defaults to fastai's `create_head` init (kaiming normal); the text classifier
  keeps torch's default Linear init.
  """

  def __init__(self, n_in: int, n_out: int, bn: bool = True, p: float = 0.0, *, kernel_init=kaiming_normal,
               dtype=None, rngs: nnx.Rngs):
    self.bn = BatchNorm(n_in) if bn else None
    if self.bn is not None:
      self.bn.bias[...] = jnp.full((n_in,), 1e-3, jnp.float32)
    self.dropout = Dropout(p, rngs=rngs)
    self.linear = nnx.Linear(n_in, n_out, use_bias=not bn, kernel_init=kernel_init, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, dropout_mask: jax.Array | None = None) -> jax.Array:
    if self.bn is not None:
      x = self.bn(x)
    x = x * dropout_mask if dropout_mask is not None and not self.dropout.deterministic else self.dropout(x)
    return self.linear(x)


class Head(nnx.Module):
  """fastai's create_head: pool (concat or average), flatten, LinBnDrop blocks with ReLU between.

  Args:
    nf: channels of the body's output (doubled internally by concat pooling).
    n_out: classes.
    lin_ftrs: hidden sizes (default [512]).
    ps: dropout of the last block, or one per block; a single value p gives p/2 to the
      earlier blocks (fastai's rule).
    concat_pool: AdaptiveConcatPool2d (True) or average pooling.
    first_bn: BatchNorm in the first block.
    dtype: compute dtype of the linear layers (None: fp32); the logits are fp32.
  """

  def __init__(self, nf: int, n_out: int, lin_ftrs: Sequence[int] | None = None, ps: float | Sequence[float] = 0.5,
               concat_pool: bool = True, first_bn: bool = True, *, dtype=None, rngs: nnx.Rngs):
    ftrs = [nf * 2 if concat_pool else nf, *(lin_ftrs if lin_ftrs is not None else [512]), n_out]
    ps = list(ps) if isinstance(ps, Sequence) else [ps]
    if len(ps) == 1:
      ps = [ps[0] / 2] * (len(ftrs) - 2) + ps
    if len(ps) != len(ftrs) - 1:
      raise ValueError(f'create_head: got {len(ps)} dropout values ps={ps} for {len(ftrs) - 1} blocks; '
                       f'pass one value or one per block')
    self.concat_pool = concat_pool
    self.blocks = nnx.List([LinBnDrop(ni, no, first_bn or i > 0, p, dtype=dtype, rngs=rngs)
                            for i, (ni, no, p) in enumerate(zip(ftrs[:-1], ftrs[1:], ps))])

  def __call__(self, x: jax.Array, *, dropout_masks: Sequence[jax.Array | None] | None = None) -> jax.Array:
    """(N, H, W, nf) features -> (N, n_out) fp32 logits; `dropout_masks`: one optional scaled keep-mask per block."""
    x = (adaptive_concat_pool(x) if self.concat_pool else adaptive_avg_pool(x)).astype(jnp.float32)
    masks = dropout_masks if dropout_masks is not None else [None] * len(self.blocks)
    for i, (block, mask) in enumerate(zip(self.blocks, masks, strict=True)):
      x = block(x, mask)
      if i < len(self.blocks) - 1:
        x = jax.nn.relu(x)
    return x.astype(jnp.float32)


def create_head(nf: int, n_out: int, lin_ftrs: Sequence[int] | None = None, ps: float | Sequence[float] = 0.5,
                concat_pool: bool = True, first_bn: bool = True, *, dtype=None, rngs: nnx.Rngs) -> Head:
  """fastai's `create_head` (see `Head`)."""
  return Head(nf, n_out, lin_ftrs, ps, concat_pool, first_bn, dtype=dtype, rngs=rngs)
