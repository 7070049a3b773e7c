"""Deterministic XResNet weights from numpy alone, one generator per state_dict key, so a golden
file can record fastai's outputs for weights that every side rebuilds without storing them.

Weights are kaiming-scaled normals; BatchNorm scales in [0.5, 1.5) (not fastai's zeros, so
every conv path counts), biases and running means ~N(0, 0.1), running vars in [0.5, 1.5).
"""
import zlib

import numpy as np


def weight(key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
  """The value of state_dict entry `key` (fastai's names) with `shape` and `dtype`."""
  rng = np.random.default_rng(zlib.crc32(key.encode()))
  name = key.rsplit('.', 1)[-1]
  if np.dtype(dtype).kind == 'i':  # num_batches_tracked
    return np.full(shape, 3, dtype)
  if name == 'weight' and len(shape) > 1:  # conv or linear
    return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(dtype)
  if name in ('weight', 'running_var'):  # BatchNorm scale, running variance
    return rng.uniform(0.5, 1.5, shape).astype(dtype)
  return (rng.standard_normal(shape) * 0.1).astype(dtype)  # biases, running means


def state_dict(shapes: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
  """{key: weight} for {key: (shape, dtype name)}."""
  return {key: weight(key, tuple(shape), dtype) for key, (shape, dtype) in shapes.items()}
