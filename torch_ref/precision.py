"""Reference dynamic loss scalers in PyTorch: torch's GradScaler and fastai course-v3's MixedPrecision."""
from __future__ import annotations

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max


class DynamicLossScaler:
  """Scale bookkeeping of a training loop with fp16 gradients (one `step` per batch).

  `step(params, optimizer_step)` unscales the `.grad`s in place, skips `optimizer_step` and
  backs off when any is inf/NaN, else calls it and grows the scale after `growth_interval`
  clean steps (never past float32's maximum; the count restarts either way).
  `reset_on_overflow` is torch GradScaler's behaviour (fastai course-v3 keeps its count).
  Returns whether the step ran.
  """

  def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
               reset_on_overflow=True):
    self.scale, self.good_steps = init_scale, 0
    self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
    self.growth_interval, self.reset_on_overflow = growth_interval, reset_on_overflow

  def step(self, params, optimizer_step) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    if not finite:
      self.scale *= self.backoff_factor
      if self.reset_on_overflow:
        self.good_steps = 0
      return False
    for g in grads:
      g.div_(self.scale)
    optimizer_step()
    self.good_steps += 1
    if self.good_steps == self.growth_interval:
      self.good_steps = 0
      if self.scale * self.growth_factor <= FLOAT32_MAX:  # torch keeps its scale in float32
        self.scale *= self.growth_factor
    return True


def torch_grad_scaler() -> DynamicLossScaler:
  """torch.amp.GradScaler's defaults."""
  return DynamicLossScaler(2.0 ** 16, 2.0, 0.5, 2000, reset_on_overflow=True)


def fastai_course_scaler() -> DynamicLossScaler:
  """fastai course-v3 MixedPrecision: max_loss_scale 2**24, div_factor 2, scale_wait 500."""
  return DynamicLossScaler(2.0 ** 24, 2.0, 0.5, 500, reset_on_overflow=False)
