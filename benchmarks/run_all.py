"""Every benchmark in one run, and one Markdown table of their figures.

Runs each benchmark script in its own process (lm_step, clas_step, xresnet_step for xresnet18
and xresnet50, tokenize_speed, precision), each timing ours and torch_ref alternately as it
always does, and reads the figures from its output. Then, for the step benchmarks, one
memory run per side (`timing.SIDE_ENV`: only that side's steps run) gives each side's peak
RSS; tokenizing and precision report the peak RSS of their process (both sides together).
Finally it measures this machine's fp32 matmul throughput (the best of JAX's and torch's
2048x2048 products) and gives the LM step's fraction of it (the step's FLOPs counted from
the model's matmuls). Tokenizing is compared with fastai when `--fastai-python` names a Python that has it.
Writes the table with the date, the load average and the command to
`--out` (default docs/benchmarks.md); `--quick` runs small sizes once as a smoke test and
writes nothing unless `--out` is given.

  PYTHONPATH=. python benchmarks/run_all.py            # on an idle machine
  PYTHONPATH=. python benchmarks/run_all.py --quick
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIDE_ENV = 'FLAX_ULMFIT_BENCH_SIDE'  # timing.SIDE_ENV (timing is not imported: it is for the benchmarks' processes)

# name -> (script, full arguments, --quick arguments)
BENCHMARKS = {
    'lm_step': ('lm_step.py', ['--configs', 'small', 'default'], ['--configs', 'small', '--steps', '2', '--warmup', '1']),
    'clas_step': ('clas_step.py', [], ['--configs', 'small', '--docs', '100', '--min-len', '100', '--max-len', '300',
                                       '--batches', '1', '--rounds', '1', '--warmup', '1']),
    'xresnet18': ('xresnet_step.py', ['--only', 'xresnet18'], ['--only', 'xresnet18', '--steps', '2', '--warmup', '1']),
    'xresnet50': ('xresnet_step.py', ['--only', 'xresnet50'], ['--only', 'xresnet50', '--steps', '1', '--warmup', '1']),
    'tokenize': ('tokenize_speed.py', [], ['--repeats', '1']),
    'precision': ('precision.py', [], ['--steps', '1', '--warmup', '1', '--models', 'lm', '--precisions', 'fp32', 'bf16',
                                       '--vocab', '2000', '--emb', '64', '--hid', '64', '--bs', '8', '--bptt', '16']),
}
MEMORY_RUNS = ('lm_step', 'clas_step', 'xresnet18', 'xresnet50')  # benchmarks whose sides can run alone


def run_script(script: str, args: list[str], side: str | None = None, python: str = sys.executable) -> tuple[str, float]:
  """Runs a benchmark script with `python`; returns its stdout and the peak RSS (MiB) of its process."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
  env.pop(SIDE_ENV, None)
  if side:
    env[SIDE_ENV] = side
  command = [python, str(HERE / script), *args]
  print('$', ' '.join(command[1:]), f'({SIDE_ENV}={side})' if side else '', flush=True)
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
    _, status, usage = os.wait4(process.pid, 0)  # not process.wait(): wait4 gives this process's own peak RSS
    process.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0), err.seek(0)
    if process.returncode:
      raise RuntimeError(f'{script} {" ".join(args)} failed ({process.returncode}):\n{err.read()[-3000:]}')
    return out.read(), usage.ru_maxrss / 1024


def _floats(pattern: str, text: str) -> list[tuple[float, ...]]:
  return [tuple(float(g) for g in m.groups()) for m in re.finditer(pattern, text)]


