"""scripts/pretrain_lm.py end to end on a small WikiText file the test writes."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'pretrain_lm.py'
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _wikitext(path: Path, n_articles: int = 6) -> Path:
  """Articles of a 20-word cycle: predictable, so a working LM's loss must fall."""
  words = [f'word{i}' for i in range(20)]
  lines = []
  for a in range(n_articles):
    lines += ['', f' = Article {a} = ', '']
    for line in range(15):
      lines.append(' ' + ' '.join(words[(line + j) % 20] for j in range(30)) + ' . ')
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return path


def test_pretrain_lm_trains_and_writes_its_outputs(tmp_path):
  corpus = _wikitext(tmp_path / 'wiki.train.tokens')
  out = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, str(SCRIPT), '--wikitext', str(corpus), '--size', 'tiny', '--bs', '4',
       '--bptt', '16', '--epochs', '2', '--lr', '3e-2', '--valid-pct', '0.34', '--out', str(out)],
      capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'perplexity' in result.stdout
  rows = list(csv.DictReader(open(out / 'log.csv')))
  assert [int(r['epoch']) for r in rows] == [0, 1]
  valid = [float(r['valid_loss']) for r in rows]
  assert valid[1] < valid[0] and valid[1] < math.log(20)  # learns; beats a guess among the 20 words
  assert math.isclose(float(rows[-1]['perplexity']), math.exp(valid[1]), rel_tol=1e-9)
  vocab = json.loads((out / 'vocab.json').read_text())
  assert 'word7' in json.dumps(vocab)
  weights = np.load(out / 'lm.npz', allow_pickle=False)
  assert any(k.endswith('1.decoder.bias') for k in weights.files)


def test_pretrain_lm_rejects_a_missing_corpus(tmp_path):
  result = subprocess.run([sys.executable, str(SCRIPT), '--wikitext', str(tmp_path / 'nope.tokens'),
                           '--size', 'tiny', '--out', str(tmp_path / 'run')],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
  assert result.returncode != 0
  assert 'nope.tokens' in result.stderr
