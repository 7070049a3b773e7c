"""What the step benchmarks share: the process environment (set before jax and torch load) and
steps of several frameworks timed alternately in one process.

Alternating steps in one process puts JAX and torch under the same machine load; OMP_WAIT_POLICY
PASSIVE lets torch's idle OpenMP threads sleep (spinning made torch 10x slower on a shared
machine).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# run_all.py's memory runs set it to 'flax' or 'torch': only that side's steps run, then the
# process prints its memory figures and ends
SIDE_ENV = 'FLAX_ULMFIT_BENCH_SIDE'


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
  baseline = rss_mb()
  runners = {label: runner for label, runner in runners.items() if runs(label)}
  times, last = {label: [] for label in runners}, {}
  for i in range(n_warmup + n_steps):
    for label, runner in runners.items():
      seconds, last[label] = runner.step(i)
      if i >= n_warmup:
        times[label].append(seconds * 1e3)
  end_memory_run(baseline)
  return times, last


def runs(label: str) -> bool:
  """Whether the side `label` ('flax' or 'torch') runs its steps in this process."""
  return os.environ.get(SIDE_ENV, label) == label


def _status_mb(field: str) -> float:
  with open('/proc/self/status') as status:
    return next(int(line.split()[1]) for line in status if line.startswith(field + ':')) / 1024


def rss_mb() -> float:
  """This process's resident memory now, MiB (Linux)."""
  return _status_mb('VmRSS')


def end_memory_run(baseline_mb: float) -> None:
  """In a memory run (SIDE_ENV set), prints the peak RSS and its rise over `baseline_mb` (the
  RSS before the first step: frameworks imported, models built) and ends the process."""
  side = os.environ.get(SIDE_ENV)
  if side:
    peak = _status_mb('VmHWM')
    print(f'memory_run side={side} peak_rss_mb={peak:.0f} step_rss_mb={peak - baseline_mb:.0f}', flush=True)
    sys.exit(0)

