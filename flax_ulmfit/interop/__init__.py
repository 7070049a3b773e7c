"""Lossless conversion between PyTorch/fastai state_dicts and Flax models, both ways.

`torch_to_flax(state_dict, model) -> model` fills `model` (in place) from a state_dict of
torch tensors or numpy arrays with fastai's key names; `flax_to_torch(model)` returns such a
state_dict as numpy arrays (`{k: torch.from_numpy(v)}` loads it into torch).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flax_ulmfit.interop.awd_lstm import awd_lstm_to_flax, awd_lstm_to_torch
from flax_ulmfit.models.awd_lstm import AWDLSTM, LanguageModel

_TEXT_MODELS = (AWDLSTM, LanguageModel)


def _unsupported(model) -> TypeError:
  return TypeError(f'no converter for {type(model).__name__}; supported: '
                   f'{", ".join(t.__name__ for t in _TEXT_MODELS)}')


def torch_to_flax(state_dict: Mapping, model):
  """Copies a torch/fastai `state_dict` into the Flax `model` and returns the model."""
  if isinstance(model, _TEXT_MODELS):
    return awd_lstm_to_flax(state_dict, model)
  raise _unsupported(model)


def flax_to_torch(model) -> dict[str, np.ndarray]:
  """The torch/fastai state_dict of the Flax `model`, as numpy arrays."""
  if isinstance(model, _TEXT_MODELS):
    return awd_lstm_to_torch(model)
  raise _unsupported(model)


__all__ = ['torch_to_flax', 'flax_to_torch']
