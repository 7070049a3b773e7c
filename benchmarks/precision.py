"""fp32 vs bf16 vs fp16 training-step time of the AWD-LSTM language model, Flax and torch side by side.

Flax: the library's train step (fastai Adam, clipping, CE + AR/TAR) with the model built in
the policy's compute dtype (fp32 master weights); fp16 adds dynamic loss scaling. torch:
torch_ref's LanguageModel under `torch.autocast('cpu', dtype)` (fp16 with `GradScaler`),
AdamW (fastai's Adam for a constant momentum). torch 2.13's oneDNN LSTM refuses autocast
inputs ("could not create a primitive descriptor"), so the bf16/fp16 torch steps run with
oneDNN off (`torch.backends.mkldnn.flags(enabled=False)`): its LSTM then stays fp32. Steps alternate between the two in one
process; medians after warm-up. Last line: `bf16_speedup=<flax fp32 ms / flax bf16 ms>`.

  python benchmarks/precision.py --steps 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads: idle threads sleep

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import torch_ref.awd_lstm as ref  # noqa: E402
import torch_ref.losses as ref_losses  # noqa: E402
from flax_ulmfit.interop import flax_to_torch, torch_to_flax  # noqa: E402
from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config  # noqa: E402
from flax_ulmfit.train import optim, precision  # noqa: E402
from flax_ulmfit.train.lm import lm_loss  # noqa: E402
from flax_ulmfit.train.step import init_train_state, make_train_step  # noqa: E402

LR, CLIP = 1e-3, 0.4
TORCH_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--vocab', type=int, default=10_000)
  parser.add_argument('--emb', type=int, default=400)
  parser.add_argument('--hid', type=int, default=400)
  parser.add_argument('--layers', type=int, default=3)
  parser.add_argument('--bs', type=int, default=32)
  parser.add_argument('--bptt', type=int, default=72)
  parser.add_argument('--steps', type=int, default=5, help='timed steps per framework and precision')
  parser.add_argument('--warmup', type=int, default=2)
  return parser.parse_args()


class FlaxRunner:
  def __init__(self, vocab, config, name, state_dict, data, bs):
    policy = precision.get_policy(name)
    model = torch_to_flax(state_dict, LanguageModel(vocab, config, dtype=policy.compute_dtype, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    tx = optim.fastai_optimizer(optim.label_params(params, [('', 'all')]), {'all': LR}, clip_norm=CLIP)
    if policy.needs_loss_scaling:
      tx = precision.torch_grad_scaler(tx)
    self.state, self.step_fn = init_train_state(model, tx), make_train_step(model, lm_loss, tx)
    self.carry, self.data = model.zero_state(bs), [tuple(map(jnp.asarray, b)) for b in data]

  def step(self, i):
    start = time.perf_counter()
    self.state, self.carry, metrics = self.step_fn(self.state, self.data[i % len(self.data)],
                                                   jax.random.key(i), self.carry)
    loss = float(metrics['loss'])  # waits for the step
    return time.perf_counter() - start, loss


class TorchRunner:
  def __init__(self, vocab, config, name, state_dict, data):
    self.model = ref.LanguageModel(vocab, config)
    self.model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)
    self.dtype = TORCH_DTYPES[name]
    self.scaler = torch.amp.GradScaler('cpu') if name == 'fp16' else None
    self.data = [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in data]
    self.state = None

  def step(self, i):
    x, y = self.data[i % len(self.data)]
    start = time.perf_counter()
    with (torch.autocast('cpu', dtype=self.dtype, enabled=self.dtype is not None),
          torch.backends.mkldnn.flags(enabled=self.dtype is None)):
      logits, state, (raw, dropped) = self.model(x, self.state)
      loss = ref_losses.cross_entropy_flat(logits, y) + ref_losses.ar_tar(raw, dropped)
      if self.scaler is not None:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
      else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
    if self.scaler is not None:
      self.scaler.step(self.opt)
      self.scaler.update()
    else:
      self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.state = tuple((h.detach().float(), c.detach().float()) for h, c in state)
    return time.perf_counter() - start, loss.item()


def main():
  args = parse_args()
  config = dict(awd_lstm_lm_config, emb_sz=args.emb, n_hid=args.hid, n_layers=args.layers)
  state_dict = flax_to_torch(LanguageModel(args.vocab, config, rngs=nnx.Rngs(0)))
  ids = np.random.default_rng(0).integers(2, args.vocab, (4, args.bs, args.bptt + 1)).astype(np.int32)
  data = [(b[:, :-1], b[:, 1:]) for b in ids]
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} with '
        f'{torch.get_num_threads()} threads; LM V={args.vocab} {args.emb}/{args.hid}/{args.layers} '
        f'bs={args.bs} bptt={args.bptt}; medians of {args.steps} steps after {args.warmup} warm-up', flush=True)
  flax_ms = {}
  for name in ('fp32', 'bf16', 'fp16'):
    runners = {'flax': FlaxRunner(args.vocab, config, name, state_dict, data, args.bs),
               'torch': TorchRunner(args.vocab, config, name, state_dict, data)}
    times, last = {'flax': [], 'torch': []}, {}
    for i in range(args.warmup + args.steps):
      for label, runner in runners.items():
        seconds, last[label] = runner.step(i)
        if i >= args.warmup:
          times[label].append(seconds * 1e3)
    f_ms, t_ms = statistics.median(times['flax']), statistics.median(times['torch'])
    flax_ms[name] = f_ms
    print(f'LM {name}: flax {f_ms:8.1f} ms  torch {t_ms:8.1f} ms  torch/flax {t_ms / f_ms:5.2f}  '
          f'flax vs its fp32 {flax_ms["fp32"] / f_ms:5.2f}x  (last losses {last["flax"]:.3f} / {last["torch"]:.3f})',
          flush=True)
  print(f'bf16_speedup={flax_ms["fp32"] / flax_ms["bf16"]:.3f}')


if __name__ == '__main__':
  main()
