"""Running the scripts in tests: a subprocess environment sharing one JAX compilation cache,
a run in which a signal hits the script at a chosen training batch, and a free port for a
job of several processes."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def script_env(cache: Path) -> dict:
  """Subprocess environment; the runs share a JAX compilation cache (each compiles the same
  steps: the cache cuts a run's start-up, and cached executables compute the same numbers)."""
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def free_port() -> int:
  """A localhost port free now: the coordinator address of a job of several processes."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run(script: Path, args, env, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=timeout, **kw)


# Runs the script in this process after arranging for a signal to hit it when a shuffling
# (training) loader of class LOADER makes batch B of its epoch E: a deterministic point.
_SIGNAL_AT = textwrap.dedent('''
    import os, runpy, sys
    from flax_ulmfit.text import data
    script, loader, sig, epoch_at, batch_at, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \\
        int(sys.argv[5]), sys.argv[6:]
    make = getattr(data, loader).batches
    def batches(self, epoch, start=0):
      for b, batch in enumerate(make(self, epoch, start), start):
        if self.shuffle and (epoch, b) == (epoch_at, batch_at):
          os.kill(os.getpid(), sig)
        yield batch
    setattr(getattr(data, loader), 'batches', batches)
    sys.argv = [script] + argv
    runpy.run_path(script, run_name='__main__')
''')


def run_with_signal(script: Path, loader: str, sig: int, epoch: int, batch: int, args, env,
                    timeout: int = 600) -> subprocess.CompletedProcess:
  """`script args` with signal `sig` sent when `loader` ('LMLoader', 'ClasLoader') makes batch `batch` of epoch `epoch`."""
  return subprocess.run([sys.executable, '-c', _SIGNAL_AT, str(script), loader, str(int(sig)), str(epoch), str(batch),
                         *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
