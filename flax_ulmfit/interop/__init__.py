"""Lossless conversion between PyTorch/fastai state_dicts and Flax models, both ways.

`torch_to_flax(state_dict, model) -> model` fills `model` (in place) from a state_dict of
torch tensors or numpy arrays with fastai's key names; `flax_to_torch(model)` returns such a
state_dict as numpy arrays (`{k: torch.from_numpy(v)}` loads it into torch). Supported:
`LanguageModel`, `AWDLSTM`, `TextClassifier`, `XResNet` (and its presets) and `CNNModel`
(body + new head). `load_encoder(state_dict, classifier)` is fastai's `load_encoder`.
`interop.fastai_files` reads and writes fastai's `.pth` weight files and `itos` vocabularies.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flax_ulmfit.interop.awd_lstm import awd_lstm_to_flax, awd_lstm_to_torch
from flax_ulmfit.interop.classifier import classifier_to_flax, classifier_to_torch, load_encoder
from flax_ulmfit.interop.xresnet import xresnet_to_flax, xresnet_to_torch
from flax_ulmfit.models.awd_lstm import AWDLSTM, LanguageModel
from flax_ulmfit.models.classifier import TextClassifier
from flax_ulmfit.models.transfer import CNNModel
from flax_ulmfit.models.xresnet import XResNet

_CONVERTERS = (((AWDLSTM, LanguageModel), awd_lstm_to_flax, awd_lstm_to_torch),
               ((TextClassifier,), classifier_to_flax, classifier_to_torch),
               ((XResNet, CNNModel), xresnet_to_flax, xresnet_to_torch))


def _converters(model):
  for types, to_flax, to_torch in _CONVERTERS:
    if isinstance(model, types):
      return to_flax, to_torch
  supported = ', '.join(t.__name__ for types, _, _ in _CONVERTERS for t in types)
  raise TypeError(f'no converter for {type(model).__name__}; supported: {supported}')


def torch_to_flax(state_dict: Mapping, model):
  """Copies a torch/fastai `state_dict` into the Flax `model` and returns the model."""
  return _converters(model)[0](state_dict, model)


def flax_to_torch(model) -> dict[str, np.ndarray]:
  """The torch/fastai state_dict of the Flax `model`, as numpy arrays."""
  return _converters(model)[1](model)


__all__ = ['torch_to_flax', 'flax_to_torch', 'load_encoder']
