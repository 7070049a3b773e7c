"""Dynamic loss scaling vs torch_ref's scalers, and fp16 with scaling vs fp32.

The scaler sequence test pins down fastai course-v3 (2**24, /2, x2 after 500 clean steps,
count kept across overflows) and torch GradScaler (2**16, x0.5, x2 after 2000, count reset).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import torch_ref.precision as tp
from flax_ulmfit.train import losses, optim, precision
from flax_ulmfit.train.step import init_train_state, make_train_step
from torch_ref.optim import Adam

N_STEPS, BAD = 2400, {3: np.inf, 4: np.nan, 300: -np.inf}


@pytest.mark.parametrize('preset', ['fastai_course_scaler', 'torch_grad_scaler'])
def test_scaler_sequence_matches_torch_ref(preset):
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(5,)).astype(np.float32)
  true_grads = rng.normal(size=(N_STEPS, 5)).astype(np.float32)

  tx = getattr(precision, preset)(optim.fastai_adam(1e-3))
  params = {'w': jnp.asarray(p0)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  tparam = torch.nn.Parameter(torch.tensor(p0))
  topt, scaler = Adam([[tparam]], 1e-3), getattr(tp, preset)()

  j_scales, t_scales, j_skips, t_skips = [], [], [], []
  for i in range(N_STEPS):
    grad = true_grads[i].copy()
    if i in BAD:
      grad[2] = BAD[i]
    j_scales.append(float(state.scale))
    before = params['w']
    updates, state = update({'w': jnp.asarray(grad * j_scales[-1])}, state, params)
    params = optax.apply_updates(params, updates)
    if np.array_equal(np.asarray(params['w']), np.asarray(before)):
      j_skips.append(i)
    t_scales.append(scaler.scale)
    tparam.grad = torch.tensor(grad * np.float32(scaler.scale))
    if not scaler.step([tparam], topt.step):
      t_skips.append(i)

  assert j_skips == t_skips == sorted(BAD)
  assert j_scales == t_scales
  assert len(set(j_scales)) >= 3  # backed off and grew within the run: the rules were exercised
  # 2,400 Adam steps in float32 on both sides: rounding accumulates (measured 4.4e-6 relative).
  np.testing.assert_allclose(np.asarray(params['w']), tparam.detach().numpy(), rtol=1e-5, atol=1e-6)


def _overflow_pattern(n_steps, bad_steps, seed):
  rng = np.random.default_rng(seed)
  grads = rng.uniform(-0.5, 0.5, size=(n_steps, 5)).astype(np.float32)
  for i, value in bad_steps.items():
    grads[i, i % 5] = value
  return grads


# torch's defaults over 2,400 steps (a growth at 2,000 clean steps, overflows before and after);
# then a scale starting near float32's maximum, growing every 3 clean steps: it must reach 2**127
# and stay there, with overflows (consecutive, and on a growth step) backing it off in between.
GRAD_SCALER_CASES = {
    'defaults': (dict(), _overflow_pattern(2400, {3: np.inf, 4: np.nan, 300: -np.inf, 2350: np.nan}, 0)),
    'ceiling': (dict(init_scale=2.0 ** 124, growth_interval=3),
                _overflow_pattern(80, {20: np.inf, 21: np.inf, 22: np.nan, 35: -np.inf, 50: np.nan}, 1)),
}


@pytest.mark.parametrize('case', sorted(GRAD_SCALER_CASES))
def test_torch_grad_scaler_matches_torch_amp_grad_scaler(case):
  """`torch_grad_scaler` against a real `torch.amp.GradScaler('cpu')`, each wrapping SGD with
  momentum (whose state must survive a skipped step), on the same gradients and the same
  inf/NaN pattern: the scale, the growth count and the skipped steps at every step, and the
  parameters. Those agree to float32 rounding: torch's SGD adds `-lr * buf` in one fused op,
  optax in two, so over 2,400 steps they drift apart by up to 5e-7 of the largest (measured)."""
  kwargs, grads = GRAD_SCALER_CASES[case]
  tx = precision.torch_grad_scaler(optax.sgd(0.1, momentum=0.9), **kwargs)
  params = {'w': jnp.zeros(5)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  tparam = torch.nn.Parameter(torch.zeros(5))
  topt = torch.optim.SGD([tparam], lr=0.1, momentum=0.9)
  scaler = torch.amp.GradScaler('cpu', **kwargs)
  scales, skipped = set(), []
  for i, grad in enumerate(grads):
    scaled = scaler.scale(torch.from_numpy(grad))  # grad * scale in float32, overflowing as ours does
    assert float(state.scale) == scaler.get_scale(), f'step {i}'
    updates, state = update({'w': jnp.asarray(grad) * state.scale}, state, params)
    params = optax.apply_updates(params, updates)
    before = tparam.detach().clone()
    tparam.grad = scaled
    scaler.step(topt)
    scaler.update()
    if torch.equal(before, tparam.detach()):
      skipped.append(i)
    assert int(state.good_steps) == scaler.state_dict()['_growth_tracker'], f'step {i}'
    want = tparam.detach().numpy()
    np.testing.assert_allclose(np.asarray(params['w']), want, rtol=0, atol=2e-6 * np.abs(want).max(),
                               err_msg=f'step {i}')
    scales.add(scaler.get_scale())
  assert skipped == [i for i in range(len(grads)) if not np.isfinite(grads[i]).all()]
  assert len(scales) >= 3  # the scale backed off and grew: every rule ran
  if case == 'ceiling':
    assert max(scales) == 2.0 ** 127 and float(state.scale) == 2.0 ** 127


def test_scaler_rules_by_hand():
  """Expected values worked out from the rules, not the code: x0.5 then x2 after 2 clean steps."""
  tx = precision.dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0, growth_interval=2, reset_on_overflow=True)
  params = {'w': jnp.zeros(2)}
  state = tx.init(params)
  seen = []
  for g in [1.0, np.inf, 1.0, 1.0, 1.0]:
    _, state = tx.update({'w': jnp.full(2, g)}, state, params)
    seen.append((float(state.scale), int(state.good_steps)))
  assert seen == [(8.0, 1), (4.0, 0), (4.0, 1), (8.0, 0), (8.0, 1)]


class Mlp(nnx.Module):
  def __init__(self, policy: precision.Policy, *, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(16, 16, **policy.module_kwargs(), rngs=rngs)
    self.l2 = nnx.Linear(16, 4, **policy.module_kwargs(), rngs=rngs)
    self.policy = policy

  def __call__(self, x):
    return self.policy.cast_to_output(self.l2(jnp.tanh(self.l1(self.policy.cast_to_compute(x)))))


def record_grads() -> optax.GradientTransformation:
  """Keeps the gradients it receives in its state and returns zero updates (test probe)."""
  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def grads_of(policy_name: str, scaled: bool):
  policy = precision.get_policy(policy_name)
  model = Mlp(policy, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = (jnp.asarray(rng.normal(size=(8, 16)), jnp.float32), jnp.asarray(rng.integers(0, 4, 8), jnp.int32))

  def loss_fn(m, b, key, carry):  # weighted 1e-8: gradients ~1e-10, below fp16's smallest subnormal 6e-8
    return 1e-8 * losses.cross_entropy(m(b[0]), b[1]), (carry, {})
  tx = precision.fastai_course_scaler(record_grads()) if scaled else record_grads()
  state = init_train_state(model, tx)
  state, _, _ = make_train_step(model, loss_fn, tx)(state, batch, jax.random.key(0), None)
  grads = state.opt_state.inner_state if scaled else state.opt_state
  return np.concatenate([np.asarray(g, np.float32).ravel() for g in jax.tree.leaves(grads)])


def test_fp16_loss_scaling_recovers_underflowing_gradients():
  reference = grads_of('fp32', scaled=False)
  assert np.abs(reference).max() > 0
  unscaled = grads_of('fp16', scaled=False)
  assert np.count_nonzero(unscaled) == 0  # without scaling fp16 flushes every gradient to zero
  scaled = grads_of('fp16', scaled=True)
  assert np.count_nonzero(scaled) == np.count_nonzero(reference)
  # fp16 keeps 11 significant bits (~5e-4 relative); the forward and backward each round
  # through two matmuls of 16 terms, so allow 1e-2 of the largest gradient.
  np.testing.assert_allclose(scaled, reference, rtol=0, atol=1e-2 * np.abs(reference).max())


def test_policy_says_which_precision_needs_scaling():
  assert precision.get_policy('fp16').needs_loss_scaling
  assert not precision.get_policy('bf16').needs_loss_scaling
  assert not precision.get_policy('fp32').needs_loss_scaling
  with pytest.raises(ValueError, match="unknown precision 'fp8'"):
    precision.get_policy('fp8')
