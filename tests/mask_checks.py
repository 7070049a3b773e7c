"""Binomial checks for dropout masks a model draws itself (shared by the AWD-LSTM and classifier tests)."""
from __future__ import annotations

import numpy as np


def check_mask(mask, shape, p, site):
  """Shape, values in {0, 1/(1-p)} (fastai's `dropout_mask`) and a drop rate within 4 standard deviations of p."""
  mask = np.asarray(mask)
  assert mask.shape == shape, f'{site}: shape {mask.shape}, expected {shape}'
  values = np.unique(mask)
  # zeros and one kept value, 1/(1-p) to float32 rounding (fastai divides in the model's dtype)
  assert values[0] == 0.0 and len(values) == 2 and abs(values[1] * (1 - p) - 1) <= 1e-6, f'{site}: values {values[:5]}'
  rate = (mask == 0).mean()
  assert abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / mask.size), f'{site}: drop rate {rate:.4f}, p={p}'


def check_independent(a, p_a, b, p_b, what):
  """Independent masks keep an entry together at the rate (1 - p_a)(1 - p_b), within 4 standard
  deviations; `a` and `b` are compared entry by entry after flattening, over the shorter one."""
  a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
  n = min(a.size, b.size)
  both_kept = ((a[:n] != 0) & (b[:n] != 0)).mean()
  rate = (1 - p_a) * (1 - p_b)
  assert abs(both_kept - rate) <= 4 * np.sqrt(rate * (1 - rate) / n), \
      f'{what}: kept together at {both_kept:.4f}, independent masks {rate:.4f}'
