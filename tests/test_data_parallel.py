"""Data parallelism gives the numbers of one device: 3 training steps and an evaluation of the
LM (every dropout on), the classifier (a gradual-unfreezing stage, head BatchNorm) and a small
XResNet (BatchNorm, head dropout, mixup) on a 4-device mesh equal the same on one device, every
parameter, BatchNorm statistic and optimizer-state leaf; a short last batch padded with rows
that count in nothing evaluates as the short batch does on one device. The 4 XLA host
devices must be made before JAX starts, so the runs happen in a subprocess (tests/data_parallel_job.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ('lm', 'clas', 'xresnet')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp('data_parallel') / 'runs.npz'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, str(ROOT / 'tests' / 'data_parallel_job.py'), str(out)], env=env,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  with np.load(out) as data:
    return dict(data)


def _run(runs, model, devices):
  prefix = f'{model}/{devices}/'
  return {k[len(prefix):]: v for k, v in runs.items() if k.startswith(prefix)}


@pytest.mark.parametrize('model', MODELS)
def test_four_devices_train_as_one(runs, model):
  one, four = _run(runs, model, 1), _run(runs, model, 4)
  assert one.keys() == four.keys()
  leaves = [k for k in one if k.startswith('leaf/')]
  assert len(leaves) > 20  # params, BatchNorm statistics, optimizer moments and counters
  # fp32 sums over 2-row shards then across devices, in another order than over 8 rows: the
  # differences are rounding (~1e-7 relative in the gradients), 3 steps keep them under 1e-5.
  for k in leaves:
    np.testing.assert_allclose(four[k], one[k], rtol=0, atol=1e-5, err_msg=f'{model}: {k}')
  np.testing.assert_allclose(four['train_loss'], one['train_loss'], rtol=1e-6, err_msg=f'{model}: training losses')
  assert not np.allclose(one['train_loss'][0], one['train_loss'][1:], rtol=1e-3)  # the steps changed the model


@pytest.mark.parametrize('model', MODELS)
def test_four_devices_evaluate_as_one(runs, model):
  one, four = _run(runs, model, 1), _run(runs, model, 4)
  metrics = sorted(k for k in one if k.startswith('eval/'))
  short = ['eval/short_accuracy', 'eval/short_count', 'eval/short_loss']  # a short batch, padded on 4 devices
  assert metrics == (['eval/loss'] if model == 'lm' else ['eval/accuracy', 'eval/count', 'eval/loss', *short])
  for k in metrics:
    np.testing.assert_allclose(four[k], one[k], rtol=1e-6, err_msg=f'{model}: {k}')
  if model != 'lm':
    assert four['eval/short_count'] == 5  # the 3 padding rows count in nothing
