"""`fit`: epochs of jitted steps with a progress bar, a per-epoch table, a CSV/JSONL log,
optional PNG plots, checkpoints for exact resume, and two callbacks (early stopping, save best).

Runs never lose work: a step whose loss or gradients are inf/NaN stops the run
(`TrainingDiverged`) before anything is saved after it, so checkpoints, logs and callbacks
never see inf/NaN weights; Ctrl-C or SIGTERM saves a checkpoint after the current step
and raises `Interrupted`; with `checkpoints`, the state is saved each epoch and every
`save_every` steps, and `resume=True` continues from the newest checkpoint exactly as the
uninterrupted run would have gone on (step `i` draws `fold_in(rng, i)`, epoch `e`'s data
order depends on `e` only).
"""
from __future__ import annotations

import collections
import contextlib
import csv
import io
import itertools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flax_ulmfit import checkpoint
from flax_ulmfit.atomic import atomic_write
from flax_ulmfit.train import plots
from flax_ulmfit.train.checkpoints import CheckpointError, TrainCheckpoints
from flax_ulmfit.train.optim import hyperparams
from flax_ulmfit.train.step import TrainState

_LAG = 2  # a step's metrics are read when two later steps are queued: the device never waits


class TrainingDiverged(FloatingPointError):
  """The loss or the gradients became inf/NaN; `fit` stopped (fastai's TerminateOnNaNCallback)."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C (SIGINT) or SIGTERM stopped `fit`, after saving a checkpoint when it had `checkpoints`."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


class Callback(Protocol):
  def after_epoch(self, epoch: int, record: dict, state: TrainState) -> bool:
    """Called with the epoch's table row; returns True to stop training."""


class EarlyStopping:
  """Stops when `monitor` has not improved by `min_delta` for `patience` epochs (fastai's EarlyStoppingCallback)."""

  def __init__(self, monitor: str = 'valid_loss', patience: int = 1, min_delta: float = 0.0, mode: str = 'min'):
    if mode not in ('min', 'max'):
      raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode=}")
    self.monitor, self.patience, self.min_delta, self.sign = monitor, patience, min_delta, 1 if mode == 'min' else -1
    self.best, self.wait = math.inf, 0

  def after_epoch(self, epoch: int, record: dict, state: TrainState) -> bool:
    value = self.sign * _monitored(record, self.monitor, 'EarlyStopping')
    if value < self.best - self.min_delta:
      self.best, self.wait = value, 0
      return False
    self.wait += 1
    return self.wait >= self.patience

  def resume(self, history: list[dict]) -> None:
    """Rebuilds the count of epochs without improvement from a resumed run's records."""
    for record in history:
      self.after_epoch(record['epoch'], record, None)


class SaveBest:
  """Saves params and model state (`checkpoint.save`) whenever `monitor` improves (fastai's SaveModelCallback)."""

  def __init__(self, path: str | os.PathLike, monitor: str = 'valid_loss', mode: str = 'min'):
    if mode not in ('min', 'max'):
      raise ValueError(f"SaveBest: mode must be 'min' or 'max', got {mode=}")
    self.path, self.monitor, self.sign, self.best = Path(path), monitor, 1 if mode == 'min' else -1, math.inf

  def after_epoch(self, epoch: int, record: dict, state: TrainState) -> bool:
    value = self.sign * _monitored(record, self.monitor, 'SaveBest')
    if value < self.best:
      self.best = value
      checkpoint.save(self.path, {'params': state.params, 'rest': state.rest}, {'epoch': epoch, **record})
    return False

  def resume(self, history: list[dict]) -> None:
    """The best value so far, from a resumed run's records (the file already holds its weights);
    called once per resumed stage of a run of several `fit`s, it keeps the best of all."""
    self.best = min([self.sign * _monitored(r, self.monitor, 'SaveBest') for r in history], default=self.best)


def _monitored(record: dict, monitor: str, who: str) -> float:
  if monitor not in record:
    raise KeyError(f'{who}: monitor {monitor!r} is not in the epoch record; available: {sorted(record)}')
  return float(record[monitor])


