"""fastai's schedules in plain Python, evaluated the way its `ParamScheduler` does (pos = i / total)."""
from __future__ import annotations

import math

import torch


def sched_cos(start: float, end: float, pos: float) -> float:
  """fastai's `SchedCos`."""
  return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def combine_scheds(pcts, scheds):
  """fastai's `combine_scheds`: segment boundaries kept in a float32 tensor, as fastai does."""
  bounds = torch.cumsum(torch.tensor([0.0] + list(pcts)), 0)
  last = len(bounds) - 2

  def inner(pos: float) -> float:
    idx = min(int((pos >= bounds).nonzero().max()), last)
    actual = (pos - bounds[idx]) / (bounds[idx + 1] - bounds[idx])
    return scheds[idx](actual.item())
  return inner


def combined_cos(pct: float, start: float, middle: float, end: float):
  """fastai's `combined_cos` as a function of pos in [0, 1]."""
  return combine_scheds([pct, 1 - pct], [lambda p: sched_cos(start, middle, p), lambda p: sched_cos(middle, end, p)])


def one_cycle(total: int, lr_max: float, div: float = 25.0, div_final: float = 1e5, pct_start: float = 0.25):
  """fit_one_cycle's lr at iteration i (0-based)."""
  sched = combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final)
  return lambda i: sched(i / total)


def one_cycle_moms(total: int, moms=(0.95, 0.85, 0.95), pct_start: float = 0.25):
  """fit_one_cycle's momentum at iteration i."""
  sched = combined_cos(pct_start, *moms)
  return lambda i: sched(i / total)


def flat_cos(total: int, lr: float, pct_start: float = 0.75, div_final: float = 1e5):
  """fit_flat_cos's lr at iteration i."""
  sched = combine_scheds([pct_start, 1 - pct_start], [lambda p: lr, lambda p: sched_cos(lr, lr / div_final, p)])
  return lambda i: sched(i / total)


def cosine(total: int, start: float, end: float = 0.0):
  """SchedCos over the whole run at iteration i."""
  return lambda i: sched_cos(start, end, i / total)


def stlr(total: int, lr_max: float = 0.01, cut_frac: float = 0.1, ratio: float = 32.0):
  """Howard & Ruder 2018, eq. 3, at iteration t (0-based); decay over total - cut steps."""
  cut = math.floor(total * cut_frac)

  def sched(t: int) -> float:
    p = t / cut if t < cut else 1 - (t - cut) / (total - cut)
    return lr_max * (1 + p * (ratio - 1)) / ratio
  return sched


def exponential_sweep(total: int, start: float = 1e-7, end: float = 10.0):
  """fastai's SchedExp as LRFinder uses it, at iteration i."""
  return lambda i: start * (end / start) ** (i / total)
