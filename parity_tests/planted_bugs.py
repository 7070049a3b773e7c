"""Plants realistic bugs one at a time in a scratch copy of the repository and runs the tests
that should catch each: the record behind the bug table in docs/parity.md.

  PYTHONPATH=. python -m parity_tests.planted_bugs            # every bug, a markdown table
  PYTHONPATH=. python -m parity_tests.planted_bugs loader_bl  # the named ones only

The working tree is never touched: each bug is an exact text replacement applied to a copy
(which the run deletes), so an interrupted run leaves nothing planted.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Bug(NamedTuple):
  name: str
  area: str
  what: str    # the mistake, as a reviewer would describe it
  path: str    # file it is planted in
  old: str     # exact text replaced (must occur once)
  new: str
  tests: tuple[str, ...]  # pytest targets run against it


BUGS = [
    Bug('loader_bl', 'loaders', 'LMLoader: `bl = n_tokens // bs` instead of `(n_tokens - 1) // bs`',
        'flax_ulmfit/text/data.py', 'self.bl = (n_tokens - 1) // bs', 'self.bl = n_tokens // bs',
        ('tests/test_text_data.py', 'parity_tests/test_fastai_lm_loader.py')),
    Bug('loader_empty_last', 'loaders', 'LMLoader: an empty last batch when `bl % bptt == 0` and `drop_last=False`',
        'flax_ulmfit/text/data.py', 'math.ceil(self.bl / bptt)', 'self.bl // bptt + 1',
        ('tests/test_text_data.py', 'parity_tests/test_fastai_lm_loader.py')),
    Bug('weight_mask_unscaled', 'models', 'sample_masks: weight-dropout masks a plain Bernoulli draw, not scaled by 1/(1-p)',
        'flax_ulmfit/models/awd_lstm.py',
        'weight=[dp.draw(rnn.weight_hh.shape, k) for dp, rnn, k in zip(self.weight_dps, self.rnns, k_weight)],',
        'weight=[jax.random.bernoulli(k, 1 - dp.p, rnn.weight_hh.shape).astype(jnp.float32) '
        'for dp, rnn, k in zip(self.weight_dps, self.rnns, k_weight)],',
        ('tests/test_awd_lstm.py', 'tests/test_lm_training.py', 'parity_tests/test_awd_lstm_parity.py')),
    Bug('weight_site_unscaled', 'models', 'WeightDropout drawing on demand: a plain Bernoulli mask, not scaled',
        'flax_ulmfit/models/dropout.py', "    mask = self.draw(weight.shape) if mask is None else mask\n",
        "    mask = jax.random.bernoulli(self.rngs(), 1 - self.p, weight.shape) if mask is None else mask\n",
        ('tests/test_awd_lstm.py', 'parity_tests/test_awd_lstm_parity.py')),
    Bug('weight_mask_one_key', 'models', 'sample_masks: one key for every layer\'s weight mask',
        'flax_ulmfit/models/awd_lstm.py', 'k_weight = jax.random.split(k_weight, self.n_layers)',
        'k_weight = [k_weight] * self.n_layers',
        ('tests/test_awd_lstm.py', 'tests/test_lm_training.py', 'parity_tests/test_awd_lstm_parity.py')),
]


def _copy_repository(dest: Path) -> None:
  tracked = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True).stdout
  for name in tracked.decode().split('\0'):
    if name and (ROOT / name).is_file():
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, dest / name)


def _failed_tests(output: str) -> list[str]:
  return sorted({m.group(1).split('[')[0] for m in re.finditer(r'^(?:FAILED|ERROR) (\S+)', output, re.M)})


def run(bug: Bug, copy: Path) -> list[str]:
  """Plants `bug` in `copy`, runs its tests, restores the file; returns the failing tests."""
  path = copy / bug.path
  original = path.read_text()
  if original.count(bug.old) != 1:
    raise ValueError(f'{bug.name}: the text to replace occurs {original.count(bug.old)} times in {bug.path}')
  path.write_text(original.replace(bug.old, bug.new))
  try:
    env = dict(os.environ, PYTHONPATH=str(copy))
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *bug.tests],
                            cwd=copy, env=env, capture_output=True, text=True)
  finally:
    path.write_text(original)
  return _failed_tests(result.stdout)


def main(names: list[str]) -> None:
  unknown = set(names) - {b.name for b in BUGS}
  if unknown:
    raise SystemExit(f'planted_bugs: unknown bug names {sorted(unknown)}')
  bugs = [b for b in BUGS if not names or b.name in names]
  with tempfile.TemporaryDirectory() as tmp:
    copy = Path(tmp)
    _copy_repository(copy)
    print('| area | planted bug | caught by |\n|---|---|---|')
    for bug in bugs:
      failed = run(bug, copy)
      caught = ', '.join(f'`{t}`' for t in failed) if failed else '**not caught**'
      print(f'| {bug.area} | {bug.what} | {caught} |', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
