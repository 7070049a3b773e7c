"""XResNet structure, initialisation, converters, transfer learning, precision and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref.xresnet as ref
from flax_ulmfit.interop.xresnet import xresnet_to_flax, xresnet_to_torch, xresnet_torch_shapes
from flax_ulmfit.models import xresnet
from flax_ulmfit.models.batchnorm import BatchNorm
from flax_ulmfit.models.conv import avg_pool_ceil, conv2d, max_pool
from flax_ulmfit.models.transfer import create_cnn_model, load_pretrained_body


def _rngs(seed):
  """Rngs on an 'rbg' key: XLA compiles threefry's random.normal in ~4 s per kernel shape here, rbg in ~0.4 s."""
  return nnx.Rngs(jax.random.key(seed, impl='rbg'))


def _tiny(expansion=1, **kwargs):
  """A narrow 4-stage XResNet (one block per stage): every kind of layer, fast to build and run."""
  return xresnet.XResNet(expansion, [1, 1, 1, 1], stem_szs=(8, 8, 64), widen=0.25, conv_impl='xla', **kwargs)


@pytest.fixture(scope='module')
def r18():
  return xresnet.xresnet18(n_out=10, rngs=_rngs(0))


def test_xresnet18_state_dict_names_match_fastai(r18):
  """134 entries with fastai's Sequential names (REFERENCE.md); the torch twin loads them strictly."""
  sd = xresnet_to_torch(r18)
  assert len(sd) == 134
  t = ref.xresnet18(n_out=10)
  assert list(sd) == list(t.state_dict())
  for key in ['0.0.weight', '0.1.num_batches_tracked', '4.1.convpath.1.1.running_var',
              '5.0.idpath.1.0.weight', '7.1.convpath.0.0.weight', '11.weight', '11.bias']:
    assert key in sd
  t.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  assert sd['0.0.weight'].shape == (32, 3, 3, 3) and sd['11.weight'].shape == (10, 512)
  assert sd['0.1.num_batches_tracked'].dtype == np.int64


@pytest.mark.parametrize('name', ['xresnet34', 'xresnet101', 'xresnet152'])
def test_presets_match_torch_twin(name):
  """The deeper presets' state_dicts: fastai's keys in fastai's order, each with the torch twin's
  shape (twin built on 'meta', ours with `nnx.eval_shape`: no weights allocated)."""
  with torch.device('meta'):
    t = getattr(ref, name)()
  abstract = nnx.eval_shape(lambda: getattr(xresnet, name)(rngs=nnx.Rngs(0)))
  assert xresnet_torch_shapes(abstract) == {k: tuple(v.shape) for k, v in t.state_dict().items()}
  assert list(xresnet_torch_shapes(abstract)) == list(t.state_dict())


def test_init_follows_fastai(r18):
  """kaiming_normal_ (untruncated, std sqrt(2/fan_in)), zero biases, zero last BN of each conv path."""
  kernel = np.asarray(r18.body.stages[3][0].convpath[1].kernel[...])  # 3x3x512x512, fan_in 4608
  std = np.sqrt(2 / (3 * 3 * 512))
  assert abs(kernel.std() / std - 1) < 0.01
  assert np.abs(kernel).max() > 3 * std  # a truncated normal (Flax's kaiming_normal) stops at 2 std
  for stage in r18.body.stages:
    for block in stage:
      assert not np.any(block.convpath[-1].bn.scale[...])
      assert np.all(block.convpath[0].bn.scale[...] == 1)
  biases = [v for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(r18, nnx.Param)) if 'bias' in str(p)]
  assert biases and not any(np.any(b) for b in biases)


@pytest.mark.parametrize('model_fn', [
    lambda: _tiny(4, c_in=1, n_out=3, rngs=_rngs(1)),
    lambda: create_cnn_model(_tiny(rngs=_rngs(1)), 4, lin_ftrs=[16, 8], ps=[0.1, 0.0, 0.2],
                             rngs=_rngs(2))])
