"""scripts/train_xresnet.py end to end at a tiny size (xresnet18 on 128 of the embedded 8x8
digits): outputs, fine-tuning, exact resume after SIGKILL in the middle of an epoch (also in
fine_tune's second stage), a damaged checkpoint, bad flags and files."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flax_ulmfit.vision.learner import load_xresnet
from tests.script_runs import free_port
from torch_ref.schedules import one_cycle

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'train_xresnet.py'
TINY = ['--data', 'digits', '--train-size', '128', '--valid-size', '64', '--bs', '32', '--no-progress']  # 4 batches
PLAIN = [*TINY, '--epochs', '2', '--save-every', '3']
TUNE = [*TINY, '--epochs', '1', '--save-every', '3']  # + --pretrained: stage 0 frozen, stage 1 unfrozen


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Subprocess environment; the runs share a JAX compilation cache (they compile the same
  steps: the cache cuts each run's start-up, and cached executables compute the same numbers).
  Programs carry only their innermost source location, so that the runs started through
  SIGNAL_AT (other outer frames) find the same cache entries."""
  cache = tmp_path_factory.mktemp('jax_cache')
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
              JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS='0')


def run(args, env):
  return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=600)


# Runs the script in this process after arranging for a signal to hit it when the training
# loader makes batch B of (loader) epoch E: a deterministic point in the middle of an epoch.
SIGNAL_AT = textwrap.dedent('''
    import os, runpy, sys
    from flax_ulmfit.vision import data
    sig, epoch_at, batch_at, argv = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    make = data.ImageLoader.batches
    def batches(self, epoch):
      for b, batch in enumerate(make(self, epoch)):
        if self.shuffle and (epoch, b) == (epoch_at, batch_at):
          os.kill(os.getpid(), sig)
        yield batch
    data.ImageLoader.batches = batches
    sys.argv = [{script!r}] + argv
    runpy.run_path({script!r}, run_name='__main__')
''').format(script=str(SCRIPT))


def run_with_signal(sig, epoch, batch, args, env):
  return subprocess.run([sys.executable, '-c', SIGNAL_AT, str(int(sig)), str(epoch), str(batch), *map(str, args)],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def accuracy(result) -> float:
  last = result.stdout.strip().splitlines()[-1]
  assert re.fullmatch(r'accuracy=\d\.\d{4}', last), last
  return float(last.split('=')[1])


def arrays(path: Path) -> dict:
  """The arrays of a checkpoint.save file, and its metadata without the times."""
  with np.load(path, allow_pickle=False) as npz:
    found = {k: npz[k] for k in npz.files}
  meta = json.loads(str(found.pop('__metadata__')))
  meta['user'].pop('time', None)
  return found | {'metadata': meta}


def rows(path: Path) -> list[dict]:
  return [{k: v for k, v in row.items() if k != 'time'} for row in csv.DictReader(open(path))]


def assert_same_run(mine: Path, whole: Path, logs: tuple[str, ...]) -> None:
  """Bit for bit: the exported weights, best.npz and every logged number but the times."""
  for name in ('model/model.npz', 'best.npz'):
    a, b = arrays(mine / name), arrays(whole / name)
    assert sorted(a) == sorted(b)
    assert a.pop('metadata') == b.pop('metadata'), name
    for key in b:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'{name}: {key}')
  for log in logs:
    assert rows(mine / log) == rows(whole / log), log


@pytest.fixture(scope='module')
def plain(tmp_path_factory, env):
  out = tmp_path_factory.mktemp('runs') / 'plain'
  result = run([*PLAIN, '--out', out], env)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


@pytest.fixture(scope='module')
def tuned(tmp_path_factory, env, plain):
  out = tmp_path_factory.mktemp('runs') / 'tuned'
  result = run([*TUNE, '--pretrained', plain[0], '--out', out], env)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def test_train_writes_consistent_outputs(plain):
  out, result = plain
  log = list(csv.DictReader(open(out / 'log.csv')))
  assert [int(r['epoch']) for r in log] == [0, 1]
  assert accuracy(result) == round(float(log[-1]['valid_accuracy']), 4)
  assert (out / 'losses.png').stat().st_size > 0 and (out / 'best.npz').is_file()
  assert sorted(p.name for p in (out / 'model').iterdir()) == ['config.json', 'model.npz']
  config = json.loads((out / 'model' / 'config.json').read_text())
  assert [r['valid_loss'] for r in config['history']] == [float(r['valid_loss']) for r in log]
  model, meta = load_xresnet(out / 'model' / 'model.npz')
  assert (meta['arch'], meta['c_in'], meta['head'], meta['classes']) == ('xresnet18', 1, 'xresnet', list('0123456789'))
  assert np.asarray(model.linear.kernel[...]).shape == (512, 10)


