"""What every script shares: the common flags, value checks before any work, the run
folder, and clean exits (Ctrl-C, a diverged run, bad input: a message, no traceback).

Nothing here imports JAX at import time: `use_devices` must run before JAX starts.

A run folder (`--out`) holds:
  checkpoints/   the training state (orbax), for `--resume`; a run of stages keeps one
                 folder per stage, `checkpoints/<i>-<stage>/`
  model/         the result, replaced whole when the run ends: weights, vocabulary, labels,
                 config (never a mix of two runs)
  log.csv, losses.png, lr_find.png, token_cache/
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flax_ulmfit import atomic

PRECISIONS = ('fp32', 'bf16', 'fp16')
# flags that may differ when a run is resumed (they do not change what is trained)
RESUMABLE_CHANGES = ('out', 'resume', 'overwrite', 'save_every', 'devices', 'lr_find', 'no_progress',
                     'export_fastai', 'coordinator', 'num_processes', 'process_id')


def _number(kind: type, test: Callable[[Any], bool], wanted: str):
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'expected {wanted}, got {text!r}') from None
    if not test(value):
      raise argparse.ArgumentTypeError(f'expected {wanted}, got {text!r}')
    return value
  return parse


positive_int = _number(int, lambda v: v >= 1, 'an integer >= 1')
nonnegative_int = _number(int, lambda v: v >= 0, 'an integer >= 0')
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, 'a finite number > 0')
nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, 'a finite number >= 0')
fraction = _number(float, lambda v: 0 < v < 1, 'a number strictly between 0 and 1')
probability = _number(float, lambda v: 0 <= v < 1, 'a number >= 0 and < 1')


def at_least(low: int):
  """argparse type: an integer >= `low`."""
  return _number(int, lambda v: v >= low, f'an integer >= {low}')


def existing_file(text: str) -> Path:
  """argparse type: a path to a readable file."""
  path = Path(text)
  if not path.is_file():
    raise argparse.ArgumentTypeError(f'no file at {text!r}')
  return path


def existing_dir(text: str) -> Path:
  """argparse type: a path to a folder."""
  path = Path(text)
  if not path.is_dir():
    raise argparse.ArgumentTypeError(f'no folder at {text!r}')
  return path


def add_run_args(parser: argparse.ArgumentParser, out: str) -> None:
  """The flags every training script takes (`--out` defaults to `out`)."""
  run = parser.add_argument_group('run')
  run.add_argument('--out', type=Path, default=Path(out),
                   help='run folder: checkpoints/, model/ (weights, vocabulary, config), log.csv, plots')
  run.add_argument('--resume', action='store_true',
                   help='continue the run in --out from its newest checkpoint (same flags); starts afresh if there is none')
  run.add_argument('--overwrite', action='store_true',
                   help="start afresh in an --out that holds a run (its checkpoints go; its model/ stays until this run's replaces it)")
  run.add_argument('--save-every', type=positive_int, metavar='N',
                   help='also save the training state every N steps (it is saved after every epoch and on Ctrl-C)')
  run.add_argument('--seed', type=nonnegative_int, default=0, help='seeds initialisation, data order and dropout')
  run.add_argument('--precision', choices=PRECISIONS, default='fp32',
                   help='compute dtype (parameters stay fp32); fp16 adds dynamic loss scaling')
  run.add_argument('--devices', type=positive_int, default=1,
                   help='split each batch over N devices (per process with several; on a CPU: N XLA host devices)')
  run.add_argument('--lr-find', action='store_true',
                   help="run fastai's learning-rate finder instead of training: print the valley suggestion, save lr_find.png")
  run.add_argument('--no-progress', action='store_true', help='no progress bars (the per-epoch table stays)')
  add_distributed_args(parser)


def check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace, batch_size: int) -> None:
  """Cross-flag checks of `add_run_args`' flags (exits through `parser.error`)."""
  if args.resume and args.overwrite:
    parser.error('--resume and --overwrite contradict each other: pick one')
  if batch_size % args.devices:
    parser.error(f'the batch size ({batch_size}) must split evenly over --devices {args.devices}')
  check_distributed_args(parser, args, batch_size)
  if args.out.exists() and not args.out.is_dir():
    parser.error(f'--out {args.out} is a file, not a folder')


def use_devices(n: int) -> None:
  """Lets a CPU-only JAX see `n` devices (XLA host devices); call before JAX is imported."""
  if 'jax' in sys.modules:
    raise RuntimeError('use_devices: JAX is already imported; call it first')
  flags = os.environ.get('XLA_FLAGS', '')
  if n > 1 and 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()


