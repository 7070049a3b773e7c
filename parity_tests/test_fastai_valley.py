"""`lr_find`'s `valley` against fastai 2.8's own function (golden/make_fastai_valley.py): 200
curves of lengths 1 to 120 (random walks, lr_find-like dips, exact ties, smoothed noise,
monotone and constant), float32 values as fastai's `lr_find` hands them over. Exact equality:
the rule only compares and indexes."""
from pathlib import Path

import numpy as np

from flax_ulmfit.train.lr_find import valley

GOLDEN = np.load(Path(__file__).parent / 'golden' / 'fastai_valley.npz')


def test_valley_equals_fastai_on_every_curve():
  bounds = np.cumsum(GOLDEN['lengths'])[:-1]
  curves = zip(np.split(GOLDEN['lrs'], bounds), np.split(GOLDEN['losses'], bounds))
  got = [valley(lrs.tolist(), losses.tolist()) for lrs, losses in curves]
  expected = [float(lrs[i]) for lrs, i in zip(np.split(GOLDEN['lrs'], bounds), GOLDEN['index'])]
  mismatches = [k for k, (a, b) in enumerate(zip(got, expected)) if a != b]
  assert not mismatches, f'{len(mismatches)} of {len(got)} curves differ, first {mismatches[:5]}'
  np.testing.assert_array_equal(np.float32(got), GOLDEN['suggestion'])
