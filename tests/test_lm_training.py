"""The LM loss in the generic train step: it learns, it is deterministic given the key, and
evaluation gives the model's cross-entropy (data parallelism: tests/test_data_parallel.py)."""
from __future__ import annotations

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