def test_two_processes_train_as_one_process_with_two_devices(tmp_path, env, plain):
  """Two processes joined on localhost (one device each, 16 rows of each batch of 32) compute
  bit for bit what one process computes on two devices (which equals one device within
  rounding, tests/test_data_parallel.py; Adam amplifies that rounding over 8 steps); process 0
  alone writes the folder and prints."""
  one = run([*PLAIN, '--devices', '2', '--out', tmp_path / 'one'], env)
  assert one.returncode == 0, one.stderr[-3000:]
  join = ['--coordinator', f'localhost:{free_port()}', '--num-processes', '2', '--out', tmp_path / 'two']
  runs = [subprocess.Popen([sys.executable, str(SCRIPT), *map(str, [*PLAIN, *join, '--process-id', i])], env=env,
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [run_.communicate(timeout=600) for run_ in runs]
  for run_, (_, err) in zip(runs, outputs):
    assert run_.returncode == 0, err[-3000:]
  # process 1 prints nothing of its own (gloo's C++ library writes its connection line itself)
  assert all(line.startswith('[Gloo]') for line in outputs[1][0].splitlines())
  assert outputs[0][0].splitlines()[-1] == one.stdout.splitlines()[-1]  # accuracy=...
  assert sorted(p.name for p in (tmp_path / 'two').iterdir()) == sorted(p.name for p in plain[0].iterdir())
  for name in ('model/model.npz', 'best.npz'):
    mine, whole = arrays(tmp_path / 'two' / name), arrays(tmp_path / 'one' / name)
    assert mine.pop('metadata') == whole.pop('metadata') and len(whole) > 50
    for key in whole:
      np.testing.assert_array_equal(mine[key], whole[key], err_msg=f'{name}: {key}')
  assert rows(tmp_path / 'two' / 'log.csv') == rows(tmp_path / 'one' / 'log.csv')


def test_fine_tune_writes_both_stages(tuned):
  out, result = tuned
  assert 'fine-tuning the xresnet18 body' in result.stdout
  frozen, unfrozen = rows(out / 'log-frozen.csv'), rows(out / 'log.csv')
  assert len(frozen) == 1 and len(unfrozen) == 1
  assert accuracy(result) == round(float(unfrozen[-1]['valid_accuracy']), 4)
  # the head's rate, as fastai's Recorder logs it (stem and body: 1/10 frozen, 1/100 unfrozen)
  assert float(frozen[-1]['lr']) == pytest.approx(one_cycle(4, 2e-3, pct_start=0.99)(3), rel=1e-6)
  assert float(unfrozen[-1]['lr']) == pytest.approx(one_cycle(4, 1e-3, div=5, pct_start=0.3)(3), rel=1e-6)
  assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['0-frozen', '1-fit']
  assert load_xresnet(out / 'model' / 'model.npz')[1]['head'] == 'transfer'


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, env, plain):
  """SIGKILL while epoch 1 runs loses the steps after the last --save-every checkpoint; a
  forgotten --resume is refused; --resume continues to the uninterrupted run's bits."""
  out = tmp_path / 'run'
  killed = run_with_signal(signal.SIGKILL, 1, 3, [*PLAIN, '--out', out], env)
  assert killed.returncode == -signal.SIGKILL
  assert not (out / 'model').exists() and len(rows(out / 'log.csv')) == 1  # epoch 0 finished before the kill
  refused = run([*PLAIN, '--out', out], env)
  assert refused.returncode == 1 and '0-fit, step 6, epoch 1, batch 2' in refused.stderr
  assert '--resume' in refused.stderr and 'Traceback' not in refused.stderr
  resumed = run([*PLAIN, '--out', out, '--resume'], env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'epoch 1, batch 2, step 6' in resumed.stdout
  assert_same_run(out, plain[0], ('log.csv',))


def test_fine_tune_killed_in_its_second_stage_resumes_there(tmp_path, env, plain, tuned):
  out = tmp_path / 'run'
  args = [*TUNE, '--pretrained', plain[0], '--out', out]
  killed = run_with_signal(signal.SIGKILL, 1, 3, args, env)  # loader epoch 1 = stage 1's first epoch
  assert killed.returncode == -signal.SIGKILL
  assert len(rows(out / 'log-frozen.csv')) == 1 and not (out / 'log.csv').exists()
  resumed = run([*args, '--resume'], env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'the run had finished' in resumed.stdout and 'epoch 0, batch 3, step 3' in resumed.stdout
  assert_same_run(out, tuned[0], ('log-frozen.csv', 'log.csv'))


def test_a_damaged_checkpoint_or_other_flags_are_refused_and_change_nothing(tmp_path, env, plain):
  out = tmp_path / 'run'
  shutil.copytree(plain[0], out)
  other = run([*PLAIN, '--out', out, '--resume', '--lr', '0.05'], env)
  assert other.returncode == 1 and 'lr: None in the checkpoint, 0.05 now' in other.stderr
  newest = max((out / 'checkpoints' / '0-fit').iterdir(), key=lambda p: int(p.name))
  for data in (newest / 'arrays').rglob('*'):
    if data.is_file() and data.stat().st_size > 1000:
      data.write_bytes(b'\0' * 100)  # the arrays' contents, truncated
  before = {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file() and 'checkpoints' not in p.parts}
  damaged = run([*PLAIN, '--out', out, '--resume'], env)
  assert damaged.returncode == 1 and 'Traceback' not in damaged.stderr
  assert f'checkpoint {newest} is damaged' in damaged.stderr
  after = {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file() and 'checkpoints' not in p.parts}
  assert after.keys() - {Path('.lock')} == before.keys() - {Path('.lock')}
  assert all(after[k] == before[k] for k in before if k.name != '.lock')


@pytest.mark.parametrize('flags, message', [
    (['--epochs', '0'], '--epochs: expected an integer >= 1'),
    (['--bs', '0'], '--bs: expected an integer >= 1'),
    (['--size', '-2'], '--size: expected an integer >= 1'),
    (['--crop-pad', '-1'], '--crop-pad: expected an integer >= 0'),
    (['--lr', 'inf'], '--lr: expected a finite number > 0'),
    (['--mixup', '-0.4'], '--mixup: expected a finite number >= 0'),
    (['--ls-eps', '1'], '--ls-eps: expected a number >= 0 and < 1'),
    (['--save-every', '0'], '--save-every: expected an integer >= 1'),
    (['--precision', 'fp8'], "--precision: invalid choice: 'fp8'"),
    (['--bs', '3', '--devices', '2'], 'must split evenly over --devices 2'),
    (['--resume', '--overwrite'], 'contradict'),
    (['--pretrained', 'nowhere/model.npz'], "no model.npz at 'nowhere/model.npz'"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, flags, message):
  result = subprocess.run([sys.executable, str(SCRIPT), '--out', str(tmp_path / 'run'), *flags], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert not (tmp_path / 'run').exists()


def test_bad_files_fail_with_a_clear_message(tmp_path, env):
  missing = run(['--folder', tmp_path / 'nowhere', '--out', tmp_path / 'run'], env)
  assert missing.returncode == 1 and "'" + str(tmp_path / 'nowhere') + "' is not a folder" in missing.stderr
  assert 'Traceback' not in missing.stderr and not (tmp_path / 'run').exists()
  for i, name in enumerate(['cat', 'dog']):
    (tmp_path / 'rgb' / name).mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / 'rgb' / name / '0.png')
    Image.fromarray(np.full((8, 8, 3), 90 + 40 * i, np.uint8)).save(tmp_path / 'rgb' / name / '1.png')
  not_a_checkpoint = tmp_path / 'weights.npz'
  not_a_checkpoint.write_bytes(b'not a zip file')
  result = run(['--folder', tmp_path / 'rgb', '--valid-size', '2', '--bs', '2', '--pretrained', not_a_checkpoint,
                '--out', tmp_path / 'run'], env)
  assert result.returncode == 1 and 'weights.npz' in result.stderr and 'not a readable checkpoint' in result.stderr
  assert 'Traceback' not in result.stderr and not (tmp_path / 'run' / 'model').exists()
