"""scripts/pretrain_lm.py end to end on a small WikiText file the test writes: outputs, exact
resume after Ctrl-C and SIGKILL in the middle of an epoch, a diverging run, bad flags."""
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import script_runs

ROOT = script_runs.ROOT
SCRIPT = ROOT / 'scripts' / 'pretrain_lm.py'
TINY = ['--size', 'tiny', '--bs', '4', '--bptt', '16', '--valid-pct', '0.34']


def _wikitext(path: Path, n_articles: int = 6) -> Path:
  """Articles of a 20-word cycle: predictable, so a working LM's loss must fall."""
  words = [f'word{i}' for i in range(20)]
  lines = []
  for a in range(n_articles):
    lines += ['', f' = Article {a} = ', '']
    for line in range(15):
      lines.append(' ' + ' '.join(words[(line + j) % 20] for j in range(30)) + ' . ')
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return path


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return script_runs.script_env(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return _wikitext(tmp_path_factory.mktemp('corpus') / 'wiki.train.tokens')


def run(args, env, **kw):
  return script_runs.run(SCRIPT, args, env, **kw)


def run_with_signal(sig, epoch, batch, args, env):
  return script_runs.run_with_signal(SCRIPT, 'LMLoader', sig, epoch, batch, args, env)


def weights(out: Path) -> dict:
  with np.load(out / 'model' / 'lm.npz', allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def log_rows(out: Path) -> list[dict]:
  return [{k: v for k, v in row.items() if k != 'time'} for row in csv.DictReader(open(out / 'log-0-all.csv'))]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, corpus, env):
  out = tmp_path_factory.mktemp('runs') / 'whole'
  result = run(['--wikitext', corpus, *TINY, '--epochs', '2', '--lr', '3e-2', '--out', out], env)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def test_pretrain_lm_trains_and_writes_its_outputs(uninterrupted):
  out, result = uninterrupted
  assert 'perplexity' in result.stdout
  rows = list(csv.DictReader(open(out / 'log-0-all.csv')))
  assert [int(r['epoch']) for r in rows] == [0, 1]
  valid = [float(r['valid_loss']) for r in rows]
  assert valid[1] < valid[0] and valid[1] < math.log(20)  # learns; beats a guess among the 20 words
  assert math.isclose(float(rows[-1]['perplexity']), math.exp(valid[1]), rel_tol=1e-9)
  assert sorted(p.name for p in (out / 'model').iterdir()) == ['config.json', 'lm.npz', 'vocab.json']
  vocab = json.loads((out / 'model' / 'vocab.json').read_text())
  assert 'word7' in vocab['itos']
  assert any(k.endswith('1.decoder.bias') for k in weights(out))
  assert json.loads((out / 'model' / 'config.json').read_text())['vocab_size'] == len(vocab['itos'])


def test_ctrl_c_and_sigkill_mid_epoch_then_resume_equal_the_uninterrupted_run(tmp_path, corpus, env, uninterrupted):
  """Ctrl-C in epoch 0 saves and exits 130; SIGKILL in epoch 1 loses the steps after the
  last --save-every checkpoint; each --resume continues, and the result is bit for bit the
  uninterrupted run's (same params, same logged losses)."""
  out = tmp_path / 'run'
  args = ['--wikitext', corpus, *TINY, '--epochs', '2', '--lr', '3e-2', '--out', out, '--save-every', '4']
  ctrl_c = run_with_signal(signal.SIGINT, 0, 10, args, env)
  assert ctrl_c.returncode == 130, ctrl_c.stderr[-3000:]
  assert 'interrupted at epoch 0, batch 11' in ctrl_c.stderr and '--resume' in ctrl_c.stderr
  assert 'Traceback' not in ctrl_c.stderr and not (out / 'model').exists()

  refused = run(args, env)  # forgetting --resume must not throw the saved work away
  assert refused.returncode == 1 and 'rerun with --resume' in refused.stderr

  killed = run_with_signal(signal.SIGKILL, 1, 20, args + ['--resume'], env)
  assert killed.returncode == -signal.SIGKILL
  assert 'resumed from' in killed.stdout and not (out / 'model').exists()
  assert len(log_rows(out)) == 1  # epoch 0 finished before the kill

  resumed = run(args + ['--resume'], env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'epoch 1, batch 18' in resumed.stdout  # the last --save-every checkpoint before batch 20
  whole, mine = weights(uninterrupted[0]), weights(out)
  assert sorted(whole) == sorted(mine)
  for key in whole:
    np.testing.assert_array_equal(mine[key], whole[key], err_msg=key)
  assert log_rows(out) == log_rows(uninterrupted[0])


def test_resume_refuses_other_settings_before_any_work(tmp_path, corpus, env, uninterrupted):
  out = tmp_path / 'run'
  shutil.copytree(uninterrupted[0], out)
  other = run(['--wikitext', corpus, *TINY, '--epochs', '2', '--out', out, '--lr', '0.01', '--resume'], env)
  assert other.returncode == 1
  assert 'lr: 0.03 in the checkpoint, 0.01 now' in other.stderr and 'tokenizing' not in other.stderr


def test_a_diverging_run_stops_and_keeps_the_finished_model(tmp_path, corpus, env, uninterrupted):
  """--lr 1e4: with weight decay 0.01 every step multiplies the weights by 1 - lr * wd = -99,
  so the loss turns inf/NaN within the epoch; the run exits non-zero and model/ from the
  previous run stays as it was (no NaN weights written anywhere)."""
  out = tmp_path / 'run'
  shutil.copytree(uninterrupted[0], out)
  before = weights(out)
  bad = run(['--wikitext', corpus, *TINY, '--out', out, '--epochs', '1', '--lr', '1e4', '--overwrite'], env)
  assert bad.returncode == 1, bad.stderr[-3000:]
  assert 'the loss became inf/NaN' in bad.stderr and 'Traceback' not in bad.stderr
  after = weights(out)
  assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize('flags, message', [
    (['--epochs', '0'], '--epochs: expected an integer >= 1'),
    (['--bs', '0'], '--bs: expected an integer >= 1'),
    (['--bptt', '-1'], '--bptt: expected an integer >= 1'),
    (['--lr', 'nan'], '--lr: expected a finite number > 0'),
    (['--wd', '-0.1'], '--wd: expected a finite number >= 0'),
    (['--clip', '-1'], '--clip: expected a finite number >= 0'),
    (['--max-docs', '0'], '--max-docs: expected an integer >= 1'),
    (['--valid-pct', '1'], '--valid-pct: expected a number strictly between 0 and 1'),
    (['--precision', 'fp8'], "--precision: invalid choice: 'fp8'"),
    (['--bs', '3', '--devices', '2'], 'must split evenly over --devices 2'),
    (['--resume', '--overwrite'], 'contradict'),
    (['--coordinator', 'localhost:1234'], '--coordinator given without the others'),
    (['--coordinator', 'h:1', '--num-processes', '2', '--process-id', '2'], '--process-id 2 must be below'),
    (['--bs', '6', '--devices', '2', '--coordinator', 'h:1', '--num-processes', '2', '--process-id', '0'],
     'must split evenly over 2 processes x 2 device(s)'),
    (['--wikitext', 'nope.tokens'], "no file at 'nope.tokens'"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, flags, message):
  result = subprocess.run([sys.executable, str(SCRIPT), '--out', str(tmp_path / 'run'), *flags],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          timeout=120)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert not (tmp_path / 'run').exists()
