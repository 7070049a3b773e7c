"""LM train step: it learns, it is deterministic given the key, and data parallelism over
2 devices gives the single-device result."""
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
from flax_ulmfit.train.lm import make_lm_eval_step, make_lm_train_step

CONFIG = dict(awd_lstm_lm_config, emb_sz=8, n_hid=12, n_layers=2)


def _train(drop_mult: float, steps: int, lr: float = 1e-2):
  model = LanguageModel(30, CONFIG, drop_mult, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(lr)
  opt_state = tx.init(params)
  step = make_lm_train_step(graphdef, tx)
  ids = np.random.default_rng(0).integers(0, 30, (4, 9)).astype(np.int32)
  state, losses = model.zero_state(4), []
  for i in range(steps):
    params, opt_state, state, metrics = step(params, opt_state, rest, ids[:, :-1], ids[:, 1:], state,
                                             jax.random.key(i))
    state = model.zero_state(4)  # the same batch every time: restart the text
    losses.append(float(metrics['cross_entropy']))
  return losses, params


def test_train_step_learns_a_repeated_batch():
  losses, _ = _train(drop_mult=0.2, steps=25, lr=0.05)
  assert losses[-1] < 0.7 * losses[0]  # memorising one batch of 32 tokens: it drops fast


def test_train_step_is_deterministic_given_the_keys():
  (_, a), (_, b) = _train(1.0, 3), _train(1.0, 3)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_eval_step_cross_entropy_matches_the_model():
  model = LanguageModel(30, CONFIG, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ids = np.random.default_rng(1).integers(0, 30, (2, 7)).astype(np.int32)
  _, cross_entropy = make_lm_eval_step(graphdef)(params, rest, ids[:, :-1], ids[:, 1:], None)
  logits = np.asarray(model(ids[:, :-1])[0], np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_probs, ids[:, 1:, None], -1).mean()
  assert abs(float(cross_entropy) - expected) < 1e-5


DATA_PARALLEL_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np, optax
    from flax import nnx
    from flax_ulmfit import parallel
    from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config
    from flax_ulmfit.train.lm import make_lm_train_step
    config = dict(awd_lstm_lm_config, emb_sz=8, n_hid=12, n_layers=2)
    ids = np.random.default_rng(0).integers(0, 30, (4, 9)).astype(np.int32)
    results = {}
    for n_devices in (1, 2):
      model = LanguageModel(30, config, drop_mult=0.0, rngs=nnx.Rngs(0))
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      tx = optax.adam(1e-2)
      opt_state = tx.init(params)
      mesh = parallel.data_mesh(jax.devices()[:n_devices]) if n_devices > 1 else None
      step = make_lm_train_step(graphdef, tx, mesh=mesh)
      state = model.zero_state(4)
      x, y = ids[:, :-1], ids[:, 1:]
      if mesh is not None:
        params, opt_state, rest = parallel.replicate((params, opt_state, rest), mesh)
        state, x, y = parallel.shard_batch((state, x, y), mesh)
      for i in range(3):
        params, opt_state, state, metrics = step(params, opt_state, rest, x, y, state, jax.random.key(i))
      results[n_devices] = [float(metrics['loss'])] + [float(np.abs(p).sum()) for p in jax.tree.leaves(params)]
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
