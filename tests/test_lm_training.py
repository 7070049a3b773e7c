"""The LM loss in the generic train step: it learns, it is deterministic given the key,
evaluation gives the model's cross-entropy, and data parallelism over 2 devices gives the
single-device result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config
from flax_ulmfit.train.lm import lm_loss
from flax_ulmfit.train.step import init_train_state, make_eval_step, make_train_step

CONFIG = dict(awd_lstm_lm_config, emb_sz=8, n_hid=12, n_layers=2)
IDS = np.random.default_rng(0).integers(0, 30, (4, 9)).astype(np.int32)


def _train(drop_mult: float, steps: int, lr: float = 1e-2):
  model = LanguageModel(30, CONFIG, drop_mult, rngs=nnx.Rngs(0))
  tx = optax.adam(lr)
  state, step = init_train_state(model, tx), make_train_step(model, lm_loss, tx)
  losses = []
  for i in range(steps):  # the same batch every time, each from the start of the text
    state, _, metrics = step(state, (IDS[:, :-1], IDS[:, 1:]), jax.random.key(i), model.zero_state(4))
    losses.append(float(metrics['loss']))
  return losses, state.params


def test_train_step_learns_a_repeated_batch():
  losses, _ = _train(drop_mult=0.2, steps=25, lr=0.05)
  assert losses[-1] < 0.7 * losses[0]  # memorising one batch of 32 tokens: it drops fast


def test_train_step_is_deterministic_given_the_keys():
  (_, a), (_, b) = _train(1.0, 3), _train(1.0, 3)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_eval_step_gives_the_models_cross_entropy_without_ar_tar():
  model = LanguageModel(30, CONFIG, rngs=nnx.Rngs(0))
  state = init_train_state(model, optax.sgd(0.1))
  _, metrics = make_eval_step(model, lm_loss)(state, (IDS[:, :-1], IDS[:, 1:]), None)
  logits = np.asarray(model(IDS[:, :-1])[0], np.float64)  # make_eval_step set eval mode
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_probs, IDS[:, 1:, None], -1).mean()
  assert abs(float(metrics['loss']) - expected) < 1e-5
  assert set(metrics) == {'loss'}


DATA_PARALLEL_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np, optax
    from flax import nnx
    from flax_ulmfit import parallel
    from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config
    from flax_ulmfit.train.lm import lm_loss
    from flax_ulmfit.train.step import init_train_state, make_train_step
    config = dict(awd_lstm_lm_config, emb_sz=8, n_hid=12, n_layers=2)
    ids = np.random.default_rng(0).integers(0, 30, (4, 9)).astype(np.int32)
    results = {}
    for n_devices in (1, 2):
      model = LanguageModel(30, config, drop_mult=0.0, rngs=nnx.Rngs(0))
      tx = optax.adam(1e-2)
      mesh = parallel.data_mesh(jax.devices()[:n_devices]) if n_devices > 1 else None
      state, step = init_train_state(model, tx), make_train_step(model, lm_loss, tx, mesh=mesh)
      carry, batch = model.zero_state(4), (ids[:, :-1], ids[:, 1:])
      if mesh is not None:
        state = parallel.replicate(state, mesh)
        carry, batch = parallel.shard_batch((carry, batch), mesh)
      for i in range(3):
        state, carry, metrics = step(state, batch, jax.random.key(i), carry)
      results[n_devices] = [float(metrics['loss'])] + [float(np.abs(p).sum()) for p in jax.tree.leaves(state.params)]
    json.dump(results, sys.stdout)
''')


def test_data_parallel_over_two_devices_equals_one_device():
  """Without dropout, splitting the batch 2/2 and averaging gradients is the same step."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  out = subprocess.run([sys.executable, '-c', DATA_PARALLEL_SCRIPT], env=env, check=True,
                       capture_output=True, text=True).stdout
  results = json.loads(out)
  # fp32 sums of 3 Adam steps taken in a different reduction order: agree to ~1e-6 relative.
  np.testing.assert_allclose(results['2'], results['1'], rtol=1e-5)
