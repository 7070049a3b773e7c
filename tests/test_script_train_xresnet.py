"""scripts/train_xresnet.py end to end at a tiny size: train on the embedded 8x8 digits, then fine-tune."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from flax_ulmfit.vision.learner import load_xresnet

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'train_xresnet.py'
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
TINY = ['--data', 'digits', '--size', '16', '--train-size', '256', '--valid-size', '200', '--bs', '32', '--no-progress']


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=ENV,
                        timeout=timeout)


def _accuracy(result) -> float:
  last = result.stdout.strip().splitlines()[-1]
  assert re.fullmatch(r'accuracy=\d\.\d{4}', last), last
  return float(last.split('=')[1])


def test_train_then_fine_tune_writes_consistent_outputs(tmp_path):
  out = tmp_path / 'digits'
  result = _run(*TINY, '--epochs', '3', '--mixup', '0', '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = list(csv.DictReader(open(out / 'log.csv')))
  assert [int(r['epoch']) for r in rows] == [0, 1, 2]
  assert _accuracy(result) == round(float(rows[-1]['valid_accuracy']), 4)
  assert _accuracy(result) > 0.2  # 10 classes: chance is 0.1
  assert float(rows[-1]['valid_loss']) < float(rows[0]['valid_loss'])
  assert (out / 'losses.png').stat().st_size > 0 and (out / 'best.npz').is_file()
  model, meta = load_xresnet(out / 'model.npz')
  assert (meta['arch'], meta['c_in'], meta['head'], meta['classes']) == ('xresnet18', 1, 'xresnet', list('0123456789'))
  assert np.asarray(model.linear.kernel[...]).shape == (512, 10)

  tuned = tmp_path / 'tuned'
  result = _run(*TINY, '--epochs', '1', '--pretrained', str(out / 'model.npz'), '--out', str(tuned))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'fine-tuning the xresnet18 body' in result.stdout
  frozen, unfrozen = (list(csv.DictReader(open(tuned / name))) for name in ('log-frozen.csv', 'log.csv'))
  assert len(frozen) == 1 and len(unfrozen) == 1
  assert _accuracy(result) == round(float(unfrozen[-1]['valid_accuracy']), 4)
  assert load_xresnet(tuned / 'model.npz')[1]['head'] == 'transfer'


def test_bad_input_fails_with_a_clear_message(tmp_path):
  missing = _run('--folder', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'run'))
  assert missing.returncode != 0 and 'nowhere' in missing.stderr and 'is not a folder' in missing.stderr
  bad_flag = _run('--bs', '0', '--out', str(tmp_path / 'run'))
  assert bad_flag.returncode == 2 and '--bs must be >= 1' in bad_flag.stderr
  for i, name in enumerate(['cat', 'dog']):
    (tmp_path / 'rgb' / name).mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / 'rgb' / name / '0.png')
    Image.fromarray(np.full((8, 8, 3), 90 + 40 * i, np.uint8)).save(tmp_path / 'rgb' / name / '1.png')
  not_a_checkpoint = tmp_path / 'weights.npz'
  not_a_checkpoint.write_bytes(b'not a zip file')
  result = _run('--folder', str(tmp_path / 'rgb'), '--valid-size', '2', '--bs', '2', '--pretrained',
                str(not_a_checkpoint), '--out', str(tmp_path / 'run'))
  assert result.returncode != 0 and 'weights.npz' in result.stderr and 'not a readable checkpoint' in result.stderr
