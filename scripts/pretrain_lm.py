"""Trains an AWD-LSTM language model on the embedded Wikipedia sample (or a WikiText file).

fastai's recipe: fastai tokenization and vocabulary, LM streams of `bptt` tokens, Adam with
one-cycle LR and 0.8/0.7/0.8 momentum, weight decay except biases, gradient clipping, AR/TAR. Prints a table per epoch with train/valid loss
and perplexity. --out holds checkpoints/ (resume with --resume), log-0-all.csv,
losses-0-all.png and, when training ends, model/ with the weights (fastai state_dict names,
lm.npz), vocab.json and config.json, written together (finetune_lm.py --lm reads it).

  python scripts/pretrain_lm.py                     # short run, small model
  python scripts/pretrain_lm.py --size fastai --epochs 10 --lr 1e-2 --save-every 500
  python scripts/pretrain_lm.py --wikitext wiki.train.tokens --lr-find
"""
from __future__ import annotations

import argparse
import sys

from flax_ulmfit import cli, ulmfit_cli  # import no JAX: --devices must be set first


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  data = parser.add_argument_group('data')
  data.add_argument('--wikitext', type=cli.existing_file, help='a WikiText token file (default: embedded sample)')
  data.add_argument('--max-docs', type=cli.positive_int, help='use only the first N articles (default: all)')
  data.add_argument('--valid-pct', type=cli.fraction, default=0.1, help='fraction of the articles for validation')
  ulmfit_cli.add_vocab_args(parser)
  model = parser.add_argument_group('model and training')
  ulmfit_cli.add_size_arg(model, 'small')
  ulmfit_cli.add_direction_arg(model)
  ulmfit_cli.add_training_args(model, ulmfit_cli.PRETRAIN)
  ulmfit_cli.add_export_arg(parser)
  cli.add_run_args(parser, out='runs/pretrain_lm')
  return ulmfit_cli.parsed_phase(parser, parser.parse_args(argv))


def main(args: argparse.Namespace) -> list[dict]:
  from flax_ulmfit.text import corpora
  texts = corpora.read_wikitext(args.wikitext) if args.wikitext else corpora.wikipedia_sample()
  if not texts:
    raise ValueError(f'no article in {args.wikitext}: a WikiText file has " = Title = " lines, each followed by text')
  train_texts, valid_texts = ulmfit_cli.split_texts(texts[:args.max_docs] if args.max_docs else texts, args.valid_pct,
                                                    args.seed)
  run = cli.RunFolder(args.out)
  cli.open_run(run, args, 'pretrain_lm.py')
  mesh = cli.device_mesh(args.devices)
  from flax_ulmfit.text import Tokenizer
  tokenizer = Tokenizer(cache_dir=run.token_cache, progress=cli.show_progress(args))
  return ulmfit_cli.lm_phase(args, run, train_texts, valid_texts, tokenizer,
                             ulmfit_cli.pretrain_recipe(args), cli.settings(args), mesh=mesh)


if __name__ == '__main__':
  arguments = parse_args()
  cli.start_jax(arguments)
  sys.exit(cli.run_script('pretrain_lm', lambda: main(arguments)))