def _epoch_batches(data, epoch: int, start: int) -> Iterator:
  """Batches `start`, ... of `epoch`: a loader's `batches(epoch, start)` (the rest is skipped
  unmade), else `data(epoch)` or `data` itself, re-iterated, with the first `start` dropped."""
  if hasattr(data, 'batches'):
    return iter(data.batches(epoch, start))
  return itertools.islice(iter(data(epoch) if callable(data) else data), start, None)


def _n_batches(data) -> int | None:
  return len(data) if hasattr(data, '__len__') else None


def _mean_metrics(metrics: Sequence[dict]) -> dict[str, float]:
  """Batch metrics averaged; weighted by a 'count' entry where the loss function gives one."""
  host = jax.device_get(list(metrics))
  weights = np.array([float(m.get('count', 1.0)) for m in host])
  return {k: float(np.array([float(m[k]) for m in host]) @ weights / weights.sum()) for k in host[0] if k != 'count'}


class _Steps:
  """Each step's metrics and hyperparameters, read from the device `_LAG` steps late and
  checked for inf/NaN: the per-step log (plots) and this epoch's metrics (its table row)."""

  def __init__(self, log: dict[str, list[float]] | None = None, epoch: list[dict] | None = None):
    self.log = log or {'loss': [], 'learning_rate': [], 'mom': []}
    self.epoch = epoch or []
    self.pending = collections.deque()

  def add(self, where: tuple[int, int, int], metrics: dict, hypers: dict) -> None:
    self.pending.append((where, metrics, hypers))

  def settle(self, lag: int = 0) -> None:
    """Reads all but the newest `lag` queued steps; raises `TrainingDiverged` at a non-finite one."""
    while len(self.pending) > lag:
      (step, epoch, batch), metrics, hypers = self.pending.popleft()
      metrics, hypers = jax.device_get((dict(metrics), hypers))
      nonfinite = bool(metrics.pop('nonfinite', False))
      loss = float(metrics['loss'])
      if nonfinite or not math.isfinite(loss):
        self.pending.clear()
        raise TrainingDiverged(
            f'fit: the {"gradients" if math.isfinite(loss) else "loss"} became inf/NaN at step {step} (epoch '
            f'{epoch}, batch {batch}; loss {loss}): the run diverged and stopped; nothing was saved after '
            'that step (the checkpoints hold the weights from before it). Lower the learning rate, or look '
            'for inf/NaN in the data')
      self.epoch.append({k: float(v) for k, v in metrics.items()})
      self.log['loss'].append(loss)
      for key in ('learning_rate', 'mom'):
        if key in hypers:
          self.log[key].append(float(hypers[key]))

  def smoothed_loss(self) -> float | None:
    recent = [m['loss'] for m in self.epoch[-20:]]
    return sum(recent) / len(recent) if recent else None


class _Log:
  """One row per epoch in a .csv or .jsonl file; a resumed run rewrites it from its history."""

  def __init__(self, path: str | os.PathLike | None):
    self.path = Path(path) if path is not None else None
    if self.path is not None and self.path.suffix not in ('.csv', '.jsonl'):
      raise ValueError(f'fit: log_path must end in .csv or .jsonl, got {str(self.path)!r}')
    self.header = None

  def start(self, history: list[dict]) -> None:
    """Writes the rows of `history` (a resumed run's epochs) in place of any older file."""
    if self.path is None:
      return
    self.header = None
    if not history:
      self.path.unlink(missing_ok=True)
      return
    with atomic_write(self.path, 'w', encoding='utf-8') as f:
      f.write(''.join(self._rows(history)))

  def write(self, record: dict) -> None:
    if self.path is None:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    text = ''.join(self._rows([record]))
    with open(self.path, 'a', encoding='utf-8', newline='') as f:
      f.write(text)

  def _rows(self, records: list[dict]) -> list[str]:
    if self.path.suffix == '.jsonl':
      self.header = self.header or list(records[0])
      return [json.dumps(r) + '\n' for r in records]
    out = io.StringIO(newline='')
    writer = csv.DictWriter(out, fieldnames=self.header or list(records[0]))
    if self.header is None:
      writer.writeheader()
      self.header = list(records[0])
    writer.writerows(records)
    return [out.getvalue()]


