"""BatchNorm with torch's semantics over the last (channel) axis, statistics in fp32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_ulmfit import parallel


class BatchNorm(nnx.Module):
  """torch's BatchNorm1d/2d on channels-last inputs (N, C) or (N, H, W, C).

  Matches torch exactly: the running mean/var move by `momentum` (torch's 0.1, Flax's 0.9)
  towards the batch statistics, the running var with the unbiased (n / (n - 1)) batch
  variance while normalisation uses the biased one; `num_batches_tracked` counts updates.
  Statistics and normalisation run in fp32; the output keeps the input's dtype. Inside a
  data-parallel step the statistics are the global batch's (synchronised over the devices,
  `parallel.batch_mean`), as one device computes them.
  """
  is_norm_layer = True  # the marker `train.optim.is_norm_layer` reads (fastai's norm_types)

  def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
               scale_init: float = 1.0, use_running_average: bool = False, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init; accepted for a uniform constructor signature
    self.momentum, self.epsilon = momentum, epsilon
    self.use_running_average = use_running_average
    self.scale = nnx.Param(jnp.full((num_features,), scale_init, jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      n = y.size // y.shape[-1] * parallel.shard()[1]
      mean = parallel.batch_mean(y.mean(axes))
      var = parallel.batch_mean(jnp.square(y - mean).mean(axes))
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
      self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    y = (y - mean) * (jax.lax.rsqrt(var + self.epsilon) * self.scale[...]) + self.bias[...]
    return y.astype(x.dtype)
