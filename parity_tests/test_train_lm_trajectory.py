"""A 5-step AWD-LSTM language-model training run, Flax vs torch_ref (fastai's recipe).

Same weights, same token batches, the same dropout masks (drawn once in numpy per step),
recurrent state carried and detached between batches, cross-entropy + AR/TAR (alpha 2,
beta 1), fastai's LM splitter groups (one per RNN layer, then embedding + decoder) with
discriminative one-cycle learning rates, text momentum 0.8/0.7/0.8, decoupled weight decay
off for biases, global-norm clipping. Tolerance: params within 1e-4 max-abs-diff after
five steps (forward/gradient rounding of ~1e-6 per step, amplified by Adam's normalisation).
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import torch_ref.losses as tl
import torch_ref.schedules as ts
from flax_ulmfit.interop import flax_to_torch
from flax_ulmfit.train import optim, schedules
from flax_ulmfit.train.lm import lm_loss
from flax_ulmfit.train.step import init_train_state, make_train_step
from parity_tests.awd_lstm_cases import HEAVY, as_jax, numpy_masks, tokens, twin_models
from torch_ref.optim import Adam

STEPS, BS, BPTT, CLIP, LR = 5, 3, 8, 0.5, 1e-2
MOMS = (0.8, 0.7, 0.8)


def test_five_step_lm_trajectory_matches_torch_ref():
  torch_lm, flax_lm = twin_models(HEAVY)
  n_layers = HEAVY['n_layers']
  ids = tokens(BS, STEPS * BPTT + 1)
  batches = [(ids[:, i * BPTT:(i + 1) * BPTT], ids[:, i * BPTT + 1:(i + 1) * BPTT + 1]) for i in range(STEPS)]
  masks = [numpy_masks(HEAVY, BS, seed=10 + i) for i in range(STEPS)]
  lrs = optim.discriminative_lrs(LR / 2.6 ** n_layers, LR, n_layers + 1)

  params = nnx.state(flax_lm, nnx.Param)
  rules = [(f'^encoder/rnns/{l}/', f'rnn{l}') for l in range(n_layers)] + [('^(encoder/encoder|decoder)', 'embeds')]
  labels = optim.label_params(params, rules)
  groups = [f'rnn{l}' for l in range(n_layers)] + ['embeds']
  wd_mask = jax.tree.map(lambda b: not b, optim.bn_bias_mask(flax_lm, params))
  tx = optim.fastai_optimizer(labels, {g: schedules.one_cycle(STEPS, lr) for g, lr in zip(groups, lrs)},
                              mom=schedules.one_cycle_moms(STEPS, MOMS), wd_mask=wd_mask, clip_norm=CLIP)
  state = init_train_state(flax_lm, tx)
  step = make_train_step(flax_lm, lm_loss, tx)

  torch_lm.train()
  encoder = torch_lm[0]
  tgroups = [list(encoder.rnns[l].parameters()) for l in range(n_layers)]
  tgroups.append(list(torch.nn.ModuleList([encoder.encoder, encoder.encoder_dp, torch_lm[1]]).parameters()))
  no_wd = [p for n, p in torch_lm.named_parameters() if n.endswith('.bias')]  # fastai decays the LSTM's bias_ih/hh
  topt = Adam(tgroups, lrs, no_wd=no_wd)
  lr_scheds, mom_sched = [ts.one_cycle(STEPS, lr) for lr in lrs], ts.one_cycle_moms(STEPS, MOMS)

  f_carry, t_carry = None, None
  for i, ((x, y), m) in enumerate(zip(batches, masks)):
    state, f_carry, metrics = step(state, (jnp.asarray(x), jnp.asarray(y), as_jax(m)), jax.random.key(0), f_carry)
    topt.set_hyper('lr', [s(i) for s in lr_scheds])
    topt.set_hyper('mom', mom_sched(i))
    topt.zero_grad()
    logits, t_carry, (raw, dropped) = torch_lm(torch.from_numpy(x).long(), t_carry, m)
    t_carry = tuple(tuple(t.detach() for t in layer) for layer in t_carry)
    t_ce = tl.cross_entropy_flat(logits, torch.from_numpy(y).long())
    (t_ce + tl.ar_tar(raw, dropped)).backward()   # AR/TAR reach the gradients (the params below)
    torch.nn.utils.clip_grad_norm_(topt.params(), CLIP)
    topt.step()
    # the recorded loss is the one before AR/TAR, as fastai's Recorder logs it
    np.testing.assert_allclose(float(metrics['loss']), t_ce.item(), atol=1e-5, rtol=0, err_msg=f'step {i}')

  nnx.update(flax_lm, state.params, state.rest)
  ours, theirs = flax_to_torch(flax_lm), torch_lm.state_dict()
  for key, t_value in theirs.items():
    np.testing.assert_allclose(np.asarray(ours[key]), t_value.numpy(), atol=1e-4, rtol=0, err_msg=key)
  initial = flax_to_torch(twin_models(HEAVY)[1])
  moved = max(np.abs(np.asarray(ours[k]) - np.asarray(initial[k])).max() for k in theirs)
  assert moved > 1e-3  # the run really trained: a 1e-4 tolerance is meaningful
