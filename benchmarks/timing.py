"""What the step benchmarks share: the process environment (set before jax and torch load) and
steps of several frameworks timed alternately in one process.

Alternating steps in one process puts JAX and torch under the same machine load; OMP_WAIT_POLICY
PASSIVE lets torch's idle OpenMP threads sleep (spinning made torch 10x slower on a shared
machine).
"""
from __future__ import annotations

import os
from collections.abc import Mapping


def configure(devices: int = 1, dots: str = 'ynn') -> None:
  """Sets XLA's host device count and matmul backend ('ynn', XLA's default, or 'eigen') and
  torch's OpenMP wait policy. Call before importing jax or torch."""
  flags = os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}'
  if dots == 'eigen':
    flags += ' --xla_cpu_experimental_ynn_fusion_type='
  os.environ['XLA_FLAGS'] = flags.strip()
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')


def alternate(runners: Mapping, n_steps: int, n_warmup: int) -> tuple[dict[str, list[float]], dict[str, float]]:
  """Runs `runner.step(i) -> (seconds, loss)` of every runner in turn for each step i; returns
  each runner's step times in ms after the `n_warmup` first steps, and its last loss."""
  times, last = {label: [] for label in runners}, {}
  for i in range(n_warmup + n_steps):
    for label, runner in runners.items():
      seconds, last[label] = runner.step(i)
      if i >= n_warmup:
        times[label].append(seconds * 1e3)
  return times, last