def device_mesh(n: int):
  """None for one device in one process, else a data mesh over the first `n` devices of every
  process (clear error if a process has fewer)."""
  import jax
  if n == 1 and jax.process_count() == 1:
    return None

  from flax_ulmfit import parallel
  local = jax.local_devices()
  if len(local) < n:
    raise ValueError(f'--devices {n}: only {len(local)} {local[0].platform} device(s) are available'
                     + (f' to process {jax.process_index()}' if jax.process_count() > 1 else ''))
  per_process = [[d for d in jax.devices() if d.process_index == p][:n] for p in range(jax.process_count())]
  return parallel.data_mesh([d for devices in per_process for d in devices])


# --- Several processes (hosts) -----------------------------------------------------------------
# One process per host (or per GPU), all started with the same flags; together they train one
# model on global batches, each process feeding its rows of every batch. JAX's variables
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID stand in for the flags.

DISTRIBUTED_ENV = {'coordinator': 'JAX_COORDINATOR_ADDRESS', 'num_processes': 'JAX_NUM_PROCESSES',
                   'process_id': 'JAX_PROCESS_ID'}


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
  """`--coordinator`, `--num-processes`, `--process-id`: the flags of `init_distributed`."""
  group = parser.add_argument_group(
      'several hosts', 'start one process per host with the same flags and --out on a shared file system; '
      '--devices counts the devices of each process and the batch size is global (it must split over all of them)')
  group.add_argument('--coordinator', metavar='HOST:PORT', default=os.environ.get(DISTRIBUTED_ENV['coordinator']),
                     help="process 0's address, the same for every process (env JAX_COORDINATOR_ADDRESS); 'auto': "
                     "let JAX find the cluster (TPU slices, SLURM, Open MPI)")
  group.add_argument('--num-processes', type=positive_int, default=_env_int('num_processes'),
                     help='how many processes take part (env JAX_NUM_PROCESSES)')
  group.add_argument('--process-id', type=nonnegative_int, default=_env_int('process_id'),
                     help="this process's rank, 0 to N-1 (env JAX_PROCESS_ID)")


def _env_int(name: str) -> int | None:
  text = os.environ.get(DISTRIBUTED_ENV[name])
  try:
    return None if text is None else int(text)
  except ValueError:
    raise ValueError(f'{DISTRIBUTED_ENV[name]}={text!r} is not an integer') from None


def check_distributed_args(parser: argparse.ArgumentParser, args: argparse.Namespace, batch_size: int) -> None:
  """All three flags or none (or `--coordinator auto`); a rank below the process count; a batch that
  splits over every process's devices (exits through `parser.error`)."""
  given = [f'--{k.replace("_", "-")}' for k in DISTRIBUTED_ENV if getattr(args, k) is not None]
  if args.coordinator == 'auto' or not given:
    return
  if len(given) < 3:
    parser.error(f'several hosts: {" and ".join(given)} given without the others; pass --coordinator, '
                 '--num-processes and --process-id together (or --coordinator auto)')
  if args.process_id >= args.num_processes:
    parser.error(f'--process-id {args.process_id} must be below --num-processes {args.num_processes}')
  if batch_size % (args.devices * args.num_processes):
    parser.error(f'the batch size ({batch_size}) is global: it must split evenly over {args.num_processes} processes '
                 f'x {args.devices} device(s)')


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Joins this process to a job of several (`jax.distributed.initialize`) before JAX starts
  its devices; `jax.devices()` then spans every process. With nothing given, one process
  (False); `coordinator='auto'` leaves the addresses to JAX's cluster detection. CPU
  processes talk through gloo (jax's default CPU collectives)."""
  if coordinator is None and num_processes is None and process_id is None:
    return False
  import jax
  if coordinator == 'auto':
    jax.distributed.initialize()
  else:
    if None in (coordinator, num_processes, process_id):
      raise ValueError(f'init_distributed: give coordinator, num_processes and process_id together, got '
                       f'{coordinator=}, {num_processes=}, {process_id=}')
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return True


def start_jax(args: argparse.Namespace) -> None:
  """Before JAX is imported: `--devices` XLA host devices on a CPU, then `init_distributed`
  with the several-hosts flags. In a job of several processes only process 0 prints: the
  others' standard output is discarded (their errors still reach standard error)."""
  use_devices(args.devices)
  if init_distributed(args.coordinator, args.num_processes, args.process_id) and not is_primary():
    sys.stdout = open(os.devnull, 'w')


def open_run(run: 'RunFolder', args: argparse.Namespace, script: str) -> bool:
  """`run.open(args)` in every process of a job, then a barrier. Returns whether the run
  continues from a checkpoint. `--lr-find` refuses a job of several processes. Every process
  must see `--out` (a shared filesystem, as orbax's checkpoints of a multi-host job need)."""
  import jax
  if jax.process_count() > 1 and args.lr_find:
    raise ValueError('--lr-find runs on one process: run it without --coordinator / --num-processes')
  resuming = run.open(args)
  wait_for_all(f'{script}: run folder open')
  return resuming


def wait_for_all(name: str) -> None:
  """A barrier: in a job of several processes, returns once every process has reached `name`
  (e.g. process 0 has written a model the others read next); at once with one process."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def show_progress(args: argparse.Namespace) -> bool:
  """Whether this process draws progress bars: unless `--no-progress`, and only process 0."""
  return not args.no_progress and is_primary()


def is_primary() -> bool:
  """True in the process that writes the run's files (logs, plots, model/): process 0."""
  import jax
  return jax.process_index() == 0


def settings(args: argparse.Namespace) -> dict:
  """The flags that define what a run trains (JSON-able): a resumed run must repeat them."""
  return {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())
          if k not in RESUMABLE_CHANGES}


