"""Flax text classifier vs torch_ref (fastai semantics): same weights, same per-chunk masks,
same tokens padded as ClasLoader pads them.

The batches hold rows of different lengths, two rows longer than `max_len` (chunks before the
window only feed the state), rows that are all padding in the first chunks (they join with a
zero state; torch_ref runs only started rows, as fastai does), trailing padding that is not a
multiple of `seq_len`, and (n_tokens=30) a first chunk that is padding in every row.
Tolerances: the numerical contract's fp32 bounds, forward 1e-5 and gradients 1e-4.
"""
from __future__ import annotations

import operator
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref.classifier as ref
import torch_ref.losses as ref_losses
import torch_ref.schedules as ts
from flax_ulmfit import ulmfit
from flax_ulmfit.interop import flax_to_torch, load_encoder, torch_to_flax
from flax_ulmfit.models import AWDLSTM, TextClassifier
from flax_ulmfit.models.classifier import masked_concat_pool
from flax_ulmfit.train import optim
from flax_ulmfit.train.clas import clas_loss
from flax_ulmfit.train.step import TrainState, init_train_state, make_train_step
from parity_tests.classifier_cases import (CONFIG, MAX_LEN, N_CLASS, SEQ_LEN, VOCAB, as_jax, batch,
                                           numpy_masks, twin_models)
from torch_ref.optim import Adam

FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def _max_diff(a, b) -> float:
  b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)))


def test_masked_concat_pool_matches_fastai_formula():
  """[last real token, masked max, masked mean] on outputs whose padded positions hold large
  values (a pooling that let them in would fail), trailing padding of 0 to seq_len - 1."""
  rng = np.random.default_rng(0)
  outputs = rng.standard_normal((4, 15, 6)).astype(np.float32)
  pad = np.zeros((4, 15), bool)
  pad[1, :5], pad[1, -2:], pad[2, :10], pad[2, -4:], pad[3, -1:] = True, True, True, True, True
  outputs[pad] = 50.0
  ours = masked_concat_pool(jnp.asarray(outputs), jnp.asarray(pad))
  theirs = ref.masked_concat_pool(torch.from_numpy(outputs), torch.from_numpy(pad), SEQ_LEN)
  assert _max_diff(ours, theirs) <= FWD_TOL
  assert np.asarray(ours).max() < 50.0


@pytest.mark.parametrize('n_tokens', [25, 30])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_forward_matches_torch(mode, n_tokens):
  """Logits with the same masks; in train mode also the BatchNorm statistics the batch moved."""
  torch_clf, flax_clf = twin_models()
  tokens, _ = batch(n_tokens)
  masks = numpy_masks(len(tokens), n_tokens)
  getattr(torch_clf, mode)()
  getattr(flax_clf, mode)()
  t_logits, t_out, _ = torch_clf(torch.from_numpy(tokens).long(), masks)
  f_logits, f_out = flax_clf.classify(jnp.asarray(tokens), as_jax(masks))
  assert _max_diff(f_logits, t_logits) <= FWD_TOL
  assert _max_diff(f_out, t_out) <= FWD_TOL  # what AR/TAR read: zeros where a row had not started
  ours, theirs = flax_to_torch(flax_clf), torch_clf.state_dict()
  for key in theirs:
    assert _max_diff(ours[key], theirs[key]) <= FWD_TOL, key
  if mode == 'train':  # the masks really changed the result
    flax_clf.eval()
    assert _max_diff(flax_clf(jnp.asarray(tokens)), f_logits) > 1e-3


def test_gradients_of_training_loss_match_torch():
  """d(cross-entropy + AR/TAR on the encoder outputs)/d(every parameter), fastai's classifier
  training loss; the raw hidden-to-hidden weights get their gradient through every chunk."""
  torch_clf, flax_clf = twin_models()
  tokens, labels = batch(25, seed=3)
  masks = numpy_masks(len(tokens), 25, seed=4)
  torch_clf.train()
  logits, raw, out = torch_clf(torch.from_numpy(tokens).long(), masks)
  t_loss = ref_losses.cross_entropy_flat(logits, torch.from_numpy(labels).long()) + ref_losses.ar_tar(raw, out)
  t_loss.backward()

  def loss(model):
    return clas_loss(model, (jnp.asarray(tokens), jnp.asarray(labels), as_jax(masks)), jax.random.key(0))[0]

  f_loss, grads = nnx.value_and_grad(loss)(flax_clf)
  assert abs(float(f_loss) - t_loss.item()) <= FWD_TOL
  grad_model = nnx.clone(flax_clf)
  nnx.update(grad_model, grads)
  f_grads = flax_to_torch(grad_model)
  for key, param in torch_clf.named_parameters():
    assert _max_diff(f_grads[key], param.grad) <= GRAD_TOL, key
  for l in range(CONFIG['n_layers']):
    assert np.abs(f_grads[f'0.module.rnns.{l}.weight_hh_l0_raw']).max() > 1e-4



