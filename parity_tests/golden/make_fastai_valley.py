"""Writes fastai_valley.npz: loss curves and the learning rate fastai 2.8's `valley` suggests
for each, for test_fastai_valley.py and test_train_loop.py.

Curves: random walks, lr_find-like dips, ties (quantised losses), monotone and constant
curves, lengths 1 to 120, every value a float32 (fastai's `lr_find` hands `valley` float32
tensors); and `lr_find_curve.json`, the curve our `lr_find` records in test_train_loop.py
(written by record_lr_find_curve.py), trimmed as fastai's `Learner.lr_find` trims it.

Needs fastai (the scratch venv; the tests read only the .npz). From the repository root:
  PYTHONPATH=. /work/main/.venv/bin/python parity_tests/golden/record_lr_find_curve.py
  PYTHONPATH=. $PY parity_tests/golden/make_fastai_valley.py
"""
import json
from pathlib import Path

import numpy as np
import torch
from fastai.callback.schedule import valley

HERE = Path(__file__).parent


def random_curves(rng: np.random.Generator) -> list[np.ndarray]:
  curves = []
  for i in range(200):
    n = int(rng.integers(1, 121))
    kind = i % 5
    if kind == 0:    # random walk
      y = 3 + np.cumsum(rng.normal(0, 0.1, n))
    elif kind == 1:  # lr_find-like: flat, a descent, then a blow-up, plus noise
      x = np.linspace(0, 1, n)
      y = 2.5 - 1.5 * np.clip((x - 0.3) / 0.5, 0, 1) + 20 * np.clip(x - 0.85, 0, None) ** 2
      y = y + rng.normal(0, 0.03, n)
    elif kind == 2:  # quantised: many exact ties, which `<` must treat as not decreasing
      y = rng.integers(0, 6, n).astype(float)
    elif kind == 3:  # smoothed noise, as the Recorder's moving average gives
      raw = rng.normal(0, 1, n)
      y = np.array([raw[max(0, k - 5):k + 1].mean() for k in range(n)])
    else:            # monotone down, monotone up or constant
      y = [np.linspace(3, 1, n), np.linspace(1, 3, n), np.full(n, 2.0)][int(rng.integers(0, 3))]
    curves.append(np.asarray(y, np.float32))
  return curves


def suggest(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, int]:
  """fastai's valley on float32 tensors (as `Learner.lr_find` calls it) and the chosen index."""
  lr, _ = valley(torch.tensor(lrs, dtype=torch.float32), torch.tensor(losses, dtype=torch.float32), len(lrs))
  index = int(np.flatnonzero(lrs == np.float32(lr))[0])
  return lr, index


def main():
  rng = np.random.default_rng(0)
  curves = random_curves(rng)
  lrs = [np.logspace(-7, 1, len(losses)).astype(np.float32) for losses in curves]
  suggestions, indices = zip(*(suggest(x, y) for x, y in zip(lrs, curves)))

  recorded = json.loads((HERE / 'lr_find_curve.json').read_text())
  lo = recorded['num_it'] // 10  # fastai's Learner.lr_find: `tensor(recorder.lrs[num_it//10:-5])`
  lr_find_suggestion, lr_find_index = suggest(np.asarray(recorded['lrs'], np.float32)[lo:-5],
                                              np.asarray(recorded['losses'], np.float32)[lo:-5])
  out = HERE / 'fastai_valley.npz'
  np.savez_compressed(out, lengths=[len(c) for c in curves], lrs=np.concatenate(lrs),
                      losses=np.concatenate(curves), suggestion=np.float32(suggestions), index=indices,
                      lr_find_num_it=recorded['num_it'], lr_find_lrs=recorded['lrs'],
                      lr_find_losses=recorded['losses'], lr_find_suggestion=lr_find_suggestion,
                      lr_find_index=lr_find_index + lo)
  print(f'wrote {out}: {len(curves)} curves; lr_find curve: fastai suggests {lr_find_suggestion:.4g} '
        f'(index {lr_find_index + lo})')


if __name__ == '__main__':
  main()
