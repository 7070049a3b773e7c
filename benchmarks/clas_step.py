"""One text-classifier training step, Flax vs torch_ref, timed alternately in one run.

The step (fastai's `text_classifier_learner`, all layers unfrozen): the batch read 72 tokens
at a time with the state carried and detached between chunks, fresh dropout masks per chunk,
masked concat pooling, the BatchNorm/dropout/linear head, cross-entropy + AR/TAR on the
encoder outputs, backward through the chunks of the last 1440 tokens, Adam with decoupled
weight decay. Same initial weights; the same batches for both: the first batches of a training
epoch of `ClasLoader` (sortish: sorted by length within 50 batches, bs 32, default buckets
72 * 2**k) over 1600 documents of 400-1400 random tokens (vocab 10k), so each batch holds
texts of similar lengths behind whole chunks of padding (skipped by both). torch_ref runs
fastai's algorithm: only the rows whose text has started, chunks with none skipped.

Each round runs every batch once in each framework, alternating; the time per round is the
sum over batches of each batch's median over the timed rounds. Prints each batch's medians
(which lengths lose), the round times and, last,
`speedup_vs_torch=<float>` (torch's time / Flax's) for the first config named.

  python benchmarks/clas_step.py                          # 400/400/3, then fastai's 400/1152/3
  python benchmarks/clas_step.py --configs default --rounds 2
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import timing

CONFIGS = {  # vocab, emb_sz, n_hid, n_layers
    'small': (10_000, 400, 400, 3),
    'default': (10_000, 400, 1152, 3),
}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', nargs='+', choices=sorted(CONFIGS), default=['small', 'default'])
  parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads')
  parser.add_argument('--dots', choices=['ynn', 'eigen'], default='ynn', help="XLA's CPU matmul backend")
  parser.add_argument('--docs', type=int, default=1600, help="documents in the loader (fastai's sortish chunk: 50 batches)")
  parser.add_argument('--batches', type=int, default=4, help='batches timed (the first of the epoch)')
  parser.add_argument('--rounds', type=int, default=3, help='timed rounds over all batches')
  parser.add_argument('--warmup', type=int, default=1, help='rounds before timing (compiles each shape)')
  parser.add_argument('--min-len', type=int, default=400)
  parser.add_argument('--max-len', type=int, default=1400)
  parser.add_argument('--bs', type=int, default=32)
  return parser.parse_args()


args = parse_args()
timing.configure(1, args.dots)  # before jax and torch load

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import torch_ref.classifier as ref  # noqa: E402
import torch_ref.losses as ref_losses  # noqa: E402
from flax_ulmfit.interop import flax_to_torch  # noqa: E402
from flax_ulmfit.models import TextClassifier  # noqa: E402
from flax_ulmfit.text.data import ClasLoader  # noqa: E402
from flax_ulmfit.train import optim  # noqa: E402
from flax_ulmfit.train.clas import clas_loss  # noqa: E402
from flax_ulmfit.train.step import init_train_state, make_train_step  # noqa: E402

LR, WD, N_CLASS = 1e-3, 0.01, 2
MOM, SQR_MOM, EPS = 0.9, 0.99, 1e-5  # fastai's Adam


def batches(vocab: int):
  rng = np.random.default_rng(0)
  docs = [rng.integers(2, vocab, n).astype(np.int32) for n in rng.integers(args.min_len, args.max_len + 1, args.docs)]
  loader = ClasLoader(docs, rng.integers(0, N_CLASS, args.docs), bs=args.bs, shuffle=True, seed=0)
  return list(itertools.islice(loader, args.batches))


class FlaxRunner:
  def __init__(self, model: TextClassifier, data):
    params = nnx.state(model, nnx.Param)
    tx = optim.fastai_optimizer(optim.label_params(params, [('', 'all')]), {'all': LR},
                                mom=MOM, sqr_mom=SQR_MOM, eps=EPS, wd=WD)
    self.train_state = init_train_state(model, tx)
    self.step_fn = make_train_step(model, clas_loss, tx)
    self.data = [tuple(map(jnp.asarray, b)) for b in data]
    self.key = jax.random.key(0)

  def step(self, i: int) -> tuple[float, float]:
    start = time.perf_counter()
    self.train_state, _, metrics = self.step_fn(self.train_state, self.data[i % len(self.data)],
                                                jax.random.fold_in(self.key, i), None)
    loss = float(metrics['loss'])  # waits for the step
    return time.perf_counter() - start, loss


class TorchRunner:
  def __init__(self, vocab: int, config: dict, state_dict, data):
    self.model = ref.TextClassifier(vocab, N_CLASS, config=config, drop_mult=0.5)
    self.model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    self.model.train()
    # fastai's Adam with decoupled weight decay, as torch's (foreach) AdamW: the same update up
    # to rounding, at torch's best speed.
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(MOM, SQR_MOM), eps=EPS, weight_decay=WD)
    self.data = [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in data]

  def step(self, i: int) -> tuple[float, float]:
    x, y = self.data[i % len(self.data)]
    start = time.perf_counter()
    logits, raw, out = self.model(x)
    loss = ref_losses.cross_entropy_flat(logits, y) + ref_losses.ar_tar(raw, out)
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def run(name: str) -> float:
  vocab, emb, hid, layers = CONFIGS[name]
  config = dict(emb_sz=emb, n_hid=hid, n_layers=layers)
  model = TextClassifier(vocab, N_CLASS, config, rngs=nnx.Rngs(0))
  data = batches(vocab)
  runners = {'flax': FlaxRunner(model, data), 'torch': TorchRunner(vocab, config, flax_to_torch(model), data)}
  n = len(data)
  times, last = timing.alternate(runners, args.rounds * n, args.warmup * n)
  medians = {label: [statistics.median(t[b::n]) for b in range(n)] for label, t in times.items()}
  per_round = {label: sum(m) for label, m in medians.items()}
  shapes = ' '.join(str(x.shape[1]) for x, _ in data)
  for b, (x, _) in enumerate(data):
    f, t = medians['flax'][b], medians['torch'][b]
    print(f'  batch {b}: {x.shape[0]}x{x.shape[1]} tokens: flax {f / 1e3:.2f} s, torch {t / 1e3:.2f} s, ratio {t / f:.3f}')
  print(f'{name:8s} V={vocab} {emb}/{hid}/{layers} bs={args.bs}, {n} batches of lengths {shapes}: '
        f'flax {per_round["flax"] / 1e3:7.2f} s  torch {per_round["torch"] / 1e3:7.2f} s per round '
        f'(per-batch medians of {args.rounds}; last losses {last["flax"]:.3f} / {last["torch"]:.3f})  '
        f'speedup {per_round["torch"] / per_round["flax"]:.3f}', flush=True)
  return per_round['torch'] / per_round['flax']


def main():
  torch.set_num_threads(args.threads)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {args.dots} dots; torch {torch.__version__} '
        f'with {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}', flush=True)
  speedups = [run(name) for name in args.configs]
  print(f'load average {os.getloadavg()[0]:.2f}')
  print(f'speedup_vs_torch={speedups[0]:.3f}')


if __name__ == '__main__':
  main()
