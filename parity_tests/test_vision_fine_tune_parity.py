"""The vision recipe vs torch_ref: `VisionLearner.fit_one_cycle` and `fine_tune` against fastai's done by hand.

`fit_one_cycle` (the script's plain recipe), 5 steps on a small XResNet with head dropout:
each step's mixup-around-label-smoothing loss, the final weights and BatchNorm statistics,
the evaluation. `fine_tune`, on a small transfer model (XResNet body + concat-pool head with dropout):
mixup (given lambdas and permutations) around label smoothing, the unreduced losses lerped
then averaged; `_xresnet_split`'s three groups; stage 1 frozen except BatchNorm (which
trains at its group's rate `slice(base_lr)` -> base_lr/10) with one-cycle at pct_start 0.99;
stage 2 at half the rate, unfrozen, `slice(base_lr/200, base_lr/2)`, pct_start 0.3, div 5,
with a fresh optimizer state (fastai's `freeze_to` clears it); fastai's Adam with
`wd_bn_bias=False`; BatchNorm statistics moving in both stages; evaluation with label
smoothing and accuracy. Same weights, batches, mixup draws and dropout masks in both.
Tolerance: fp32, 2 x 3 Adam steps; weights within 2e-5 of scale (Adam divides each gradient
by its running RMS, so gradient rounding of ~1e-7 moves a parameter by up to ~lr x 1e-3).
"""
import functools

import jax
import numpy as np
import torch
from flax import nnx

import torch_ref.losses as tl
import torch_ref.schedules as ts
import torch_ref.xresnet as ref
from flax_ulmfit.interop.xresnet import xresnet_to_flax, xresnet_to_torch
from flax_ulmfit.models import xresnet
from flax_ulmfit.models.transfer import create_cnn_model
from flax_ulmfit.train.mixup import Mix
from flax_ulmfit.vision.learner import VisionLearner
from torch_ref.mixup import mix_inputs, mixup_loss
from torch_ref.optim import Adam

BS, SIZE, STEPS, N_OUT, BASE_LR, ALPHA = 8, 12, 3, 3, 1e-2, 0.4
BODY = dict(expansion=1, layers=[1, 1], c_in=1, stem_szs=(8, 8, 64), widen=0.25)
HEAD = dict(lin_ftrs=[16], ps=[0.25, 0.5])


class Given:
  """A loader stand-in yielding fixed batches, with their mixup draws and dropout masks, each epoch."""

  def __init__(self, batches):
    self.items, self.bs = batches, BS

  def __len__(self):
    return len(self.items)

  def batches(self, epoch):
    return iter(self.items)


def _randomise_bn(t):
  """Non-trivial BatchNorm: zero-initialised scales would block the residual branches."""
  g = torch.Generator().manual_seed(1)
  for m in t.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      with torch.no_grad():
        m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _models():
  torch.manual_seed(0)
  t_body = ref.XResNet(BODY['expansion'], BODY['layers'], c_in=1, stem_szs=BODY['stem_szs'], widen=BODY['widen'])
  t = ref.create_cnn_model(t_body, N_OUT, **HEAD)
  _randomise_bn(t)
  rngs = nnx.Rngs(jax.random.key(0, impl='rbg'))
  f = create_cnn_model(xresnet.XResNet(**BODY, n_out=10, rngs=rngs), N_OUT, rngs=rngs, **HEAD)
  return xresnet_to_flax(t.state_dict(), f), t


def _data(rng):
  """STEPS training batches with their mixup draws and dropout masks, and one validation batch."""
  train = []
  for _ in range(STEPS):
    lam = rng.beta(ALPHA, ALPHA, BS).astype(np.float32)
    masks = [(rng.random((BS, n)) > p).astype(np.float32) / (1 - p) for n, p in [(64, 0.25), (16, 0.5)]]
    train.append((rng.standard_normal((BS, SIZE, SIZE, 1)).astype(np.float32), rng.integers(0, N_OUT, BS).astype(np.int32),
                  Mix(np.maximum(lam, 1 - lam), rng.permutation(BS).astype(np.int32)), {'dropout_masks': masks}))
  valid = (rng.standard_normal((BS, SIZE, SIZE, 1)).astype(np.float32), rng.integers(0, N_OUT, BS).astype(np.int32))
  return train, valid


def _transfer_groups(t):
  """fastai's `_xresnet_split` of a transfer model: stem, rest of the body, head."""
  return [list(t[0][:3].parameters()), list(t[0][3:].parameters()), list(t[1].parameters())]


