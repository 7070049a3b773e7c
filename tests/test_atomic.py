"""atomic.py: a file or folder is replaced whole; a killed writer's leftovers are cleaned up."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flax_ulmfit.atomic import atomic_write, recover_folder, replace_folder

ROOT = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  p = subprocess.Popen([sys.executable, '-c', 'pass'])
  p.wait()
  return p.pid


def test_write_replaces_whole_and_an_error_keeps_the_old_file(tmp_path):
  path = tmp_path / 'a.json'
  with atomic_write(path, 'w', encoding='utf-8') as f:
    f.write('first')
  with pytest.raises(RuntimeError):
    with atomic_write(path, 'w') as f:
      f.write('half of the second')
      raise RuntimeError('killed halfway')
  assert path.read_text() == 'first'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a.json']


def test_sigkill_mid_write_leaves_the_old_file_and_the_next_write_cleans_up(tmp_path):
  path = tmp_path / 'weights.npz'
  path.write_bytes(b'old')
  writer = textwrap.dedent(f'''
      import sys, time
      from flax_ulmfit.atomic import atomic_write
      with atomic_write({str(path)!r}) as f:
        f.write(b'new, partly written')
        f.flush()
        print('WRITING', flush=True)
        time.sleep(60)
  ''')
  proc = subprocess.Popen([sys.executable, '-c', writer], stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert proc.stdout.readline().strip() == 'WRITING'
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  leftovers = [p for p in tmp_path.iterdir() if p.name != 'weights.npz']
  assert path.read_bytes() == b'old' and len(leftovers) == 1 and leftovers[0].name.endswith('.tmp')
  with atomic_write(path) as f:
    f.write(b'next')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['weights.npz'] and path.read_bytes() == b'next'


def test_temporaries_of_a_live_writer_are_left_alone(tmp_path):
  path = tmp_path / 'f.txt'
  alive = tmp_path / f'.f.txt.{os.getppid()}-abc.tmp'   # the test runner's parent is alive
  dead = tmp_path / f'.f.txt.{dead_pid()}-abc.tmp'
  alive.write_text('x')
  dead.write_text('x')
  with atomic_write(path, 'w') as f:
    f.write('y')
  assert alive.exists() and not dead.exists()


def test_replace_folder_swaps_the_whole_set(tmp_path):
  model = tmp_path / 'model'
  with replace_folder(model) as stage:
    (stage / 'weights').write_text('w1')
    (stage / 'vocab').write_text('v1')
  with pytest.raises(RuntimeError):
    with replace_folder(model) as stage:
      (stage / 'vocab').write_text('v2')
      raise RuntimeError('killed before the weights were written')
  assert {p.name: p.read_text() for p in model.iterdir()} == {'weights': 'w1', 'vocab': 'v1'}
  with replace_folder(model) as stage:
    (stage / 'weights').write_text('w3')
    (stage / 'vocab').write_text('v3')
  assert {p.name: p.read_text() for p in model.iterdir()} == {'weights': 'w3', 'vocab': 'v3'}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['model']


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
  """The old folder was moved aside, the new one not yet in place: recovery puts the old back."""
  pid = dead_pid()
  aside, staged = tmp_path / f'.model.{pid}-x.old', tmp_path / f'.model.{pid}-y.tmp'
  aside.mkdir()
  (aside / 'weights').write_text('w1')
  staged.mkdir()
  (staged / 'weights').write_text('w2, maybe incomplete')
  recover_folder(tmp_path / 'model')
  assert (tmp_path / 'model' / 'weights').read_text() == 'w1'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['model']
