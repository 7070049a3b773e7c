"""Swappable convolution and pooling formulations for NHWC images (torch's padding semantics).

`impl='xla'` uses `lax.conv_general_dilated` / `lax.reduce_window` (right on GPU/TPU);
`impl='im2col'` writes each op as k*k strided slices (plus one matmul for a conv).
`impl='auto'` picks xla on GPU/TPU; on CPU, per layer, xla where the output is at least as
large as the kernel, and im2col where it is smaller (XLA's CPU compiler then swaps image
and kernel and runs a slow generic loop) and for pooling (XLA's max-pool gradient is a slow
select-and-scatter; the strided-slice pool has its own gradient, written per phase of the
stride). On CPU the library's steps compile convolutions outside YNNPACK (`flax_ulmfit.xla_cpu`).
docs/performance-vision.md has the measurements. Padding is symmetric like torch's
`padding=p`, never Flax's 'SAME' (which pads asymmetrically for stride 2).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_IMPLS = ('auto', 'im2col', 'xla')


def resolve_conv_impl(impl: str, out_hw: tuple[int, int] | None = None, ks: int | None = None) -> str:
  """Returns 'im2col' or 'xla' for `impl` in CONV_IMPLS.

  'auto' gives xla off CPU; on CPU, xla for a convolution whose output (`out_hw`) is at
  least its kernel size `ks` (> 1), im2col otherwise and for pooling (`out_hw` None).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl=!r}')
  if impl != 'auto':
    return impl
  if jax.default_backend() != 'cpu':
    return 'xla'
  return 'xla' if out_hw is not None and ks > 1 and min(out_hw) >= ks else 'im2col'


def _window(x: jax.Array, i: int, j: int, stride: int, out_hw: tuple[int, int]) -> jax.Array:
  """The strided (N, Ho, Wo, C) slice of padded `x` that kernel tap (i, j) multiplies."""
  ho, wo = out_hw
  return lax.slice(x, (0, i, j, 0), (x.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, x.shape[3]),
                   (1, stride, stride, 1))


def _windows(x: jax.Array, ks: int, stride: int, out_hw: tuple[int, int]):
  """Yields the ks*ks windows of padded `x`, row-major over the kernel."""
  for i in range(ks):
    for j in range(ks):
      yield _window(x, i, j, stride, out_hw)


def _reaches_input(tap: int, size: int, out: int, stride: int, padding: int) -> bool:
  """Whether kernel offset `tap` reads a real (not padding) row for some output position."""
  return any(0 <= o * stride + tap - padding < size for o in range(out))


def _out_size(size: int, ks: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - ks) // stride + 1


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int, impl: str = 'auto') -> jax.Array:
  """Convolution of (N, H, W, Cin) `x` with a (k, k, Cin, Cout) HWIO `kernel`, torch semantics.

  im2col leaves out the kernel taps that only ever meet padding (on small maps: a 3x3 conv
  on a 1x1 map is its centre tap alone), so they cost neither patches nor FLOPs.
  """
  ks = kernel.shape[0]
  out_hw = (_out_size(x.shape[1], ks, stride, padding), _out_size(x.shape[2], ks, stride, padding))
  if resolve_conv_impl(impl, out_hw, ks) == 'xla':
    return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  taps = [(i, j) for i in range(ks) if _reaches_input(i, x.shape[1], out_hw[0], stride, padding)
          for j in range(ks) if _reaches_input(j, x.shape[2], out_hw[1], stride, padding)]
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  patches = [_window(x, i, j, stride, out_hw) for i, j in taps]
  patches = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
  weights = (kernel.reshape(-1, kernel.shape[-1]) if len(taps) == ks * ks
             else jnp.concatenate([kernel[i, j] for i, j in taps], axis=0))
  return jnp.dot(patches, weights)


