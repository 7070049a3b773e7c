"""fastai 2.8 on the MNIST 5k split and normalisation of scripts/train_xresnet.py (no crop), for comparison.

Runs in fastai's own environment, not the project's (it needs fastai and torch; it reads the
split through `flax_ulmfit.vision`, which needs only numpy):

  PYTHONPATH=. /tmp/fastai-venv/bin/python benchmarks/fastai_mnist5k.py [seed]

`Learner(dls, xresnet18(c_in=1, n_out=10), loss_func=LabelSmoothingCrossEntropy(),
cbs=MixUp(0.4))`, `fit_one_cycle(5, 1e-2)`, bs 64, the training loader shuffled with
drop_last as fastai's is. Prints the accuracy and images/s (validation included).
"""
import os
import statistics
import sys
import time

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # as benchmarks/xresnet_step.py: no spinning threads under load

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastai.data.load import DataLoader  # noqa: E402
from fastai.vision.all import (Callback, DataLoaders, LabelSmoothingCrossEntropy, Learner, MixUp, accuracy,  # noqa: E402
                               set_seed, xresnet18)  # fastai.vision.all also patches in fit_one_cycle, no_bar

from flax_ulmfit.vision.data import channel_stats  # noqa: E402
from flax_ulmfit.vision.datasets import mnist_5k_split  # noqa: E402


class EpochTimes(Callback):
  """Seconds of each epoch, training and validation."""

  def __init__(self):
    self.seconds = []

  def before_epoch(self):
    self.start = time.perf_counter()

  def after_epoch(self):
    self.seconds.append(time.perf_counter() - self.start)


def main(seed: int) -> None:
  torch.set_num_threads(2)
  set_seed(seed, reproducible=True)
  train, valid = mnist_5k_split(seed)
  stats = channel_stats(train.images)

  def samples(images):
    x = torch.from_numpy(((images.images - stats.mean) / stats.std).transpose(0, 3, 1, 2).copy())
    return list(zip(x, torch.from_numpy(images.labels.astype(np.int64))))

  dls = DataLoaders(DataLoader(samples(train), bs=64, shuffle=True, drop_last=True), DataLoader(samples(valid), bs=64))
  times = EpochTimes()
  learn = Learner(dls, xresnet18(c_in=1, n_out=10), loss_func=LabelSmoothingCrossEntropy(), metrics=accuracy,
                  cbs=[MixUp(0.4), times])
  start = time.time()
  with learn.no_bar():
    learn.fit_one_cycle(5, 1e-2)
  seconds = time.time() - start
  print(f'fastai seed {seed}: {len(dls.train) * 64 / statistics.median(times.seconds[1:]):.0f} train images/s '
        f'(median epoch after the first, validation included, as scripts/train_xresnet.py reports); '
        f'{5 * len(dls.train) * 64 / seconds:.0f} over the whole fit')
  print(f'accuracy={float(learn.recorder.values[-1][2]):.4f}')


if __name__ == '__main__':
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
