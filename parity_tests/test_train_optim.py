"""fastai's Adam with param groups, freezing, schedules, weight decay and clipping: Flax vs torch_ref.

20 steps in two stages on a small BatchNorm MLP of our own (fastai behaviours pinned down:
decoupled wd before the Adam step, debiasing with the current momentum, no wd on BN/bias,
BN trainable in a frozen group, fresh Adam state after `Learner.freeze_to` (its
`opt.clear_state()`), one-cycle lr and momentum per group, clip_grad_norm_ over trainable gradients).
Tolerance: params within 1e-6 relative (+1e-7 absolute for entries that cross zero).
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import torch_ref.losses as tl
import torch_ref.schedules as ts
from flax_ulmfit.train import losses, optim, schedules
from flax_ulmfit.train.step import TrainState, init_train_state, make_train_step
from torch_ref.optim import Adam

N_IN, N_HID, N_OUT, BS, STEPS = 6, 8, 3, 16, 10
GROUPS = ('body', 'mid', 'head')


class Net(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.body = nnx.Linear(N_IN, N_HID, use_bias=False, rngs=rngs)  # BN follows: a bias gets no gradient
    self.bn = nnx.BatchNorm(N_HID, rngs=rngs)
    self.mid = nnx.Linear(N_HID, N_HID, rngs=rngs)
    self.head = nnx.Linear(N_HID, N_OUT, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.mid(jax.nn.relu(self.bn(self.body(x))))))


class TorchNet(torch.nn.Module):
  def __init__(self, net: Net):
    super().__init__()
    self.body, self.bn = torch.nn.Linear(N_IN, N_HID, bias=False), torch.nn.BatchNorm1d(N_HID)
    self.mid, self.head = torch.nn.Linear(N_HID, N_HID), torch.nn.Linear(N_HID, N_OUT)
    with torch.no_grad():
      self.body.weight.copy_(torch.tensor(np.asarray(net.body.kernel[...]).T))
      for name in ('mid', 'head'):
        getattr(self, name).weight.copy_(torch.tensor(np.asarray(getattr(net, name).kernel[...]).T))
        getattr(self, name).bias.copy_(torch.tensor(np.asarray(getattr(net, name).bias[...])))
      self.bn.weight.copy_(torch.tensor(np.asarray(net.bn.scale[...])))
      self.bn.bias.copy_(torch.tensor(np.asarray(net.bn.bias[...])))

  def forward(self, x):
    return self.head(torch.tanh(self.mid(torch.relu(self.bn(self.body(x))))))


def loss_fn(model, batch, rng, carry):
  x, y = batch
  return losses.cross_entropy(model(x), y), (carry, {})


def flax_params(params):
  flat = {optim.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  out = {'body.weight': flat['body/kernel'].T}
  for name in ('mid', 'head'):
    out[f'{name}.weight'] = flat[f'{name}/kernel'].T
    out[f'{name}.bias'] = flat[f'{name}/bias']
  out['bn.weight'], out['bn.bias'] = flat['bn/scale'], flat['bn/bias']
  return out


def test_twenty_steps_two_stages_match_fastai_adam():
  net = Net(rngs=nnx.Rngs(0))
  tnet = TorchNet(net)
  rng = np.random.default_rng(1)
  data = [(rng.normal(size=(BS, N_IN)).astype(np.float32), rng.integers(0, N_OUT, BS).astype(np.int32))
          for _ in range(2 * STEPS)]

  params = nnx.state(net, nnx.Param)
  labels = optim.label_params(params, [('^(body|bn)/', 'body'), ('^mid/', 'mid'), ('^head/', 'head')])
  bn_bias = optim.bn_bias_mask(net, params)
  wd_mask = jax.tree.map(lambda b: not b, bn_bias)
  train_bn = jax.tree_util.tree_map_with_path(lambda p, _: optim.path_str(p).startswith('bn/'), params)
  lrs = optim.discriminative_lrs(1e-2 / 2.6 ** 2, 1e-2, 3)
  wd, clip = 0.1, 0.3

  # Stage 1: body frozen (its BatchNorm trains), one-cycle lr per group and one-cycle momentum.
  tx1 = optim.fastai_optimizer(labels, {g: schedules.one_cycle(STEPS, lr) for g, lr in zip(GROUPS, lrs)},
                               mom=schedules.one_cycle_moms(STEPS), wd=wd, wd_mask=wd_mask, frozen=['body'],
                               train_mask=train_bn, clip_norm=clip)
  # Stage 2: everything trains, flat-then-cosine lr, constant momentum, fresh Adam state.
  tx2 = optim.fastai_optimizer(labels, {g: schedules.flat_cos(STEPS, lr) for g, lr in zip(GROUPS, lrs)},
                               mom=0.9, wd=wd, wd_mask=wd_mask, clip_norm=clip)

  tgroups = [[tnet.body.weight, tnet.bn.weight, tnet.bn.bias],
             [tnet.mid.weight, tnet.mid.bias], [tnet.head.weight, tnet.head.bias]]
  no_wd = [tnet.bn.weight, tnet.bn.bias, tnet.mid.bias, tnet.head.bias]
  topt = Adam(tgroups, lrs, wd=wd, no_wd=no_wd, train_bn=[tnet.bn.weight, tnet.bn.bias])
  torch_scheds = [([ts.one_cycle(STEPS, lr) for lr in lrs], ts.one_cycle_moms(STEPS)),
                  ([ts.flat_cos(STEPS, lr) for lr in lrs], lambda i: 0.9)]
  body_kernel_before = np.asarray(net.body.kernel[...])

  state = init_train_state(net, tx1)
  for stage, tx in enumerate((tx1, tx2)):
    if stage == 1:
      state = TrainState(state.params, state.rest, tx2.init(state.params))
    topt.freeze_to(1 if stage == 0 else 0)
    topt.clear_state()  # fastai's Learner.freeze_to
    step = make_train_step(net, loss_fn, tx)
    lr_scheds, mom_sched = torch_scheds[stage]
    for i in range(STEPS):
      x, y = data[stage * STEPS + i]
      state, _, _ = step(state, (jnp.asarray(x), jnp.asarray(y)), jax.random.key(0), None)
      topt.set_hyper('lr', [s(i) for s in lr_scheds])
      topt.set_hyper('mom', mom_sched(i))
      topt.zero_grad()
      tl.cross_entropy(tnet(torch.tensor(x)), torch.tensor(y).long()).backward()
      torch.nn.utils.clip_grad_norm_(topt.params(), clip)
      topt.step()

      for g, s, peak in zip(GROUPS, lr_scheds, lrs):
        used = optim.hyperparams(state.opt_state, g)
        if used:  # the frozen body group has none in stage 1 (only its BN trains, and it does)
          # atol: float32 position rounding near the run's end, see test_train_schedules.py.
          np.testing.assert_allclose(float(used['learning_rate']), s(i), rtol=1e-6, atol=1e-6 * peak)
          np.testing.assert_allclose(float(used['mom']), mom_sched(i), rtol=1e-6)
      got = flax_params(state.params)
      for name, tparam in tnet.named_parameters():
        np.testing.assert_allclose(got[name], tparam.detach().numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=f'stage {stage} step {i} {name}')
    if stage == 0:
      np.testing.assert_array_equal(got['body.weight'], body_kernel_before.T)  # frozen: untouched
      assert not np.allclose(got['bn.weight'], 1.0)  # train_bn: BatchNorm moved
