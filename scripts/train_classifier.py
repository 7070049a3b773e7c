"""Trains a ULMFiT text classifier with gradual unfreezing (on the embedded BBC News by default).

fastai's recipe (text_classifier_learner, drop_mult 0.5): the head for one epoch, then the
last two parameter groups, then three, then all, each a one-cycle with discriminative rates
slice(lr / 2.6**4, lr), momentum 0.8/0.7/0.8, fresh Adam state per stage, AR/TAR. The
encoder and vocabulary come from a language model (--lm: the --out of finetune_lm.py or
pretrain_lm.py), else the encoder starts random. Prints a table per stage; --out holds
checkpoints/ (--resume), log-<i>-<stage>.csv, losses-<i>-<stage>.png and, when training
ends, model/ (classifier.npz, vocab.json, labels.json, config.json: what predict.py reads).
The last line is accuracy=<validation accuracy>.

  python scripts/train_classifier.py --lm runs/finetune_lm
  python scripts/train_classifier.py --csv reviews.csv --text-col review --label-col sentiment --lm runs/finetune_lm
  python scripts/train_classifier.py --size small --epochs 1 1 1 2 --lrs 2e-2 1e-2 5e-3 1e-3   # random encoder
"""
from __future__ import annotations

import argparse
import sys

from flax_ulmfit import cli, ulmfit_cli  # import no JAX: --devices must be set first


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ulmfit_cli.add_labelled_args(parser)
  model = parser.add_argument_group('model and training')
  model.add_argument('--lm', type=cli.existing_dir,
                     help='a language model run (finetune_lm.py --out): its vocabulary and encoder (default: random encoder)')
  ulmfit_cli.add_size_arg(model, 'small')
  ulmfit_cli.add_direction_arg(model)
  ulmfit_cli.add_training_args(model, ulmfit_cli.CLASSIFIER)
  ulmfit_cli.add_vocab_args(parser)
  cli.add_run_args(parser, out='runs/train_classifier')
  args = parser.parse_args(argv)
  return ulmfit_cli.parsed_phase(parser, args)


def main(args: argparse.Namespace) -> list[dict]:
  data = ulmfit_cli.read_labelled(args)
  run = cli.RunFolder(args.out)
  cli.open_run(run, args, 'train_classifier.py')
  mesh = cli.device_mesh(args.devices)
  from flax_ulmfit import ulmfit
  from flax_ulmfit.text import Tokenizer
  tokenizer = Tokenizer(cache_dir=run.token_cache, progress=cli.show_progress(args))
  history = ulmfit_cli.classifier_phase(args, run, data, tokenizer,
                                        ulmfit_cli.recipe(ulmfit.CLASSIFIER, args), cli.settings(args), mesh=mesh,
                                        lm=args.lm)
  if history:
    print(f'accuracy={history[-1]["valid_accuracy"]:.4f}')
  return history


if __name__ == '__main__':
  arguments = parse_args()
  cli.start_jax(arguments)
  sys.exit(cli.run_script('train_classifier', lambda: main(arguments)))
