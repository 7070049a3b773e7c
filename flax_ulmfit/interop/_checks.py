"""Shared pieces of the state_dict converters: array coercion and key/shape checks."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def as_numpy(value, key: str) -> np.ndarray:
  """Returns `value` (torch tensor, numpy or JAX array) as a numpy array; names `key` on failure."""
  if hasattr(value, 'detach'):  # a torch tensor, without importing torch
    value = value.detach().cpu().numpy()
  try:
    return np.asarray(value)
  except Exception as err:  # noqa: BLE001 - re-raised with the key named
    raise TypeError(f'state_dict[{key!r}]: cannot read {type(value).__name__} as an array') from err


def check_keys(state_dict: Mapping, expected: Mapping[str, tuple[int, ...]], what: str) -> dict[str, np.ndarray]:
  """Checks `state_dict` has exactly the `expected` keys and shapes; returns numpy arrays.

  Raises:
    KeyError: a key is missing or unexpected (every such key is named).
    ValueError: an array has the wrong shape (key, expected and received shapes named), or
      holds NaN/inf.
  """
  missing = [k for k in expected if k not in state_dict]
  extra = [k for k in state_dict if k not in expected]
  if missing or extra:
    raise KeyError(f'{what}: state_dict does not match the model: missing keys {missing}, '
                   f'unexpected keys {extra}')
  arrays = {}
  for key, shape in expected.items():
    array = as_numpy(state_dict[key], key)
    if tuple(array.shape) != tuple(shape):
      raise ValueError(f'{what}: state_dict[{key!r}] has shape {tuple(array.shape)}, '
                       f'the model expects {tuple(shape)}')
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
      raise ValueError(f'{what}: state_dict[{key!r}] contains NaN or infinite values; '
                       'the checkpoint is corrupt or was saved after training diverged')
    arrays[key] = array
  return arrays
