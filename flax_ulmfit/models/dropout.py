"""Dropout: AWD-LSTM's mask helper and the three dropout sites that use it, and plain dropout.

Every AWD-LSTM site takes an explicit `mask` (drawn by the caller, e.g. in numpy for a parity
test), or a `key` to draw one from, or, with neither, draws from its `nnx.Rngs` stream.
`.eval()` turns them all off. Masks with one entry per row of the batch are drawn for the
global batch in a data-parallel step (`flax_ulmfit.parallel`): any number of devices draws
what one device draws.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from flax_ulmfit import parallel


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32, 20 rounds (Salmon et al. 2011): key words `k1, k2`, counter words `x1, x2`
  (uint32 arrays) -> two uint32 words per counter; the function of `jax.extend.random.threefry_2x32`.

  Written out in elementwise ops so XLA fuses it into one loop: on CPU, JAX lowers its own
  Threefry as a rolled loop that writes the whole state to memory every round, which made
  weight masks (millions of elements, one per layer per forward) several times slower.
  """
  keys = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
  x1, x2 = x1 + keys[0], x2 + keys[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r))) ^ x1
    x1 = x1 + keys[(i + 1) % 3]
    x2 = x2 + keys[(i + 2) % 3] + jnp.uint32(i + 1)
  return x1, x2


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform uint32 bits of `shape` from `key`: Threefry-2x32 keyed by two words drawn from
  `key`, over counters 0, 1, ..., each counter giving two elements."""
  size = math.prod(shape)
  if size >= 2 ** 33:
    raise ValueError(f'random_bits: at most 2**33 elements, got {shape=}')
  seed = jax.random.bits(key, (2,), jnp.uint32)
  counters = jax.lax.iota(jnp.uint32, (size + 1) // 2)
  first, second = threefry2x32(seed[0], seed[1], counters, jnp.zeros_like(counters))
  return jnp.concatenate([first, second])[:size].reshape(shape)


def dropout_mask(key: jax.Array, shape: tuple[int, ...], p: float, dtype=jnp.float32) -> jax.Array:
  """Bernoulli(1 - p) mask of `shape`, scaled by 1 / (1 - p) (fastai's `dropout_mask`).

  An element is kept when its `random_bits` value is at least round(p * 2**32): P(keep) is
  1 - p to within 2**-33.
  """
  if not 0.0 <= p < 1.0:
    raise ValueError(f'dropout_mask: the drop probability must be in [0, 1), got {p=}')
  if p == 0.0:
    return jnp.ones(shape, dtype)
  keep = random_bits(key, shape) >= jnp.uint32(min(round(p * 2.0 ** 32), 2 ** 32 - 1))
  return keep.astype(dtype) / (1.0 - p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def drop_weight(weight: jax.Array, key: jax.Array, p: float) -> jax.Array:
  """`weight * dropout_mask(key, weight.shape, p)`, whose backward redraws the mask from `key`
  instead of keeping it: a chunked forward pass (the text classifier's) would otherwise hold
  one weight-sized mask per chunk until the backward pass."""
  return weight * dropout_mask(key, weight.shape, p, weight.dtype)


def _drop_weight_fwd(weight, key, p):
  return drop_weight(weight, key, p), key


def _drop_weight_bwd(p, key, cotangent):
  return cotangent * dropout_mask(key, cotangent.shape, p, cotangent.dtype), None


drop_weight.defvjp(_drop_weight_fwd, _drop_weight_bwd)


def _check_mask(mask: jax.Array, shape: tuple[int, ...], site: str) -> None:
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(f'{site}: mask has shape {tuple(mask.shape)}, expected {tuple(shape)}')


class _DropoutSite(nnx.Module):
  """A dropout probability, a train/eval switch and an RNG stream for masks drawn on demand."""

  def __init__(self, p: float, *, rngs: nnx.Rngs | None = None):
    if not 0.0 <= p < 1.0:
      raise ValueError(f'{type(self).__name__}: p must be in [0, 1), got {p=}')
    self.p = p
    self.deterministic = False
    self.rngs = rngs['dropout'].fork() if rngs is not None else nnx.data(None)

  @property
  def active(self) -> bool:
    return not self.deterministic and self.p > 0.0

  def key_or_fresh(self, key: jax.Array | None = None) -> jax.Array:
    """`key`, or a fresh one from the module's own stream."""
    if key is None:
      if self.rngs is None:
        raise ValueError(f'{type(self).__name__}: in train mode it needs a mask, a key, or '
                         'rngs=nnx.Rngs(dropout=...) at construction')
      key = self.rngs()
    return key

  def draw(self, shape: tuple[int, ...], key: jax.Array | None = None) -> jax.Array:
    """A fresh mask of `shape` from `key`, or from the module's own stream."""
    return dropout_mask(self.key_or_fresh(key), shape, self.p)


class RNNDropout(_DropoutSite):
  """Variational (locked) dropout: one (B, 1, F) mask per sequence, shared over time.

  Inside a data-parallel step the mask is this device's rows of the global batch's mask
  (`parallel.local_rows`), so any number of devices draws what one device draws.
  """

  def mask_shape(self, batch_size: int, features: int) -> tuple[int, int, int]:
    return (batch_size, 1, features)

  def draw(self, shape: tuple[int, ...], key: jax.Array | None = None) -> jax.Array:
    """A fresh (B, 1, F) mask from `key`, or from the module's own stream."""
    key = self.key_or_fresh(key)
    return parallel.local_rows(lambda rows: dropout_mask(key, (rows, *shape[1:]), self.p), shape[0])

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, key: jax.Array | None = None) -> jax.Array:
    """Drops features of time-major `x` (T, B, F); `mask` is batch-first (B, 1, F)."""
    if not self.active:
      return x
    shape = self.mask_shape(x.shape[1], x.shape[2])
    mask = self.draw(shape, key) if mask is None else mask
    _check_mask(mask, shape, 'RNNDropout')
    return x * jnp.swapaxes(mask, 0, 1).astype(x.dtype)


class EmbeddingDropout(_DropoutSite):
  """Drops whole rows (words) of an embedding matrix: a (V, 1) mask scaled by 1 / (1 - p)."""

  def __call__(self, weight: jax.Array, mask: jax.Array | None = None, *, key: jax.Array | None = None) -> jax.Array:
    if not self.active:
      return weight
    shape = (weight.shape[0], 1)
    mask = self.draw(shape, key) if mask is None else mask
    _check_mask(mask, shape, 'EmbeddingDropout')
    return weight * mask.astype(weight.dtype)


class WeightDropout(_DropoutSite):
  """DropConnect on a weight matrix: one elementwise mask per forward pass.

  The gradient flows through the mask to the raw weight (the trainable parameter). A mask
  drawn here (from `key` or the module's stream) is redrawn in the backward pass, not kept.
  """

  def __call__(self, weight: jax.Array, mask: jax.Array | None = None, *, key: jax.Array | None = None) -> jax.Array:
    if not self.active:
      return weight
    if mask is None:
      return drop_weight(weight, self.key_or_fresh(key), self.p)
    _check_mask(mask, weight.shape, 'WeightDropout')
    return weight * mask.astype(weight.dtype)


class Dropout(nnx.Dropout):
  """`nnx.Dropout` (a mask per element, from its `dropout` stream) over a batch: inside a
  data-parallel step, this device's rows of what one device computes on the global batch."""

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
    index, count = parallel.shard()
    if count == 1:
      return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
    rows = inputs.shape[0]  # the other devices' rows are zeros here: each row's output is its own
    whole = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((rows * count, *inputs.shape[1:]), inputs.dtype),
                                                inputs, index * rows, 0)
    return jax.lax.dynamic_slice_in_dim(super().__call__(whole, deterministic=deterministic, rngs=rngs),
                                        index * rows, rows, 0)
