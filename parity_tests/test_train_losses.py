"""Losses and mixup: Flax vs torch_ref (fastai semantics), values and gradients.

Tolerances: fp32 forward <= 1e-5 and gradients <= 1e-4 max-abs-diff (the project contract).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref.losses as tl
import torch_ref.mixup as tm
from flax_ulmfit.train import losses, mixup

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(6, 5)).astype(np.float32) * 3
TARGETS = RNG.integers(0, 5, size=(6,)).astype(np.int32)


def torch_value_and_grad(fn, logits):
  x = torch.tensor(logits, requires_grad=True)
  out = fn(x)
  out.sum().backward()
  return out.detach().numpy(), x.grad.numpy()


def jax_value_and_grad(fn, logits):
  out, vjp = jax.vjp(fn, jnp.asarray(logits))
  return np.asarray(out), np.asarray(vjp(jnp.ones_like(out))[0])


@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
def test_label_smoothing_matches_fastai(reduction):
  """fastai's LabelSmoothingCrossEntropy: eps/c * sum(-log p) + (1 - eps) * nll, each reduction."""
  tgt = torch.tensor(TARGETS).long()
  t_val, t_grad = torch_value_and_grad(lambda x: tl.label_smoothing_cross_entropy(x, tgt, 0.1, reduction), LOGITS)
  j_val, j_grad = jax_value_and_grad(
      lambda x: losses.label_smoothing_cross_entropy(x, jnp.asarray(TARGETS), 0.1, reduction), LOGITS)
  np.testing.assert_allclose(j_val, t_val, atol=1e-5, rtol=0)
  np.testing.assert_allclose(j_grad, t_grad, atol=1e-4, rtol=0)


def test_label_smoothing_equals_smoothed_onehot_cross_entropy():
  """Independent check of the formula: CE against optax.smooth_labels(onehot, eps) targets."""
  import optax
  onehot = optax.smooth_labels(jax.nn.one_hot(TARGETS, 5), 0.1)
  expected = optax.softmax_cross_entropy(jnp.asarray(LOGITS), onehot)
  got = losses.label_smoothing_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS), 0.1, 'none')
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_cross_entropy_flat_and_accuracy_match_torch():
  """LM shapes (B, T, V) vs (B, T): fastai's CrossEntropyLossFlat and accuracy."""
  logits = RNG.normal(size=(2, 7, 11)).astype(np.float32)
  targets = RNG.integers(0, 11, size=(2, 7)).astype(np.int32)
  tgt = torch.tensor(targets).long()
  t_val, t_grad = torch_value_and_grad(lambda x: tl.cross_entropy_flat(x, tgt), logits)
  j_val, j_grad = jax_value_and_grad(lambda x: losses.cross_entropy_flat(x, jnp.asarray(targets)), logits)
  np.testing.assert_allclose(j_val, t_val, atol=1e-5, rtol=0)
  np.testing.assert_allclose(j_grad, t_grad, atol=1e-4, rtol=0)
  assert float(losses.accuracy(jnp.asarray(logits), jnp.asarray(targets))) == pytest.approx(
      float(tl.accuracy(torch.tensor(logits), tgt)), abs=1e-7)


@pytest.mark.parametrize('with_bias', [True, False])
def test_linear_cross_entropy_matches_torch_decoder_then_cross_entropy(with_bias):
  """The fused decoder matmul + CrossEntropyLossFlat: 21 rows in chunks of 4 (the last one
  padded), value and the gradients of features, weight and bias."""
  features = RNG.normal(size=(3, 7, 5)).astype(np.float32)
  weight = RNG.normal(size=(11, 5)).astype(np.float32)
  bias = RNG.normal(size=(11,)).astype(np.float32) if with_bias else None
  targets = RNG.integers(0, 11, size=(3, 7)).astype(np.int32)
  inputs = [features, weight] + ([bias] if with_bias else [])
  t_inputs = [torch.tensor(a, requires_grad=True) for a in inputs]
  t_val = tl.linear_cross_entropy(t_inputs[0], t_inputs[1], t_inputs[2] if with_bias else None,
                                  torch.tensor(targets).long())
  t_val.backward()

  def fused(*args):
    return losses.linear_cross_entropy(args[0], args[1], args[2] if with_bias else None,
                                       jnp.asarray(targets), chunk_rows=4)
  j_val, j_grads = jax.jit(jax.value_and_grad(fused, argnums=tuple(range(len(inputs)))))(*map(jnp.asarray, inputs))
  np.testing.assert_allclose(float(j_val), t_val.item(), atol=1e-5, rtol=0)
  for j_grad, t_input in zip(j_grads, t_inputs):
    np.testing.assert_allclose(np.asarray(j_grad), t_input.grad.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize('smooth', [False, True])
def test_mixup_matches_fastai_given_same_lambdas_and_permutation(smooth):
  """fastai MixUp: x = lerp(x[perm], x, lam); loss = lerp(L(y[perm]), L(y), lam), reduced after."""
  x = RNG.normal(size=(6, 4)).astype(np.float32)
  w = RNG.normal(size=(4, 5)).astype(np.float32)
  lam = np.maximum(l := RNG.beta(0.4, 0.4, size=6).astype(np.float32), 1 - l)
  perm = RNG.permutation(6)
  mix = mixup.Mix(jnp.asarray(lam), jnp.asarray(perm, jnp.int32))
  if smooth:
    j_loss = lambda p, y: losses.label_smoothing_cross_entropy(p, y, 0.1, 'none')
    t_loss = lambda p, y: tl.label_smoothing_cross_entropy(p, y, 0.1, 'none')
  else:
    j_loss = lambda p, y: losses.cross_entropy(p, y, 'none')
    t_loss = lambda p, y: tl.cross_entropy(p, y, 'none')

  def j_fn(weight):
    return mixup.mixup_loss(j_loss, mixup.mix_inputs(jnp.asarray(x), mix) @ weight, jnp.asarray(TARGETS), mix)
  j_val, j_grad = jax.value_and_grad(j_fn)(jnp.asarray(w))
  tw = torch.tensor(w, requires_grad=True)
  tlam, tperm = torch.tensor(lam), torch.tensor(perm)
  t_val = tm.mixup_loss(t_loss, tm.mix_inputs(torch.tensor(x), tlam, tperm) @ tw,
                        torch.tensor(TARGETS).long(), tlam, tperm)
  t_val.backward()
  np.testing.assert_allclose(float(j_val), t_val.item(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(j_grad), tw.grad.numpy(), atol=1e-4, rtol=0)
