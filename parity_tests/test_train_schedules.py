"""Schedules: Flax (jnp, float32) vs torch_ref (fastai's formulas in Python) at every step.

Tolerance: rtol 1e-6, plus atol 1e-6 x the schedule's peak: both sides round the position
in training to float32 (fastai keeps its phase boundaries in a float32 tensor), and near the
end of a one-cycle run, where the rate is ~300x below its peak, that 1e-7 relative rounding
of the position is amplified ~20x in relative terms.
"""
import numpy as np
import pytest

import torch_ref.schedules as ts
from flax_ulmfit.train import schedules as fs

TOTAL = 37
CASES = {
    'one_cycle': (fs.one_cycle(TOTAL, 3e-3), ts.one_cycle(TOTAL, 3e-3)),
    'one_cycle_moms_text': (fs.one_cycle_moms(TOTAL, (0.8, 0.7, 0.8)), ts.one_cycle_moms(TOTAL, (0.8, 0.7, 0.8))),
    'one_cycle_moms': (fs.one_cycle_moms(TOTAL), ts.one_cycle_moms(TOTAL)),
    'flat_cos': (fs.flat_cos(TOTAL, 1e-3), ts.flat_cos(TOTAL, 1e-3)),
    'cosine': (fs.cosine(TOTAL, 1e-2, 1e-4), ts.cosine(TOTAL, 1e-2, 1e-4)),
    'stlr': (fs.stlr(TOTAL, 0.01), ts.stlr(TOTAL, 0.01)),
    'exponential_sweep': (fs.exponential_sweep(TOTAL), ts.exponential_sweep(TOTAL)),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_schedule_values_equal_at_every_step(name):
  flax_sched, torch_sched = CASES[name]
  got = np.array([float(flax_sched(i)) for i in range(TOTAL)])
  want = np.array([torch_sched(i) for i in range(TOTAL)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_one_cycle_shape_matches_fastai_description():
  """Anchors from fastai's docs: starts at lr/25, peaks at lr at pct_start, ends near lr/1e5."""
  lr = fs.one_cycle(100, 1e-2)
  assert float(lr(0)) == pytest.approx(1e-2 / 25, rel=1e-6)
  assert float(lr(25)) == pytest.approx(1e-2, rel=1e-6)
  assert float(lr(100)) == pytest.approx(1e-7, rel=1e-4)
  assert float(fs.one_cycle_moms(100)(25)) == pytest.approx(0.85, rel=1e-6)


def test_stlr_matches_paper_anchors():
  """Howard & Ruder eq. 3: lr_max / ratio at t = 0, lr_max at the cut."""
  lr = fs.stlr(100, 0.01, 0.1, 32)
  assert float(lr(0)) == pytest.approx(0.01 / 32, rel=1e-6)
  assert float(lr(10)) == pytest.approx(0.01, rel=1e-6)
