"""Fine-tunes a pretrained AWD-LSTM language model on the texts of a classification task.

fastai's recipe (language_model_learner, drop_mult 0.3): the pretrained weights moved onto
the new vocabulary (match_embeds), one epoch training only the embedding and decoder, then
all layers, each a one-cycle (momentum 0.8/0.7/0.8, fresh Adam state per stage, AR/TAR).
The pretrained model: --lm (the --out of pretrain_lm.py), or fastai's files (--pretrained
WEIGHTS.pth --pretrained-vocab ITOS.pkl, e.g. fastai's published WikiText-103 model, with
--size fastai); neither trains from random weights. The texts: the training part of the
labelled data (the same --valid-pct/--split-seed split as train_classifier.py: the
validation texts only measure the perplexity, never train), by default the embedded BBC News. --out holds checkpoints/
(--resume), log-<i>-<stage>.csv, losses-<i>-<stage>.png and, when training ends, model/
(lm.npz, vocab.json, config.json: train_classifier.py --lm reads it).

  python scripts/finetune_lm.py --lm runs/pretrain_lm
  python scripts/finetune_lm.py --pretrained lstm_wt103.pth --pretrained-vocab itos_wt103.pkl --size fastai --imdb imdb
"""
from __future__ import annotations

import argparse
import sys

from flax_ulmfit import cli, ulmfit_cli  # import no JAX: --devices must be set first


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ulmfit_cli.add_labelled_args(parser)
  start = parser.add_argument_group('pretrained model (default: random weights)')
  start.add_argument('--lm', type=cli.existing_dir, help='a pretrain_lm.py run (its --out) or model/ folder')
  start.add_argument('--pretrained', type=cli.existing_file, help="fastai's weights (.pth state_dict)")
  start.add_argument('--pretrained-vocab', type=cli.existing_file, help="fastai's vocabulary (itos .pkl, or a JSON list)")
  model = parser.add_argument_group('model and training')
  ulmfit_cli.add_size_arg(model, 'small')
  ulmfit_cli.add_direction_arg(model)
  ulmfit_cli.add_training_args(model, ulmfit_cli.FINETUNE)
  ulmfit_cli.add_vocab_args(parser)
  ulmfit_cli.add_export_arg(parser)
  cli.add_run_args(parser, out='runs/finetune_lm')
  args = parser.parse_args(argv)
  if (args.pretrained is None) != (args.pretrained_vocab is None):
    parser.error('--pretrained and --pretrained-vocab go together (the weights and their vocabulary)')
  if args.lm is not None and args.pretrained is not None:
    parser.error('give --lm or --pretrained, not both')
  return ulmfit_cli.parsed_phase(parser, args)


def main(args: argparse.Namespace) -> list[dict]:
  train_texts, _, valid_texts, _, _ = ulmfit_cli.read_labelled(args)
  valid_texts = ulmfit_cli.lm_valid_texts(valid_texts, args)
  run = cli.RunFolder(args.out)
  cli.open_run(run, args, 'finetune_lm.py')
  mesh = cli.device_mesh(args.devices)
  from flax_ulmfit import ulmfit
  from flax_ulmfit.text import Tokenizer
  start = (args.pretrained, args.pretrained_vocab) if args.pretrained is not None else args.lm
  if start is None:
    print('finetune_lm: no --lm or --pretrained: the language model starts from random weights', file=sys.stderr)
  tokenizer = Tokenizer(cache_dir=run.token_cache, progress=cli.show_progress(args))
  return ulmfit_cli.lm_phase(args, run, train_texts, valid_texts, tokenizer,
                             ulmfit_cli.recipe(ulmfit.LM_FINETUNE, args), cli.settings(args), mesh=mesh, start=start)


if __name__ == '__main__':
  arguments = parse_args()
  cli.start_jax(arguments)
  sys.exit(cli.run_script('finetune_lm', lambda: main(arguments)))
