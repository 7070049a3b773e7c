"""The LM loss in the generic train step: it learns, it is deterministic given the key,
evaluation gives the model's cross-entropy, and data parallelism over 2 devices gives the
single-device result."""
from __future__ import annotations

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
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from flax_ulmfit import parallel
    from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config
    from flax_ulmfit.train.lm import lm_loss
    from flax_ulmfit.train.step import init_train_state, make_train_step
    config = dict(awd_lstm_lm_config, emb_sz=8, n_hid=12, n_layers=2)
    ids = np.random.default_rng(0).integers(0, 30, (4, 9)).astype(np.int32)
    batch, keys = (ids[:, :-1], ids[:, 1:]), [jax.random.key(i) for i in range(3)]
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # steps donate their state

    def setup(drop_mult, tx, mesh=None):
      model = LanguageModel(30, config, drop_mult=drop_mult, rngs=nnx.Rngs(0))
      return model, init_train_state(model, tx), make_train_step(model, lm_loss, tx, mesh=mesh)

    def run(drop_mult, tx, mesh=None):
      """3 steps on the whole batch, on one device or split over `mesh`."""
      model, state, step = setup(drop_mult, tx, mesh)
      carry, data = model.zero_state(4), batch
      if mesh is not None:
        state = parallel.replicate(state, mesh)
        carry, data = parallel.shard_batch((carry, data), mesh)
      for key in keys:
        state, carry, metrics = step(state, data, key, carry)
      return state.params, float(metrics['loss'])

    def per_shard_sgd(drop_mult, tx):
      """What 2 devices compute today, on one: each half of the batch with the key folded with
      its shard index, and (SGD being linear in the gradient) the two updated params averaged."""
      model, state, step = setup(drop_mult, tx)
      halves = [jax.tree.map(lambda x: x[2 * d:2 * d + 2], batch) for d in (0, 1)]
      carries = [model.zero_state(2)] * 2
      for key in keys:
        results = [step(copy(state), halves[d], jax.random.fold_in(key, d), carries[d]) for d in (0, 1)]
        carries = [carry for _, carry, _ in results]
        state = state._replace(params=jax.tree.map(lambda a, b: (a + b) / 2, *(s.params for s, _, _ in results)),
                               opt_state=results[0][0].opt_state)
      return state.params, sum(float(m['loss']) for _, _, m in results) / 2

    mesh = parallel.data_mesh(jax.devices()[:2])
    out = {}
    for name, (params, loss) in {'off_1': run(0.0, optax.adam(1e-2)), 'off_2': run(0.0, optax.adam(1e-2), mesh),
                                 'on_2': run(1.0, optax.sgd(0.5), mesh), 'on_shards': per_shard_sgd(1.0, optax.sgd(0.5))}.items():
      out[f'{name}/loss'] = loss
      out |= {f'{name}/{i}': np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(params))}
    np.savez(sys.argv[1], **out)
''')


def test_data_parallel_over_two_devices(tmp_path):
  """Dropout off: splitting the batch 2/2 and averaging gradients is the one-device step, leaf by
  leaf after 3 Adam steps. Dropout on: each device draws its masks from the step's key folded
  with its index (so 2 devices are not 1 device until masks are drawn for the global batch);
  the result equals that computation done shard by shard on one device."""
  out_path = tmp_path / 'out.npz'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  subprocess.run([sys.executable, '-c', DATA_PARALLEL_SCRIPT, str(out_path)], env=env, check=True,
                 capture_output=True, text=True)
  out = np.load(out_path)
  n_leaves = len([k for k in out.files if k.startswith('off_1/') and k != 'off_1/loss'])
  assert n_leaves == 10  # the (tied) embedding, 4 tensors per LSTM layer, the decoder bias
  # fp32 steps whose gradient sums run in a different order: agree to ~1e-6 relative.
  for one, two in (('off_1', 'off_2'), ('on_shards', 'on_2')):
    assert abs(out[f'{two}/loss'] - out[f'{one}/loss']) <= 1e-5 * abs(out[f'{one}/loss'])
    for i in range(n_leaves):
      np.testing.assert_allclose(out[f'{two}/{i}'], out[f'{one}/{i}'], rtol=1e-5, atol=1e-7, err_msg=f'{two} leaf {i}')
