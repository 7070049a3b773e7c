"""Trains an AWD-LSTM language model on the embedded Wikipedia sample (or a WikiText file).

fastai's recipe: fastai tokenization and vocabulary, LM streams of `bptt` tokens, Adam
(mom 0.8/0.7/0.8 one-cycle, wd 0.01 except biases), gradient clipping, AR/TAR. Prints a
table per epoch with train/valid loss and perplexity; writes the log, a plot, the
vocabulary and the weights (fastai state_dict names, .npz) to --out.

  python scripts/pretrain_lm.py                     # short run, small model
  python scripts/pretrain_lm.py --size fastai --epochs 10 --lr 1e-2
  python scripts/pretrain_lm.py --wikitext wiki.train.tokens
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

SIZES = {'tiny': dict(emb_sz=16, n_hid=32, n_layers=2),  # a smoke test
         'small': dict(emb_sz=400, n_hid=400, n_layers=3), 'fastai': {}}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--wikitext', type=Path, help='a WikiText token file (default: embedded sample)')
  parser.add_argument('--max-docs', type=int, help='use only the first N articles')
  parser.add_argument('--valid-pct', type=float, default=0.1)
  parser.add_argument('--size', choices=sorted(SIZES), default='small',
                      help="tiny: 16/32/2; small: 400/400/3; fastai: awd_lstm_lm_config's 400/1152/3")
  parser.add_argument('--epochs', type=int, default=1)
  parser.add_argument('--bs', type=int, default=32)
  parser.add_argument('--bptt', type=int, default=72)
  parser.add_argument('--lr', type=float, default=5e-3, help='peak of the one-cycle schedule')
  parser.add_argument('--wd', type=float, default=0.01)
  parser.add_argument('--clip', type=float, default=0.25, help='global-norm gradient clipping')
  parser.add_argument('--drop-mult', type=float, default=1.0)
  parser.add_argument('--min-freq', type=int, default=3)
  parser.add_argument('--max-vocab', type=int, default=60000)
  parser.add_argument('--devices', type=int, default=1,
                      help='split the batch over N XLA CPU devices (measured slower than 1 on 2 cores)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', type=Path, default=Path('runs/pretrain_lm'))
  args = parser.parse_args(argv)
  if not 0 < args.valid_pct < 1:
    parser.error(f'--valid-pct must be in (0, 1), got {args.valid_pct}')
  return args


def split_docs(texts: list[str], valid_pct: float, seed: int) -> tuple[list[str], list[str]]:
  """A random `valid_pct` of the documents for validation (at least one), the rest for training."""
  import numpy as np
  order = np.random.default_rng(seed).permutation(len(texts))
  n_valid = max(1, round(len(texts) * valid_pct))
  if len(texts) - n_valid < 1:
    raise SystemExit(f'pretrain_lm: {len(texts)} document(s) cannot be split into train and valid')
  return [texts[i] for i in order[n_valid:]], [texts[i] for i in order[:n_valid]]


def main(args) -> list[dict]:
  if args.devices > 1:  # must precede the first JAX import
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
  import jax
  from flax import nnx

  from flax_ulmfit import checkpoint, parallel
  from flax_ulmfit.interop import flax_to_torch
  from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config
  from flax_ulmfit.text import Tokenizer, Vocab, corpora
  from flax_ulmfit.text.data import LMLoader
  from flax_ulmfit.train import optim, schedules
  from flax_ulmfit.train.lm import lm_loss
  from flax_ulmfit.train.loop import fit
  from flax_ulmfit.train.step import init_train_state, make_eval_step, make_train_step

  texts = corpora.read_wikitext(args.wikitext) if args.wikitext else corpora.wikipedia_sample()
  texts = texts[:args.max_docs] if args.max_docs else texts
  train_texts, valid_texts = split_docs(texts, args.valid_pct, args.seed)
  args.out.mkdir(parents=True, exist_ok=True)
  tokenizer = Tokenizer(cache_dir=args.out / 'token_cache')
  train_tokens, valid_tokens = tokenizer(train_texts), tokenizer(valid_texts)
  vocab = Vocab.from_tokens(train_tokens, max_vocab=args.max_vocab, min_freq=args.min_freq)
  vocab.save(args.out / 'vocab.json')
  train_dl = LMLoader([vocab.numericalize(t) for t in train_tokens], args.bs, args.bptt, seed=args.seed)
  valid_dl = LMLoader([vocab.numericalize(t) for t in valid_tokens], args.bs, args.bptt, shuffle=False)
  n_tokens = sum(map(len, train_tokens))
  print(f'{len(train_texts)} train / {len(valid_texts)} valid documents, {n_tokens:,} train tokens, '
        f'vocab {len(vocab):,}, {len(train_dl)} batches of {args.bs}x{args.bptt} per epoch', flush=True)

  config = dict(awd_lstm_lm_config, **SIZES[args.size])
  model = LanguageModel(len(vocab), config, args.drop_mult, rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1))
  params = nnx.state(model, nnx.Param)
  total = args.epochs * len(train_dl)
  tx = optim.fastai_optimizer(
      optim.label_params(params, [('', 'all')]), {'all': schedules.one_cycle(total, args.lr)},
      mom=schedules.one_cycle_moms(total, (0.8, 0.7, 0.8)), wd=args.wd, clip_norm=args.clip,
      wd_mask=jax.tree.map(lambda exempt: not exempt, optim.bn_bias_mask(model, params)))
  mesh = parallel.data_mesh() if args.devices > 1 else None
  state = init_train_state(model, tx)
  train_step = make_train_step(model, lm_loss, tx, mesh=mesh)
  eval_step = make_eval_step(model, lm_loss)

  def first_state(batch):
    carry = model.zero_state(batch[0].shape[0])
    return parallel.shard_batch(carry, mesh) if mesh is not None else carry

  if mesh is not None:
    parallel.check_divisible(args.bs, mesh)
    state = parallel.replicate(state, mesh)
  state, history = fit(train_step, state, train_dl, args.epochs, rng=jax.random.key(args.seed),
                       eval_step=eval_step, valid_data=valid_dl, init_carry=first_state,
                       language_model=True, log_path=args.out / 'log.csv', plot_path=args.out / 'losses.png')
  nnx.update(model, state.params, state.rest)
  checkpoint.save(args.out / 'lm.npz', flax_to_torch(model), {'config': config, 'vocab_size': len(vocab)})
  last = history[-1]
  print(f'valid loss {last["valid_loss"]:.4f}, perplexity {math.exp(last["valid_loss"]):.1f}; '
        f'weights, vocabulary, log and plot in {args.out}/')
  return history


if __name__ == '__main__':
  main(parse_args())