def save_plots(path: str | os.PathLike, steps: dict[str, list[float]], epochs: list[dict]) -> None:
  """Losses (per batch and per epoch), lr and momentum on one PNG, if matplotlib is installed."""
  panels = [k for k in ('learning_rate', 'mom') if steps.get(k)]
  made = plots.figure(path, 1 + len(panels), 'fit')
  if made is None:
    return
  fig, axes = made
  axes[0].plot(steps['loss'], label='train (per batch)')
  per_epoch = len(steps['loss']) / max(len(epochs), 1)
  if epochs and 'valid_loss' in epochs[0]:
    axes[0].plot([(r['epoch'] + 1) * per_epoch for r in epochs], [r['valid_loss'] for r in epochs], 'o-', label='valid')
  axes[0].set(xlabel='batch', ylabel='loss')
  axes[0].legend()
  for ax, key in zip(axes[1:], panels):
    ax.plot(steps[key])
    ax.set(xlabel='batch', ylabel='lr' if key == 'learning_rate' else 'momentum')
  plots.save(fig, path)


def _checked_info(checkpoints: TrainCheckpoints, step: int, expected: dict) -> dict:
  """The info of checkpoint `step`, refused unless its run meta and `expected` values match."""
  info = checkpoints.read_info(step)
  checkpoints.check_meta(info)
  diffs = [f'{k}: {info[k]!r} in the checkpoint, {v!r} now' for k, v in expected.items() if info[k] != v]
  if diffs:
    raise CheckpointError(f'fit: the checkpoint in {checkpoints.directory} was made by a different run: '
                          + '; '.join(diffs) + '; resume with the same data, epochs and key')
  return info


@contextlib.contextmanager
def _deferred_signals() -> Iterator[Callable[[], int | None]]:
  """While inside, SIGINT and SIGTERM only record themselves (`fit` stops cleanly at the end
  of the step); a second Ctrl-C interrupts at once. Yields `() -> signal number or None`."""
  if threading.current_thread() is not threading.main_thread():
    yield lambda: None
    return
  received = []

  def handler(signum, frame):
    if received and signum == signal.SIGINT:
      raise KeyboardInterrupt
    received.append(signum)
    tqdm.write(f'fit: {signal.Signals(signum).name} received: stopping after this step '
               '(press Ctrl-C again to stop at once)')

  previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield lambda: received[0] if received else None
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _print_row(record: dict, header: bool) -> None:
  if header:
    tqdm.write('  '.join(f'{k:>12}' for k in record))
  tqdm.write('  '.join(f'{v:>12.6g}' if isinstance(v, float) else f'{v:>12}' for v in record.values()))


