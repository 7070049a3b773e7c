"""XResNet training step (forward, backward, Adam) in Flax and torch_ref, alternating in one process.

Prints the median ms and images/s of each framework for xresnet18 (64x64, bs 32) and
xresnet50 (128x128, bs 16), fp32, and ends with `speedup_vs_torch=<torch ms / JAX ms>` for
xresnet18 (for xresnet50 with `--only xresnet50`). Run: `PYTHONPATH=. python benchmarks/xresnet_step.py [--conv-impl auto] [--steps 10]`.
"""
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # spin-waiting OpenMP threads distort torch under load

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402

import timing  # noqa: E402
import torch_ref.xresnet as ref  # noqa: E402
from flax_ulmfit import xla_cpu  # noqa: E402
from flax_ulmfit.interop.xresnet import xresnet_to_flax  # noqa: E402
from flax_ulmfit.models import xresnet  # noqa: E402
from flax_ulmfit.models.conv import CONV_IMPLS  # noqa: E402


def jax_step_fn(model, lr):
  """A jitted pure step over (state, opt_state, x, y); returns it with the initial carries."""
  graphdef, state = nnx.split(model)
  tx = optax.adam(lr)
  opt_state = tx.init(nnx.state(model, nnx.Param))

  @functools.partial(jax.jit, compiler_options=xla_cpu.compiler_options())  # as the library's steps compile
  def step(state, opt_state, x, y):
    model = nnx.merge(graphdef, state)
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    params = nnx.state(model, nnx.Param)
    updates, opt_state = tx.update(grads, opt_state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    return nnx.state(model), opt_state, loss

  return step, state, opt_state


def bench(name, size, bs, steps, warmup, conv_impl):
  torch.manual_seed(0)
  t_model = getattr(ref, name)(n_out=10).train()
  f_model = getattr(xresnet, name)(n_out=10, conv_impl=conv_impl, rngs=nnx.Rngs(jax.random.key(0, impl='rbg')))
  xresnet_to_flax(t_model.state_dict(), f_model)
  f_model.train()
  step, state, opt_state = jax_step_fn(f_model, 1e-3)
  t_opt = torch.optim.Adam(t_model.parameters(), 1e-3)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((bs, size, size, 3)).astype(np.float32)
  y = rng.integers(0, 10, bs)
  xj, yj = jax.numpy.asarray(x), jax.numpy.asarray(y)
  xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y)
  baseline = timing.rss_mb()
  if timing.runs('flax'):
    t0 = time.perf_counter()
    state, opt_state, loss = step(state, opt_state, xj, yj)
    loss.block_until_ready()
    print(f'{name}: JAX compile + first step {time.perf_counter() - t0:.1f} s')
  jax_ms, torch_ms = [], []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    if timing.runs('flax'):
      state, opt_state, loss = step(state, opt_state, xj, yj)
      loss.block_until_ready()
    t1 = time.perf_counter()
    if timing.runs('torch'):
      t_opt.zero_grad(set_to_none=True)
      t_loss = F.cross_entropy(t_model(xt), yt)
      t_loss.backward()
      t_opt.step()
    t2 = time.perf_counter()
    if i >= warmup:
      jax_ms.append((t1 - t0) * 1e3)
      torch_ms.append((t2 - t1) * 1e3)
  timing.end_memory_run(baseline)
  j, t = statistics.median(jax_ms), statistics.median(torch_ms)
  print(f'{name} {size}x{size} bs {bs} ({steps} steps): JAX {j:.0f} ms ({bs / j * 1e3:.0f} img/s), '
        f'torch {t:.0f} ms ({bs / t * 1e3:.0f} img/s), JAX time / torch time {j / t:.2f}')
  return t / j


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--conv-impl', default='auto', choices=CONV_IMPLS)
  parser.add_argument('--skip-xresnet50', action='store_true')
  parser.add_argument('--only', choices=['xresnet18', 'xresnet50'], help='run one of the two models')
  args = parser.parse_args()
  print(f'JAX {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} with '
        f'{torch.get_num_threads()} threads, conv_impl={args.conv_impl}')
  if args.only == 'xresnet50':
    print(f'speedup_vs_torch={bench("xresnet50", 128, 16, args.steps, args.warmup, args.conv_impl):.3f}')
    return
  speedup = bench('xresnet18', 64, 32, args.steps, args.warmup, args.conv_impl)
  if not args.skip_xresnet50 and args.only is None:
    bench('xresnet50', 128, 16, args.steps, args.warmup, args.conv_impl)
  print(f'speedup_vs_torch={speedup:.3f}')


if __name__ == '__main__':
  main()
