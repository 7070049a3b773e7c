"""The CPU compile options of the library's steps: convolutions outside YNNPACK, dots in it.

jaxlib 0.10.2 runs a YNNPACK convolution on one thread; XLA's own uses every core
(docs/performance-vision.md). These tests pin what the option does to compiled programs, so
an XLA upgrade that renames the fusion types or changes the defaults shows here.
"""
import re

import jax
import jax.numpy as jnp
import pytest
from flax_ulmfit import xla_cpu
from flax_ulmfit.models.conv import conv2d

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='CPU compile options')


def _ynn_fusion_ops(fn, *args, options) -> list[set[str]]:
  """For each YNNPACK fusion in the optimized HLO of `fn(*args)`: the ops it holds."""
  text = jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()
  fusions = []
  for line in text.splitlines():
    if '__ynn_fusion' in line:
      called = re.search(r'calls=(%?[\w.\-]+)', line).group(1)
      body = re.search(r'\n' + re.escape(called) + r' [^\n]*\{\n(.*?)\n\}', text, re.S).group(1)
      fusions.append(set(re.findall(r'= \S+ ([a-z\-]+)\(', body)))
  return fusions


def _conv_and_dot(x, k, w):
  y = conv2d(x, k, 1, 1, 'xla')
  return (y.reshape(y.shape[0], -1) @ w).sum()


def test_steps_compile_convolutions_outside_ynnpack_and_keep_its_dots():
  # XLA leaves smaller convolutions (4x8x8x16) to its own code even by default
  args = jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32)), jnp.ones((16 * 16 * 32, 32))
  grad = jax.grad(_conv_and_dot, argnums=(0, 1, 2))
  default = _ynn_fusion_ops(grad, *args, options=None)
  assert any('convolution' in ops for ops in default), 'jaxlib no longer hands convolutions to YNNPACK'
  ours = _ynn_fusion_ops(grad, *args, options=xla_cpu.compiler_options())
  assert not any('convolution' in ops for ops in ours)
  assert sum('dot' in ops for ops in ours) == sum('dot' in ops for ops in default) > 0


def test_programs_without_convolutions_compile_as_by_default():
  """The text models' steps: the same YNNPACK fusions (dots, reductions) with or without the option."""
  def lstm_like(w, h):
    return jnp.tanh(h @ w).sum(0).max() + (h * h).sum()

  args = jnp.ones((64, 64)), jnp.ones((8, 64))
  grad = jax.grad(lstm_like, argnums=(0, 1))
  assert _ynn_fusion_ops(grad, *args, options=xla_cpu.compiler_options()) == _ynn_fusion_ops(grad, *args, options=None)


def test_a_user_choice_in_xla_flags_wins(monkeypatch):
  assert xla_cpu.compiler_options() == {xla_cpu.YNN_FUSION_TYPE: xla_cpu.YNN_WITHOUT_CONVOLUTIONS}
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot')
  assert xla_cpu.compiler_options() == {}


def test_an_xla_that_does_not_know_the_option_compiles_with_its_defaults():
  assert xla_cpu.accepted(xla_cpu.YNN_FUSION_TYPE, xla_cpu.YNN_WITHOUT_CONVOLUTIONS)
  assert not xla_cpu.accepted(xla_cpu.YNN_FUSION_TYPE, 'LIBRARY_FUSION_TYPE_RENAMED')
  assert not xla_cpu.accepted('xla_cpu_option_of_another_version', 'true')
