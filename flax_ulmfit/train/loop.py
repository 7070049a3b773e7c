"""`fit`: epochs of jitted steps with a progress bar, a per-epoch table, a CSV/JSONL log,
optional PNG plots, and two callbacks (early stopping, save best)."""
from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flax_ulmfit import checkpoint
from flax_ulmfit.train import plots
from flax_ulmfit.train.optim import hyperparams
from flax_ulmfit.train.step import TrainState


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


def _monitored(record: dict, monitor: str, who: str) -> float:
  if monitor not in record:
    raise KeyError(f'{who}: monitor {monitor!r} is not in the epoch record; available: {sorted(record)}')
  return float(record[monitor])


def _batches(data, epoch: int) -> Iterable:
  return data(epoch) if callable(data) else data


def _mean_metrics(metrics: Sequence[dict]) -> dict[str, float]:
  """Batch metrics averaged; weighted by a 'count' entry where the loss function gives one."""
  host = jax.device_get(list(metrics))
  weights = np.array([float(m.get('count', 1.0)) for m in host])
  return {k: float(np.array([float(m[k]) for m in host]) @ weights / weights.sum()) for k in host[0] if k != 'count'}


class _Log:
  """Appends one row per epoch to a .csv or .jsonl file."""

  def __init__(self, path: str | os.PathLike | None):
    self.path = Path(path) if path is not None else None
    if self.path is not None and self.path.suffix not in ('.csv', '.jsonl'):
      raise ValueError(f'fit: log_path must end in .csv or .jsonl, got {str(self.path)!r}')
    self.header = None

  def write(self, record: dict) -> None:
    if self.path is None:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.suffix == '.jsonl':
      with open(self.path, 'a' if self.header else 'w') as f:
        f.write(json.dumps(record) + '\n')
      self.header = list(record)
      return
    with open(self.path, 'a' if self.header else 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=self.header or list(record))
      if self.header is None:
        writer.writeheader()
        self.header = list(record)
      writer.writerow(record)


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


def fit(train_step: Callable, state: TrainState, train_data, n_epoch: int, *, rng: jax.Array,
        eval_step: Callable | None = None, valid_data=None, init_carry: Callable[[Any], Any] | None = None,
        language_model: bool = False, log_path: str | os.PathLike | None = None,
        plot_path: str | os.PathLike | None = None, callbacks: Sequence[Callback] = (),
        progress: bool = True) -> tuple[TrainState, list[dict]]:
  """Trains for `n_epoch` epochs; returns the final state and one record per epoch.

  Args:
    train_step: from `make_train_step`: `(state, batch, rng, carry) -> (state, carry, metrics)`.
    state: the `TrainState` to start from (donated to the first step).
    train_data: an iterable of batches, re-iterated each epoch, or `epoch -> iterable`.
    n_epoch: number of epochs.
    rng: the run's key; step i uses `fold_in(rng, i)`.
    eval_step, valid_data: from `make_eval_step`, and the validation batches.
    init_carry: `batch -> carry` at the start of each phase (e.g. a language model's zero
      state; fastai's ModelResetter); None passes carry=None.
    language_model: adds the validation perplexity, exp(valid_loss), to the table.
    log_path: .csv or .jsonl file, one row per epoch.
    plot_path: PNG with losses, lr and momentum (needs matplotlib).
    callbacks: `EarlyStopping`, `SaveBest` or anything with `after_epoch`.
    progress: show tqdm bars.

  Returns:
    `(state, history)`; a record holds epoch, train_loss, valid metrics (valid_loss,
    valid_<metric>...), perplexity, lr, mom and time (seconds).
  """
  if n_epoch < 1:
    raise ValueError(f'fit: n_epoch must be >= 1, got {n_epoch=}')
  if (eval_step is None) != (valid_data is None):
    raise ValueError('fit: pass eval_step and valid_data together (or neither)')
  log, history, steps, i = _Log(log_path), [], {'loss': [], 'learning_rate': [], 'mom': []}, 0
  header_printed = False
  for epoch in range(n_epoch):
    start = time.perf_counter()
    train_metrics, hypers, carry, first = [], [], None, True
    for batch in tqdm(_batches(train_data, epoch), desc=f'epoch {epoch}', leave=False, disable=not progress):
      if first and init_carry is not None:
        carry = init_carry(batch)
      first = False
      state, carry, metrics = train_step(state, batch, jax.random.fold_in(rng, i), carry)
      train_metrics.append(metrics)
      hypers.append(jax.tree.map(jnp.copy, hyperparams(state.opt_state)))  # the next step donates opt_state
      i += 1
    if not train_metrics:
      raise ValueError(f'fit: train_data gave no batches in epoch {epoch}; check the data loader')
    record = {'epoch': epoch, 'train_loss': _mean_metrics(train_metrics)['loss']}
    host_hypers = jax.device_get(hypers)
    steps['loss'] += [float(m['loss']) for m in jax.device_get(train_metrics)]
    for key in ('learning_rate', 'mom'):
      steps[key] += [float(h[key]) for h in host_hypers if key in h]
    if eval_step is not None:
      valid_metrics, carry, first = [], None, True
      for batch in tqdm(_batches(valid_data, epoch), desc='valid', leave=False, disable=not progress):
        if first and init_carry is not None:
          carry = init_carry(batch)
        first = False
        carry, metrics = eval_step(state, batch, carry)
        valid_metrics.append(metrics)
      if not valid_metrics:
        raise ValueError(f'fit: valid_data gave no batches in epoch {epoch}; check the data loader')
      record |= {f'valid_{k}': v for k, v in _mean_metrics(valid_metrics).items()}
      if language_model:
        record['perplexity'] = math.exp(min(record['valid_loss'], 700.0))
    if host_hypers and 'learning_rate' in host_hypers[-1]:
      record |= {'lr': float(host_hypers[-1]['learning_rate']), 'mom': float(host_hypers[-1].get('mom', math.nan))}
    record['time'] = round(time.perf_counter() - start, 2)
    if not header_printed:
      tqdm.write('  '.join(f'{k:>12}' for k in record))
      header_printed = True
    tqdm.write('  '.join(f'{v:>12.6g}' if isinstance(v, float) else f'{v:>12}' for v in record.values()))
    log.write(record)
    history.append(record)
    stop = [cb.after_epoch(epoch, record, state) for cb in callbacks]
    if any(stop):
      tqdm.write(f'fit: stopped after epoch {epoch} by {[type(c).__name__ for c, s in zip(callbacks, stop) if s]}')
      break
  if plot_path is not None:
    save_plots(plot_path, steps, history)
  return state, history
