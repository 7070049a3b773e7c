"""conv_impl='auto' on CPU: XLA's convolution where its CPU backend runs it fast, im2col elsewhere.

The rule rests on measurements of XLA 0.10.2's CPU backend (docs/performance-vision.md):
convolutions and both their gradients run in a library (YNNPACK by default; XLA's Eigen
convolution under the library's compile options, `flax_ulmfit.xla_cpu`), but when the output
is smaller than the kernel XLA swaps image and kernel into a `convolution` that runs on a
generic loop 10-100x slower; 'auto' must leave no convolution there at all.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_ulmfit.models.conv import conv2d, max_pool, resolve_conv_impl

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason="the 'auto' rule under test is CPU's")


def test_auto_rule():
  assert resolve_conv_impl('auto', (8, 8), 3) == 'xla'
  assert resolve_conv_impl('auto', (3, 5), 3) == 'xla'
  assert resolve_conv_impl('auto', (2, 8), 3) == 'im2col'  # output smaller than the kernel
  assert resolve_conv_impl('auto', (8, 8), 1) == 'im2col'  # a 1x1 conv is one matmul either way
  assert resolve_conv_impl('auto') == 'im2col'              # pooling
  assert resolve_conv_impl('xla', (1, 1), 3) == 'xla'       # explicit choices are kept
  with pytest.raises(ValueError, match='conv_impl must be one of'):
    resolve_conv_impl('winograd')


def _convolutions(fn, *args) -> list[str]:
  """Output shapes of the convolutions in the optimized HLO of `fn(*args)`, fused or not."""
  return re.findall(r'= (\S+) convolution\(', jax.jit(fn).lower(*args).compile().as_text())


@pytest.mark.parametrize('size,stride', [(1, 1), (2, 2), (2, 1), (4, 2), (9, 1), (9, 2)])
def test_auto_and_im2col_match_xla_and_keep_small_outputs_off_its_convolution(size, stride):
  """Also covers im2col's dropped taps: on a 1x1 map only the centre tap meets real pixels,
  on 2x2 -> 1x1 (stride 2) four of the nine."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, size, size, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 16, 8)) * 0.1, jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, (size - 1) // stride + 1, (size - 1) // stride + 1, 8)), jnp.float32)
  grads = {impl: jax.grad(lambda x, k, impl=impl: (conv2d(x, k, stride, 1, impl) * w).sum(), argnums=(0, 1))
           for impl in ('auto', 'im2col', 'xla')}
  with jax.default_matmul_precision('highest'):
    want = grads['xla'](x, k)
    for impl in ('auto', 'im2col'):
      for got, expected in zip(grads[impl](x, k), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # fp32 sums of 144 products
  if w.shape[1] < 3:
    assert _convolutions(grads['auto'], x, k) == []
  assert _convolutions(jax.grad(lambda x: max_pool(x, 3, 2, 1).sum()), x) == []
