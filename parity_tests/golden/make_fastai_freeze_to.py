"""Writes fastai_freeze_to.npz: a tiny fastai 2.8 `Learner` trained through three gradual-
unfreezing stages, for test_ulmfit_stages.py.

What it pins: `Learner.freeze_to` / `freeze` / `unfreeze` end with `opt.clear_state()`, so
every stage starts with fresh Adam state (fresh step counts, zero averages), while each
stage is a `fit_one_cycle` with per-group rates (a float or a `slice`), text momentum
(0.8, 0.7, 0.8), Adam's wd 0.01 except biases (`wd_bn_bias=False`) and `GradientClip`.
Stages: `freeze()` + `fit_one_cycle(1, 2e-2)`; `freeze_to(-2)` + `fit_one_cycle(1,
slice(1e-2/2.6**2, 1e-2))`; `unfreeze()` + `fit_one_cycle(1, slice(1e-3/2.6**2, 1e-3))`;
4 batches each. Stored: the data, the initial parameters and every parameter after
every step.

Needs fastai (the scratch venv); the tests read only the .npz. From the repository root:
  /tmp/fastai-venv/bin/python parity_tests/golden/make_fastai_freeze_to.py
"""
import json
from pathlib import Path

import numpy as np
import torch
import fastai.callback.progress  # noqa: F401 - adds Learner.no_bar
import fastai.callback.schedule  # noqa: F401 - adds Learner.fit_one_cycle
from fastai.callback.core import Callback
from fastai.callback.training import GradientClip
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import params

N_IN, N_HID, N_OUT, BS, N_BATCHES, CLIP = 4, 6, 3, 8, 4, 0.5
MOMS = (0.8, 0.7, 0.8)
# (name, freeze_to, lr): lr is a float or (lo, hi) for slice(lo, hi).
STAGES = [('head', -1, 2e-2), ('last_two', -2, (1e-2 / 2.6 ** 2, 1e-2)), ('all', 0, (1e-3 / 2.6 ** 2, 1e-3))]


class Net(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.l0, self.l1, self.l2 = torch.nn.Linear(N_IN, N_HID), torch.nn.Linear(N_HID, N_HID), torch.nn.Linear(N_HID, N_OUT)

  def forward(self, x):
    return self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x)))))


class RecordParams(Callback):
  """Every parameter after every optimizer step."""
  def __init__(self):
    self.steps = []

  def after_step(self):
    self.steps.append({k: v.detach().clone().numpy() for k, v in self.learn.model.named_parameters()})


def main():
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BS * N_BATCHES, N_IN)).astype(np.float32)
  y = rng.integers(0, N_OUT, BS * N_BATCHES).astype(np.int64)
  items = [(torch.from_numpy(a), torch.tensor(b)) for a, b in zip(x, y)]
  dls = DataLoaders(DataLoader(items, bs=BS, shuffle=False), DataLoader(items[:BS], bs=BS, shuffle=False))
  net = Net()
  initial = {k: v.detach().clone().numpy() for k, v in net.named_parameters()}
  record = RecordParams()
  learn = Learner(dls, net, loss_func=CrossEntropyLossFlat(), moms=MOMS,
                  splitter=lambda m: [params(m.l0), params(m.l1), params(m.l2)],
                  cbs=[record, GradientClip(CLIP)])
  with learn.no_bar(), learn.no_logging():
    for _, n, lr in STAGES:
      learn.freeze_to(n)
      learn.fit_one_cycle(1, lr if isinstance(lr, float) else slice(*lr))
  assert len(record.steps) == N_BATCHES * len(STAGES)
  out = {f'initial/{k}': v for k, v in initial.items()}
  for i, step in enumerate(record.steps):
    out.update({f'step{i}/{k}': v for k, v in step.items()})
  path = Path(__file__).with_name('fastai_freeze_to.npz')
  np.savez(path, x=x, y=y, stages=json.dumps(STAGES), moms=np.array(MOMS), clip=CLIP, bs=BS, **out)
  print(f'wrote {path}: {len(record.steps)} steps')


if __name__ == '__main__':
  main()