def fit(train_step: Callable, state: TrainState, train_data, n_epoch: int, *, rng: jax.Array,
        eval_step: Callable | None = None, valid_data=None, init_carry: Callable[[Any], Any] | None = None,
        language_model: bool = False, log_path: str | os.PathLike | None = None,
        plot_path: str | os.PathLike | None = None, callbacks: Sequence[Callback] = (),
        progress: bool = True, checkpoints: TrainCheckpoints | None = None, save_every: int | None = None,
        resume: bool = False, log_group: str | None = None) -> tuple[TrainState, list[dict]]:
  """Trains for `n_epoch` epochs; returns the final state and one record per epoch.

  Args:
    train_step: from `make_train_step`: `(state, batch, rng, carry) -> (state, carry, metrics)`.
    state: the `TrainState` to start from (donated to the first step); when resuming, the
      template the checkpoint is restored onto (structure, dtypes, shardings).
    train_data: a loader with `batches(epoch, start)` (`LMLoader`, `ClasLoader`: epoch `e`
      is the same whenever it is made), `epoch -> iterable`, or a re-iterable of batches.
    n_epoch: number of epochs.
    rng: the run's key; step i (counted over the whole run) uses `fold_in(rng, i)`.
    eval_step, valid_data: from `make_eval_step`, and the validation batches (as train_data).
    init_carry: `batch -> carry` at the start of each phase (e.g. a language model's zero
      state; fastai's ModelResetter); None passes carry=None.
    language_model: adds the validation perplexity, exp(valid_loss), to the table.
    log_path: .csv or .jsonl file, one row per epoch.
    plot_path: PNG with losses, lr and momentum (needs matplotlib).
    callbacks: `EarlyStopping`, `SaveBest` or anything with `after_epoch` (and, to be
      resumed, `resume(history)`).
    progress: show tqdm bars.
    checkpoints: where to save the training state (`TrainCheckpoints`): after each epoch,
      every `save_every` steps, and on Ctrl-C/SIGTERM.
    save_every: also save every this many steps (needs `checkpoints`).
    resume: continue from the newest checkpoint (start afresh if there is none); without
      it, a folder that holds checkpoints is refused.
    log_group: the parameter group whose lr and mom are logged and plotted: fastai's
      Recorder takes the last group of the split (`opt.hypers[-1]`, the head), so pass the
      split's last label; None: the last by name (the only one, with one group).

  Returns:
    `(state, history)`; a record holds epoch, train_loss, valid metrics (valid_loss,
    valid_<metric>...), perplexity, lr, mom and time (seconds).

  Raises:
    TrainingDiverged: a step's loss or gradients were inf/NaN (nothing was saved after it).
    Interrupted: Ctrl-C or SIGTERM (a `KeyboardInterrupt`), after saving a checkpoint.
    CheckpointError: the checkpoint to resume is damaged or belongs to another run.
  """
  if n_epoch < 1:
    raise ValueError(f'fit: n_epoch must be >= 1, got {n_epoch=}')
  if (eval_step is None) != (valid_data is None):
    raise ValueError('fit: pass eval_step and valid_data together (or neither)')
  if (save_every is not None or resume) and checkpoints is None:
    raise ValueError(f'fit: save_every and resume need checkpoints=TrainCheckpoints(...); got {save_every=}, {resume=}')
  if save_every is not None and save_every < 1:
    raise ValueError(f'fit: save_every must be >= 1 steps, got {save_every=}')
  if log_group is not None and not hyperparams(state.opt_state, log_group):
    raise ValueError(f'fit: log_group {log_group!r} has no learning rate in the optimizer state (not a trained '
                     'group of an inject_hyperparams optimizer); pass the last group of the split, or None')
  n_batches, key = _n_batches(train_data), np.asarray(jax.random.key_data(rng)).tolist()
  log, history, steps = _Log(log_path), [], _Steps()
  epoch, batch, step, carry, elapsed, finished, batches = 0, 0, 0, None, 0.0, False, None
  latest = checkpoints.latest_step() if checkpoints is not None else None
  if latest is not None and not resume:
    raise CheckpointError(f'fit: {checkpoints.directory} already holds checkpoints (newest: step {latest}); '
                          'pass resume=True to continue that run, or clear them (TrainCheckpoints.clear)')
  if latest is not None:
    info = _checked_info(checkpoints, latest, {'n_epoch': n_epoch, 'batches_per_epoch': n_batches, 'rng': key})
    epoch, batch, step, elapsed, finished = info['epoch'], info['batch'], info['step'], info['elapsed'], info['finished']
    carry_like = None
    if info['has_carry']:  # mid-epoch: the carry's template comes from the batch where the run stopped
      if init_carry is None:
        raise CheckpointError(f'fit: the checkpoint in {checkpoints.directory} holds a carried state (a language '
                              'model stopped mid-epoch): pass the init_carry the run was started with')
      batches = _epoch_batches(train_data, epoch, batch)
      first = next(batches)
      batches = itertools.chain([first], batches)
      carry_like = init_carry(first)
    state, carry, _ = checkpoints.restore(state, carry_like, latest)
    history, steps = info['history'], _Steps(info['steps'], info['epoch_metrics'])
    for cb in callbacks:
      if hasattr(cb, 'resume'):
        cb.resume(history)
    tqdm.write(f'fit: resumed from {checkpoints.directory / str(latest)}: epoch {epoch}, batch {batch}, step {step}'
               + (' (the run had finished)' if finished else ''))
  log.start(history)
  for i, record in enumerate(history):
    _print_row(record, i == 0)

  def save(signum: int | None = None) -> None:
    steps.settle()
    checkpoints.save(step, state, carry, {
        'epoch': epoch, 'batch': batch, 'step': step, 'elapsed': elapsed + time.perf_counter() - start,
        'finished': finished, 'n_epoch': n_epoch, 'batches_per_epoch': n_batches, 'rng': key,
        'has_carry': carry is not None, 'history': history, 'steps': steps.log, 'epoch_metrics': steps.epoch})

  def interrupt(signum: int) -> None:
    steps.settle()
    where = f'epoch {epoch}, batch {batch} (step {step})'
    if checkpoints is not None:
      save()
      raise Interrupted(f'interrupted at {where}; the training state is saved in {checkpoints.directory}: '
                        'resume to continue', signum)
    raise Interrupted(f'interrupted at {where}; nothing was saved (no checkpoints)', signum)

  with _deferred_signals() as received:
    while not finished:
      start = time.perf_counter()
      if batch == 0:
        carry = None
      batches = batches or _epoch_batches(train_data, epoch, batch)
      with tqdm(total=n_batches, initial=batch, desc=f'epoch {epoch}', leave=False, disable=not progress) as bar:
        for b in batches:
          if carry is None and init_carry is not None:
            carry = init_carry(b)
          state, carry, metrics = train_step(state, b, jax.random.fold_in(rng, step), carry)
          # the next step donates opt_state: keep copies of the hyperparameters it holds
          steps.add((step, epoch, batch), metrics, jax.tree.map(jnp.copy, hyperparams(state.opt_state, log_group)))
          step, batch = step + 1, batch + 1
          steps.settle(_LAG)
          bar.update()
          if progress and steps.epoch:
            bar.set_postfix(loss=f'{steps.smoothed_loss():.4f}', refresh=False)
          if received():
            interrupt(received())
          if save_every and step % save_every == 0 and batch != n_batches:
            save()
      steps.settle()
      batches = None
      if not steps.epoch:
        raise ValueError(f'fit: train_data gave no batches in epoch {epoch}; check the data loader')
      record = {'epoch': epoch, 'train_loss': _mean_metrics(steps.epoch)['loss']}
      if eval_step is not None:
        valid_metrics, valid_carry = [], None
        for b in tqdm(_epoch_batches(valid_data, epoch, 0), desc='valid', leave=False, disable=not progress):
          if valid_carry is None and init_carry is not None:
            valid_carry = init_carry(b)
          valid_carry, metrics = eval_step(state, b, valid_carry)
          valid_metrics.append(metrics)
          if received():
            carry = None  # the epoch's training is done: a resumed run validates again
            interrupt(received())
        if not valid_metrics:
          raise ValueError(f'fit: valid_data gave no batches in epoch {epoch}; check the data loader')
        record |= {f'valid_{k}': v for k, v in _mean_metrics(valid_metrics).items()}
        if language_model:
          record['perplexity'] = math.exp(min(record['valid_loss'], 700.0))
      if steps.log['learning_rate']:
        record |= {'lr': steps.log['learning_rate'][-1], 'mom': (steps.log['mom'] or [math.nan])[-1]}
      record['time'] = round(elapsed + time.perf_counter() - start, 2)
      _print_row(record, not history)
      history.append(record)
      stop = [cb.after_epoch(epoch, record, state) for cb in callbacks]
      if any(stop):
        tqdm.write(f'fit: stopped after epoch {epoch} by {[type(c).__name__ for c, s in zip(callbacks, stop) if s]}')
      epoch, batch, carry, elapsed, steps.epoch = epoch + 1, 0, None, 0.0, []
      finished = any(stop) or epoch == n_epoch
      if checkpoints is not None:
        start = time.perf_counter()
        save()
      log.write(record)  # after the checkpoint: the log never holds an epoch the checkpoints lack
  if plot_path is not None:
    save_plots(plot_path, steps.log, history)
  return state, history
