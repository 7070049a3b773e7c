"""fastai's learning-rate finder: an exponential lr sweep that stops on divergence and suggests an lr."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import optax
from flax import nnx

from flax_ulmfit.train import plots
from flax_ulmfit.train.schedules import exponential_sweep
from flax_ulmfit.train.step import LossFn, init_train_state, make_train_step


class LRFinderResult(NamedTuple):
  """The sweep: lr and smoothed loss of every step run, and the suggested lr."""
  lrs: list[float]
  losses: list[float]
  suggestion: float


def valley(lrs: list[float], losses: list[float]) -> float:
  """fastai's `valley` rule: an lr about two thirds of the way down the longest decreasing run of the loss curve.

  The run lengths come from fastai's dynamic programme (longest strictly decreasing
  subsequence ending at each point). As in fastai 2.8, the run's end moves to `i` as soon
  as the run ending at `i` grows longer than the best so far, and its start is then set
  to `i - length` (not `+ 1`), from the length at that moment, even if the inner loop
  lengthens the run at `i` afterwards; the suggestion is
  `start + int(third) + int(third / 2)` with `third = (end - start) / 3`.
  """
  n = len(losses)
  run = [1] * n
  start = end = 0
  for i in range(1, n):
    for j in range(i):
      if losses[i] < losses[j] and run[i] < run[j] + 1:
        run[i] = run[j] + 1
      if run[end] < run[i]:
        end, start = i, i - run[i]
  third = (end - start) / 3
  return float(lrs[start + int(third) + int(third / 2)])


def lr_find(model: nnx.Module, loss_fn: LossFn, make_tx: Callable[[optax.Schedule], optax.GradientTransformation],
            batches: Iterable, *, rng: jax.Array, start_lr: float = 1e-7, end_lr: float = 10.0,
            num_it: int = 100, stop_div: bool = True, init_carry: Callable | None = None,
            plot_path: str | os.PathLike | None = None, trained: Any = None) -> LRFinderResult:
  """Trains a copy of `model` for up to `num_it` steps with lr from `start_lr` to `end_lr`.

  Losses are smoothed as fastai's Recorder does (moving average, beta 0.98, debiased); with
  `stop_div` the sweep stops when the smoothed loss exceeds 4x its minimum or is NaN. The
  suggestion is fastai's default `valley` over the curve without its first tenth and last
  five points (as fastai trims). `model` is left unchanged.

  Args:
    model: the model (its parameters are copied).
    loss_fn: as for `make_train_step`.
    make_tx: `lr_schedule -> optimizer` (e.g. `lambda lr: fastai_optimizer(labels, {'all': lr})`).
    batches: training batches; cycled if shorter than `num_it`.
    rng: key for the steps.
    plot_path: PNG of loss vs lr (log scale) with the suggestion marked, if matplotlib is installed.
    trained: the parameters the optimizer moves, as for `make_train_step`.
  """
  tx = make_tx(exponential_sweep(num_it, start_lr, end_lr))
  state = init_train_state(model, tx)
  step = make_train_step(model, loss_fn, tx, trained=trained)
  lrs, smoothed, avg, best, carry = [], [], 0.0, math.inf, None
  batches = list(batches)
  if not batches:
    raise ValueError('lr_find: batches is empty; pass at least one training batch')
  for i in range(num_it):
    batch = batches[i % len(batches)]
    if i == 0 and init_carry is not None:
      carry = init_carry(batch)
    state, carry, metrics = step(state, batch, jax.random.fold_in(rng, i), carry)
    loss = float(metrics['loss'])
    avg = 0.98 * avg + 0.02 * loss
    smooth = avg / (1 - 0.98 ** (i + 1))
    lrs.append(start_lr * (end_lr / start_lr) ** (i / num_it))
    smoothed.append(smooth)
    best = min(best, smooth)
    if stop_div and (smooth > 4 * best or math.isnan(smooth)):
      break
  lo, hi = num_it // 10, len(lrs) - 5
  if hi - lo < 2:
    raise ValueError(f'lr_find: the loss diverged after {len(lrs)} steps, too early to suggest an lr; '
                     f'lower start_lr (got {start_lr}) or raise num_it (got {num_it})')
  suggestion = valley(lrs[lo:hi], smoothed[lo:hi])
  if plot_path is not None:
    _plot(plot_path, lrs[lo:hi], smoothed[lo:hi], suggestion)
  return LRFinderResult(lrs, smoothed, suggestion)


def _plot(path, lrs, losses, suggestion) -> None:
  made = plots.figure(path, 1, 'lr_find')
  if made is None:
    return
  fig, (ax,) = made
  ax.plot(lrs, losses)
  ax.axvline(suggestion, color='r', linestyle='--', label=f'valley {suggestion:.2e}')
  ax.set(xscale='log', xlabel='learning rate', ylabel='smoothed loss')
  ax.legend()
  plots.save(fig, path)
