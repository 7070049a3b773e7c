"""`LMLoader` against fastai 2.8's `LMDataLoader` (golden/make_fastai_lm_loader.py) at the edge
sizes: token counts divisible by bs (where `(n - 1) // bs` matters), stream lengths divisible
by seq_len (no shorter last batch, and no empty one), both, one batch, less than one seq_len.

fastai's own `drop_last` changes nothing here (its batches always hold bs rows; the last one
may be shorter in time). Ours: `drop_last=False` is fastai's stream exactly; `drop_last=True`
(the default, one jit shape) is the same without a shorter last batch."""
from pathlib import Path

import numpy as np
import pytest

from flax_ulmfit.text.data import LMLoader

GOLDEN = np.load(Path(__file__).parent / 'golden' / 'fastai_lm_loader.npz')
BS, SEQ_LEN = int(GOLDEN['bs']), int(GOLDEN['seq_len'])
CASES = sorted({k.split('/')[0] for k in GOLDEN.files if '/' in k})


def fastai_batches(case: str, drop_last: bool) -> list[tuple[np.ndarray, np.ndarray]]:
  prefix = f'{case}/drop_last={drop_last}'
  return [(GOLDEN[f'{prefix}/x{b}'], GOLDEN[f'{prefix}/y{b}']) for b in range(int(GOLDEN[f'{prefix}/n_batches']))]


def documents(case: str) -> list[np.ndarray]:
  """The generator's documents: token ids 0..n-1 cut at the stored lengths."""
  return np.split(np.arange(GOLDEN[f'{case}/doc_lengths'].sum()), np.cumsum(GOLDEN[f'{case}/doc_lengths'])[:-1])


def assert_same_batches(got, expected):
  assert len(got) == len(expected)
  for b, ((x, y), (ex, ey)) in enumerate(zip(got, expected)):
    np.testing.assert_array_equal(x, ex, err_msg=f'batch {b} inputs')
    np.testing.assert_array_equal(y, ey, err_msg=f'batch {b} targets')


@pytest.mark.parametrize('case', CASES)
def test_fastai_drop_last_changes_nothing_and_ours_false_is_fastais_stream(case):
  expected = fastai_batches(case, False)
  assert_same_batches(fastai_batches(case, True), expected)
  loader = LMLoader(documents(case), bs=BS, bptt=SEQ_LEN, shuffle=False, drop_last=False)
  got = list(loader)
  assert len(loader) == len(got) and all(x.dtype == y.dtype == np.int32 for x, y in got)
  assert_same_batches(got, expected)


@pytest.mark.parametrize('case', CASES)
def test_drop_last_true_is_fastais_stream_without_a_shorter_last_batch(case):
  expected = [(x, y) for x, y in fastai_batches(case, True) if x.shape[1] == SEQ_LEN]
  if not expected:
    with pytest.raises(ValueError, match='cannot fill'):
      LMLoader(documents(case), bs=BS, bptt=SEQ_LEN, shuffle=False, drop_last=True)
    return
  loader = LMLoader(documents(case), bs=BS, bptt=SEQ_LEN, shuffle=False, drop_last=True)
  got = list(loader)
  assert len(loader) == len(got)
  assert_same_batches(got, expected)