def _torch_stage(t, batches, frozen, lrs, pct_start, div, groups=_transfer_groups):
  """One fastai `fit_one_cycle` over `batches` after `freeze`/`unfreeze` (a fresh Adam: fastai
  clears the state); returns each step's loss."""
  bns = [p for m in t.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
  biases = [m.bias for m in t.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
  opt = Adam(groups(t), lrs, wd=0.01, no_wd=bns + biases, train_bn=bns)
  opt.freeze_to(2 if frozen else 0)
  lr_scheds = [ts.one_cycle(len(batches), lr, div, 1e5, pct_start) for lr in lrs]
  mom = ts.one_cycle_moms(len(batches), pct_start=pct_start)
  dropouts = [m for m in t.modules() if isinstance(m, ref.Dropout)]
  losses = []
  t.train()
  for i, (x, y, mix, kwargs) in enumerate(batches):
    opt.set_hyper('lr', [s(i) for s in lr_scheds])
    opt.set_hyper('mom', mom(i))
    for module, mask in zip(dropouts, kwargs['dropout_masks'] if 'dropout_masks' in kwargs else [kwargs['dropout_mask']]):
      module.mask = torch.from_numpy(mask)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    lam, perm = torch.from_numpy(mix.lam), torch.from_numpy(mix.perm).long()
    out = t(mix_inputs(xt, lam, perm))
    loss = mixup_loss(functools.partial(tl.label_smoothing_cross_entropy, reduction='none'), out,
                      torch.from_numpy(y).long(), lam, perm)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
  return losses


def _close(got, want, tol, what):
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(np.asarray(got, np.float64) - want).max()) / scale
  assert err <= tol, f'{what}: max-abs-diff / scale = {err:.2e} > {tol}'


def _assert_same_end(f, t, history, valid):
  """Weights and BatchNorm statistics within 2e-5 of scale; the evaluation's loss and accuracy."""
  got = xresnet_to_torch(f)
  for key, value in t.state_dict().items():
    _close(got[key], value.numpy(), 2e-5, key)
  t.eval()
  with torch.no_grad():
    out = t(torch.from_numpy(valid[0].transpose(0, 3, 1, 2).copy()))
  y = torch.from_numpy(valid[1]).long()
  np.testing.assert_allclose(history[-1]['valid_loss'], tl.label_smoothing_cross_entropy(out, y).item(), rtol=1e-5)
  assert history[-1]['valid_accuracy'] == tl.accuracy(out, y).item()


def test_fine_tune_matches_fastai_recipe_by_hand():
  f, t = _models()
  train, valid = _data(np.random.default_rng(0))
  learn = VisionLearner(f, Given(train), Given([valid]), progress=False)
  history = learn.fine_tune(1, BASE_LR)

  want_losses = [np.mean(_torch_stage(t, train, True, [BASE_LR / 10, BASE_LR / 10, BASE_LR], 0.99, 25.0))]
  half = BASE_LR / 2
  want_losses.append(np.mean(_torch_stage(t, train, False, [half / 100, half / 10, half], 0.3, 5.0)))
  for record, want in zip(history, want_losses):
    np.testing.assert_allclose(record['train_loss'], want, rtol=1e-5)
  _assert_same_end(f, t, history, valid)


class OnePerEpoch(Given):
  """Batch `e` as epoch `e`: `fit` then records every step's loss as an epoch's train_loss."""

  def __len__(self):
    return 1

  def batches(self, epoch):
    return iter([self.items[epoch]])


def test_fit_one_cycle_five_steps_match_fastai_recipe_by_hand():
  """The script's recipe (one-cycle at 1e-2, pct_start 0.25, div 25, moms .95/.85/.95; mixup
  around label smoothing; wd except BatchNorm and biases) on an XResNet with head dropout p=0.5:
  5 steps with the same lambdas, permutations and dropout masks in both."""
  n_steps, p = 5, 0.5
  torch.manual_seed(0)
  t = ref.XResNet(BODY['expansion'], BODY['layers'], p=p, c_in=1, n_out=N_OUT, stem_szs=BODY['stem_szs'],
                  widen=BODY['widen'])
  _randomise_bn(t)
  f = xresnet_to_flax(t.state_dict(), xresnet.XResNet(**BODY, p=p, n_out=N_OUT, rngs=nnx.Rngs(jax.random.key(0, impl='rbg'))))
  rng = np.random.default_rng(2)
  nf = f.body.nf
  train = []
  for _ in range(n_steps):
    lam = rng.beta(ALPHA, ALPHA, BS).astype(np.float32)
    train.append((rng.standard_normal((BS, SIZE, SIZE, 1)).astype(np.float32), rng.integers(0, N_OUT, BS).astype(np.int32),
                  Mix(np.maximum(lam, 1 - lam), rng.permutation(BS).astype(np.int32)),
                  {'dropout_mask': (rng.random((BS, nf)) > p).astype(np.float32) / (1 - p)}))
  valid = (rng.standard_normal((BS, SIZE, SIZE, 1)).astype(np.float32), rng.integers(0, N_OUT, BS).astype(np.int32))

  history = VisionLearner(f, OnePerEpoch(train), Given([valid]), progress=False).fit_one_cycle(n_steps, 1e-2)
  want = _torch_stage(t, train, False, [1e-2], 0.25, 25.0, groups=lambda t: [list(t.parameters())])
  np.testing.assert_allclose([r['train_loss'] for r in history], want, rtol=1e-5)
  np.testing.assert_allclose(history[-1]['lr'], ts.one_cycle(n_steps, 1e-2)(n_steps - 1), rtol=1e-6)  # float32 schedule
  _assert_same_end(f, t, history, valid)
