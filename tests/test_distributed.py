"""Several processes: two processes on localhost joined by `jax.distributed.initialize` (CPU
collectives) train the tiny LM as one process does, and a checkpoint the 2-process job saved
when stopped mid-epoch is resumed by one process (tests/distributed_job.py); two processes run
scripts/train_classifier.py as one process does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests import script_runs
from tests.test_script_classifier import TINY, _corpus

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / 'tests' / 'distributed_job.py')]


def _job(*flags, processes: int = 1) -> None:
  """Runs the job as `processes` processes (one device each) and waits for all of them."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop('XLA_FLAGS', None)
  if processes == 1:
    runs = [subprocess.Popen([*JOB, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
  else:
    join = ['--coordinator', f'localhost:{script_runs.free_port()}', '--num-processes', str(processes)]
    runs = [subprocess.Popen([*JOB, *flags, *join, '--process-id', str(i)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(processes)]
  for i, run in enumerate(runs):
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, f'process {i} of {flags}:\n{output[-3000:]}'


def _leaves(path: Path) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return dict(data)


def test_two_processes_train_as_one_and_one_process_resumes_their_checkpoint(tmp_path):
  """The 2-process job, stopped by SIGTERM in epoch 1 and resumed by one process, ends where one
  process running both epochs ends: the 5 steps and the epoch-0 validation of the 2-process job
  (kept in the checkpoint's history) are in what is compared."""
  _job('--checkpoints', str(tmp_path / 'one'), '--out', str(tmp_path / 'one.npz'))
  _job('--checkpoints', str(tmp_path / 'stopped'), '--out', str(tmp_path / 'unused.npz'), '--interrupt', processes=2)
  assert not (tmp_path / 'unused.npz').exists()
  # written once for the job: epoch 0's checkpoint (step 3) and the one where SIGTERM stopped it
  assert sorted(p.name for p in (tmp_path / 'stopped').iterdir()) == ['3', '5']
  _job('--checkpoints', str(tmp_path / 'stopped'), '--out', str(tmp_path / 'resumed.npz'), '--resume')

  one, resumed = _leaves(tmp_path / 'one.npz'), _leaves(tmp_path / 'resumed.npz')
  assert len(one) > 20 and resumed.keys() == one.keys()  # valid losses, params, Adam's moments and counts
  # the same fp32 sums split over 2 processes: rounding only (8e-8 measured)
  for k in one:
    np.testing.assert_allclose(resumed[k], one[k], rtol=0, atol=1e-6, err_msg=k)


def _two_processes(command: list, env: dict) -> list[tuple[int, str, str]]:
  """`command` as a job of two processes on localhost: each one's return code, output and errors."""
  join = ['--coordinator', f'localhost:{script_runs.free_port()}', '--num-processes', '2']
  runs = [subprocess.Popen([sys.executable, *map(str, [*command, *join, '--process-id', i])], env=env,
                           cwd=script_runs.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]
  outputs = [run.communicate(timeout=600) for run in runs]
  return [(run.returncode, *output) for run, output in zip(runs, outputs)]


def test_two_processes_run_train_classifier_as_one_process_with_two_devices(tmp_path):
  """Each process reads its rows of every batch; validation's short last batch (18 texts in
  batches of 4) is padded; process 0 alone writes the run folder and prints. The job computes
  bit for bit what one process computes on two devices (which equals one device within
  rounding: tests/test_data_parallel.py; at this run's rates Adam amplifies that rounding).
  Rerun without --resume, both processes refuse the finished run."""
  corpus = _corpus(tmp_path / 'texts.csv')
  env = script_runs.script_env(tmp_path / 'jax_cache')
  script = script_runs.ROOT / 'scripts' / 'train_classifier.py'
  flags = ['--csv', corpus, *TINY, '--bs', '4', '--epochs', '1', '0', '0', '2', '--lrs', '1e-1', '1e-2', '1e-2', '3e-2']
  one = script_runs.run(script, [*flags, '--devices', '2', '--out', tmp_path / 'one'], env)
  assert one.returncode == 0, one.stderr[-3000:]
  outputs = _two_processes([script, *flags, '--out', tmp_path / 'two'], env)
  for code, _, err in outputs:
    assert code == 0, err[-3000:]
  # process 1 prints nothing of its own (gloo's C++ library writes its connection line itself)
  assert all(line.startswith('[Gloo]') for line in outputs[1][1].splitlines())
  assert outputs[0][1].splitlines()[-1] == one.stdout.splitlines()[-1]  # accuracy=...
  assert sorted(p.name for p in (tmp_path / 'two').iterdir()) == sorted(p.name for p in (tmp_path / 'one').iterdir())
  one_weights, two_weights = (_leaves(tmp_path / run / 'model' / 'classifier.npz') for run in ('one', 'two'))
  assert len(one_weights) > 10 and one_weights.keys() == two_weights.keys()
  for k in one_weights:
    np.testing.assert_array_equal(two_weights[k], one_weights[k], err_msg=k)
  for log in ('log-0-head.csv', 'log-1-all.csv'):  # every figure but the times
    assert [row.rsplit(',', 1)[0] for row in (tmp_path / 'two' / log).read_text().splitlines()] == \
        [row.rsplit(',', 1)[0] for row in (tmp_path / 'one' / log).read_text().splitlines()]
  for code, _, err in _two_processes([script, *flags, '--out', tmp_path / 'two'], env):
    assert code == 1 and 'holds a run (newest checkpoint: stage 1-all' in err, err[-3000:]
