"""Trains an AWD-LSTM language model on the embedded Wikipedia sample (or a WikiText file).

fastai's recipe: fastai tokenization and vocabulary, LM streams of `bptt` tokens, Adam
(mom 0.8/0.7/0.8 one-cycle, wd 0.01 except biases), gradient clipping, AR/TAR. Prints a
table per epoch with train/valid loss and perplexity. --out holds checkpoints/ (resume with
--resume), log.csv, losses.png and, when training ends, model/ with the weights (fastai
state_dict names, lm.npz), vocab.json and config.json, written together.

  python scripts/pretrain_lm.py                     # short run, small model
  python scripts/pretrain_lm.py --size fastai --epochs 10 --lr 1e-2 --save-every 500
  python scripts/pretrain_lm.py --wikitext wiki.train.tokens --lr-find
"""
from __future__ import annotations

import argparse
import sys

from flax_ulmfit import cli  # imports no JAX: --devices must be set first

SIZES = {'tiny': dict(emb_sz=16, n_hid=32, n_layers=2),  # a smoke test
         'small': dict(emb_sz=400, n_hid=400, n_layers=3), 'fastai': {}}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  data = parser.add_argument_group('data')
  data.add_argument('--wikitext', type=cli.existing_file, help='a WikiText token file (default: embedded sample)')
  data.add_argument('--max-docs', type=cli.positive_int, help='use only the first N articles (default: all)')
  data.add_argument('--valid-pct', type=cli.fraction, default=0.1, help='fraction of the articles for validation')
  data.add_argument('--min-freq', type=cli.positive_int, default=3, help='vocabulary: minimum token count')
  data.add_argument('--max-vocab', type=cli.at_least(9), default=60000, help='vocabulary: maximum size (9 special tokens included)')
  model = parser.add_argument_group('model and training')
  model.add_argument('--size', choices=sorted(SIZES), default='small',
                     help="tiny: 16/32/2; small: 400/400/3; fastai: awd_lstm_lm_config's 400/1152/3")
  model.add_argument('--drop-mult', type=cli.nonnegative_float, default=1.0, help='scales every dropout probability')
  model.add_argument('--epochs', type=cli.positive_int, default=1)
  model.add_argument('--bs', type=cli.positive_int, default=32, help='batch size (LM streams)')
  model.add_argument('--bptt', type=cli.positive_int, default=72, help='tokens per stream per batch')
  model.add_argument('--lr', type=cli.positive_float, default=5e-3, help='peak of the one-cycle schedule')
  model.add_argument('--wd', type=cli.nonnegative_float, default=0.01, help='decoupled weight decay (not on biases)')
  model.add_argument('--clip', type=cli.nonnegative_float, default=0.25, help='global-norm gradient clipping; 0: none')
  cli.add_run_args(parser, out='runs/pretrain_lm')
  args = parser.parse_args(argv)
  cli.check_run_args(parser, args, args.bs)
  return args


def split_docs(texts: list[str], valid_pct: float, seed: int) -> tuple[list[str], list[str]]:
  """A random `valid_pct` of the documents for validation (at least one), the rest for training."""
  import numpy as np
  order = np.random.default_rng(seed).permutation(len(texts))
  n_valid = max(1, round(len(texts) * valid_pct))
  if len(texts) - n_valid < 1:
    raise ValueError(f'{len(texts)} document(s) cannot be split into train and valid; give more articles')
  return [texts[i] for i in order[n_valid:]], [texts[i] for i in order[:n_valid]]


