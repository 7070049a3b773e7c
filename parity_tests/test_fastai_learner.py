"""A fastai 2.8 `Learner` trajectory (golden/make_fastai_learner.py) reproduced with our optax
pieces: 16 steps of a tiny BatchNorm MLP in two stages, `freeze_to(1)` + `fit_one_cycle` with
discriminative rates, then `unfreeze()` + `fit_flat_cos`; fastai's Adam, `wd=0.1` with
`wd_bn_bias=False`, `train_bn=True`, `GradientClip(0.3)`.

Each stage gets a fresh `fastai_optimizer`, `init`ed on the current parameters, because
fastai's `Learner.freeze_to` clears the optimizer state. Momentum is not scheduled by
`fit_flat_cos`: fastai keeps the last value `fit_one_cycle` set, and so does this run.
Checked after every step: each group's lr and momentum, every parameter and the
BatchNorm statistics. Tolerance: 1e-6 relative plus 1e-7 absolute (fp32 forward and
backward rounding on two frameworks, carried through 16 Adam steps).
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_ulmfit.models.batchnorm import BatchNorm
from flax_ulmfit.train import losses, optim, schedules
from flax_ulmfit.train.step import TrainState, init_train_state, make_train_step

GOLDEN = np.load(Path(__file__).parent / 'golden' / 'fastai_learner.npz')
GROUPS, BS = ('body', 'mid', 'head'), 16
STAGE_STEPS = [int(n) for n in GOLDEN['steps_per_stage']]
N_TRAIN = BS * STAGE_STEPS[0] // 2  # two epochs per stage


class Net(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.body = nnx.Linear(6, 8, use_bias=False, rngs=rngs)
    self.bn = BatchNorm(8)
    self.mid, self.head = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.mid(jax.nn.relu(self.bn(self.body(x))))))


# fastai state_dict name -> (path in our params or rest, transposed)
NAMES = {'body.weight': ('body/kernel', True), 'bn.weight': ('bn/scale', False), 'bn.bias': ('bn/bias', False),
         'bn.running_mean': ('bn/mean', False), 'bn.running_var': ('bn/var', False),
         'bn.num_batches_tracked': ('bn/num_batches_tracked', False), 'mid.weight': ('mid/kernel', True),
         'mid.bias': ('mid/bias', False), 'head.weight': ('head/kernel', True), 'head.bias': ('head/bias', False)}


def as_fastai(state: TrainState) -> dict[str, np.ndarray]:
  flat = {optim.path_str(p): np.asarray(v) for tree in (state.params, state.rest)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return {name: flat[path].T if transposed else flat[path] for name, (path, transposed) in NAMES.items()}


def load_initial(net: Net) -> None:
  for name, (path, transposed) in NAMES.items():
    value = GOLDEN[f'initial/{name}']
    module, attr = path.split('/')
    getattr(getattr(net, module), attr)[...] = jnp.asarray(value.T if transposed else value)


def loss_fn(model, batch, rng, carry):
  return losses.cross_entropy(model(batch[0]), batch[1]), (carry, {})


def test_two_stage_learner_trajectory_equals_fastai():
  net = Net(rngs=nnx.Rngs(0))
  load_initial(net)
  params = nnx.state(net, nnx.Param)
  labels = optim.label_params(params, [('^(body|bn)/', 'body'), ('^mid/', 'mid'), ('^head/', 'head')])
  # the library's own rules judged by fastai's: wd_bn_bias=False exempts norm layers and biases
  # (bn_bias_mask), train_bn keeps norm layers training in a frozen group (norm_mask)
  wd_mask = jax.tree.map(lambda exempt: not exempt, optim.bn_bias_mask(net, params))
  train_bn = optim.norm_mask(net, params)
  x, y = jnp.asarray(GOLDEN['x'][:N_TRAIN]), jnp.asarray(GOLDEN['y'][:N_TRAIN], jnp.int32)
  batches = [(x[i:i + BS], y[i:i + BS]) for i in range(0, N_TRAIN, BS)]

  one_cycle_lrs = optim.discriminative_lrs(1e-3, 1e-2, 3)
  flat_cos_lrs = optim.discriminative_lrs(1e-3, 5e-3, 3)
  n1, n2 = STAGE_STEPS
  stages = [  # freeze_to(1) + fit_one_cycle(2, slice(1e-3, 1e-2)); unfreeze() + fit_flat_cos(2, slice(1e-3, 5e-3))
      optim.fastai_optimizer(labels, {g: schedules.one_cycle(n1, lr) for g, lr in zip(GROUPS, one_cycle_lrs)},
                             mom=schedules.one_cycle_moms(n1), wd=0.1, wd_mask=wd_mask, frozen=['body'],
                             train_mask=train_bn, clip_norm=0.3),
      optim.fastai_optimizer(labels, {g: schedules.flat_cos(n2, lr) for g, lr in zip(GROUPS, flat_cos_lrs)},
                             mom=float(schedules.one_cycle_moms(n1)(n1 - 1)), wd=0.1, wd_mask=wd_mask, clip_norm=0.3)]

  state, step_index = init_train_state(net, stages[0]), 0
  for tx, n_steps in zip(stages, STAGE_STEPS):
    state = TrainState(state.params, state.rest, tx.init(state.params))  # fastai's freeze_to clears the state
    step = make_train_step(net, loss_fn, tx)
    for i in range(n_steps):
      state, _, _ = step(state, batches[i % len(batches)], jax.random.key(0), None)
      for g, group in enumerate(GROUPS):
        used = optim.hyperparams(state.opt_state, group)
        np.testing.assert_allclose(float(used['learning_rate']), GOLDEN['lrs'][step_index, g], rtol=1e-6,
                                   atol=1e-6 * GOLDEN['lrs'][:, g].max(), err_msg=f'step {step_index} {group} lr')
        np.testing.assert_allclose(float(used['mom']), GOLDEN['moms'][step_index, g], rtol=1e-6,
                                   err_msg=f'step {step_index} {group} mom')
      for name, value in as_fastai(state).items():
        np.testing.assert_allclose(value, GOLDEN[f'state/{name}'][step_index], rtol=1e-6, atol=1e-7,
                                   err_msg=f'step {step_index} {name}')
      step_index += 1
  initial, final = GOLDEN['initial/body.weight'], GOLDEN['state/body.weight']
  assert np.array_equal(final[n1 - 1], initial) and not np.allclose(final[-1], initial, atol=1e-4)  # frozen, then trained
