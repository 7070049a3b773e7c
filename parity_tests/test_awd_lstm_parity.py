"""Flax AWD-LSTM vs torch_ref (fastai semantics): same weights, same masks, same tokens.

Tolerances: the numerical contract's fp32 bounds, forward 1e-5 and gradients 1e-4.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref.awd_lstm as ref
import torch_ref.losses as ref_losses
from flax_ulmfit.interop import flax_to_torch, torch_to_flax
from flax_ulmfit.models import LSTM, LanguageModel
from flax_ulmfit.train.losses import ar_tar, cross_entropy_flat
from parity_tests.awd_lstm_cases import (CONFIG, HEAVY, VOCAB, as_jax, max_diff, numpy_masks,
                                         to_numpy, tokens, twin_models)

FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def _torch_state(state):
  return tuple((torch.as_tensor(np.asarray(h)), torch.as_tensor(np.asarray(c))) for h, c in state)


def test_lstm_layer_forward_and_gradients_match_torch():
  """Our LSTM (custom VJP) vs torch.nn.LSTM: outputs, final state and every gradient,
  including those of the initial state (fastai carries state across batches)."""
  torch.manual_seed(0)
  t_lstm = torch.nn.LSTM(6, 9, batch_first=True)
  f_lstm = LSTM(6, 9, rngs=nnx.Rngs(0))
  for name in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh'):
    getattr(f_lstm, name)[...] = jnp.asarray(getattr(t_lstm, f'{name}_l0').detach().numpy())
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 11, 6)).astype(np.float32)
  h0, c0 = (rng.standard_normal((3, 9)).astype(np.float32) for _ in range(2))
  probe = rng.standard_normal((3, 11, 9)).astype(np.float32)  # a non-uniform output cotangent

  tx, th, tc = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
  t_out, (t_h, t_c) = t_lstm(tx, (th[None], tc[None]))
  ((t_out * torch.from_numpy(probe)).sum() + t_h.pow(2).sum() + t_c.sum()).backward()

  def loss(model, x, h0, c0):
    out, (h, c) = model(jnp.swapaxes(x, 0, 1), (h0, c0))
    return (jnp.swapaxes(out, 0, 1) * probe).sum() + (h ** 2).sum() + c.sum(), (out, h, c)

  grad_fn = nnx.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
  (g_model, g_x, g_h0, g_c0), (f_out, f_h, f_c) = grad_fn(f_lstm, x, h0, c0)
  assert max_diff(jnp.swapaxes(f_out, 0, 1), t_out) <= FWD_TOL
  assert max_diff(f_h, t_h[0]) <= FWD_TOL and max_diff(f_c, t_c[0]) <= FWD_TOL
  for ours, theirs in ((g_x, tx.grad), (g_h0, th.grad), (g_c0, tc.grad)):
    assert max_diff(ours, theirs) <= GRAD_TOL
  for name in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh'):
    assert max_diff(g_model[name][...], getattr(t_lstm, f'{name}_l0').grad) <= GRAD_TOL


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_language_model_forward_matches_torch(mode):
  """Logits, the raw and dropped last-layer outputs and the new state, with the same masks."""
  torch_lm, flax_lm = twin_models(HEAVY)
  ids = tokens(4, 9)
  masks = numpy_masks(HEAVY, 4)
  getattr(torch_lm, mode)()
  getattr(flax_lm, mode)()
  t_logits, t_state, (t_raw, t_dropped) = torch_lm(torch.from_numpy(ids).long(), None, masks)
  f_logits, f_state, extras = flax_lm(jnp.asarray(ids), None, as_jax(masks))
  assert max_diff(f_logits, t_logits) <= FWD_TOL
  assert max_diff(extras.raw, t_raw) <= FWD_TOL
  assert max_diff(extras.dropped, t_dropped) <= FWD_TOL
  for (fh, fc), (th, tc) in zip(f_state, t_state):
    assert max_diff(fh, th) <= FWD_TOL and max_diff(fc, tc) <= FWD_TOL
  if mode == 'train':  # the masks really changed the result
    flax_lm.eval()
    assert max_diff(flax_lm(jnp.asarray(ids))[0], f_logits) > 1e-3


def test_state_carried_over_two_batches_matches_torch():
  """fastai reads a text stream in consecutive batches, the state carried (detached) between."""
  torch_lm, flax_lm = twin_models()
  torch_lm.train()
  ids = tokens(3, 14, seed=1)
  masks = [numpy_masks(CONFIG, 3, seed=s) for s in (1, 2)]
  t_state, f_state = None, None
  for half, m in zip((ids[:, :7], ids[:, 7:]), masks):
    t_logits, t_state, _ = torch_lm(torch.from_numpy(half).long(), t_state, m)
    t_state = tuple((h.detach(), c.detach()) for h, c in t_state)
    f_logits, f_state, _ = flax_lm(jnp.asarray(half), f_state, as_jax(m))
    f_state = jax.lax.stop_gradient(f_state)
  assert max_diff(f_logits, t_logits) <= FWD_TOL
  for (fh, fc), (th, tc) in zip(f_state, t_state):
    assert max_diff(fh, th) <= FWD_TOL and max_diff(fc, tc) <= FWD_TOL


def test_gradients_of_loss_with_ar_tar_match_torch():
  """d(cross-entropy + AR + TAR)/d(every parameter), from a carried nonzero state; the raw
  hidden-to-hidden weights (weight-dropped) must get their gradient, as in fastai."""
  torch_lm, flax_lm = twin_models(HEAVY)
  torch_lm.train()
  ids = tokens(4, 9, seed=2)
  targets = np.roll(ids, -1, axis=1)
  masks = numpy_masks(HEAVY, 4, seed=3)
  rng = np.random.default_rng(4)
  state = tuple((rng.standard_normal((4, s)).astype(np.float32) * 0.5,
                 rng.standard_normal((4, s)).astype(np.float32) * 0.5) for s in (14, 14, 10))

  logits, _, (raw, dropped) = torch_lm(torch.from_numpy(ids).long(), _torch_state(state), masks)
  t_loss = ref_losses.cross_entropy_flat(logits, torch.from_numpy(targets).long()) + ref_losses.ar_tar(raw, dropped)
  t_loss.backward()
  t_grads = {k: p.grad for k, p in torch_lm.named_parameters(remove_duplicate=False)}

  def loss(model):
    logits, _, extras = model(jnp.asarray(ids), state, as_jax(masks))
    return cross_entropy_flat(logits, jnp.asarray(targets)) + ar_tar(extras.raw, extras.dropped)

  f_loss, grads = nnx.value_and_grad(loss)(flax_lm)
  assert abs(float(f_loss) - t_loss.item()) <= FWD_TOL
  grad_model = nnx.clone(flax_lm)
  nnx.update(grad_model, grads)
  f_grads = flax_to_torch(grad_model)
  assert set(f_grads) == set(t_grads)
  for key, t_grad in t_grads.items():
    assert max_diff(f_grads[key], t_grad) <= GRAD_TOL, key
  for l in range(3):
    raw_grad = f_grads[f'0.rnns.{l}.weight_hh_l0_raw']
    assert np.abs(raw_grad).max() > 1e-4
    # DropConnect: entries the mask dropped get exactly no gradient
    assert np.all(raw_grad[masks['weight'][l] == 0] == 0)


def test_torch_flax_torch_round_trip_is_exact():
  torch_lm, flax_lm = twin_models()
  back = flax_to_torch(flax_lm)
  original = torch_lm.state_dict()
  assert list(back) == list(original)
  for key, value in original.items():
    np.testing.assert_array_equal(back[key], to_numpy(value))
  fresh = ref.LanguageModel(VOCAB, CONFIG)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_flax_torch_flax_round_trip_is_exact():
  _, flax_lm = twin_models()
  again = torch_to_flax(flax_to_torch(flax_lm), LanguageModel(VOCAB, CONFIG, rngs=nnx.Rngs(7)))
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(flax_lm, nnx.Param)),
                               nnx.to_flat_state(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
