"""fastai/torch XResNet state_dicts <-> Flax XResNet and CNNModel (transfer) modules, lossless.

Key names follow fastai's Sequential layout (`0.0.weight`, `4.0.convpath.1.1.running_var`,
`5.0.idpath.1.0.weight`, `11.weight`; transfer models `0.<body key>`, `1.<head index>.*`).
Conv kernels are OIHW in torch and HWIO here; linear weights are transposed.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_ulmfit.interop._checks import check_keys
from flax_ulmfit.models.batchnorm import BatchNorm
from flax_ulmfit.models.transfer import CNNModel
from flax_ulmfit.models.xresnet import ConvLayer, XResNet, XResNetBody

_BN = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var',
       'num_batches_tracked': 'num_batches_tracked'}


def _body_layers(body: XResNetBody, prefix: str) -> Iterator[tuple[str, nnx.Module]]:
  for i, layer in enumerate(body.stem):
    yield f'{prefix}{i}', layer
  for s, stage in enumerate(body.stages):
    for b, block in enumerate(stage):
      name = f'{prefix}{len(body.stem) + 1 + s}.{b}'
      for j, layer in enumerate(block.convpath):
        yield f'{name}.convpath.{j}', layer
      if block.idconv is not None:
        yield f'{name}.idpath.{int(block.pool)}', block.idconv


def _layers(model) -> Iterator[tuple[str, nnx.Module]]:
  """(torch key prefix, ConvLayer | BatchNorm | nnx.Linear) for every layer holding tensors."""
  if isinstance(model, XResNet):
    yield from _body_layers(model.body, '')
    yield str(len(model.body.stem) + len(model.body.stages) + 4), model.linear  # + pool, avg-pool, flatten, dropout
  elif isinstance(model, CNNModel):
    yield from _body_layers(model.body, '0.')
    index = 2  # pool, flatten
    for block in model.head.blocks:
      if block.bn is not None:
        yield f'1.{index}', block.bn
        index += 1
      index += block.dropout.rate != 0
      yield f'1.{index}', block.linear
      index += 2  # linear, relu
  else:
    raise TypeError(f'xresnet interop: expected an XResNet or CNNModel, got {type(model).__name__}')


def _tensors(prefix: str, layer) -> Iterator[tuple[str, nnx.Variable, str]]:
  """(torch key, Flax variable, layout) with layout 'oihw', 'linear' or 'same'."""
  if isinstance(layer, ConvLayer):
    yield f'{prefix}.0.weight', layer.kernel, 'oihw'
    prefix, layer = f'{prefix}.1', layer.bn
  if isinstance(layer, BatchNorm):
    for torch_name, flax_name in _BN.items():
      yield f'{prefix}.{torch_name}', getattr(layer, flax_name), 'same'
  elif isinstance(layer, nnx.Linear):
    yield f'{prefix}.weight', layer.kernel, 'linear'
    if layer.bias is not None:
      yield f'{prefix}.bias', layer.bias, 'same'


def _entries(model):
  return [entry for prefix, layer in _layers(model) for entry in _tensors(prefix, layer)]


def _to_torch(array: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'oihw':
    return array.transpose(3, 2, 0, 1)
  if layout == 'linear':
    return array.T
  return array.astype(np.int64) if array.dtype.kind == 'i' else array


def xresnet_to_torch(model: XResNet | CNNModel) -> dict[str, np.ndarray]:
  """fastai state_dict (numpy arrays) of `model`; `{k: torch.from_numpy(v)}` loads with strict=True."""
  return {key: np.array(_to_torch(np.asarray(var[...]), layout), order='C') for key, var, layout in _entries(model)}


def xresnet_torch_shapes(model: XResNet | CNNModel) -> dict[str, tuple[int, ...]]:
  """The fastai state_dict's keys and shapes for `model`, in order; works on `nnx.eval_shape` models."""
  return {key: _to_torch(np.empty(var.shape, np.float32), layout).shape for key, var, layout in _entries(model)}


def xresnet_to_flax(state_dict: Mapping, model: XResNet | CNNModel) -> XResNet | CNNModel:
  """Loads a fastai/torch XResNet (or create_cnn_model) `state_dict` into `model` in place; returns it.

  Raises:
    KeyError: missing or unexpected keys (build `model` with the same preset, c_in and n_out).
    ValueError: a tensor of the wrong shape, or non-finite values.
  """
  arrays = check_keys(state_dict, xresnet_torch_shapes(model), 'xresnet_to_flax')
  for key, var, layout in _entries(model):
    array = arrays[key]
    if array.dtype.kind == 'f' and not np.isfinite(array).all():
      raise ValueError(f'xresnet_to_flax: state_dict[{key!r}] contains NaN or inf; the checkpoint is corrupt')
    if layout == 'oihw':
      array = array.transpose(2, 3, 1, 0)
    elif layout == 'linear':
      array = array.T
    var[...] = jnp.array(array, dtype=var[...].dtype, copy=True)  # never alias torch tensor memory
  return model
