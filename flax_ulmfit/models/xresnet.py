"""fastai v2's XResNet (bag-of-tricks ResNet: ResNet-B/C/D) as Flax NNX modules, NHWC inputs.

References:
  He et al., "Bag of Tricks for Image Classification with Convolutional Neural Networks", 2019.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flax_ulmfit.models.batchnorm import BatchNorm
from flax_ulmfit.models.dropout import Dropout
from flax_ulmfit.models.conv import adaptive_avg_pool, avg_pool_ceil, conv2d, max_pool

# torch's nn.init.kaiming_normal_ (fan_in, gain sqrt(2), untruncated normal).
kaiming_normal = nnx.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class ConvLayer(nnx.Module):
  """fastai's ConvLayer: conv (no bias, padding (ks-1)//2) -> BatchNorm -> optional act.

  `bn_zero` initialises the BatchNorm scale to zero (fastai's NormType.BatchZero). `dtype`
  is the compute dtype of the convolution (None: fp32); BatchNorm always runs in fp32.
  """

  def __init__(self, ni: int, nf: int, ks: int = 3, stride: int = 1, *, act: Callable | None = jax.nn.relu,
               bn_zero: bool = False, conv_impl: str = 'auto', dtype=None, rngs: nnx.Rngs):
    self.stride, self.padding, self.act = stride, (ks - 1) // 2, act
    self.conv_impl, self.dtype = conv_impl, dtype
    self.kernel = nnx.Param(kaiming_normal(rngs.params(), (ks, ks, ni, nf), jnp.float32))
    self.bn = BatchNorm(nf, scale_init=0.0 if bn_zero else 1.0)

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    if self.dtype is not None:
      x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    x = self.bn(conv2d(x, kernel, self.stride, self.padding, self.conv_impl))
    return x if self.act is None else self.act(x)


class ResBlock(nnx.Module):
  """fastai's ResBlock: act(convpath(x) + idpath(x)).

  convpath: two 3x3 ConvLayers (expansion 1) or 1x1, 3x3 carrying the stride, 1x1
  (expansion 4); its last BatchNorm starts at zero and has no activation. idpath
  (ResNet-D): AvgPool2d(2, ceil_mode=True) when strided, then a 1x1 ConvLayer without
  activation when the channel count changes.
  """

  def __init__(self, expansion: int, ni: int, nf: int, stride: int = 1, *, act: Callable = jax.nn.relu,
               conv_impl: str = 'auto', dtype=None, rngs: nnx.Rngs):
    ni, nf = ni * expansion, nf * expansion
    mid = nf // expansion
    conv = functools.partial(ConvLayer, act=act, conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    if expansion == 1:
      convs = [conv(ni, mid, 3, stride), conv(mid, nf, 3, act=None, bn_zero=True)]
    else:
      convs = [conv(ni, mid, 1), conv(mid, mid, 3, stride), conv(mid, nf, 1, act=None, bn_zero=True)]
    self.convpath = nnx.List(convs)
    self.pool = stride != 1
    self.idconv = conv(ni, nf, 1, act=None) if ni != nf else None
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x
    for layer in self.convpath:
      y = layer(y)
    if self.pool:
      x = avg_pool_ceil(x)
    if self.idconv is not None:
      x = self.idconv(x)
    return self.act(y + x)


class XResNetBody(nnx.Module):
  """XResNet without its head: ResNet-C stem, max-pool 3/2/1, then the residual stages.

  Maps (N, H, W, c_in) images to (N, H', W', nf) features, nf = `self.nf`.
  """

  def __init__(self, expansion: int, layers: Sequence[int], c_in: int = 3, stem_szs=(32, 32, 64),
               widen: float = 1.0, *, act: Callable = jax.nn.relu, conv_impl: str = 'auto', dtype=None,
               rngs: nnx.Rngs):
    self.c_in, self.conv_impl = c_in, conv_impl
    szs = [c_in, *stem_szs]
    self.stem = nnx.List([ConvLayer(szs[i], szs[i + 1], 3, 2 if i == 0 else 1, act=act, conv_impl=conv_impl,
                                    dtype=dtype, rngs=rngs) for i in range(len(stem_szs))])
    widths = [64 // expansion] + [int(w * widen) for w in [64, 128, 256, 512] + [256] * (len(layers) - 4)]
    widths = widths[:len(layers) + 1]  # fastai keeps all five, breaking the head when len(layers) < 4
    self.stages = nnx.List([
        nnx.List([ResBlock(expansion, widths[i] if b == 0 else widths[i + 1], widths[i + 1],
                           (1 if i == 0 else 2) if b == 0 else 1, act=act, conv_impl=conv_impl, dtype=dtype,
                           rngs=rngs) for b in range(n)])
        for i, n in enumerate(layers)])
    self.nf = widths[-1] * expansion

  def __call__(self, x: jax.Array) -> jax.Array:
    check_images(x, self.c_in)
    for layer in self.stem:
      x = layer(x)
    x = max_pool(x, 3, 2, 1, self.conv_impl)
    for stage in self.stages:
      for block in stage:
        x = block(x)
    return x


def check_images(x, c_in: int) -> None:
  """Raises ValueError unless `x` is a float (N, H, W, c_in) array."""
  shape, dtype = getattr(x, 'shape', None), getattr(x, 'dtype', None)
  if shape is None or len(shape) != 4 or shape[-1] != c_in:
    raise ValueError(f'XResNet: expected NHWC images of shape (N, H, W, {c_in}), got shape {shape}; '
                     f'transpose NCHW arrays with x.transpose(0, 2, 3, 1)')
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'XResNet: expected floating-point images, got dtype {dtype}; '
                     f'convert with x.astype(jnp.float32) (and scale uint8 pixels to [0, 1])')


class XResNet(nnx.Module):
  """fastai's XResNet: `body` (XResNetBody) then head avg-pool -> flatten -> dropout(p) -> linear.

  Args:
    expansion: 1 (basic blocks) or 4 (bottlenecks).
    layers: residual blocks per stage, e.g. [2, 2, 2, 2].
    p: dropout before the final linear layer.
    c_in: input channels. n_out: classes.
    stem_szs: widths of the three stem ConvLayers. widen: multiplies the stage widths.
    act: activation. conv_impl: 'auto', 'im2col' or 'xla' (see `conv.py`).
    dtype: compute dtype of convolutions and the linear layer (None: fp32); parameters and
      BatchNorm stay fp32 and the logits are fp32.

  Returns (from `__call__` on (N, H, W, c_in) images): (N, n_out) fp32 logits.
  """

  def __init__(self, expansion: int, layers: Sequence[int], p: float = 0.0, c_in: int = 3, n_out: int = 1000,
               stem_szs=(32, 32, 64), widen: float = 1.0, *, act: Callable = jax.nn.relu, conv_impl: str = 'auto',
               dtype=None, rngs: nnx.Rngs):
    self.body = XResNetBody(expansion, layers, c_in, stem_szs, widen, act=act, conv_impl=conv_impl,
                            dtype=dtype, rngs=rngs)
    self.dropout = Dropout(p, rngs=rngs)
    self.linear = nnx.Linear(self.body.nf, n_out, kernel_init=kaiming_normal, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, dropout_mask: jax.Array | None = None) -> jax.Array:
    """`dropout_mask`: optional (N, nf) keep-mask already scaled by 1/(1-p), used instead of a random one."""
    x = adaptive_avg_pool(self.body(x)).astype(jnp.float32)
    if dropout_mask is not None and not self.dropout.deterministic:
      x = x * dropout_mask
    else:
      x = self.dropout(x)
    return self.linear(x).astype(jnp.float32)


def _preset(expansion: int, layers: list[int], name: str):
  def make(c_in: int = 3, n_out: int = 1000, p: float = 0.0, *, rngs: nnx.Rngs, **kwargs) -> XResNet:
    return XResNet(expansion, layers, p=p, c_in=c_in, n_out=n_out, rngs=rngs, **kwargs)
  make.__name__ = make.__qualname__ = name
  make.__doc__ = f'fastai\'s {name}: XResNet(expansion={expansion}, layers={layers}).'
  return make


xresnet18 = _preset(1, [2, 2, 2, 2], 'xresnet18')
xresnet34 = _preset(1, [3, 4, 6, 3], 'xresnet34')
xresnet50 = _preset(4, [3, 4, 6, 3], 'xresnet50')
xresnet101 = _preset(4, [3, 4, 23, 3], 'xresnet101')
xresnet152 = _preset(4, [3, 8, 36, 3], 'xresnet152')
