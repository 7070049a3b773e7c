"""Data parallelism: a 1-axis device mesh, the batch split over it, parameters replicated.

A step function written for one device becomes data-parallel with `data_parallel`: each
device runs it on its slice of the batch (and of the LM streams' recurrent state), and
the step averages gradients and metrics with `jax.lax.pmean(..., DATA_AXIS)`. On CPU,
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (set before importing jax) makes N
devices of the cores; measured here, this beat plain jit with a batch sharding on 2 cores
(DESIGN.md), though for the AWD-LSTM step one device is now faster still (README).
Many hosts: call `jax.distributed.initialize()` first; `jax.devices()` then spans them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
BATCH = P(DATA_AXIS)  # leading (batch) axis split over devices
REPLICATED = P()


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-axis mesh named `data` over `devices` (default: all of them)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def check_divisible(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the batch splits evenly over the mesh."""
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f'data_parallel: batch size {batch_size} does not split over {n} devices; '
                     f'use a multiple of {n}')


def shard_batch(tree, mesh: Mesh):
  """Places every leaf of `tree` on `mesh`, split along its leading axis."""
  return jax.device_put(tree, NamedSharding(mesh, BATCH))


def replicate(tree, mesh: Mesh):
  """Places every leaf of `tree` on every device of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, REPLICATED))


def data_parallel(step: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
  """Wraps `step` in `jax.shard_map` over `mesh`: each device runs it on its shard.

  `in_specs`/`out_specs` use `BATCH` for per-example trees and `REPLICATED` for the rest.
  `step` itself must `pmean` what it wants averaged over `DATA_AXIS`. `check_vma` is off
  because the LSTM's hand-written backward pass carries no varying-axis annotations.
  """
  return jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
