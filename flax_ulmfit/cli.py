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
RESUMABLE_CHANGES = ('out', 'resume', 'overwrite', 'save_every', 'devices', 'lr_find', 'export_fastai')


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
                   help='split each batch over N devices (on a CPU: N XLA host devices)')
  run.add_argument('--lr-find', action='store_true',
                   help="run fastai's learning-rate finder instead of training: print the valley suggestion, save lr_find.png")


def check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace, batch_size: int) -> None:
  """Cross-flag checks of `add_run_args`' flags (exits through `parser.error`)."""
  if args.resume and args.overwrite:
    parser.error('--resume and --overwrite contradict each other: pick one')
  if batch_size % args.devices:
    parser.error(f'the batch size ({batch_size}) must split evenly over --devices {args.devices}')
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
  """None for one device, else a data mesh over the first `n` devices (clear error if fewer)."""
  if n == 1:
    return None
  import jax

  from flax_ulmfit import parallel
  devices = jax.devices()
  if len(devices) < n:
    raise ValueError(f'--devices {n}: only {len(devices)} {devices[0].platform} device(s) are available')
  return parallel.data_mesh(devices[:n])


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

  def open(self, args: argparse.Namespace) -> None:
    """Creates and locks the folder; with checkpoints present, requires --resume (same
    settings) or --overwrite (deletes them). Call before any work."""
    self.path.mkdir(parents=True, exist_ok=True)
    self._take_lock()
    atomic.recover_folder(self.model)
    if args.lr_find:
      return
    newest = self.newest_checkpoint()
    if newest is None:
      if args.resume:
        print(f'--resume: no checkpoint in {self.checkpoints}: starting a new run', file=sys.stderr)
      return
    if args.overwrite:
      shutil.rmtree(self.checkpoints)
      return
    where, info = newest
    state = 'finished' if info['finished'] else f'epoch {info["epoch"]}, batch {info["batch"]}'
    if not args.resume:
      raise FileExistsError(f'{self.path} holds a run (newest checkpoint: {where}, {state}); rerun with '
                            '--resume to continue it, --overwrite to start afresh, or choose another --out')
    stored = info['meta'].get('settings', {})
    from flax_ulmfit.train.checkpoints import differences
    diffs = differences(stored, settings(args))
    if diffs:
      raise ValueError(f'--resume: the run in {self.path} was started with other settings: ' + '; '.join(diffs)
                       + '. Rerun with its flags (or start a new run with --overwrite)')

  def newest_checkpoint(self) -> tuple[str, dict] | None:
    """`(where, info)` of the newest checkpoint in `checkpoints/` or, for a run of stages,
    in its last stage folder that holds one (`checkpoints/<i>-<name>/`); None if there is none."""
    from flax_ulmfit.train.checkpoints import TrainCheckpoints
    if not self.checkpoints.is_dir():
      return None
    stages = sorted((p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.split('-')[0].isdigit()),
                    key=lambda p: int(p.name.split('-')[0]))
    for folder in reversed(stages) if stages else [self.checkpoints]:
      checkpoints = TrainCheckpoints(folder)
      latest = checkpoints.latest_step()
      if latest is not None:
        where = f'step {latest}' if folder == self.checkpoints else f'stage {folder.name}, step {latest}'
        return where, checkpoints.read_info(latest)
    return None

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
