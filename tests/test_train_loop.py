"""fit, callbacks, logs, plots and lr_find on a tiny MLP classifier (blobs that an MLP separates)."""
import csv
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import torch_ref.schedules as torch_schedules
from flax_ulmfit import checkpoint
from flax_ulmfit.train import losses, optim, schedules
from flax_ulmfit.train.loop import EarlyStopping, SaveBest, fit, save_plots
from flax_ulmfit.train import lr_find as lr_find_module
from flax_ulmfit.train.lr_find import lr_find, valley
from flax_ulmfit.train.step import init_train_state, make_eval_step, make_train_step, update_model


class Mlp(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.l1, self.l2 = nnx.Linear(2, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def blobs(n, seed, noise=0.3):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  x = np.stack([np.cos(2 * np.pi * y / 3), np.sin(2 * np.pi * y / 3)], 1) * 2 + rng.normal(size=(n, 2)) * noise
  return [(jnp.asarray(x[i:i + 16], jnp.float32), jnp.asarray(y[i:i + 16], jnp.int32)) for i in range(0, n, 16)]


def loss_fn(model, batch, rng, carry):
  logits = model(batch[0])
  return losses.cross_entropy(logits, batch[1]), (carry, {'accuracy': losses.accuracy(logits, batch[1])})


def setup(n_epoch, lr=3e-2):
  model = Mlp(rngs=nnx.Rngs(0))
  train, valid = blobs(128, 0), blobs(64, 1)
  params = nnx.state(model, nnx.Param)
  total = n_epoch * len(train)
  tx = optim.fastai_optimizer(optim.label_params(params, [('', 'all')]), {'all': schedules.one_cycle(total, lr)},
                              mom=schedules.one_cycle_moms(total))
  return model, init_train_state(model, tx), make_train_step(model, loss_fn, tx), make_eval_step(model, loss_fn), train, valid


def test_fit_learns_logs_and_plots(tmp_path):
  model, state, step, eval_step, train, valid = setup(3)
  state, history = fit(step, state, train, 3, rng=jax.random.key(0), eval_step=eval_step, valid_data=valid,
                       log_path=tmp_path / 'log.csv', plot_path=tmp_path / 'plots.png', progress=False)
  assert [r['epoch'] for r in history] == [0, 1, 2]
  assert history[-1]['valid_loss'] < history[0]['valid_loss']
  assert history[-1]['valid_accuracy'] > 0.9  # the blobs are separable; chance is 1/3
  # one-cycle: the last lr is the schedule's value at the last step (8 batches x 3 epochs);
  # rel 1e-4: jitted vs eager float32 near the run's end, where the cosine amplifies rounding.
  assert history[-1]['lr'] == pytest.approx(float(schedules.one_cycle(24, 3e-2)(23)), rel=1e-4)
  rows = list(csv.DictReader(open(tmp_path / 'log.csv')))
  assert len(rows) == 3 and float(rows[2]['valid_loss']) == pytest.approx(history[2]['valid_loss'])
  assert (tmp_path / 'plots.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  update_model(model, state)
  assert float(losses.accuracy(model(valid[0][0]), valid[0][1])) > 0.9


def test_fit_jsonl_log_and_language_model_perplexity(tmp_path):
  _, state, step, eval_step, train, valid = setup(1)
  _, history = fit(step, state, train, 1, rng=jax.random.key(0), eval_step=eval_step, valid_data=valid,
                   language_model=True, log_path=tmp_path / 'log.jsonl', progress=False)
  record = json.loads((tmp_path / 'log.jsonl').read_text().splitlines()[0])
  assert record['perplexity'] == pytest.approx(np.exp(record['valid_loss']))


def test_early_stopping_and_save_best(tmp_path):
  model, state, step, eval_step, train, valid = setup(6, lr=10.0)  # diverging lr: no improvement after a while
  stopper = EarlyStopping('valid_loss', patience=1)
  saver = SaveBest(tmp_path / 'best.npz')
  _, history = fit(step, state, train, 6, rng=jax.random.key(0), eval_step=eval_step, valid_data=valid,
                   callbacks=[stopper, saver], progress=False)
  assert len(history) < 6
  best = min(history, key=lambda r: r['valid_loss'])
  like = {'params': nnx.state(model, nnx.Param), 'rest': nnx.split(model, nnx.Param, ...)[2]}
  tree, meta = checkpoint.load(tmp_path / 'best.npz', like)
  assert meta['epoch'] == best['epoch'] and meta['valid_loss'] == pytest.approx(best['valid_loss'])


def test_monitor_must_exist():
  with pytest.raises(KeyError, match="monitor 'valid_accuracy' is not in the epoch record"):
    EarlyStopping('valid_accuracy').after_epoch(0, {'train_loss': 1.0}, None)


def test_fit_rejects_empty_data():
  _, state, step, _, _, _ = setup(1)
  with pytest.raises(ValueError, match='train_data gave no batches'):
    fit(step, state, [], 1, rng=jax.random.key(0), progress=False)


def test_the_log_records_the_lr_of_the_group_fastai_records():
  """fastai's Recorder logs `opt.hypers[-1]`: the split's last group (the head), here 'head'
  at 10x the rate of 'stem', which sorts after it by name."""
  model = Mlp(rngs=nnx.Rngs(0))
  train = blobs(64, 0)
  labels = optim.label_params(nnx.state(model, nnx.Param), [('^l1/', 'stem'), ('', 'head')])
  total = len(train)
  tx = optim.fastai_optimizer(labels, {'stem': schedules.one_cycle(total, 1e-3), 'head': schedules.one_cycle(total, 1e-2)},
                              mom=schedules.one_cycle_moms(total))
  step, state = make_train_step(model, loss_fn, tx), init_train_state(model, tx)
  _, history = fit(step, state, train, 1, rng=jax.random.key(0), progress=False, log_group='head')
  want = torch_schedules.one_cycle(total, 1e-2)(total - 1)  # fastai's schedule at the last step, read by torch_ref
  assert history[-1]['lr'] == pytest.approx(want, rel=1e-6)
  assert history[-1]['mom'] == pytest.approx(torch_schedules.one_cycle_moms(total)(total - 1), rel=1e-6)
  with pytest.raises(ValueError, match="log_group 'body' has no learning rate"):
    fit(step, init_train_state(model, tx), train, 1, rng=jax.random.key(0), progress=False, log_group='body')


NUM_IT = 60
GOLDEN_VALLEY = Path(__file__).parents[1] / 'parity_tests' / 'golden' / 'fastai_valley.npz'


def mlp_lr_find(model, plot_path=None):
  """The sweep whose curve parity_tests/golden/lr_find_curve.json records (fastai's suggestion beside it)."""
  labels = optim.label_params(nnx.state(model, nnx.Param), [('', 'all')])
  noisy = blobs(128, 0, noise=3.0)  # overlapping classes: at a huge lr the loss must blow up
  return lr_find(model, loss_fn, lambda lr: optim.fastai_optimizer(labels, {'all': lr}), noisy,
                 rng=jax.random.key(0), start_lr=1e-5, end_lr=1e3, num_it=NUM_IT, plot_path=plot_path)


def test_lr_find_sweeps_stops_on_divergence_suggests_fastais_valley_and_keeps_model(tmp_path, monkeypatch):
  """The recorded curve is the one fastai's `valley` was run on (golden), and the suggestion
  is fastai's: the same index into the curve, which `valley` sees trimmed as fastai's
  `Learner.lr_find` trims it (`[num_it // 10:-5]`)."""
  golden = np.load(GOLDEN_VALLEY)
  model = Mlp(rngs=nnx.Rngs(0))
  before = np.asarray(model.l1.kernel[...]).copy()
  seen = []
  monkeypatch.setattr(lr_find_module, 'valley', lambda lrs, losses: seen.append((lrs, losses)) or valley(lrs, losses))
  result = mlp_lr_find(model, tmp_path / 'lr.png')
  assert seen == [(result.lrs[NUM_IT // 10:-5], result.losses[NUM_IT // 10:-5])]
  assert len(result.lrs) < NUM_IT  # lr 1e3 diverges: the sweep stopped early
  np.testing.assert_allclose(result.lrs, golden['lr_find_lrs'], rtol=1e-12)
  # 47 jitted float32 steps: the smoothed losses agree to rounding here; rtol 1e-5 leaves room
  # for another CPU's kernels (fastai's suggestion on this curve holds under 1e-5 noise).
  np.testing.assert_allclose(result.losses, golden['lr_find_losses'], rtol=1e-5)
  assert result.suggestion == result.lrs[int(golden['lr_find_index'])]
  assert result.suggestion == pytest.approx(float(golden['lr_find_suggestion']), rel=1e-7)  # fastai's is float32
  assert (tmp_path / 'lr.png').exists()
  np.testing.assert_array_equal(np.asarray(model.l1.kernel[...]), before)


def test_whole_train_state_checkpoints_for_resuming(tmp_path):
  """Params, BatchStats/RNG state and the optimizer's (groups, schedules' counts) round-trip."""
  _, state, step, _, train, _ = setup(1)
  state, _ = fit(step, state, train[:2], 1, rng=jax.random.key(0), progress=False)
  checkpoint.save(tmp_path / 'resume.npz', state)
  back, _ = checkpoint.load(tmp_path / 'resume.npz', state)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(back.opt_state[0].inner_states['all'].inner_state.count) == 2  # the schedule's count: two steps


def test_plots_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'matplotlib', None)  # makes `import matplotlib` fail
  save_plots(tmp_path / 'p.png', {'loss': [1.0, 0.5], 'learning_rate': [1e-3, 1e-3], 'mom': []}, [])
  assert not (tmp_path / 'p.png').exists()
  assert 'matplotlib is not installed' in capsys.readouterr().out
