"""Tokenizing throughput on the embedded corpora: flax_ulmfit's Tokenizer vs fastai 2.8's
`tokenize_texts` (same texts, same number of worker processes, runs alternated, medians).

  PYTHONPATH=. python benchmarks/tokenize_speed.py [--workers 2] [--repeats 3]

fastai is optional (it needs torch): without it only our figures are printed and the last
line says so. With it, outputs are compared token for token and the last line is
`speedup_vs_fastai=<fastai time / our time over both corpora>`.
"""
import os
import sys

# this file's name shadows the standard library's `tokenize`: drop its folder from the path
sys.path = [p for p in sys.path if os.path.abspath(p or '.') != os.path.dirname(__file__)]
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # before torch (imported by fastai)

import argparse
import statistics
import tempfile
import time

from flax_ulmfit.text import Tokenizer
from flax_ulmfit.text.corpora import bbc_news, wikipedia_sample


def timed(fn, texts):
    start = time.perf_counter()
    out = fn(texts)
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    try:
        from fastai.text.core import tokenize_texts
        fastai = lambda texts: [list(map(str, t)) for t in tokenize_texts(texts, args.workers)]
    except ImportError:
        fastai = None
        print('fastai is not installed: measuring flax_ulmfit only '
              '(pip install -c constraints.txt "fastai==2.8.*" to compare)')
    ours = Tokenizer(n_workers=args.workers, progress=False)
    corpora = {'wikipedia_sample': wikipedia_sample(), 'bbc_news': bbc_news()[0]}
    ours(['Warm up: imports spaCy and builds the splitter, learning no corpus word.'])
    total = {'ours': 0.0, 'fastai': 0.0}
    print(f'{"corpus":18} {"docs":>6} {"tokens":>9} {"who":>8} {"median s":>9} '
          f'{"docs/s":>8} {"tokens/s":>10}')
    for name, texts in corpora.items():
        times = {'ours': [], 'fastai': []}
        for _ in range(args.repeats):
            t, ours_out = timed(ours, texts)
            times['ours'].append(t)
            if fastai is not None:
                t, fastai_out = timed(fastai, texts)
                times['fastai'].append(t)
                if fastai_out != ours_out:
                    raise SystemExit(f'{name}: outputs differ from fastai')
        n_tokens = sum(map(len, ours_out))
        for who, ts in times.items():
            if ts:
                med = statistics.median(ts)
                total[who] += med
                print(f'{name:18} {len(texts):6d} {n_tokens:9d} {who:>8} {med:9.2f} '
                      f'{len(texts) / med:8.0f} {n_tokens / med:10.0f}')
        with tempfile.TemporaryDirectory() as cache:
            cached = Tokenizer(n_workers=args.workers, progress=False, cache_dir=cache)
            cached(texts)
            t, again = timed(cached, texts)
            assert again == ours_out
            print(f'{name:18} {len(texts):6d} {n_tokens:9d} {"cached":>8} {t:9.2f} '
                  f'{len(texts) / t:8.0f} {n_tokens / t:10.0f}')
    if fastai is None:
        print('speedup_vs_fastai=nan  # fastai not installed')
    else:
        print('outputs identical to fastai on both corpora')
        print(f'speedup_vs_fastai={total["fastai"] / total["ours"]:.2f}')


if __name__ == '__main__':
    main()
