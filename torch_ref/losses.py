"""Reference losses in PyTorch with fastai semantics: cross-entropy, label smoothing, AR/TAR."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reduce_loss(losses: torch.Tensor, reduction: str) -> torch.Tensor:
  """fastai's `reduce_loss`: 'none', 'mean' or 'sum'."""
  return losses.mean() if reduction == 'mean' else losses.sum() if reduction == 'sum' else losses


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = 'mean') -> torch.Tensor:
  """Cross-entropy over the last axis of (..., C) logits; 'none' keeps the (...) shape."""
  losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction='none')
  return reduce_loss(losses.reshape(targets.shape), reduction)


def cross_entropy_flat(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
  """Mean cross-entropy over every position of (..., V) logits (fastai's CrossEntropyLossFlat)."""
  return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def linear_cross_entropy(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
  """fastai's LinearDecoder matmul then CrossEntropyLossFlat: the logits formed whole."""
  return cross_entropy_flat(F.linear(features, weight, bias), targets)


def label_smoothing_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, eps: float = 0.1,
                                  reduction: str = 'mean') -> torch.Tensor:
  """fastai's LabelSmoothingCrossEntropy on (B, C) logits: eps/c * sum(-log p) + (1 - eps) * nll."""
  c = logits.shape[-1]
  log_preds = F.log_softmax(logits.float(), dim=-1)
  if reduction == 'sum':
    smooth = -log_preds.sum()
  else:
    smooth = -log_preds.sum(dim=-1)
    if reduction == 'mean':
      smooth = smooth.mean()
  return smooth * eps / c + (1 - eps) * F.nll_loss(log_preds, targets.long(), reduction=reduction)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
  """fastai's `accuracy`: mean of arg-max == target."""
  return (logits.argmax(dim=-1) == targets).float().mean()


def ar_tar(raw: torch.Tensor, dropped: torch.Tensor, alpha: float = 2.0, beta: float = 1.0) -> torch.Tensor:
  """fastai's RNNRegularizer: alpha * mean(dropped**2) + beta * mean((raw[:,1:] - raw[:,:-1])**2);
  TAR only for more than one row (fastai's `len(h) > 1`) and, unlike fastai (NaN), more than one step."""
  ar = dropped.float().pow(2).mean()
  tar = (raw[:, 1:] - raw[:, :-1]).float().pow(2).mean() if len(raw) > 1 and raw.shape[1] > 1 else 0.0
  return alpha * ar + beta * tar
