"""Run by tests/test_data_parallel.py in a process with 4 XLA host devices: 3 training steps and
one evaluation of the LM, the classifier and a small XResNet, on one device and over a 4-device
mesh, saved to the .npz named on the command line as `{model}/{run}/...` arrays.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/data_parallel_job.py OUT.npz
"""
from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_ulmfit import parallel, ulmfit
from flax_ulmfit.models import LanguageModel, TextClassifier, awd_lstm_lm_config
from flax_ulmfit.models.xresnet import XResNet
from flax_ulmfit.text.labels import PAD_LABEL
from flax_ulmfit.train.clas import clas_batch_check, clas_loss
from flax_ulmfit.train.lm import lm_batch_check, lm_loss
from flax_ulmfit.train.step import init_train_state, make_eval_step, make_train_step
from flax_ulmfit.vision.learner import vision_loss

BS, STEPS, SHORT = 8, 3, 5  # 2 rows per device on 4 devices; a short last batch of 5


def lm_case():
  """The AWD-LSTM LM with every dropout on (drop_mult 1), Adam, the state carried over 3 batches."""
  data = np.random.default_rng(0)
  model = LanguageModel(30, dict(awd_lstm_lm_config, emb_sz=8, n_hid=12, n_layers=2), drop_mult=1.0,
                        rngs=nnx.Rngs(0))
  ids = data.integers(0, 30, (BS, 3 * 6 + 1)).astype(np.int32)
  batches = [(ids[:, i * 6:(i + 1) * 6], ids[:, i * 6 + 1:(i + 1) * 6 + 1]) for i in range(STEPS)]
  return model, lm_loss, optax.adam(1e-2), batches, model.zero_state(BS), lm_batch_check(30), None


def clas_case():
  """The text classifier in the CLASSIFIER recipe's second stage (`freeze_to(-2)`: head and last
  LSTM layer train), its head's BatchNorm and dropout on; texts of several chunks, some padded."""
  data = np.random.default_rng(0)
  model = TextClassifier(16, 3, dict(emb_sz=4, n_hid=6, n_layers=3), drop_mult=1.0, seq_len=4, max_len=8,
                         rngs=nnx.Rngs(0))
  (_, tx), = [(s, t) for s, t in ulmfit.stage_optimizers(model, ulmfit.awd_lstm_clas_split(3), ulmfit.CLASSIFIER, 3)
              if s.name == 'last_two']
  batches = []
  for _ in range(STEPS):
    tokens = data.integers(2, 16, (BS, 12)).astype(np.int32)
    tokens[1, :4] = 1  # a shorter text: a whole chunk of padding first
    tokens[5, :8] = 1
    batches.append((tokens, data.integers(0, 3, BS).astype(np.int32)))
  filler = np.ones((BS - SHORT, 12), np.int32)
  filler[:, 8] = 2  # ClasLoader's padding row: one token on the last chunk's start
  return model, clas_loss, tx, batches, None, clas_batch_check(model), filler


def xresnet_case():
  """xresnet18's kind (basic blocks, 4 stages, BatchNorm everywhere) with one block per stage at
  1/16 of its widths (a small compile), 16x16 images, head dropout, mixup and label smoothing,
  SGD with momentum."""
  data = np.random.default_rng(0)
  model = XResNet(1, [1, 1, 1, 1], p=0.5, c_in=1, n_out=3, stem_szs=(4, 4, 64), widen=1 / 16, rngs=nnx.Rngs(0))
  # SGD with momentum, not Adam: a shift of a stem channel that stays above 0 through its ReLU
  # is removed by the next BatchNorm, so its bias gradient is exactly 0 in theory and fp32
  # rounding residue (~1e-7, either sign) in practice, which Adam (eps 1e-5) turns into
  # steps of ~lr / 100 in a random direction on 1 and on 4 devices alike.
  tx = optax.sgd(0.1, momentum=0.9)
  batches = [(data.normal(size=(BS, 16, 16, 1)).astype(np.float32), data.integers(0, 3, BS).astype(np.int32))
             for _ in range(STEPS)]
  filler = np.zeros((BS - SHORT, 16, 16, 1), np.float32)  # ImageLoader's padding rows
  return model, functools.partial(vision_loss, mixup_alpha=0.4, ls_eps=0.1), tx, batches, None, None, filler


def run(case, mesh):
  """3 train steps from the model's weights, then one eval step on the first batch; the leaves.
  Classifiers also evaluate the first batch's first SHORT rows: whole on one device, padded to BS
  with rows labelled PAD_LABEL (what the loaders' `pad_last` gives) on the mesh."""
  model, loss_fn, tx, batches, carry, check, filler = case
  state = init_train_state(model, tx)
  if mesh is not None:
    state = parallel.replicate(state, mesh)
  train = make_train_step(model, loss_fn, tx, mesh=mesh, check_batch=check)
  evaluate = make_eval_step(model, loss_fn, check_batch=check, mesh=mesh)
  losses = []
  for i, batch in enumerate(batches):
    state, carry, metrics = train(state, batch, jax.random.key(i), carry)
    losses.append(float(metrics['loss']))
  _, eval_metrics = evaluate(state, batches[0], carry)
  if filler is not None:
    x, y = (a[:SHORT] for a in batches[0])
    if mesh is not None:
      x, y = np.concatenate([x, filler]), np.concatenate([y, np.full(BS - SHORT, PAD_LABEL, np.int32)])
    _, short_metrics = evaluate(state, (x, y), carry)
    eval_metrics |= {f'short_{k}': v for k, v in short_metrics.items()}
  out = {f'leaf/{jax.tree_util.keystr(path)}': np.asarray(leaf) for path, leaf
         in jax.tree_util.tree_leaves_with_path((state.params, state.rest, state.opt_state))
         if jnp.issubdtype(leaf.dtype, jnp.number)}
  out['train_loss'] = np.asarray(losses)
  out |= {f'eval/{k}': np.asarray(v) for k, v in eval_metrics.items()}
  return out


if __name__ == '__main__':
  assert len(jax.devices()) == 4, jax.devices()
  mesh = parallel.data_mesh()
  results = {}
  for name, make_case in {'lm': lm_case, 'clas': clas_case, 'xresnet': xresnet_case}.items():
    case = make_case()  # one model for both runs: each starts from a copy of its weights
    for devices, m in (('1', None), ('4', mesh)):
      results |= {f'{name}/{devices}/{k}': v for k, v in run(case, m).items()}
  np.savez(sys.argv[1], **results)