def main(args: argparse.Namespace) -> list[dict]:
  from flax_ulmfit.text import corpora
  texts = corpora.read_wikitext(args.wikitext) if args.wikitext else corpora.wikipedia_sample()
  if not texts:
    raise ValueError(f'no article in {args.wikitext}: a WikiText file has " = Title = " lines, each followed by text')
  train_texts, valid_texts = split_docs(texts[:args.max_docs] if args.max_docs else texts, args.valid_pct, args.seed)
  run = cli.RunFolder(args.out)
  import jax
  from flax import nnx
  from jax.experimental import multihost_utils

  primary = cli.is_primary()  # several processes: process 0 alone writes the run's files
  if primary:
    run.open(args)
  if jax.process_count() > 1:
    if args.lr_find:
      raise ValueError('--lr-find runs on one process: run it without --coordinator')
    multihost_utils.sync_global_devices('pretrain_lm: run folder open')
  mesh = cli.device_mesh(args.devices)

  from flax_ulmfit import checkpoint, parallel
  from flax_ulmfit.interop import flax_to_torch
  from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config
  from flax_ulmfit.text import Tokenizer, Vocab
  from flax_ulmfit.text.data import LMLoader
  from flax_ulmfit.text.files import write_json
  from flax_ulmfit.train import optim, precision, schedules
  from flax_ulmfit.train.checkpoints import TrainCheckpoints
  from flax_ulmfit.train.lm import lm_batch_check, lm_loss
  from flax_ulmfit.train.loop import fit
  from flax_ulmfit.train.lr_find import lr_find
  from flax_ulmfit.train.step import init_train_state, make_eval_step, make_train_step

  config = dict(awd_lstm_lm_config, **SIZES[args.size])
  too_high = {k: p * args.drop_mult for k, p in config.items() if k.endswith('_p') and p * args.drop_mult >= 1}
  if too_high:
    raise ValueError(f'--drop-mult {args.drop_mult} makes dropout probabilities >= 1: {too_high}')
  tokenizer = Tokenizer(cache_dir=run.token_cache)
  train_tokens, valid_tokens = tokenizer(train_texts), tokenizer(valid_texts)
  vocab = Vocab.from_tokens(train_tokens, max_vocab=args.max_vocab, min_freq=args.min_freq)
  rows = parallel.process_rows(args.bs, mesh) if mesh is not None else slice(None)  # this process's streams
  train_dl = LMLoader([vocab.numericalize(t) for t in train_tokens], args.bs, args.bptt, seed=args.seed, rows=rows)
  valid_dl = LMLoader([vocab.numericalize(t) for t in valid_tokens], args.bs, args.bptt, shuffle=False, rows=rows)
  if primary:
    print(f'{len(train_texts)} train / {len(valid_texts)} valid documents, {sum(map(len, train_tokens)):,} train '
          f'tokens, vocab {len(vocab):,}, {len(train_dl)} batches of {args.bs}x{args.bptt} per epoch', flush=True)

  # fastai's LM recipe: one parameter group, one-cycle lr, text momentum, no wd on biases
  policy = precision.get_policy(args.precision)
  model = LanguageModel(len(vocab), config, args.drop_mult, dtype=policy.compute_dtype,
                        rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1))
  params = nnx.state(model, nnx.Param)
  labels = optim.label_params(params, [('', 'all')])
  wd_mask = jax.tree.map(lambda exempt: not exempt, optim.bn_bias_mask(model, params))

  def make_tx(lr, mom=0.9):
    tx = optim.fastai_optimizer(labels, {'all': lr}, mom=mom, wd=args.wd, clip_norm=args.clip or None, wd_mask=wd_mask)
    return precision.torch_grad_scaler(tx) if policy.needs_loss_scaling else tx

  def first_state(batch):
    carry = model.zero_state(batch[0].shape[0])
    return parallel.shard_batch(carry, mesh) if mesh is not None else carry

  if args.lr_find:
    result = lr_find(model, lm_loss, make_tx, [b for _, b in zip(range(100), train_dl.batches(0))],
                     rng=jax.random.key(args.seed), init_carry=lambda batch: model.zero_state(batch[0].shape[0]),
                     plot_path=run.lr_find_plot)  # one device: lr_find's step is not data-parallel
    print(f'lr_find: valley {result.suggestion:.2e} (plot: {run.lr_find_plot}); train with --lr {result.suggestion:.1e}')
    return []

  total = args.epochs * len(train_dl)
  tx = make_tx(schedules.one_cycle(total, args.lr), schedules.one_cycle_moms(total, (0.8, 0.7, 0.8)))
  state = init_train_state(model, tx)
  if mesh is not None:
    state = parallel.replicate(state, mesh)
  check = lm_batch_check(len(vocab))
  checkpoints = TrainCheckpoints(run.checkpoints, meta={
      'settings': cli.settings(args), 'config': config, 'vocab': vocab.itos, 'tokenizer': tokenizer.name})
  state, history = fit(make_train_step(model, lm_loss, tx, mesh=mesh, check_batch=check), state, train_dl,
                       args.epochs, rng=jax.random.key(args.seed),
                       eval_step=make_eval_step(model, lm_loss, check_batch=check, mesh=mesh), valid_data=valid_dl,
                       init_carry=first_state, language_model=True, log_path=run.log if primary else None,
                       plot_path=run.plot if primary else None, progress=primary and not args.no_progress,
                       checkpoints=checkpoints, save_every=args.save_every, resume=args.resume)
  nnx.update(model, state.params, state.rest)
  if not primary:
    return history
  with run.export() as stage:
    checkpoint.save(stage / 'lm.npz', flax_to_torch(model), {'config': config, 'vocab_size': len(vocab)})
    vocab.save(stage / 'vocab.json')
    write_json(stage / 'config.json', {'format': 'flax_ulmfit.lm_run/1', 'config': config, 'vocab_size': len(vocab),
                                       'settings': cli.settings(args), 'history': history})
  last = history[-1]
  print(f'valid loss {last["valid_loss"]:.4f}, perplexity {last["perplexity"]:.1f}; '
        f'weights, vocabulary and config in {run.model}/, log and plot in {run.path}/')
  return history


if __name__ == '__main__':
  arguments = parse_args()
  cli.start_jax(arguments)
  sys.exit(cli.run_script('pretrain_lm', lambda: main(arguments)))
