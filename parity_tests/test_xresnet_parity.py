"""XResNet parity: Flax (both conv formulations) vs torch_ref with fastai's layout, same weights and data.

Pins down fastai's ConvLayer/ResBlock/XResNet semantics, torch's symmetric conv padding,
AvgPool2d(2, ceil_mode=True) at odd edges, MaxPool2d(3, 2, 1), BatchNorm (momentum 0.1,
unbiased running_var, num_batches_tracked), create_head and its dropout sites.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref.xresnet as ref
from flax_ulmfit.interop.xresnet import xresnet_to_flax, xresnet_to_torch
from flax_ulmfit.models import xresnet
from flax_ulmfit.models.transfer import create_cnn_model

IMPLS = ['im2col', 'xla']


def _randomise_bn(model: torch.nn.Module, seed: int) -> None:
  """Non-trivial BatchNorm weights and statistics.

  fastai's zero-initialised scales (last BN of each conv path) become small (0-0.2) rather
  than 0.5-1.5: nonzero so the conv path is exercised, small so that a 50-layer net in
  training mode stays well conditioned (with unit scales its fp32 gradients differ from
  its own fp64 gradients by ~5%, which no parity bound could absorb).
  """
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      n = m.num_features
      with torch.no_grad():
        zero_init = not m.weight.any()
        m.weight.copy_(torch.rand(n, generator=g) * 0.2 if zero_init else torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        m.num_batches_tracked.fill_(3)


def _rngs(seed):
  """Rngs on an 'rbg' key: XLA compiles threefry's random.normal in ~4 s per kernel shape here, rbg in ~0.4 s
  (the initial weights are overwritten with the torch model's anyway)."""
  return nnx.Rngs(jax.random.key(seed, impl='rbg'))


def _pair(name, impl, c_in=3, n_out=10, p=0.0):
  torch.manual_seed(0)
  t = getattr(ref, name)(c_in=c_in, n_out=n_out, p=p)
  _randomise_bn(t, 1)
  f = getattr(xresnet, name)(c_in=c_in, n_out=n_out, p=p, conv_impl=impl, rngs=_rngs(0))
  return xresnet_to_flax(t.state_dict(), f), t


def _images(shape, seed=0):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@nnx.jit
def _forward(model, x):
  return model(x)


def _close(got, want, tol, what):
  """max|got - want| / max(1, max|want|) <= tol: absolute below scale 1, relative above."""
  got, want = np.asarray(got), np.asarray(want)
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max()) / scale
  assert err <= tol, f'{what}: max-abs-diff / scale = {err:.2e} > {tol}'
  return err


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('name,shape', [('xresnet18', (2, 64, 64, 3)), ('xresnet50', (2, 33, 47, 1))])
def test_eval_forward(name, shape, impl):
  """Running statistics; 33x47 and c_in=1 exercise padding and the ceil-mode average pool at odd edges."""
  f, t = _pair(name, impl, c_in=shape[-1])
  x, xt = _images(shape)
  f.eval(), t.eval()
  with torch.no_grad():
    want = t(xt).numpy()
  _close(_forward(f, x), want, 1e-5, f'{name} eval logits')


@pytest.mark.parametrize('name,impl', [('xresnet18', 'im2col'), ('xresnet18', 'xla'), ('xresnet50', 'xla')])
def test_train_forward_stats_and_grads(name, impl):
  """Training mode on 2x33x47x1 images, head dropout p=0.5 with a shared mask: logits, the
  running statistics after one update (unbiased var, momentum 0.1, num_batches_tracked) and
  every parameter's gradient. xresnet50 runs only with xla to keep compile time down; the
  im2col ops it adds (1x1 convs) are covered by its eval test."""
  f, t = _pair(name, impl, c_in=1, p=0.5)
  x, xt = _images((2, 33, 47, 1))
  rng = np.random.default_rng(1)
  w = rng.standard_normal((2, 10)).astype(np.float32)
  mask = (rng.random((2, f.linear.in_features)) > 0.5).astype(np.float32) / 0.5
  f.train(), t.train()
  t[-2].mask = torch.from_numpy(mask)
  out_t = t(xt)
  (out_t * torch.from_numpy(w)).sum().backward()

  def loss(model):
    out = model(x, dropout_mask=mask)
    return (out * w).sum(), out

  grads, out_f = nnx.jit(nnx.grad(loss, has_aux=True))(f)
  _close(out_f, out_t.detach().numpy(), 1e-5, 'train-mode logits')
  got_state, want_state = xresnet_to_torch(f), t.state_dict()
  for key, want in want_state.items():
    if 'running' in key or 'num_batches' in key:
      _close(got_state[key], want.numpy(), 1e-5, key)
  nnx.update(f, grads)  # reuse the converter to name the gradients like torch's parameters
  got_grads = xresnet_to_torch(f)
  for key, param in t.named_parameters():
    _close(got_grads[key], param.grad.numpy(), 1e-4, f'grad {key}')


def test_transfer_model():
  """create_cnn_model: concat pool + LinBnDrop head (BN bias 1e-3) on a cut xresnet18 body;
  same logits in eval and in training mode (with shared dropout masks), same statistics.
  Runs the xla formulation only: the body's ops are covered above, this test is about the head."""
  torch.manual_seed(0)
  t = ref.create_cnn_model(ref.xresnet18(), 7)
  _randomise_bn(t, 3)
  f = create_cnn_model(xresnet.xresnet18(conv_impl='xla', rngs=_rngs(0)), 7, rngs=_rngs(1))
  xresnet_to_flax(t.state_dict(), f)
  x, xt = _images((4, 40, 40, 3))
  rng = np.random.default_rng(4)
  masks = [(rng.random((4, n)) > p).astype(np.float32) / (1 - p) for n, p in [(1024, 0.25), (512, 0.5)]]
  t[1][3].mask, t[1][7].mask = (torch.from_numpy(m) for m in masks)
  forward = nnx.jit(lambda m, x: m(x, dropout_masks=masks))
  for train in (False, True):
    f.train() if train else f.eval()
    t.train(train)
    with torch.no_grad():
      want = t(xt).numpy()
    _close(forward(f, x), want, 1e-5, f'transfer logits ({train=})')
    got_state = xresnet_to_torch(f)
    for key, value in t.state_dict().items():
      _close(got_state[key], value.numpy(), 1e-5, key)
