"""Writes fastai_learner.npz: a fastai 2.8 `Learner` training a tiny BatchNorm MLP in two
stages, recording after every training step each group's lr and momentum and the whole
state_dict (parameters and BatchNorm statistics), for test_fastai_learner.py.

The Learner: `Adam` (fastai's), three parameter groups [body + bn, mid, head] from a
splitter, `wd=0.1` with `wd_bn_bias=False`, `train_bn=True`, `GradientClip(0.3)`,
`CrossEntropyLossFlat`, unshuffled batches of 16. Stage 1: `freeze_to(1)` then
`fit_one_cycle(2, slice(1e-3, 1e-2))`; stage 2: `unfreeze()` then
`fit_flat_cos(2, slice(1e-3, 5e-3))` (momentum is not scheduled there: it keeps the last
value stage 1 set). Both `freeze_to` calls clear the optimizer state.

Initial weights, data and every recorded value are in the .npz. Needs fastai (the scratch
venv; the tests read only the .npz). From the repository root:
  PYTHONPATH=. $PY parity_tests/golden/make_fastai_learner.py
"""
from pathlib import Path

import numpy as np
import torch
import fastai.callback.schedule  # noqa: F401  (adds fit_one_cycle and fit_flat_cos to Learner)
from fastai.callback.core import Callback
from fastai.callback.training import GradientClip
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from fastai.torch_core import params
from torch import nn

N_IN, N_HID, N_OUT, BS, N_TRAIN, N_VALID = 6, 8, 3, 16, 64, 16
STAGES = (('fit_one_cycle', 1, 2, (1e-3, 1e-2)), ('fit_flat_cos', 0, 2, (1e-3, 5e-3)))  # name, freeze_to, epochs, slice
WD, CLIP = 0.1, 0.3


class Net(nn.Module):
  def __init__(self):
    super().__init__()
    self.body, self.bn = nn.Linear(N_IN, N_HID, bias=False), nn.BatchNorm1d(N_HID)
    self.mid, self.head = nn.Linear(N_HID, N_HID), nn.Linear(N_HID, N_OUT)

  def forward(self, x):
    return self.head(torch.tanh(self.mid(torch.relu(self.bn(self.body(x))))))


def splitter(model: Net):
  return [params(model.body) + params(model.bn), params(model.mid), params(model.head)]


class Record(Callback):
  """After each training step: every group's lr and mom, and the state_dict."""
  order = 100

  def __init__(self):
    self.lrs, self.moms, self.states = [], [], []

  def after_batch(self):
    if not self.training:
      return
    self.lrs.append([h['lr'] for h in self.opt.hypers])
    self.moms.append([h['mom'] for h in self.opt.hypers])
    self.states.append({k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()})


def main():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N_TRAIN + N_VALID, N_IN)).astype(np.float32)
  y = rng.integers(0, N_OUT, N_TRAIN + N_VALID)
  items = [(torch.from_numpy(x[i]), torch.tensor(y[i])) for i in range(len(x))]
  dls = DataLoaders(DataLoader(items[:N_TRAIN], bs=BS, shuffle=False, drop_last=False),
                    DataLoader(items[N_TRAIN:], bs=BS, shuffle=False), device='cpu')
  torch.manual_seed(0)
  model = Net()
  with torch.no_grad():  # a BatchNorm that is not at its init, so its weight decay exemption shows
    model.bn.weight.uniform_(0.5, 1.5)
    model.bn.bias.uniform_(-0.2, 0.2)
  initial = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  record = Record()
  learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, splitter=splitter, wd=WD,
                  wd_bn_bias=False, train_bn=True, cbs=[GradientClip(CLIP), record])
  steps = []
  with learn.no_logging(), learn.no_bar():
    for name, freeze_to, epochs, (lo, hi) in STAGES:
      learn.freeze_to(freeze_to)
      getattr(learn, name)(epochs, slice(lo, hi))
      steps.append(len(record.lrs))
  out = dict(x=x, y=y, steps_per_stage=np.diff([0] + steps), lrs=np.array(record.lrs), moms=np.array(record.moms))
  out |= {f'initial/{k}': v for k, v in initial.items()}
  out |= {f'state/{k}': np.stack([s[k] for s in record.states]) for k in initial}
  path = Path(__file__).with_name('fastai_learner.npz')
  np.savez_compressed(path, **out)
  print(f'wrote {path}: {len(record.lrs)} steps in stages of {list(out["steps_per_stage"])}; '
        f'stage-2 momentum {record.moms[-1]}')


if __name__ == '__main__':
  main()
