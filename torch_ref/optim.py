"""fastai's `Adam` optimizer in PyTorch: param groups, freezing, wd_bn_bias, per-parameter state.

Reproduces fastai's `Optimizer` with its step functions `weight_decay`,
`average_grad(dampening=True)`, `average_sqr_grad`, `step_stat` and `adam_step`.
"""
from __future__ import annotations

import torch


def debias(mom: float, damp: float, step: int) -> float:
  """fastai's `debias`: damp * (1 - mom**step) / (1 - mom)."""
  return damp * (1 - mom ** step) / (1 - mom)


class Adam:
  """fastai's `Adam(params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01)` over parameter groups.

  Args:
    groups: list of lists of parameters, first group first (fastai's splitter output).
    lr: one learning rate per group (or one for all).
    no_wd: parameters exempt from weight decay (fastai's `wd_bn_bias=False` on BN and biases).
    train_bn: parameters kept trainable when their group is frozen (fastai's `train_bn=True`).
  """

  def __init__(self, groups, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01, no_wd=(), train_bn=()):
    self.groups = [list(g) for g in groups]
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(self.groups)
    self.hypers = [dict(lr=v, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd) for v in lrs]
    self.no_wd = {id(p) for p in no_wd}
    self.train_bn = {id(p) for p in train_bn}
    self.state: dict[int, dict] = {}

  def set_hyper(self, name: str, values) -> None:
    """Sets hyperparameter `name` for every group (one value, or one per group)."""
    values = list(values) if isinstance(values, (list, tuple)) else [values] * len(self.hypers)
    for hyper, value in zip(self.hypers, values):
      hyper[name] = value

  def freeze_to(self, n: int) -> None:
    """fastai's `Optimizer.freeze_to`: groups before `n` (negative: counted from the end)
    frozen, BN kept trainable, the rest trainable; the optimizer state is left alone."""
    n = n if n >= 0 else len(self.groups) + n
    for i, group in enumerate(self.groups):
      for p in group:
        p.requires_grad_(i >= n or id(p) in self.train_bn)

  def clear_state(self) -> None:
    """fastai's `clear_state`: forgets every step count and running average. fastai's
    `Learner.freeze_to`/`freeze`/`unfreeze` call it after `Optimizer.freeze_to`."""
    self.state.clear()

  def params(self):
    """Trainable parameters, all groups."""
    return [p for g in self.groups for p in g if p.requires_grad]

  def zero_grad(self) -> None:
    for p in self.params():
      p.grad = None

  @torch.no_grad()
  def step(self) -> None:
    for group, hyper in zip(self.groups, self.hypers):
      lr, mom, sqr_mom, eps, wd = (hyper[k] for k in ('lr', 'mom', 'sqr_mom', 'eps', 'wd'))
      for p in group:
        if not p.requires_grad or p.grad is None:
          continue
        state = self.state.setdefault(id(p), {})
        if id(p) not in self.no_wd and wd != 0:  # weight_decay
          p.mul_(1 - lr * wd)
        grad_avg = state.setdefault('grad_avg', torch.zeros_like(p))  # average_grad(dampening=True)
        grad_avg.mul_(mom).add_(p.grad, alpha=1 - mom)
        sqr_avg = state.setdefault('sqr_avg', torch.zeros_like(p))  # average_sqr_grad
        sqr_avg.mul_(sqr_mom).addcmul_(p.grad, p.grad, value=1 - sqr_mom)
        state['step'] = step = state.get('step', 0) + 1  # step_stat
        debias1 = debias(mom, 1 - mom, step)  # adam_step
        debias2 = debias(sqr_mom, 1 - sqr_mom, step)
        p.addcdiv_(grad_avg, (sqr_avg / debias2).sqrt() + eps, value=-lr / debias1)