def max_pool(x: jax.Array, ks: int, stride: int, padding: int, impl: str = 'auto') -> jax.Array:
  """torch's MaxPool2d(ks, stride, padding) on NHWC `x` (padding never wins the max).

  Off XLA's own pooling, the gradient goes to the first maximum of each window in row-major
  order, as torch's does (XLA's and autodiff's split it between tied maxima).
  """
  if resolve_conv_impl(impl) == 'xla':
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, ks, ks, 1), (1, stride, stride, 1), pads)
  out_hw = (_out_size(x.shape[1], ks, stride, padding), _out_size(x.shape[2], ks, stride, padding))
  # In fp32 whatever x's dtype (the max is exact either way): XLA's CPU backend has no bf16/fp16
  # compare, and converted the chained maxima and their gradient at every step of the chain.
  return _window_max(x.astype(jnp.float32), ks, stride, padding, out_hw).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _window_max(x: jax.Array, ks: int, stride: int, padding: int, out_hw: tuple[int, int]) -> jax.Array:
  """Max-pooling as chained maxima of the ks*ks strided windows; its gradient (`_window_max_bwd`)
  is written per phase of the stride instead of autodiff's ks*ks padded scatters."""
  return _window_max_fwd(x, ks, stride, padding, out_hw)[0]


def _window_max_fwd(x, ks, stride, padding, out_hw):
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
  windows = list(_windows(padded, ks, stride, out_hw))
  out = functools.reduce(jnp.maximum, windows)
  index = jnp.int8 if len(windows) <= 128 else jnp.int32
  first = jnp.full(out.shape, len(windows) - 1, index)  # the first window holding the max
  for tap in range(len(windows) - 2, -1, -1):
    first = jnp.where(windows[tap] == out, index(tap), first)
  return out, (first, x.shape)


def _window_max_bwd(ks, stride, padding, out_hw, residuals, grad):
  """Input row Y (counted in the padded input) = q * stride + r is read by output row q - d
  through kernel row d * stride + r; so each phase (r, r') of the input gathers its kernel taps'
  gradients shifted by (d, d') on the output grid, and the phases interleave into the input."""
  first, (n, h, w, c) = residuals
  rows, cols = -(-(h + padding) // stride), -(-(w + padding) // stride)  # phase grid covering the input

  def phase(r_h: int, r_w: int) -> jax.Array:
    total = jnp.zeros((n, rows, cols, c), grad.dtype)
    for d_h in range(-(-(ks - r_h) // stride)):
      for d_w in range(-(-(ks - r_w) // stride)):
        tap = (d_h * stride + r_h) * ks + d_w * stride + r_w
        shifted = ((0, 0, 0), (d_h, rows - out_hw[0] - d_h, 0), (d_w, cols - out_hw[1] - d_w, 0), (0, 0, 0))
        total = total + lax.pad(jnp.where(first == tap, grad, 0.0), jnp.zeros((), grad.dtype), shifted)
    return total

  phases = jnp.stack([jnp.stack([phase(r_h, r_w) for r_w in range(stride)], axis=3) for r_h in range(stride)], axis=2)
  dx = phases.reshape(n, rows * stride, cols * stride, c)
  return (dx[:, padding:padding + h, padding:padding + w],)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)


def avg_pool_ceil(x: jax.Array) -> jax.Array:
  """torch's AvgPool2d(2, ceil_mode=True) on NHWC `x`.

  At an odd edge the last window hangs over the input; torch divides by the number of
  elements it covers inside the input (1 or 2 instead of 4), so the edge is a plain mean.
  """
  n, h, w, c = x.shape
  hp, wp = h + h % 2, w + w % 2
  summed = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  summed = summed.reshape(n, hp // 2, 2, wp // 2, 2, c).sum(axis=(2, 4))
  counts = np.outer(np.minimum(np.arange(0, hp, 2) + 2, h) - np.arange(0, hp, 2),
                    np.minimum(np.arange(0, wp, 2) + 2, w) - np.arange(0, wp, 2))
  return summed / jnp.asarray(counts, x.dtype)[None, :, :, None]


def adaptive_avg_pool(x: jax.Array) -> jax.Array:
  """AdaptiveAvgPool2d(1) + Flatten: (N, H, W, C) -> (N, C)."""
  return x.mean(axis=(1, 2))


def adaptive_max_pool(x: jax.Array) -> jax.Array:
  """AdaptiveMaxPool2d(1) + Flatten: (N, H, W, C) -> (N, C)."""
  return x.max(axis=(1, 2))