def test_gradients_in_eval_mode_match_torch():
  """d(cross-entropy)/d(every parameter) in eval mode (BatchNorm on its running statistics, no
  dropout, no AR/TAR: clas_loss without a key), on the batch whose first chunk is all padding."""
  torch_clf, flax_clf = twin_models(seed=2)
  tokens, labels = batch(30, seed=5)
  torch_clf.eval()
  flax_clf.eval()
  t_loss = ref_losses.cross_entropy_flat(torch_clf(torch.from_numpy(tokens).long())[0], torch.from_numpy(labels).long())
  t_loss.backward()
  f_loss, grads = nnx.value_and_grad(lambda m: clas_loss(m, (jnp.asarray(tokens), jnp.asarray(labels)), None)[0])(flax_clf)
  assert abs(float(f_loss) - t_loss.item()) <= FWD_TOL
  grad_model = nnx.clone(flax_clf)
  nnx.update(grad_model, grads)
  f_grads = flax_to_torch(grad_model)
  for key, param in torch_clf.named_parameters():
    diff, scale = _max_diff(f_grads[key], param.grad), float(param.grad.abs().max())
    # The contract's 1e-4, and, since eval-mode gradients of the first layer are only ~5e-5,
    # 1e-5 of each one's largest entry (measured <= 8e-7 of it).
    assert diff <= GRAD_TOL and diff <= 1e-5 * scale, (key, diff, scale)

def test_round_trips_are_exact_with_and_without_head_dropout():
  """torch -> Flax -> torch and Flax -> torch -> Flax are bit-exact, BatchNorm statistics and
  num_batches_tracked included; with ps=[0.0] the last block has no Dropout and fastai's Linear
  moves from index 2 to 1."""
  for ps in ([0.2], [0.0]):
    torch_clf, flax_clf = twin_models(ps=ps)
    back = flax_to_torch(flax_clf)
    original = torch_clf.state_dict()
    assert list(back) == list(original)
    for key, value in original.items():
      assert back[key].dtype == value.numpy().dtype, key
      np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    fresh = ref.TextClassifier(VOCAB, N_CLASS, SEQ_LEN, CONFIG, drop_mult=1.0, max_len=MAX_LEN, lin_ftrs=[7], ps=ps)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    again = torch_to_flax(back, TextClassifier(VOCAB, N_CLASS, CONFIG, drop_mult=1.0, seq_len=SEQ_LEN,
                                               max_len=MAX_LEN, lin_ftrs=[7], ps=ps, rngs=nnx.Rngs(5)))
    variables = (nnx.Param, nnx.BatchStat)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(flax_clf, variables)),
                                 nnx.to_flat_state(nnx.state(again, variables))):
      np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
  assert '1.layers.1.1.weight' in back and '1.layers.1.2.weight' not in back


def test_load_encoder_copies_a_language_model_encoder():
  """fastai's load_encoder: the AWD-LSTM's state_dict (no prefix) replaces the classifier's
  encoder; the head keeps its weights; the result classifies as torch_ref given the same."""
  torch_clf, flax_clf = twin_models()
  head_before = {k: v for k, v in flax_to_torch(flax_clf).items() if k.startswith('1.')}
  torch.manual_seed(9)
  lm_encoder = ref.AWD_LSTM(VOCAB, **{k: v for k, v in CONFIG.items() if k != 'output_p'})
  encoder_sd = lm_encoder.state_dict()
  load_encoder(encoder_sd, flax_clf)
  torch_clf[0].module.load_state_dict(encoder_sd, strict=True)
  exported = flax_to_torch(flax_clf)
  for key, value in encoder_sd.items():
    np.testing.assert_array_equal(exported[f'0.module.{key}'], value.numpy(), err_msg=key)
  for key, value in head_before.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  tokens, _ = batch(25)
  torch_clf.eval()
  flax_clf.eval()
  assert _max_diff(flax_clf(jnp.asarray(tokens)), torch_clf(torch.from_numpy(tokens).long())[0]) <= FWD_TOL


STAGE_STEPS, LR, MOMS = (2, 3), 1e-2, (0.8, 0.7, 0.8)


