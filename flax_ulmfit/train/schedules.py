"""Learning-rate and momentum schedules as pure `step -> value` functions (optax convention).

`step` is the number of updates already applied (optax's count), so with `total_steps`
updates in a run the position in training is `step / total_steps`, as in fastai's
`ParamScheduler` (which reads `train_iter / total` before each batch).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def _check_total(fn: str, total_steps: int) -> None:
  if int(total_steps) < 1:
    raise ValueError(f'{fn}: total_steps must be >= 1, got {total_steps=}')


def _check_pct(fn: str, name: str, pct: float) -> None:
  if not 0.0 < pct < 1.0:
    raise ValueError(f'{fn}: {name} must be in (0, 1), got {name}={pct}')


def cos_anneal(start: float, end: float, pos: jnp.ndarray) -> jnp.ndarray:
  """fastai's `SchedCos` at `pos` in [0, 1]: half a cosine from `start` to `end`.

  fastai writes `start + (1 + cos(pi * (1 - pos))) * (end - start) / 2`; the same value is
  computed here as `start * cos(pi * pos / 2)**2 + end * sin(pi * pos / 2)**2`, a sum of
  two non-negative terms that keeps float32 precise where fastai's form cancels (near
  either end when one of start, end is much smaller than the other).
  """
  angle = 0.5 * math.pi * pos
  return start * jnp.square(jnp.cos(angle)) + end * jnp.square(jnp.sin(angle))


def combined_cos(total_steps: int, pct_start: float, start: float, middle: float,
                 end: float) -> optax.Schedule:
  """fastai's `combined_cos`: cosine `start -> middle` over `pct_start`, then `middle -> end`."""
  _check_total('combined_cos', total_steps)
  _check_pct('combined_cos', 'pct_start', pct_start)

  def schedule(step):
    pos = jnp.asarray(step, jnp.float32) / total_steps
    warm = cos_anneal(start, middle, pos / pct_start)
    anneal = cos_anneal(middle, end, (pos - pct_start) / (1.0 - pct_start))
    return jnp.where(pos < pct_start, warm, anneal)
  return schedule


def one_cycle(total_steps: int, lr_max: float, div: float = 25.0, div_final: float = 1e5,
              pct_start: float = 0.25) -> optax.Schedule:
  """fastai's `fit_one_cycle` learning rate: `lr_max/div -> lr_max -> lr_max/div_final`.

  Args:
    total_steps: updates in the whole run (epochs x batches per epoch).
    lr_max: the peak learning rate.
    div: the starting rate is `lr_max / div`.
    div_final: the final rate is `lr_max / div_final`.
    pct_start: fraction of the run spent warming up.

  Returns:
    A schedule `step -> lr`.

  References:
    Smith, "Super-Convergence: Very Fast Training of Neural Networks Using Large Learning Rates", 2017.

  Example:
    >>> lr = one_cycle(100, 1e-2)
    >>> float(lr(25))  # the peak
    0.01
  """
  return combined_cos(total_steps, pct_start, lr_max / div, lr_max, lr_max / div_final)


def one_cycle_moms(total_steps: int, moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
                   pct_start: float = 0.25) -> optax.Schedule:
  """fastai's one-cycle momentum (Adam's beta1): `moms[0] -> moms[1] -> moms[2]`.

  Text learners use `moms=(0.8, 0.7, 0.8)`.
  """
  return combined_cos(total_steps, pct_start, *moms)


def flat_cos(total_steps: int, lr: float, pct_start: float = 0.75, div_final: float = 1e5) -> optax.Schedule:
  """fastai's `fit_flat_cos`: flat at `lr` for `pct_start`, then cosine down to `lr / div_final`."""
  _check_total('flat_cos', total_steps)
  _check_pct('flat_cos', 'pct_start', pct_start)

  def schedule(step):
    pos = jnp.asarray(step, jnp.float32) / total_steps
    anneal = cos_anneal(lr, lr / div_final, (pos - pct_start) / (1.0 - pct_start))
    return jnp.where(pos < pct_start, jnp.float32(lr), anneal)
  return schedule


def cosine(total_steps: int, start: float, end: float = 0.0) -> optax.Schedule:
  """fastai's `SchedCos` over the whole run: half a cosine from `start` to `end`."""
  _check_total('cosine', total_steps)
  return lambda step: cos_anneal(start, end, jnp.asarray(step, jnp.float32) / total_steps)


def stlr(total_steps: int, lr_max: float = 0.01, cut_frac: float = 0.1, ratio: float = 32.0) -> optax.Schedule:
  """ULMFiT's slanted triangular learning rate: a short linear rise, then a long linear decay.

  `cut = floor(T * cut_frac)`; `p = t / cut` before the cut, else
  `1 - (t - cut) / (T - cut)`; `lr = lr_max * (1 + p * (ratio - 1)) / ratio`. The paper's
  decay length `cut * (1 / cut_frac - 1)` equals `T - cut` when `T * cut_frac` is whole; for
  other T it would overshoot to negative rates, so `T - cut` is used.

  References:
    Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification", 2018, eq. 3.
  """
  _check_total('stlr', total_steps)
  _check_pct('stlr', 'cut_frac', cut_frac)
  cut = math.floor(total_steps * cut_frac)
  if cut < 1:
    raise ValueError(f'stlr: total_steps * cut_frac must be >= 1 to have a rising part, got '
                     f'{total_steps=} and {cut_frac=}; use more steps or a larger cut_frac')

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    p = jnp.where(t < cut, t / cut, 1.0 - (t - cut) / (total_steps - cut))
    return lr_max * (1.0 + p * (ratio - 1.0)) / ratio
  return schedule


def exponential_sweep(total_steps: int, start: float = 1e-7, end: float = 10.0) -> optax.Schedule:
  """`lr_find`'s sweep (fastai's `SchedExp`): `start * (end / start) ** (step / total_steps)`."""
  _check_total('exponential_sweep', total_steps)
  return lambda step: start * (end / start) ** (jnp.asarray(step, jnp.float32) / total_steps)