def parse(name: str, out: str) -> list[dict]:
  """The rows a benchmark's output gives: {'what', 'ours', 'torch', 'unit'} (time per step or per round)."""
  rows = []
  if name == 'lm_step':
    for m in re.finditer(r'^(\w+)\s+V=(\d+) (\d+/\d+/\d+) bs=(\d+) bptt=(\d+): flax\s+([\d.]+) ms\s+torch\s+([\d.]+) ms',
                         out, re.M):
      emb, hid, layers = map(int, m[3].split('/'))
      rows.append(dict(what=f'LM step {m[3]} (V {m[2]}, bs {m[4]}, bptt {m[5]})', ours=float(m[6]),
                       torch=float(m[7]), unit='ms', config=m[1],
                       gflop=lm_step_gflop(int(m[2]), emb, hid, layers, int(m[4]), int(m[5]))))
  elif name == 'clas_step':
    for m in re.finditer(r'^(\w+)\s+V=\d+ (\d+/\d+/\d+) bs=(\d+).*?flax\s+([\d.]+) s\s+torch\s+([\d.]+) s per round',
                         out, re.M):
      rows.append(dict(what=f'classifier step {m[2]} (bs {m[3]}, per round of batches)', ours=float(m[4]),
                       torch=float(m[5]), unit='s'))
  elif name in ('xresnet18', 'xresnet50'):
    for m in re.finditer(r'^(xresnet\d+) (\d+x\d+) bs (\d+) .*?JAX ([\d.]+) ms .*?torch ([\d.]+) ms', out, re.M):
      rows.append(dict(what=f'{m[1]} step ({m[2]}, bs {m[3]})', ours=float(m[4]), torch=float(m[5]), unit='ms'))
  elif name == 'tokenize':
    times = {}
    for m in re.finditer(r'^(\S+)\s+(\d+)\s+(\d+)\s+(ours|fastai)\s+([\d.]+)', out, re.M):
      times.setdefault(m[1], {})[m[4]] = float(m[5])
    for corpus, t in times.items():
      rows.append(dict(what=f'tokenizing {corpus} (vs fastai)', ours=t['ours'], torch=t.get('fastai', float('nan')),
                       unit='s'))
  elif name == 'precision':
    for m in re.finditer(r'^(LM|xresnet18 64x64 bs 32) (\w+): flax\s+([\d.]+) ms\s+torch\s+([\d.]+) ms', out, re.M):
      what = 'LM step' if m[1] == 'LM' else 'xresnet18 step (64x64, bs 32)'
      rows.append(dict(what=f'precision: {what} {m[2]}', ours=float(m[3]), torch=float(m[4]), unit='ms'))
  if not rows:
    raise RuntimeError(f'run_all: no figures found in the output of {name}:\n{out[-2000:]}')
  return rows


def lm_step_gflop(vocab: int, emb: int, hid: int, layers: int, bs: int, bptt: int) -> float:
  """FLOPs of one AWD-LSTM LM training step counted from its matmuls (forward x 3 for the
  backward's two products): each LSTM layer's 4 gates over input and hidden, the tied decoder."""
  sizes = [emb] + [hid] * (layers - 1) + [emb]
  per_token = sum(2 * 4 * n_out * (n_in + n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:])) + 2 * emb * vocab
  return 3 * per_token * bs * bptt / 1e9


MATMUL_PROBE = textwrap.dedent('''
    import statistics, time, jax, jax.numpy as jnp, numpy as np, torch
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    dot = jax.jit(jnp.dot)
    x = jnp.asarray(a)
    def best(f, repeats=7):
        f(); times = []
        for _ in range(repeats):
            t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
        return 2 * n ** 3 / statistics.median(times) / 1e9
    t = torch.from_numpy(a)
    print(f'jax_gflops={best(lambda: dot(x, x).block_until_ready()):.1f} torch_gflops={best(lambda: t @ t):.1f}')
''')


def matmul_gflops() -> dict[str, float]:
  env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
  out = subprocess.run([sys.executable, '-c', MATMUL_PROBE], env=env, capture_output=True, text=True, check=True).stdout
  return {k: float(v) for k, v in re.findall(r'(\w+)_gflops=([\d.]+)', out)}


