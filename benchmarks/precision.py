"""fp32 vs bf16 vs fp16 training-step time of the AWD-LSTM LM and xresnet18, Flax and torch side by side.

Flax: the library's train step (fastai Adam, clipping, CE + AR/TAR) with the model built in
the policy's compute dtype (fp32 master weights); fp16 adds dynamic loss scaling. torch:
torch_ref's LanguageModel under `torch.autocast('cpu', dtype)` (fp16 with `GradScaler`),
AdamW (fastai's Adam for a constant momentum). torch 2.13's oneDNN LSTM refuses autocast
inputs ("could not create a primitive descriptor"), so the bf16/fp16 torch steps run with
oneDNN off (`torch.backends.mkldnn.flags(enabled=False)`): its LSTM then stays fp32. Steps alternate between the two in one
process; medians after warm-up. xresnet18 (64x64 images, bs 32, 10 classes): the same
train step with cross-entropy; torch under autocast, channels_last. Last line:
`bf16_speedup=<flax fp32 ms / flax bf16 ms>` for the LM.

  python benchmarks/precision.py --steps 5
  python benchmarks/precision.py --models xresnet18 --precisions fp32 bf16
"""
from __future__ import annotations

import argparse
import math
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
import torch_ref.xresnet as ref_xresnet  # noqa: E402
from flax_ulmfit.interop import flax_to_torch, torch_to_flax  # noqa: E402
from flax_ulmfit.interop.xresnet import xresnet_to_torch  # noqa: E402
from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config, xresnet18  # noqa: E402
from flax_ulmfit.train import losses, optim, precision  # noqa: E402
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
  parser.add_argument('--models', nargs='+', choices=['lm', 'xresnet18'], default=['lm', 'xresnet18'])
  parser.add_argument('--precisions', nargs='+', choices=list(TORCH_DTYPES), default=list(TORCH_DTYPES))
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


def torch_update(loss, model, opt, scaler) -> None:
  """Backward, unscale (fp16), clip the unscaled gradients, optimizer step, zero the gradients."""
  (scaler.scale(loss) if scaler is not None else loss).backward()
  if scaler is not None:
    scaler.unscale_(opt)
  torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
  if scaler is not None:
    scaler.step(opt)
    scaler.update()
  else:
    opt.step()
  opt.zero_grad(set_to_none=True)


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
      torch_update(loss, self.model, self.opt, self.scaler)  # backward under the same oneDNN flags
    self.state = tuple((h.detach().float(), c.detach().float()) for h, c in state)
    return time.perf_counter() - start, loss.item()


def image_loss(model, batch, rng, carry):
  x, y = batch
  return losses.cross_entropy(model(x), y), (carry, {})


class FlaxImageRunner:
  def __init__(self, name, state_dict, x, y):
    policy = precision.get_policy(name)
    model = torch_to_flax(state_dict, xresnet18(n_out=10, dtype=policy.compute_dtype,
                                                rngs=nnx.Rngs(jax.random.key(0, impl='rbg'))))
    params = nnx.state(model, nnx.Param)
    tx = optim.fastai_optimizer(optim.label_params(params, [('', 'all')]), {'all': LR}, clip_norm=CLIP)
    if policy.needs_loss_scaling:
      tx = precision.torch_grad_scaler(tx)
    self.state, self.step_fn = init_train_state(model, tx), make_train_step(model, image_loss, tx)
    self.batch = (jnp.asarray(x), jnp.asarray(y))

  def step(self, i):
    start = time.perf_counter()
    self.state, _, metrics = self.step_fn(self.state, self.batch, jax.random.key(i), None)
    loss = float(metrics['loss'])  # waits for the step
    return time.perf_counter() - start, loss


class TorchImageRunner:
  def __init__(self, name, state_dict, x, y):
    self.model = ref_xresnet.xresnet18(n_out=10).to(memory_format=torch.channels_last)
    self.model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)
    self.dtype = TORCH_DTYPES[name]
    self.scaler = torch.amp.GradScaler('cpu') if name == 'fp16' else None
    self.x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(memory_format=torch.channels_last)
    self.y = torch.from_numpy(y).long()

  def step(self, i):
    start = time.perf_counter()
    with torch.autocast('cpu', dtype=self.dtype, enabled=self.dtype is not None):
      loss = torch.nn.functional.cross_entropy(self.model(self.x).float(), self.y)
    torch_update(loss, self.model, self.opt, self.scaler)
    return time.perf_counter() - start, loss.item()


def time_pair(runners, args):
  """Medians (ms) of alternating steps of each runner, after warm-up, and the last losses."""
  times, last = {label: [] for label in runners}, {}
  for i in range(args.warmup + args.steps):
    for label, runner in runners.items():
      seconds, last[label] = runner.step(i)
      if i >= args.warmup:
        times[label].append(seconds * 1e3)
  return {label: statistics.median(t) for label, t in times.items()}, last


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
  if 'lm' in args.models:
    for name in args.precisions:
      ms, last = time_pair({'flax': FlaxRunner(args.vocab, config, name, state_dict, data, args.bs),
                            'torch': TorchRunner(args.vocab, config, name, state_dict, data)}, args)
      flax_ms[name] = ms['flax']
      print(f'LM {name}: flax {ms["flax"]:8.1f} ms  torch {ms["torch"]:8.1f} ms  torch/flax '
            f'{ms["torch"] / ms["flax"]:5.2f}  flax vs its fp32 {flax_ms.get("fp32", math.nan) / ms["flax"]:5.2f}x  '
            f'(last losses {last["flax"]:.3f} / {last["torch"]:.3f})', flush=True)
  if 'xresnet18' in args.models:
    image_state = xresnet_to_torch(xresnet18(n_out=10, rngs=nnx.Rngs(jax.random.key(0, impl='rbg'))))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 64, 64, 3)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    image_fp32 = math.nan
    for name in args.precisions:
      ms, last = time_pair({'flax': FlaxImageRunner(name, image_state, x, y),
                            'torch': TorchImageRunner(name, image_state, x, y)}, args)
      image_fp32 = ms['flax'] if name == 'fp32' else image_fp32
      print(f'xresnet18 64x64 bs 32 {name}: flax {ms["flax"]:8.1f} ms  torch {ms["torch"]:8.1f} ms  '
            f'torch/flax {ms["torch"] / ms["flax"]:5.2f}  flax vs its fp32 {image_fp32 / ms["flax"]:5.2f}x  '
            f'(last losses {last["flax"]:.3f} / {last["torch"]:.3f})', flush=True)
  if {'fp32', 'bf16'} <= set(flax_ms):
    print(f'bf16_speedup={flax_ms["fp32"] / flax_ms["bf16"]:.3f}')


if __name__ == '__main__':
  main()