def test_round_trip_is_lossless(model_fn):
  a, b = model_fn(), model_fn()
  rng = np.random.default_rng(0)
  sd = {k: (v + 3 if v.dtype == np.int64 else rng.standard_normal(v.shape).astype(np.float32))
        for k, v in xresnet_to_torch(a).items()}
  back = xresnet_to_torch(xresnet_to_flax(sd, b))
  assert list(back) == list(sd)
  for key in sd:
    assert back[key].dtype == sd[key].dtype and np.array_equal(back[key], sd[key]), key


def test_converter_errors_name_the_problem(r18):
  sd = xresnet_to_torch(r18)
  missing = {k: v for k, v in sd.items() if k != '11.bias'}
  with pytest.raises(KeyError, match=r"missing keys \['11.bias'\]"):
    xresnet_to_flax(missing, r18)
  with pytest.raises(KeyError, match=r"unexpected keys \['12.weight'\]"):
    xresnet_to_flax({**sd, '12.weight': sd['11.weight']}, r18)
  with pytest.raises(ValueError, match=r"'11.weight'.*\(10, 256\).*\(10, 512\)"):
    xresnet_to_flax({**sd, '11.weight': sd['11.weight'][:, :256]}, r18)
  bad = sd['0.0.weight'].copy()
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r"'0.0.weight'.*NaN"):
    xresnet_to_flax({**sd, '0.0.weight': bad}, r18)
  with pytest.raises(TypeError, match='XResNet or CNNModel'):
    xresnet_to_torch(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_loading_copies_torch_memory():
  """Flax arrays must not alias the torch tensors they came from (torch updates BN stats in place)."""
  t = ref.xresnet18(n_out=10)
  f = xresnet_to_flax(t.state_dict(), xresnet.xresnet18(n_out=10, rngs=_rngs(0)))
  before = np.array(f.body.stem[0].bn.mean[...])
  with torch.no_grad():
    t[0][1].running_mean.add_(1.0)
  assert np.array_equal(np.asarray(f.body.stem[0].bn.mean[...]), before)


@pytest.mark.parametrize('ks,stride,padding', [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0)])
def test_im2col_conv_equals_xla_conv(ks, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 9, 12, 5)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((ks, ks, 5, 7)), jnp.float32)
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(conv2d(x, k, stride, padding, 'im2col'), conv2d(x, k, stride, padding, 'xla'),
                               atol=1e-5)  # fp32 sums of 45 products of unit normals: rounding ~1e-6
  np.testing.assert_array_equal(max_pool(x, 3, 2, 1, 'im2col'), max_pool(x, 3, 2, 1, 'xla'))