def table(rows: list[dict], throughput: dict[str, float], command: str) -> str:
  best = max(throughput.values())
  lines = [f'# Benchmarks: flax_ulmfit vs torch_ref', '',
           f'Measured {datetime.date.today().isoformat()} by `{command}` on {os.cpu_count()} CPU cores '
           f'(load average {os.getloadavg()[0]:.1f} at the end); each benchmark alternates ours and torch_ref in one '
           'process (medians after warm-up). Speed ratio: torch_ref\'s time / ours (above 1: ours faster). Peak RSS: '
           "a run of that side's steps alone, the other side's model built but idle (its rise over the RSS before the first "
           'step in brackets); where one figure spans both columns, the process ran both sides. Tokenizing rows compare with '
           'fastai 2.8 in the torch_ref column (n/a: run without `--fastai-python`); their RSS is the main process\'s '
           '(worker processes not counted).', '',
           '| benchmark | ours | torch_ref | speed ratio | peak RSS ours, MiB | peak RSS torch_ref, MiB |',
           '|---|---:|---:|---:|---:|---:|']
  for r in rows:
    ratio = r['torch'] / r['ours']
    mem = r.get('memory')
    if mem:
      ours_mem = f"{mem['flax'][0]:.0f} (+{mem['flax'][1]:.0f})"
      torch_mem = f"{mem['torch'][0]:.0f} (+{mem['torch'][1]:.0f})"
    else:
      ours_mem = torch_mem = f"{r['process_rss']:.0f} (both)"
    theirs, ratio = ((f"{r['torch']:.2f} {r['unit']}", f'{ratio:.2f}') if ratio == ratio else ('n/a', 'n/a'))
    lines.append(f"| {r['what']} | {r['ours']:.2f} {r['unit']} | {theirs} | {ratio} | {ours_mem} | {torch_mem} |")
  lm = [r for r in rows if 'gflop' in r]
  lines += ['', f"Matmul throughput (fp32 2048x2048, median): JAX {throughput.get('jax', float('nan')):.0f} GFLOP/s, "
            f"torch {throughput.get('torch', float('nan')):.0f} GFLOP/s; the machine's figure is the better one."]
  for r in lm:
    gflop = r['gflop']
    lines.append(f"{r['what']}: {gflop:.0f} GFLOP of matmuls; ours runs at {gflop / (r['ours'] / 1e3):.0f} GFLOP/s "
                 f"= {gflop / (r['ours'] / 1e3) / best:.0%} of it, torch_ref {gflop / (r['torch'] / 1e3):.0f} GFLOP/s "
                 f"= {gflop / (r['torch'] / 1e3) / best:.0%}.")
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='small sizes, few steps: a smoke test of this script')
  parser.add_argument('--out', type=Path, help='Markdown file (default: docs/benchmarks.md; none with --quick)')
  parser.add_argument('--only', nargs='+', choices=list(BENCHMARKS), default=list(BENCHMARKS))
  parser.add_argument('--fastai-python', default=os.environ.get('FASTAI_PYTHON'),
                      help="a Python with fastai 2.8 installed: tokenizing is then compared with fastai's (env FASTAI_PYTHON)")
  args = parser.parse_args()
  out_path = args.out or (None if args.quick else ROOT / 'docs' / 'benchmarks.md')
  rows = []
  for name in args.only:
    script, full, quick = BENCHMARKS[name]
    flags = quick if args.quick else full
    python = args.fastai_python if name == 'tokenize' and args.fastai_python else sys.executable
    output, process_rss = run_script(script, flags, python=python)
    found = parse(name, output)
    memory = None
    if name in MEMORY_RUNS:
      memory = {}
      for side in ('flax', 'torch'):
        text, _ = run_script(script, flags, side)
        m = re.search(r'peak_rss_mb=(\d+) step_rss_mb=(-?\d+)', text)
        memory[side] = (float(m[1]), float(m[2]))
    for i, r in enumerate(found):  # a memory run ends after its first configuration
      r.update(process_rss=process_rss, memory=memory if i == 0 else None)
      print(f"  {r['what']}: ours {r['ours']:.2f} {r['unit']}, torch_ref {r['torch']:.2f} {r['unit']}", flush=True)
    rows += found
  throughput = matmul_gflops()
  command = 'python benchmarks/run_all.py' + (' --quick' if args.quick else '') + (
      ' --fastai-python PY' if args.fastai_python else '')
  text = table(rows, throughput, command)
  print(text)
  if out_path is not None:
    tmp = out_path.with_suffix('.tmp')
    tmp.write_text(text)
    tmp.replace(out_path)
    print(f'written to {out_path}')


if __name__ == '__main__':
  main()