class RunFolder:
  """The `--out` folder of one run: its paths, a lock against a second run in it, the
  checks of `--resume`/`--overwrite` before any work, and the whole-folder model export."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.checkpoints = self.path / 'checkpoints'
    self.model = self.path / 'model'
    self.log = self.path / 'log.csv'
    self.plot = self.path / 'losses.png'
    self.lr_find_plot = self.path / 'lr_find.png'
    self.token_cache = self.path / 'token_cache'
    self._lock = None

  def open(self, args: argparse.Namespace) -> bool:
    """Creates and locks the folder; with checkpoints present, requires --resume (same
    settings) or --overwrite (deletes them). Call before any work. Returns whether the run
    continues from a checkpoint. In a job of several processes every process calls it
    (orbax reads checkpoints collectively) and makes the same checks, so a refusal stops
    them all; process 0 alone creates, locks, repairs and clears."""
    primary = is_primary()
    if primary:
      self.path.mkdir(parents=True, exist_ok=True)
      self._take_lock()
      atomic.recover_folder(self.model)
    if args.lr_find:
      return False
    from flax_ulmfit.train.checkpoints import TrainCheckpoints, differences, latest_checkpoints
    checkpoints = latest_checkpoints(self.checkpoints)
    if checkpoints is None:
      if args.resume and primary:
        print(f'--resume: no checkpoint in {self.checkpoints}: starting a new run', file=sys.stderr)
      return False
    if args.overwrite:
      if primary:
        TrainCheckpoints(self.checkpoints).clear()
      return False
    latest = checkpoints.latest_step()
    info = checkpoints.read_info(latest)
    state = 'finished' if info['finished'] else f'epoch {info["epoch"]}, batch {info["batch"]}'
    where = checkpoints.directory.relative_to(self.checkpoints.absolute())
    stage = '' if where == Path('.') else f'stage {where}, '
    if not args.resume:
      raise FileExistsError(f'{self.path} holds a run (newest checkpoint: {stage}step {latest}, {state}); rerun '
                            'with --resume to continue it, --overwrite to start afresh, or choose another --out')
    diffs = differences(info['meta'].get('settings', {}), settings(args))
    if diffs:
      raise ValueError(f'--resume: the run in {self.path} was started with other settings: ' + '; '.join(diffs)
                       + '. Rerun with its flags (or start a new run with --overwrite)')
    return True

  def _take_lock(self) -> None:
    try:
      import fcntl
    except ImportError:  # not POSIX: no lock
      return
    self._lock = open(self.path / '.lock', 'a+')
    try:
      fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._lock.seek(0)
      holder = self._lock.read().strip() or '?'
      raise FileExistsError(f'{self.path} is in use by another run (pid {holder}); wait for it or choose another --out') from None
    self._lock.seek(0)
    self._lock.truncate()
    self._lock.write(str(os.getpid()))
    self._lock.flush()

  @contextlib.contextmanager
  def export(self) -> Iterator[Path]:
    """Yields a staging folder: write the result there; it replaces `model/` whole afterwards."""
    with atomic.replace_folder(self.model) as stage:
      yield stage


def run_script(name: str, main: Callable[[], Any]) -> int:
  """Runs `main()`; returns the exit status, printing one line instead of a traceback for
  Ctrl-C/SIGTERM (130/143), a diverged run and bad input or files (1). Set
  FLAX_ULMFIT_TRACEBACK=1 to see tracebacks."""
  try:
    main()
    return 0
  except KeyboardInterrupt as err:
    message = str(err) or 'interrupted'
    if 'saved' in message:
      message += ' (rerun the same command with --resume)'
    print(f'{name}: {message}', file=sys.stderr)
    return 128 + getattr(err, 'signum', signal.SIGINT)
  except (FloatingPointError, ValueError, OSError) as err:  # a diverged run, bad values, missing files
    if os.environ.get('FLAX_ULMFIT_TRACEBACK'):
      raise
    print(f'{name}: error: {err}', file=sys.stderr)
    return 1