def test_pools_match_torch_on_odd_sizes():
  x = np.random.default_rng(0).standard_normal((2, 7, 5, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  want_avg = torch.nn.AvgPool2d(2, ceil_mode=True)(xt).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(avg_pool_ceil(jnp.asarray(x)), want_avg, atol=1e-6)  # 4-term fp32 mean
  want_max = torch.nn.MaxPool2d(3, 2, 1)(xt).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(max_pool(jnp.asarray(x), 3, 2, 1, 'im2col'), want_max)


@pytest.mark.parametrize('ks,stride,padding', [(3, 2, 1), (2, 2, 0), (3, 1, 1), (2, 3, 0), (4, 2, 2)])
def test_max_pool_gradient_goes_to_the_first_maximum_as_torchs(ks, stride, padding):
  """The strided-slice pool's own gradient, per phase of the stride: torch's values and its
  rule at ties (the first maximum in row-major order takes it all), on odd sizes."""
  rng = np.random.default_rng(ks * 100 + stride * 10 + padding)
  x = np.maximum(rng.standard_normal((2, 7, 9, 3)), 0.3).round(0).astype(np.float32)  # ties everywhere
  xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  yt = torch.nn.functional.max_pool2d(xt, ks, stride, padding)
  g = rng.standard_normal(yt.shape).astype(np.float32)
  yt.backward(torch.from_numpy(g))
  y, vjp = jax.vjp(lambda x: max_pool(x, ks, stride, padding, 'im2col'), jnp.asarray(x))
  np.testing.assert_array_equal(y, yt.detach().numpy().transpose(0, 2, 3, 1))
  # up to 4 windows add into one pixel, in another order than torch's: 1 ulp of values ~3
  np.testing.assert_allclose(vjp(jnp.asarray(g.transpose(0, 2, 3, 1)))[0], xt.grad.numpy().transpose(0, 2, 3, 1),
                             rtol=0, atol=1e-6)


def test_conv_impl_is_checked():
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((1, 1, 1, 1)), 1, 0, 'cudnn')


@pytest.mark.parametrize('x,match', [
    (jnp.ones((8, 8, 3)), r'shape \(N, H, W, 3\), got shape \(8, 8, 3\)'),
    (jnp.ones((1, 3, 8, 8)), r'got shape \(1, 3, 8, 8\).*transpose'),
    (jnp.ones((1, 8, 8, 3), jnp.uint8), 'floating-point images, got dtype uint8'),
    ([[1.0]], 'got shape None')])
def test_bad_images_raise(r18, x, match):
  with pytest.raises(ValueError, match=match):
    r18(x)


def test_transfer_model_loads_the_pretrained_body():
  """Freezing it is the optimizer's job: tests/test_train_norms_and_freezing.py."""
  pretrained = _tiny(n_out=10, rngs=_rngs(0))
  cnn = create_cnn_model(_tiny(rngs=_rngs(5)), 3, rngs=_rngs(1))
  load_pretrained_body(cnn, pretrained)
  np.testing.assert_array_equal(cnn.body.stem[0].kernel[...], pretrained.body.stem[0].kernel[...])
  assert cnn(jnp.ones((2, 32, 32, 3))).shape == (2, 3)
  with pytest.raises(ValueError, match='different architecture'):
    load_pretrained_body(cnn, _tiny(c_in=1, rngs=_rngs(0)))


def test_bf16_compute_keeps_params_stats_and_logits_fp32():
  kwargs = dict(n_out=4, stem_szs=(8, 8, 64), conv_impl='xla')  # xla: fewest ops to dispatch eagerly
  f32 = xresnet.XResNet(1, [1, 1], **kwargs, rngs=_rngs(0))
  b16 = xresnet.XResNet(1, [1, 1], **kwargs, dtype=jnp.bfloat16, rngs=_rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)
  out32, out16 = f32(x), b16(x)
  assert out16.dtype == jnp.float32
  assert all(v.dtype in (jnp.float32, jnp.int32) for v in jax.tree.leaves(nnx.state(b16, (nnx.Param, nnx.BatchStat))))
  # bf16 keeps 8 mantissa bits (relative rounding 2**-9) through 8 layers: measured 1.1% of the
  # largest logit; bound 2%.
  np.testing.assert_allclose(out16, out32, rtol=0, atol=0.02 * float(jnp.abs(out32).max()))
  # One training forward moved every BatchNorm's running statistics away from (0, 1) by ~0.01-0.1;
  # bf16 convolutions feed them: measured within 0.4% of each leaf's largest entry, bound 1%.
  bns32, bns16 = ([m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)] for model in (f32, b16))
  assert len(bns32) == len(bns16) == 8
  for bn32, bn16 in zip(bns32, bns16):
    for name, start in (('mean', 0.0), ('var', 1.0)):
      s32, s16 = np.asarray(getattr(bn32, name)[...]), np.asarray(getattr(bn16, name)[...])
      assert np.abs(s32 - start).max() > 1e-3 and s16.dtype == np.float32
      np.testing.assert_allclose(s16, s32, rtol=0, atol=0.01 * np.abs(s32).max())
