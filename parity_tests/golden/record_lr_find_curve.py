"""Writes lr_find_curve.json: the lr and smoothed-loss curve our `lr_find` records on the
tiny MLP of tests/test_train_loop.py, the input of make_fastai_valley.py (which adds
fastai's suggestion for it). Run with the project's Python from the repository root:
  PYTHONPATH=. /work/main/.venv/bin/python parity_tests/golden/record_lr_find_curve.py
"""
import json
from pathlib import Path

from flax import nnx

from tests.test_train_loop import NUM_IT, Mlp, mlp_lr_find


def main():
  result = mlp_lr_find(Mlp(rngs=nnx.Rngs(0)))
  out = Path(__file__).with_name('lr_find_curve.json')
  out.write_text(json.dumps(dict(num_it=NUM_IT, lrs=result.lrs, losses=result.losses)))
  print(f'wrote {out}: {len(result.lrs)} steps, our suggestion {result.suggestion:.4g}')


if __name__ == '__main__':
  main()
