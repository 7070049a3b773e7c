"""Against fastai 2.8 itself (golden file written by golden/make_fastai_classifier.py): a
`get_text_classifier(AWD_LSTM, ...)` state_dict loads strictly into torch_ref and into Flax;
both give fastai's eval logits on batches padded by fastai's `pad_chunk` (one whose first
chunk is padding in every row), and our export has exactly fastai's keys. With fastai's
dropout draws recorded, one training batch of fastai's `TextLearner` is reproduced: logits,
the loss before and after its RNNRegularizer (AR/TAR on the encoder outputs, padding
included), every gradient, and the BatchNorm running statistics. The parameter groups of
`ulmfit.awd_lstm_clas_split` and the weight-decay exemption of `optim.bn_bias_mask` are
fastai's `awd_lstm_clas_split` and `norm_bias_params`.

Tolerances: the numerical contract's fp32 bounds (forward 1e-5, gradients 1e-4).
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref.classifier as ref
import torch_ref.losses as ref_losses
from flax_ulmfit import ulmfit
from flax_ulmfit.interop import flax_to_torch, torch_to_flax
from flax_ulmfit.models import TextClassifier
from flax_ulmfit.train import optim
from flax_ulmfit.train.clas import clas_loss

GOLDEN = np.load(Path(__file__).parent / 'golden' / 'fastai_classifier.npz', allow_pickle=False)
SETUP = json.loads(str(GOLDEN['config']))
CONFIG = {k: SETUP[k] for k in ('emb_sz', 'n_hid', 'n_layers', 'pad_token', 'bidir', 'output_p', 'hidden_p',
                                'input_p', 'embed_p', 'weight_p')}
OPTIONS = dict(lin_ftrs=SETUP['lin_ftrs'], ps=SETUP['ps'])
STATE_DICT = {k.removeprefix('state_dict/'): GOLDEN[k] for k in GOLDEN.files if k.startswith('state_dict/')}
FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def _masks():
  n_layers = CONFIG['n_layers']
  encoder = dict(embed=GOLDEN['train/masks/embed'], input=GOLDEN['train/masks/input'],
                 weight=[GOLDEN[f'train/masks/weight/{l}'] for l in range(n_layers)],
                 hidden=[GOLDEN[f'train/masks/hidden/{l}'] for l in range(n_layers - 1)])
  return {'encoder': encoder, 'head': [GOLDEN[f'train/masks/head/{i}'] for i in range(len(OPTIONS['ps']) + 1)]}


def _torch_ref():
  model = ref.TextClassifier(SETUP['vocab'], SETUP['n_class'], SETUP['seq_len'], CONFIG, drop_mult=1.0,
                             max_len=SETUP['max_len'], **OPTIONS)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in STATE_DICT.items()}, strict=True)
  return model


def _flax():
  clf = TextClassifier(SETUP['vocab'], SETUP['n_class'], CONFIG, drop_mult=1.0, seq_len=SETUP['seq_len'],
                       max_len=SETUP['max_len'], rngs=nnx.Rngs(0), **OPTIONS)
  return torch_to_flax(STATE_DICT, clf)


@pytest.mark.parametrize('n_tokens', [25, 30])
def test_eval_logits_equal_fastai(n_tokens):
  tokens, expected = GOLDEN[f'eval/{n_tokens}/tokens'], GOLDEN[f'eval/{n_tokens}/logits']
  model = _torch_ref().eval()
  with torch.no_grad():
    assert np.abs(model(torch.from_numpy(tokens))[0].numpy() - expected).max() <= FWD_TOL
  clf = _flax()
  clf.eval()
  assert np.abs(np.asarray(clf(jnp.asarray(tokens, jnp.int32))) - expected).max() <= FWD_TOL


def test_export_has_fastai_keys_and_values():
  exported = flax_to_torch(_flax())
  assert list(exported) == list(STATE_DICT)
  for key, value in STATE_DICT.items():
    assert exported[key].dtype == value.dtype, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_torch_ref_reproduces_a_fastai_training_batch():
  model = _torch_ref().train()
  tokens, labels = torch.from_numpy(GOLDEN['train/tokens']), torch.from_numpy(GOLDEN['train/labels'])
  logits, raw, out = model(tokens, _masks())
  loss = ref_losses.cross_entropy_flat(logits, labels)
  loss_grad = loss + ref_losses.ar_tar(raw, out)
  loss_grad.backward()
  assert np.abs(logits.detach().numpy() - GOLDEN['train/logits']).max() <= FWD_TOL
  assert abs(loss.item() - float(GOLDEN['train/loss'])) <= FWD_TOL
  assert abs(loss_grad.item() - float(GOLDEN['train/loss_grad'])) <= FWD_TOL
  for name, param in model.named_parameters():
    assert np.abs(param.grad.numpy() - GOLDEN[f'train/grad/{name}']).max() <= GRAD_TOL, name


def test_flax_reproduces_a_fastai_training_batch():
  clf = _flax()
  tokens, labels = jnp.asarray(GOLDEN['train/tokens'], jnp.int32), jnp.asarray(GOLDEN['train/labels'], jnp.int32)
  masks = _masks()

  def loss_fn(model):
    loss, (_, metrics) = clas_loss(model, (tokens, labels, masks), rng=jax.random.key(0), carry=None)
    return loss, metrics

  (loss_grad, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(clf)
  assert abs(float(metrics['loss']) - float(GOLDEN['train/loss'])) <= FWD_TOL  # fastai's recorded loss
  assert abs(float(loss_grad) - float(GOLDEN['train/loss_grad'])) <= FWD_TOL
  assert float(GOLDEN['train/loss_grad']) - float(GOLDEN['train/loss']) > 1e-3  # AR/TAR really counted
  after = flax_to_torch(clf)  # the forward pass moved the BatchNorm statistics
  for key in (k for k in GOLDEN.files if k.startswith('train/after/')):
    name = key.removeprefix('train/after/')
    assert np.abs(after[name].astype(np.float64) - GOLDEN[key]).max() <= FWD_TOL, name
  grad_model = nnx.clone(clf)
  nnx.update(grad_model, grads)
  flax_grads = flax_to_torch(grad_model)
  for key in (k for k in GOLDEN.files if k.startswith('train/grad/')):
    name = key.removeprefix('train/grad/')
    assert np.abs(flax_grads[name] - GOLDEN[key]).max() <= GRAD_TOL, name


def _by_torch_key(model, values, keys):
  """One number per Flax parameter (a pytree like its params) -> {state_dict key: number} for
  `keys`, read back through the exporter, so fastai's names judge which parameter got which."""
  marked = nnx.clone(model)
  params = nnx.state(marked, nnx.Param)
  nnx.update(marked, jax.tree.map(lambda p, v: jnp.full(p.shape, v, p.dtype), params, values))
  exported = flax_to_torch(marked)
  for key in keys:
    assert exported[key].min() == exported[key].max(), key  # one Flax parameter per key
  return {key: float(exported[key].flat[0]) for key in keys}


def test_groups_and_weight_decay_exemption_equal_fastai():
  """Gradual unfreezing freezes by group and fastai's `wd_bn_bias=False` spares what
  `norm_bias_params` finds (the head's BatchNorms; an LSTM's `bias` is a flag, so LSTM biases decay)."""
  clf = _flax()
  params = nnx.state(clf, nnx.Param)
  split = ulmfit.awd_lstm_clas_split(CONFIG['n_layers'])
  index = {g: i for i, g in enumerate(split.groups)}
  fastai_groups = json.loads(str(GOLDEN['split']))
  trainable = [n for names in fastai_groups for n in names]
  group_of = _by_torch_key(clf, jax.tree.map(index.get, optim.label_params(params, split.rules)), trainable)
  assert len(fastai_groups) == len(split.groups)
  for i, names in enumerate(fastai_groups):
    assert {n: group_of[n] for n in names} == {n: i for n in names}
  exempt = _by_torch_key(clf, jax.tree.map(float, optim.bn_bias_mask(clf, params)), trainable)
  assert {n for n in trainable if exempt[n]} == set(json.loads(str(GOLDEN['wd_exempt'])))
