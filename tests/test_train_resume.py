"""Runs that never lose work, in one process on a tiny MLP: the step flags inf/NaN, fit stops
on it before saving, checkpoints resume exactly (after a crash or Ctrl-C) and refuse what
does not fit; out-of-range ids are caught on the host."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config
from flax_ulmfit.train import losses, optim, precision, schedules
from flax_ulmfit.train.checkpoints import CheckpointError, TrainCheckpoints
from flax_ulmfit.train.lm import lm_batch_check, lm_loss
from flax_ulmfit.train.loop import EarlyStopping, Interrupted, TrainingDiverged, fit
from flax_ulmfit.train.step import init_train_state, make_eval_step, make_train_step

from tests.test_train_loop import Mlp, blobs, loss_fn

N_EPOCH = 3


def setup(width: int = 16, scaled: bool = False):
  model = Mlp(rngs=nnx.Rngs(0))
  if width != 16:
    model.l1, model.l2 = nnx.Linear(2, width, rngs=nnx.Rngs(0)), nnx.Linear(width, 3, rngs=nnx.Rngs(0))
  total = N_EPOCH * 8
  tx = optim.fastai_optimizer(optim.label_params(nnx.state(model, nnx.Param), [('', 'all')]),
                              {'all': schedules.one_cycle(total, 3e-2)}, mom=schedules.one_cycle_moms(total))
  if scaled:  # the scale grows every 5 clean steps: its state must come back exactly
    tx = precision.dynamic_loss_scale(tx, init_scale=2.0 ** 10, growth_interval=5)
  return model, tx


class Blobs:
  """8 batches per epoch, shuffled by (seed, epoch); optionally calls `hook(epoch, batch)` as
  each batch is made (to crash or signal at a known point)."""

  def __init__(self, hook=None):
    self.data, self.hook = blobs(128, 0), hook

  def __len__(self):
    return len(self.data)

  def batches(self, epoch, start=0):
    order = np.random.default_rng([7, epoch]).permutation(len(self.data))
    for b in range(start, len(self.data)):
      if self.hook is not None:
        self.hook(epoch, b)
      yield self.data[order[b]]


def train(checkpoints=None, hook=None, resume=False, save_every=None, callbacks=(), width=16, scaled=False):
  model, tx = setup(width, scaled)
  state = init_train_state(model, tx)
  return fit(make_train_step(model, loss_fn, tx), state, Blobs(hook), N_EPOCH, rng=jax.random.key(1),
             eval_step=make_eval_step(model, loss_fn), valid_data=blobs(32, 1), progress=False,
             checkpoints=checkpoints, save_every=save_every, resume=resume, callbacks=callbacks)


def assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def uninterrupted():
  return train()


@pytest.fixture(scope='module')
def uninterrupted_scaled():
  return train(scaled=True)


def crash_at(epoch, batch):
  def hook(e, b):
    if (e, b) == (epoch, batch):
      raise RuntimeError('crash')
  return hook


def test_a_crashed_run_resumes_to_the_same_params_and_history(tmp_path, uninterrupted):
  checkpoints = TrainCheckpoints(tmp_path / 'ck', meta={'run': 'blobs'})
  with pytest.raises(RuntimeError, match='crash'):
    train(checkpoints, crash_at(1, 6), save_every=3)
  assert checkpoints.latest_step() == 12  # epoch 1, batch 4: the steps after it are lost
  state, history = train(TrainCheckpoints(tmp_path / 'ck', meta={'run': 'blobs'}), resume=True, save_every=3)
  assert_same_params(state, uninterrupted[0])
  strip = lambda h: [{k: v for k, v in r.items() if k != 'time'} for r in h]
  assert strip(history) == strip(uninterrupted[1])


def test_the_loss_scale_resumes_exactly(tmp_path, uninterrupted_scaled):
  checkpoints = TrainCheckpoints(tmp_path / 'ck')
  with pytest.raises(RuntimeError, match='crash'):
    train(checkpoints, crash_at(1, 7), save_every=3, scaled=True)
  state, _ = train(checkpoints, resume=True, save_every=3, scaled=True)
  assert_same_params(state, uninterrupted_scaled[0])
  assert float(precision.loss_scale(state.opt_state)) == 2.0 ** 10 * 2 ** 4  # 24 clean steps: grew 4 times
  assert int(state.opt_state.good_steps) == int(uninterrupted_scaled[0].opt_state.good_steps) == 4


def test_ctrl_c_saves_the_step_it_stopped_after_and_resume_continues(tmp_path, uninterrupted):
  checkpoints = TrainCheckpoints(tmp_path / 'ck')
  hook = lambda e, b: os.kill(os.getpid(), signal.SIGINT) if (e, b) == (2, 2) else None
  before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under `pytest &`
  try:
    with pytest.raises(Interrupted, match=r'interrupted at epoch 2, batch 3 \(step 19\); the training state is saved'):
      train(checkpoints, hook)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # fit put the handler back
  finally:
    signal.signal(signal.SIGINT, before)
  assert checkpoints.latest_step() == 19
  state, _ = train(checkpoints, resume=True)
  assert_same_params(state, uninterrupted[0])


def test_a_finished_or_early_stopped_run_resumes_to_its_end(tmp_path):
  checkpoints = TrainCheckpoints(tmp_path / 'ck')
  stopper = lambda: EarlyStopping('valid_loss', patience=1, mode='max')  # the loss falls: stops after epoch 1
  state, history = train(checkpoints, callbacks=[stopper()])
  again, again_history = train(checkpoints, resume=True, callbacks=[stopper()])
  assert len(history) == len(again_history) == 2
  assert_same_params(again, state)


def test_checkpoints_that_do_not_fit_are_refused_before_training(tmp_path):
  folder = tmp_path / 'ck'
  train(TrainCheckpoints(folder, meta={'vocab': ['a', 'b']}))
  with pytest.raises(CheckpointError, match='already holds checkpoints'):
    train(TrainCheckpoints(folder, meta={'vocab': ['a', 'b']}))
  with pytest.raises(CheckpointError, match=r"vocab: 1 of 2 entries differ, first #1: 'b' in the checkpoint, 'c' now"):
    train(TrainCheckpoints(folder, meta={'vocab': ['a', 'c']}), resume=True)
  with pytest.raises(CheckpointError, match=r'does not fit .*l1/kernel.*\[2, 16\].*\[2, 8\]'):
    train(TrainCheckpoints(folder, meta={'vocab': ['a', 'b']}), resume=True, width=8)


def test_a_damaged_checkpoint_is_refused_naming_an_older_one(tmp_path):
  folder = tmp_path / 'ck'
  train(TrainCheckpoints(folder))
  newest = folder / '24'
  for f in (newest / 'arrays').rglob('*'):
    if f.is_file() and f.stat().st_size > 200:
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])  # a copy cut short
  with pytest.raises(CheckpointError, match=r'24 is damaged or incomplete .*delete .*24 to resume from step 16'):
    train(TrainCheckpoints(folder), resume=True)


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
  folder = tmp_path / 'ck'
  checkpoints = TrainCheckpoints(folder)
  with pytest.raises(RuntimeError, match='crash'):
    train(checkpoints, crash_at(1, 2))
  # what orbax 0.12.8 left when a save was killed with SIGKILL (measured): the step's
  # folder under a temporary name, holding whatever was written
  leftover = folder / '9.orbax-checkpoint-tmp'
  (leftover / 'arrays').mkdir(parents=True)
  (leftover / 'arrays' / 'half_written').write_bytes(b'\0' * 10)
  fresh = TrainCheckpoints(folder)
  assert fresh.latest_step() == 8  # never taken for a checkpoint
  _, history = train(fresh, resume=True)
  assert len(history) == N_EPOCH and not leftover.exists()


def test_a_non_finite_step_is_flagged_and_fit_stops_before_saving_it(tmp_path):
  model, tx = setup()
  step = make_train_step(model, loss_fn, tx)
  x, y = blobs(16, 0)[0]
  _, _, metrics = step(init_train_state(model, tx), (x.at[3, 0].set(jnp.nan), y), jax.random.key(0), None)
  assert bool(metrics['nonfinite']) and np.isnan(float(metrics['loss']))
  _, _, metrics = step(init_train_state(model, tx), (x, y), jax.random.key(0), None)
  assert not bool(metrics['nonfinite'])

  # Batch 5 is poisoned and a checkpoint is due after every step: fit reads step 5's flag
  # before the save that follows it, so the newest checkpoint is the one before, all finite.
  poisoned = Blobs()
  poisoned.data[5] = (poisoned.data[5][0].at[0, 0].set(jnp.inf), poisoned.data[5][1])
  order = np.random.default_rng([7, 0]).permutation(8)
  bad = int(np.flatnonzero(order == 5)[0])
  checkpoints = TrainCheckpoints(tmp_path)
  with pytest.raises(TrainingDiverged, match=rf'the loss became inf/NaN at step {bad} \(epoch 0, batch {bad}'):
    fit(step, init_train_state(model, tx), poisoned, 1, rng=jax.random.key(0), progress=False,
        checkpoints=checkpoints, save_every=1)
  assert checkpoints.latest_step() == bad
  restored = checkpoints.restore(init_train_state(model, tx), None, bad).state
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(restored.params))


def test_the_check_reads_the_gradients_of_trained_parameters_only():
  """A NaN gradient under a finite loss is flagged when its parameter trains, not when it is frozen."""
  model = Mlp(rngs=nnx.Rngs(0))
  labels = optim.label_params(nnx.state(model, nnx.Param), [('^l1/', 'body'), ('', 'head')])

  def nan_gradient(m, batch, rng, carry):  # sqrt at 0: the value 0, the gradient inf * 0 = NaN
    loss, aux = loss_fn(m, batch, rng, carry)
    return loss + jnp.sqrt(jnp.abs(m.l1.kernel[...]) * 0.0).sum(), aux

  batch = blobs(16, 0)[0]
  for frozen in ((), ('body',)):
    tx = optim.fastai_optimizer(labels, {'body': 1e-2, 'head': 1e-2}, frozen=frozen)
    step = make_train_step(model, nan_gradient, tx, trained=optim.trained_mask(labels, frozen))
    _, _, metrics = step(init_train_state(model, tx), batch, jax.random.key(0), None)
    assert np.isfinite(float(metrics['loss'])) and bool(metrics['nonfinite']) == (frozen == ()), frozen


def test_with_a_loss_scaler_an_overflow_is_skipped_by_the_scaler_not_refused():
  """Scaled gradients overflow while the loss is finite: the scaler backs off (its state must
  change), the params stay, and the step is not reported as non-finite."""
  model, inner = setup()
  biggest = float(jnp.finfo(jnp.float32).max)
  tx = precision.dynamic_loss_scale(inner, init_scale=biggest)
  steep = lambda m, batch, rng, carry: (100 * losses.cross_entropy(m(batch[0]), batch[1]), (carry, {}))
  state = init_train_state(model, tx)
  before = np.asarray(state.params['l1']['kernel'][...])
  # d(scale * loss)/d(logits) ~ biggest * 100 / 16: the scaled gradients overflow
  state, _, metrics = make_train_step(model, steep, tx)(state, blobs(16, 0)[0], jax.random.key(0), None)
  assert not bool(metrics['nonfinite']) and np.isfinite(float(metrics['loss']))
  assert float(precision.loss_scale(state.opt_state)) == biggest / 2
  np.testing.assert_array_equal(np.asarray(state.params['l1']['kernel'][...]), before)


def test_out_of_range_ids_are_refused_on_the_host_before_the_step():
  model = LanguageModel(30, dict(awd_lstm_lm_config, emb_sz=8, n_hid=12, n_layers=1), rngs=nnx.Rngs(0))
  tx = optax.sgd(0.1)
  state = init_train_state(model, tx)
  step = make_train_step(model, lm_loss, tx, check_batch=lm_batch_check(30))
  evaluate = make_eval_step(model, lm_loss, check_batch=lm_batch_check(30))
  x = np.ones((2, 5), np.int32)
  with pytest.raises(ValueError, match=r'input ids must lie in \[0, 30\), got 30 at index \(1, 2\)'):
    step(state, (x.copy() + (np.arange(10).reshape(2, 5) == 7) * 29, x), jax.random.key(0), None)
  with pytest.raises(ValueError, match=r'target ids must lie in \[0, 30\), got -1'):
    evaluate(state, (x, -x), None)
  with pytest.raises(TypeError, match='input ids must be integer ids'):
    step(state, (x.astype(np.float32), x), jax.random.key(0), None)
  state, _, metrics = step(state, (x, x), jax.random.key(0), None)  # the state was not donated by a refused batch
  assert np.isfinite(float(metrics['loss']))
