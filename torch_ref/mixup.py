"""fastai's MixUp in PyTorch, with the weights and permutation handed in (for parity)."""
from __future__ import annotations

import torch

from torch_ref.losses import reduce_loss


def mix_inputs(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
  """`torch.lerp(x[perm], x, lam)` per sample, as fastai's MixUp.before_batch does."""
  return torch.lerp(x[perm], x, lam.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype))


def mixup_loss(per_sample_loss, preds: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor,
               perm: torch.Tensor, reduction: str = 'mean') -> torch.Tensor:
  """fastai's MixUp.lf: lerp of the unreduced losses on both targets, then reduced."""
  loss = torch.lerp(per_sample_loss(preds, targets[perm]), per_sample_loss(preds, targets), lam)
  return reduce_loss(loss, reduction)
