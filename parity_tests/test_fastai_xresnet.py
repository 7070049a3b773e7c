"""XResNet against fastai 2.8 itself (golden/make_fastai_xresnet.py): state_dict layouts of every
preset, xresnet18's initialisation, and xresnet18's eval and training logits and BatchNorm
running statistics on odd-sized 33x47 images (weights from parity_tests/xresnet_weights.py).

Tolerance for outputs: max-abs-diff <= 1e-5 x max(1, largest value), the fp32 forward
bound of the numerical contract, for both conv formulations.
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_ulmfit.interop.xresnet import xresnet_to_flax, xresnet_to_torch, xresnet_torch_shapes
from flax_ulmfit.models import xresnet
from parity_tests.xresnet_weights import state_dict

GOLDEN = np.load(Path(__file__).parent / 'golden' / 'fastai_xresnet.npz', allow_pickle=False)
LAYOUT = json.loads(str(GOLDEN['xresnet18/layout']))
TOL = 1e-5


def _rngs(seed):
  return nnx.Rngs(jax.random.key(seed, impl='rbg'))  # rbg: fast to compile; the weights are replaced


def _close(got, want, what):
  got, want = np.asarray(got), np.asarray(want)
  err = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))
  assert err <= TOL, f'{what}: max-abs-diff / scale = {err:.2e}'


@pytest.mark.parametrize('name', ['xresnet34', 'xresnet50', 'xresnet101', 'xresnet152'])
def test_deeper_presets_have_fastais_state_dict_layout(name):
  abstract = nnx.eval_shape(lambda: getattr(xresnet, name)(rngs=nnx.Rngs(0)))
  expected = {k: tuple(shape) for k, (shape, _) in json.loads(str(GOLDEN[f'{name}/layout'])).items()}
  assert list(xresnet_torch_shapes(abstract).items()) == list(expected.items())


def test_xresnet18_state_dict_and_init_equal_fastais():
  """Keys, order, shapes and dtypes; then what `init_cnn` gives each entry: the constants
  (BatchNorm 1 or 0 for the last of each conv path, zero biases and running means, unit
  running vars) exactly, and kaiming normals with fastai's mean and spread, within 5
  standard errors of two samples of the same distribution."""
  ours = xresnet_to_torch(xresnet.xresnet18(n_out=10, rngs=_rngs(0)))
  assert [(k, list(v.shape), str(v.dtype)) for k, v in ours.items()] == [
      (k, shape, dtype) for k, (shape, dtype) in LAYOUT.items()]
  for key, value in ours.items():
    mean, std, low, high = GOLDEN[f'xresnet18/init/{key}']
    if std == 0:
      assert value.min() == low and value.max() == high, key
      continue
    n, ours_std = value.size, float(value.std())
    assert abs(value.mean() - mean) <= 5 * std * np.sqrt(2 / n), key
    assert abs(ours_std / std - 1) <= 5 / np.sqrt(n), key  # sample stds: relative error 1/sqrt(2n) each


@pytest.fixture(scope='module')
def images():
  return jnp.asarray(GOLDEN['images_nchw'].transpose(0, 2, 3, 1))


@pytest.mark.parametrize('impl', ['im2col', 'xla'])
def test_xresnet18_logits_and_batchnorm_statistics_equal_fastais(impl, images):
  model = xresnet_to_flax(state_dict(LAYOUT), xresnet.xresnet18(n_out=10, conv_impl=impl, rngs=_rngs(0)))
  forward = nnx.jit(lambda m, x: m(x))
  model.eval()
  _close(forward(model, images), GOLDEN['eval_logits'], 'eval logits')
  model.train()
  _close(forward(model, images), GOLDEN['train_logits'], 'training logits')
  after = xresnet_to_torch(model)
  stats = [k for k in GOLDEN.files if k.startswith('after_train/')]
  assert len(stats) == 3 * 22  # 3 stem + 2 x 8 blocks + 3 shortcut convs: mean, var, num_batches_tracked
  for key in stats:
    name = key.removeprefix('after_train/')
    if name.endswith('num_batches_tracked'):
      assert after[name] == GOLDEN[key] == 4, name
    else:
      _close(after[name], GOLDEN[key], name)