def test_five_step_training_over_two_unfreezing_stages_matches_torch():
  """fastai's gradual unfreezing: `freeze_to(-1)` (head only), 2 one-cycle steps, then
  `freeze_to(-2)` (last RNN layer + head), 3 steps; discriminative rates slice(lr/2.6**4, lr),
  momentum 0.8/0.7/0.8, the training loss with AR/TAR, weight decay except on BatchNorm (fastai's
  `norm_bias_params` finds no LSTM bias: `nn.LSTM.bias` is a flag, so LSTM biases decay).
  `freeze_to` clears the optimizer state, so each stage starts a fresh Adam, on both sides.
  The Flax side is the library's own: `awd_lstm_clas_split`, `bn_bias_mask` and `stage_optimizer`;
  torch_ref groups the modules as fastai's `awd_lstm_clas_split` does.
  Tolerance: params within 1e-4 after five steps (forward/gradient rounding of ~1e-6 per step,
  amplified by Adam's normalisation)."""
  torch_clf, flax_clf = twin_models()
  split = ulmfit.awd_lstm_clas_split(CONFIG['n_layers'])
  stages = [ulmfit.Stage('head', 1, slice(LR / 2.6 ** 4, LR), freeze_to=-1),
            ulmfit.Stage('last_two', 1, slice(LR / 2.6 ** 4, LR), freeze_to=-2)]
  recipe = ulmfit.Recipe(tuple(stages), drop_mult=1.0, moms=MOMS)
  params = nnx.state(flax_clf, nnx.Param)
  labels = optim.label_params(params, split.rules)
  wd_mask = jax.tree.map(operator.not_, optim.bn_bias_mask(flax_clf, params))
  lrs = [LR / 2.6 ** (4 - g) for g in range(5)]  # slice(LR / 2.6**4, LR): geometric over the 5 groups

  encoder = torch_clf[0].module
  t_groups = [list(encoder.encoder.parameters())] + [list(r.parameters()) for r in encoder.rnns]
  t_groups.append(list(torch_clf[1].parameters()))
  no_wd = [p for n, p in torch_clf.named_parameters() if re.match(r'1\.layers\.\d+\.0\.', n)]
  assert len(no_wd) == 4  # BatchNorm weight and bias of 2 blocks

  state, step_i = None, 0
  torch_clf.train()
  for stage, n_steps in zip(stages, STAGE_STEPS):
    tx = ulmfit.stage_optimizer(labels, split.groups, stage, recipe, n_steps, wd_mask)
    # a fresh optimizer state per stage, as fastai's freeze_to
    state = init_train_state(flax_clf, tx) if state is None else TrainState(state.params, state.rest, tx.init(state.params))
    step = make_train_step(flax_clf, clas_loss, tx)
    t_opt = Adam(t_groups, lrs, no_wd=no_wd)
    t_opt.freeze_to(stage.freeze_to)
    lr_scheds, mom_sched = [ts.one_cycle(n_steps, lr) for lr in lrs], ts.one_cycle_moms(n_steps, MOMS)
    for i in range(n_steps):
      tokens, labels_i = batch(25, seed=20 + step_i)
      masks = numpy_masks(len(tokens), 25, seed=30 + step_i)
      state, _, metrics = step(state, (jnp.asarray(tokens), jnp.asarray(labels_i), as_jax(masks)),
                               jax.random.key(0), None)
      t_opt.set_hyper('lr', [s(i) for s in lr_scheds])
      t_opt.set_hyper('mom', mom_sched(i))
      t_opt.zero_grad()
      logits, raw, out = torch_clf(torch.from_numpy(tokens).long(), masks)
      t_recorded = ref_losses.cross_entropy_flat(logits, torch.from_numpy(labels_i).long())
      (t_recorded + ref_losses.ar_tar(raw, out)).backward()
      t_opt.step()
      assert abs(float(metrics['loss']) - t_recorded.item()) <= FWD_TOL, f'step {step_i}'  # before AR/TAR
      step_i += 1

  nnx.update(flax_clf, state.params, state.rest)
  ours, theirs = flax_to_torch(flax_clf), torch_clf.state_dict()
  for key, value in theirs.items():
    assert _max_diff(ours[key], value) <= GRAD_TOL, key
  initial = flax_to_torch(twin_models()[1])
  moved = {k: np.abs(ours[k] - initial[k]).max() for k in theirs if 'num_batches' not in k}
  assert moved['1.layers.1.2.weight'] > 1e-3 and moved['0.module.rnns.2.weight_hh_l0_raw'] > 1e-3
  assert moved['0.module.rnns.1.weight_hh_l0_raw'] == 0 and moved['0.module.encoder.weight'] == 0  # frozen
