"""Writes fastai_lm_loader.npz: the batches fastai 2.8's `LMDataLoader` yields (no shuffle,
`drop_last` False and True) at the edge sizes, for test_fastai_lm_loader.py.

Sizes with bs=4, seq_len=5 and n tokens split into documents: `n % bs == 0` (where
`(n - 1) // bs` and `n // bs` differ), `bl % seq_len == 0` (no shorter last batch), both,
one batch exactly, a stream shorter than one seq_len, and a general case.

Needs fastai (the scratch venv; the tests read only the .npz). From the repository root:
  PYTHONPATH=. $PY parity_tests/golden/make_fastai_lm_loader.py
"""
from pathlib import Path

import numpy as np
import torch
from fastai.text.data import LMDataLoader

BS, SEQ_LEN = 4, 5
CASES = {'general': 50, 'tokens_multiple_of_bs': 48, 'bl_multiple_of_seq_len': 42, 'both': 44,
         'one_batch': 21, 'shorter_than_seq_len': 15}


def documents(n_tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
  """Token ids 0..n-1 cut into 1 to 6 documents, so every id says where it came from."""
  cuts = np.sort(rng.choice(np.arange(1, n_tokens), size=int(rng.integers(0, 6)), replace=False))
  return np.split(np.arange(n_tokens), cuts)


def main():
  rng = np.random.default_rng(0)
  arrays = dict(bs=BS, seq_len=SEQ_LEN)
  for name, n_tokens in CASES.items():
    docs = documents(n_tokens, rng)
    arrays[f'{name}/doc_lengths'] = [len(d) for d in docs]
    for drop_last in (False, True):
      dl = LMDataLoader([torch.from_numpy(d) for d in docs], bs=BS, seq_len=SEQ_LEN, shuffle=False,
                        drop_last=drop_last)
      batches = [(np.asarray(x), np.asarray(y)) for x, y in dl]
      arrays[f'{name}/drop_last={drop_last}/n_batches'] = len(batches)
      for b, (x, y) in enumerate(batches):
        arrays[f'{name}/drop_last={drop_last}/x{b}'] = x
        arrays[f'{name}/drop_last={drop_last}/y{b}'] = y
  out = Path(__file__).with_name('fastai_lm_loader.npz')
  np.savez_compressed(out, **arrays)
  print(f'wrote {out}: ' + ', '.join(f"{k}: {arrays[f'{k}/drop_last=False/n_batches']} batches" for k in CASES))


if __name__ == '__main__':
  main()
