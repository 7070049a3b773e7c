"""One AWD-LSTM language-model training step, Flax vs torch_ref, timed alternately in one run.

The step: forward with freshly drawn dropout masks (embedding, input, weight, hidden,
output), cross-entropy + AR/TAR, backward, global-norm clipping, Adam with decoupled weight
decay; recurrent state carried between steps. Same config, same initial weights, same
token batches. Prints the median ms per step of each and, last, `speedup_vs_torch=<float>`
(torch's median time / Flax's) for the first config named.

  python benchmarks/lm_step.py                        # small and fastai-default sizes
  python benchmarks/lm_step.py --configs default --steps 10
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/lm_step.py   # both on huge pages

`--devices N` splits the batch over N XLA CPU devices (shard_map, parameters replicated);
`--dots eigen` turns off XLA's YNNPACK fusions so matmuls use Eigen. The defaults (one
device, YNNPACK) measured fastest. Both frameworks run in this one process, so glibc's
malloc settings apply to both: with `glibc.malloc.hugetlb=1` their large temporaries use
transparent huge pages and page faults stop costing ~10% of a step (torch gains more).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import timing

CONFIGS = {  # vocab, emb_sz, n_hid, n_layers; bptt 72 and bs 32 for both
    'small': (10_000, 400, 400, 3),
    'default': (10_000, 400, 1152, 3),
}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', nargs='+', choices=sorted(CONFIGS), default=['small', 'default'])
  parser.add_argument('--devices', type=int, default=1, help='XLA CPU devices for the Flax step')
  parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads')
  parser.add_argument('--dots', choices=['ynn', 'eigen'], default='ynn',
                      help="XLA's CPU matmul backend (ynn, XLA's default, measured faster for this step)")
  parser.add_argument('--steps', type=int, default=20, help='timed steps of each framework')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--bs', type=int, default=32)
  parser.add_argument('--bptt', type=int, default=72)
  return parser.parse_args()


args = parse_args()
timing.configure(args.devices, args.dots)  # before jax and torch load

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import torch_ref.awd_lstm as ref  # noqa: E402
import torch_ref.losses as ref_losses  # noqa: E402
from flax_ulmfit import parallel  # noqa: E402
from flax_ulmfit.interop import flax_to_torch  # noqa: E402
from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config  # noqa: E402
from flax_ulmfit.train import optim  # noqa: E402
from flax_ulmfit.train.lm import lm_loss  # noqa: E402
from flax_ulmfit.train.step import init_train_state, make_train_step  # noqa: E402

LR, WD, CLIP = 1e-3, 0.01, 0.4
MOM, SQR_MOM, EPS = 0.9, 0.99, 1e-5  # fastai's Adam


def batches(vocab: int, n: int = 4):
  rng = np.random.default_rng(0)
  ids = rng.integers(2, vocab, (n, args.bs, args.bptt + 1)).astype(np.int32)
  return [(b[:, :-1], b[:, 1:]) for b in ids]


class FlaxRunner:
  def __init__(self, model: LanguageModel, data):
    params = nnx.state(model, nnx.Param)
    tx = optim.fastai_optimizer(optim.label_params(params, [('', 'all')]), {'all': LR},
                                mom=MOM, sqr_mom=SQR_MOM, eps=EPS, wd=WD, clip_norm=CLIP)
    mesh = parallel.data_mesh() if args.devices > 1 else None
    self.train_state = init_train_state(model, tx)
    self.step_fn = make_train_step(model, lm_loss, tx, mesh=mesh)
    self.carry = model.zero_state(args.bs)
    self.data = [tuple(map(jnp.asarray, b)) for b in data]
    if mesh is not None:
      parallel.check_divisible(args.bs, mesh)
      self.train_state = parallel.replicate(self.train_state, mesh)
      self.carry, self.data = parallel.shard_batch((self.carry, self.data), mesh)
    self.key = jax.random.key(0)

  def step(self, i: int) -> float:
    start = time.perf_counter()
    self.train_state, self.carry, metrics = self.step_fn(
        self.train_state, self.data[i % len(self.data)], jax.random.fold_in(self.key, i), self.carry)
    loss = float(metrics['loss'])  # waits for the step
    return time.perf_counter() - start, loss


class TorchRunner:
  def __init__(self, vocab: int, config: dict, state_dict, data):
    self.model = ref.LanguageModel(vocab, config)
    self.model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    self.model.train()
    # fastai's Adam with decoupled weight decay, as torch's (fused, foreach) AdamW: eps outside
    # the sqrt, debiased averages; the same update up to rounding, at torch's best speed.
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(MOM, SQR_MOM), eps=EPS, weight_decay=WD)
    self.data = [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in data]
    self.state = None

  def step(self, i: int) -> float:
    x, y = self.data[i % len(self.data)]
    start = time.perf_counter()
    logits, state, (raw, dropped) = self.model(x, self.state)
    loss = ref_losses.cross_entropy_flat(logits, y) + ref_losses.ar_tar(raw, dropped)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.state = tuple((h.detach(), c.detach()) for h, c in state)
    return time.perf_counter() - start, loss.item()


def run(name: str) -> float:
  vocab, emb, hid, layers = CONFIGS[name]
  config = dict(awd_lstm_lm_config, emb_sz=emb, n_hid=hid, n_layers=layers)
  model = LanguageModel(vocab, config, rngs=nnx.Rngs(0))
  data = batches(vocab)
  torch_runner = TorchRunner(vocab, config, flax_to_torch(model), data)
  flax_runner = FlaxRunner(model, data)
  times, last = timing.alternate({'flax': flax_runner, 'torch': torch_runner}, args.steps, args.warmup)
  flax_ms, torch_ms = statistics.median(times['flax']), statistics.median(times['torch'])
  print(f'{name:8s} V={vocab} {emb}/{hid}/{layers} bs={args.bs} bptt={args.bptt}: '
        f'flax {flax_ms:8.1f} ms  torch {torch_ms:8.1f} ms  (medians of {args.steps}; '
        f'last losses {last["flax"]:.3f} / {last["torch"]:.3f})  '
        f'speedup {torch_ms / flax_ms:.3f}', flush=True)
  return torch_ms / flax_ms


def main():
  torch.set_num_threads(args.threads)
  print(f'jax {jax.__version__} on {len(jax.devices())} {jax.devices()[0].platform} device(s), '
        f'{args.dots} dots; torch {torch.__version__} with {torch.get_num_threads()} threads; '
        f'GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r}', flush=True)
  speedups = [run(name) for name in args.configs]
  print(f'speedup_vs_torch={speedups[0]:.3f}')


if __name__ == '__main__':
  main()
