"""Reference losses in PyTorch: flat cross-entropy and AWD-LSTM's AR/TAR (fastai semantics)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_flat(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
  """Mean cross-entropy over every position of (..., V) logits (fastai's CrossEntropyLossFlat)."""
  return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def ar_tar(raw: torch.Tensor, dropped: torch.Tensor, alpha: float = 2.0, beta: float = 1.0) -> torch.Tensor:
  """fastai's RNNRegularizer: alpha * mean(dropped**2) + beta * mean((raw[:,1:] - raw[:,:-1])**2)."""
  ar = dropped.float().pow(2).mean()
  tar = (raw[:, 1:] - raw[:, :-1]).float().pow(2).mean() if raw.shape[1] > 1 else 0.0
  return alpha * ar + beta * tar
