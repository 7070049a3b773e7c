"""The training pieces on their own: errors on bad input, mixup's rules, param-group helpers, bf16 steps."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_ulmfit.train import losses, mixup, optim, precision, schedules
from flax_ulmfit.train.step import init_train_state, make_train_step


def test_losses_name_bad_shapes_dtypes_and_reductions():
  logits = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match=r'got shape \(4, 3\) logits and \(5,\) targets'):
    losses.cross_entropy(logits, jnp.zeros(5, jnp.int32))
  with pytest.raises(TypeError, match='targets must be integer class indices, got dtype float32'):
    losses.label_smoothing_cross_entropy(logits, jnp.zeros(4))
  with pytest.raises(ValueError, match="reduction must be one of .* got reduction='avg'"):
    losses.cross_entropy(logits, jnp.zeros(4, jnp.int32), 'avg')
  with pytest.raises(ValueError, match='eps must be in'):
    losses.label_smoothing_cross_entropy(logits, jnp.zeros(4, jnp.int32), eps=1.0)


def test_linear_cross_entropy_names_bad_input():
  features, weight = jnp.zeros((2, 3, 4)), jnp.zeros((6, 4))
  with pytest.raises(ValueError, match=r'got features \(2, 3, 4\), weight \(6, 5\)'):
    losses.linear_cross_entropy(features, jnp.zeros((6, 5)), None, jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match=r'bias has shape \(5,\), expected \(6,\)'):
    losses.linear_cross_entropy(features, weight, jnp.zeros(5), jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(TypeError, match='targets must be integer ids, got dtype float32'):
    losses.linear_cross_entropy(features, weight, None, jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match='chunk_rows=0'):
    losses.linear_cross_entropy(features, weight, None, jnp.zeros((2, 3), jnp.int32), chunk_rows=0)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_linear_cross_entropy_in_low_precision_tracks_fp32(dtype):
  """Matmuls in bf16/fp16 with fp32 accumulation, against the same loss in fp32; fp16 runs
  under a 2**16 loss scale, as `dynamic_loss_scale` gives it, and its gradients stay finite."""
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(512, 16)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(40, 16)) * 0.3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 40, 512), jnp.int32)
  scale = 2.0 ** 16 if dtype == jnp.float16 else 1.0

  def scaled(w, dt):
    return scale * losses.linear_cross_entropy(features, w.astype(dt), None, targets, chunk_rows=96)
  value, grad = jax.value_and_grad(scaled)(weight, dtype)
  ref_value, ref_grad = jax.value_and_grad(scaled)(weight, jnp.float32)
  # bf16 keeps 8 mantissa bits (fp16 11): products of rounded inputs move the loss by ~0.3%
  # and each gradient entry by ~1% of the largest; the fp16 gradients stay finite and nonzero.
  assert abs(float(value) - float(ref_value)) <= 5e-3 * abs(float(ref_value))
  assert np.all(np.isfinite(np.asarray(grad))) and np.count_nonzero(np.asarray(grad)) == grad.size
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=0,
                             atol=1e-2 * float(np.abs(ref_grad).max()))


@pytest.mark.parametrize('eps', [0.0, 0.1, 0.3])
def test_label_smoothing_by_hand(eps):
  """fastai's formula in float64 numpy, on logits far from uniform (where every eps differs)."""
  rng = np.random.default_rng(0)
  logits, targets = rng.normal(size=(5, 7)) * 3, rng.integers(0, 7, 5)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = eps / 7 * -log_p.sum(-1) + (1 - eps) * -log_p[np.arange(5), targets]
  got = losses.label_smoothing_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), eps, 'none')
  np.testing.assert_allclose(got, expected, rtol=1e-5)  # float32 log-softmax of logits up to ~10


def _folded_beta_moments(alpha):
  """Mean and variance of max(B, 1 - B) for B ~ Beta(alpha, alpha), in closed form:
  E|B - 1/2| = 4**-alpha / (alpha * Beta(alpha, alpha)), Var(B) = 1 / (4 (2 alpha + 1))."""
  beta_fn = math.exp(2 * math.lgamma(alpha) - math.lgamma(2 * alpha))
  half_gap = 4 ** -alpha / (alpha * beta_fn)
  return 0.5 + half_gap, 1 / (4 * (2 * alpha + 1)) - half_gap ** 2


@pytest.mark.parametrize('alpha', [0.2, 0.4, 1.0])
def test_mixup_lambda_distribution(alpha):
  """lam = max(B, 1 - B), B ~ Beta(alpha, alpha) per sample: its mean over 4,096 draws within 4
  standard errors of the exact mean (0.899, 0.840, 0.750), its variance within 10%."""
  mix = mixup.sample_mix(jax.random.key(3), 4096, alpha=alpha)
  lam = np.asarray(mix.lam, np.float64)
  mean, var = _folded_beta_moments(alpha)
  assert lam.min() >= 0.5 and lam.max() <= 1.0
  assert abs(lam.mean() - mean) <= 4 * math.sqrt(var / lam.size)
  # the variance of 4,096 draws has a relative sd of 1.4-2.5% here (simulated): 10% is 4 sd
  assert abs(lam.var() / var - 1) <= 0.10
  assert sorted(np.asarray(mix.perm)) == list(range(4096))
  np.testing.assert_array_equal(np.asarray(mixup.sample_mix(jax.random.key(3), 4096, alpha=alpha).lam), mix.lam)


def test_mix_inputs_lerps_with_the_permuted_batch():
  x = jnp.arange(6.0).reshape(3, 2)
  fixed = mixup.Mix(jnp.array([1.0, 0.5, 0.75]), jnp.array([2, 0, 1], jnp.int32))
  np.testing.assert_allclose(mixup.mix_inputs(x, fixed), [[0, 1], [1, 2], [3.5, 4.5]])


