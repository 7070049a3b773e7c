"""AWD-LSTM in training mode against fastai 2.8 itself (golden/make_fastai_awd_lstm_train.py):
fastai's model with its mask draws replaced by stored masks, two consecutive batches with
the state carried. Pinned: every dropout site (what it multiplies and where), the state
carried under dropout, logits and the raw and dropped last-layer outputs, the loss fastai
backpropagates (`CrossEntropyLossFlat` + its `RNNRegularizer(alpha=2, beta=1)`, whose TAR is
skipped for a one-row batch) and the gradient of every state_dict entry, for the Flax
model through `lm_loss` (the training path) and for torch_ref.

Tolerances: the numerical contract's fp32 bounds, forward 1e-5 and gradients 1e-4.
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref.awd_lstm as ref
import torch_ref.losses as ref_losses
from flax_ulmfit.interop import flax_to_torch, torch_to_flax
from flax_ulmfit.models import LanguageModel
from flax_ulmfit.train.lm import lm_loss
from parity_tests.awd_lstm_cases import as_jax, max_diff

GOLDEN = np.load(Path(__file__).parent / 'golden' / 'fastai_awd_lstm_train.npz', allow_pickle=False)
CONFIG, VOCAB = json.loads(str(GOLDEN['config'])), int(GOLDEN['vocab'])
STATE_DICT = {k.removeprefix('state_dict/'): GOLDEN[k] for k in GOLDEN.files if k.startswith('state_dict/')}
IDS = GOLDEN['tokens'].astype(np.int32)
BATCHES = {'first': (IDS[:, 0:8], IDS[:, 1:9]), 'second': (IDS[:, 8:16], IDS[:, 9:17])}
FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def masks(prefix: str) -> dict:
  """The stored masks in `sample_masks`' layout (numpy arrays)."""
  get = lambda name: GOLDEN[f'{prefix}/masks/{name}']  # noqa: E731
  n = CONFIG['n_layers']
  return dict(embed=get('embed'), input=get('input'), output=get('output'),
              weight=[get(f'weight{l}') for l in range(n)], hidden=[get(f'hidden{l}') for l in range(n - 1)])


@pytest.fixture(scope='module')
def flax_lm():
  lm = torch_to_flax(STATE_DICT, LanguageModel(VOCAB, CONFIG, rngs=nnx.Rngs(0)))
  lm.train()
  return lm


def test_flax_training_forward_loss_and_gradients_equal_fastai(flax_lm):
  states = [None]
  for name, (x, _) in BATCHES.items():
    logits, state, extras = flax_lm(jnp.asarray(x), states[-1], as_jax(masks(name)))
    states.append(jax.lax.stop_gradient(state))
    for ours, key in ((logits, 'logits'), (extras.raw, 'raw'), (extras.dropped, 'dropped')):
      assert max_diff(ours, GOLDEN[f'{name}/{key}']) <= FWD_TOL, f'{name} {key}'

  x, y = BATCHES['second']

  def loss(model):  # the train step's loss, from the state the first batch left
    value, (_, metrics) = lm_loss(model, (jnp.asarray(x), jnp.asarray(y), as_jax(masks('second'))),
                                  jax.random.key(0), states[1])
    return value, metrics
  (value, metrics), grads = nnx.value_and_grad(loss, has_aux=True)(flax_lm)
  assert abs(float(value) - float(GOLDEN['second/loss'])) <= FWD_TOL
  assert abs(float(metrics['loss']) - float(GOLDEN['second/cross_entropy'])) <= FWD_TOL  # the recorded loss: before AR/TAR
  grad_model = nnx.clone(flax_lm)
  nnx.update(grad_model, grads)
  ours = flax_to_torch(grad_model)
  assert set(ours) == set(STATE_DICT)
  for key in STATE_DICT:
    assert max_diff(ours[key], GOLDEN[f'grad/{key}']) <= GRAD_TOL, key
  assert min(np.abs(GOLDEN[f'grad/0.rnns.{l}.weight_hh_l0_raw']).max() for l in range(3)) > 1e-4  # gradients flowed


def test_torch_ref_training_forward_loss_and_gradients_equal_fastai():
  model = ref.LanguageModel(VOCAB, CONFIG)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in STATE_DICT.items()}, strict=True)
  model.train()
  state = None
  for name, (x, y) in BATCHES.items():
    logits, state, (raw, dropped) = model(torch.from_numpy(x).long(), state, masks(name))
    if name == 'first':
      state = tuple((h.detach(), c.detach()) for h, c in state)
    for ours, key in ((logits, 'logits'), (raw, 'raw'), (dropped, 'dropped')):
      assert max_diff(ours, GOLDEN[f'{name}/{key}']) <= FWD_TOL, f'{name} {key}'
  loss = ref_losses.cross_entropy_flat(logits, torch.from_numpy(y).long()) + ref_losses.ar_tar(raw, dropped)
  loss.backward()
  assert abs(loss.item() - float(GOLDEN['second/loss'])) <= FWD_TOL
  params = dict(model.named_parameters(remove_duplicate=False))
  for key in STATE_DICT:
    grad = params.get(key, params['0.encoder.weight']).grad  # the tied embedding's other names
    assert max_diff(grad, GOLDEN[f'grad/{key}']) <= GRAD_TOL, key


def test_one_row_batch_skips_tar_as_fastai_does(flax_lm):
  """fastai's RNNRegularizer guards TAR with `len(h) > 1`, the batch axis: one row, no TAR."""
  tokens = GOLDEN['single/tokens'].astype(np.int32)
  x, y = tokens[:, :-1], tokens[:, 1:]
  expected = float(GOLDEN['single/loss'])
  assert expected == pytest.approx(float(GOLDEN['single/cross_entropy']) + float(GOLDEN['single/ar']), abs=1e-6)
  value, _ = lm_loss(flax_lm, (jnp.asarray(x), jnp.asarray(y), as_jax(masks('single'))), jax.random.key(0), None)
  assert abs(float(value) - expected) <= FWD_TOL
  model = ref.LanguageModel(VOCAB, CONFIG)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in STATE_DICT.items()}, strict=True)
  model.train()
  logits, _, (raw, dropped) = model(torch.from_numpy(x).long(), None, masks('single'))
  loss = ref_losses.cross_entropy_flat(logits, torch.from_numpy(y).long()) + ref_losses.ar_tar(raw, dropped)
  assert abs(loss.item() - expected) <= FWD_TOL
