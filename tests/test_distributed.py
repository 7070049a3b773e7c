"""Several processes: two processes on localhost joined by `jax.distributed.initialize` (CPU
collectives) train the tiny LM as one process does, and a checkpoint the 2-process job saved
when stopped mid-epoch is resumed by one process (tests/distributed_job.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / 'tests' / 'distributed_job.py')]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _job(*flags, processes: int = 1) -> None:
  """Runs the job as `processes` processes (one device each) and waits for all of them."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop('XLA_FLAGS', None)
  if processes == 1:
    runs = [subprocess.Popen([*JOB, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
  else:
    join = ['--coordinator', f'localhost:{_free_port()}', '--num-processes', str(processes)]
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