def test_mixup_loss_wants_per_sample_losses():
  mix = mixup.Mix(jnp.ones(4), jnp.arange(4, dtype=jnp.int32))
  with pytest.raises(ValueError, match='reduction="none"'):
    mixup.mixup_loss(losses.cross_entropy, jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32), mix)


def test_discriminative_lrs_follow_fastai_slice():
  np.testing.assert_allclose(optim.discriminative_lrs(1e-3, 1e-1, 3), [1e-3, 1e-2, 1e-1], rtol=1e-12)
  assert optim.discriminative_lrs(1e-2, None, 3) == [1e-3, 1e-3, 1e-2]
  ulmfit = optim.discriminative_lrs(1e-2 / 2.6 ** 3, 1e-2, 4)
  np.testing.assert_allclose(np.array(ulmfit[1:]) / ulmfit[:-1], 2.6, rtol=1e-12)


def test_label_params_rules_and_unmatched_error():
  params = {'encoder': {'w': jnp.ones(1)}, 'head': {'w': jnp.ones(1)}, 'odd': jnp.ones(1)}
  labels = optim.label_params(params, [('^encoder/', 'body'), (lambda p: p.startswith('head'), 'head')], default='rest')
  assert labels == {'encoder': {'w': 'body'}, 'head': {'w': 'head'}, 'odd': 'rest'}
  with pytest.raises(ValueError, match="parameter 'odd' matches no rule"):
    optim.label_params(params, [('^encoder/', 'body'), ('^head/', 'head')])


def test_fastai_optimizer_checks_groups():
  labels = {'a': 'g0', 'b': 'g1'}
  with pytest.raises(ValueError, match=r"no learning rate for groups \['g1'\]"):
    optim.fastai_optimizer(labels, {'g0': 1e-3})
  with pytest.raises(ValueError, match=r"frozen groups \['g9'\] are not among the labels"):
    optim.fastai_optimizer(labels, {'g0': 1e-3, 'g1': 1e-3}, frozen=['g9'])


def test_fastai_adam_first_step_by_hand():
  """Step 1: averages are (1-mom) g and (1-sqr_mom) g^2, debiased back to g and g^2, so the
  update is -lr * g / (|g| + eps) after p *= 1 - lr * wd."""
  p, g, lr, wd = jnp.array([2.0, -1.0]), jnp.array([0.5, -3.0]), 0.1, 0.01
  tx = optim.fastai_adam(lr, wd=wd)
  updates, _ = tx.update(g, tx.init(p), p)
  expected = np.array([2.0, -1.0]) * (1 - lr * wd) - lr * np.array([0.5, -3.0]) / (np.array([0.5, 3.0]) + 1e-5)
  np.testing.assert_allclose(np.asarray(optax.apply_updates(p, updates)), expected, rtol=1e-6)


def test_schedules_reject_bad_arguments():
  with pytest.raises(ValueError, match='total_steps must be >= 1'):
    schedules.one_cycle(0, 1e-3)
  with pytest.raises(ValueError, match='pct_start must be in'):
    schedules.one_cycle(10, 1e-3, pct_start=1.5)
  with pytest.raises(ValueError, match='to have a rising part'):
    schedules.stlr(5, cut_frac=0.1)


@pytest.mark.parametrize('kwargs', [dict(backoff_factor=2.0), dict(growth_factor=0.5), dict(growth_interval=0),
                                    dict(init_scale=0.0), dict(init_scale=-1.0), dict(init_scale=float('inf')),
                                    dict(init_scale=float('nan')), dict(init_scale=2.0 ** 128)])
def test_dynamic_loss_scale_rejects_bad_arguments(kwargs):
  (name, value), = kwargs.items()
  with pytest.raises(ValueError, match=re.escape(f'{name}={value}')):
    precision.dynamic_loss_scale(optax.sgd(1.0), **kwargs)


class Mlp(nnx.Module):
  def __init__(self, policy, *, rngs):
    self.l1 = nnx.Linear(4, 8, **policy.module_kwargs(), rngs=rngs)
    self.bn = nnx.BatchNorm(8, **policy.norm_kwargs(), rngs=rngs)
    self.l2 = nnx.Linear(8, 2, **policy.module_kwargs(), rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.bn(self.l1(x))))


@pytest.mark.parametrize('name', ['bf16', 'fp16'])
def test_low_precision_step_keeps_fp32_master_weights(name):
  policy = precision.get_policy(name)
  model = Mlp(policy, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  tx = optim.fastai_optimizer(optim.label_params(params, [('', 'all')]), {'all': 1e-2})
  if policy.needs_loss_scaling:
    tx = precision.torch_grad_scaler(tx)
  seen = {}

  def loss_fn(m, batch, rng, carry):
    logits = m(batch[0])
    seen['dtype'] = logits.dtype
    return losses.cross_entropy(logits, batch[1]), (carry, {})
  state = init_train_state(model, tx)
  step = make_train_step(model, loss_fn, tx)
  batch = (jax.random.normal(jax.random.key(1), (8, 4)), jnp.array([0, 1, 0, 1, 1, 1, 0, 1]))
  first = None
  for _ in range(3):
    state, _, metrics = step(state, batch, jax.random.key(0), None)
    first = first or float(metrics['loss'])
  assert seen['dtype'] == policy.compute_dtype
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert {leaf.dtype for leaf in jax.tree.leaves(state.rest)} == {jnp.dtype(jnp.float32)}  # BN stats fp32
  assert float(metrics['loss']) < first
