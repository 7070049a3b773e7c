"""ULMFiT end to end: pretrain a language model, fine-tune it on the task's texts, train the classifier.

With no arguments, the embedded demo: an AWD-LSTM language model pretrained on the Wikipedia
sample (gensim's test data), fine-tuned on the training texts of BBC News (2,225 articles,
5 classes; valid = numpy.random.RandomState(42).permutation(2225)[:445], on which the
language model only measures its perplexity), then the classifier trained with gradual
unfreezing. Prints a table per
stage (losses, perplexity, accuracy), a summary, and last `accuracy=<validation accuracy>`.
--no-pretrain trains the same classifier from a random encoder (the transfer gain); --quick
runs the same stages on a fraction of the data for a first look.

--out holds the classifier's run (checkpoints/, log-<i>-<stage>.csv, losses-<i>-<stage>.png,
model/: what `predict.py --model OUT` reads) and the language model's two runs in pretrain/
and finetune/ (each with its model/). --resume continues a stopped run in whichever stage it
stopped; --lr-find runs the learning-rate finder of the pretraining stage instead.

  python scripts/ulmfit.py                      # the demo
  python scripts/ulmfit.py --no-pretrain        # the same classifier without the language model
  python scripts/predict.py --model runs/ulmfit "Shares in the bank fell 5% after its results."
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flax_ulmfit import cli, ulmfit_cli  # import no JAX: --devices must be set first

# The demo's configuration: every default of this script is here.
# Measured on 2 cores (docs/ulmfit.md): the first 1,000 characters of each article, a
# 200/400/2 AWD-LSTM, vocabularies of at most 12,000 tokens.
DEMO = dict(
    size=dict(emb_sz=200, n_hid=400, n_layers=2), max_chars=1000, max_vocab=12000, precision='fp32',
    pretrain=dict(ulmfit_cli.PRETRAIN, drop_mult=0.5, epochs=[2], lrs=[1e-2], bs=32, bptt=72, wd=0.01, clip=0.25),
    finetune=dict(ulmfit_cli.FINETUNE, drop_mult=0.3, epochs=[1, 4], lrs=[2e-2, 5e-3], bs=32, bptt=72),
    classifier=dict(ulmfit_cli.CLASSIFIER, drop_mult=0.5, epochs=[1, 1, 1, 4], lrs=[2e-2, 1e-2, 5e-3, 2e-3], bs=32,
                    bptt=72, max_len=1440),
)
# --quick: the same stages on the first PRETRAIN_DOCS Wikipedia articles and a FRACTION of
# the task's train and valid texts.
QUICK = dict(pretrain_docs=20, fraction=0.25)
PHASES = (('pretrain', 'pretrain-'), ('finetune', 'lm-'), ('classifier', 'clas-'))


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--no-pretrain', action='store_true',
                      help='no language model: the classifier starts from a random encoder (the transfer gain)')
  parser.add_argument('--quick', action='store_true',
                      help=f'the same stages on {QUICK["fraction"]:g} of the texts and {QUICK["pretrain_docs"]} '
                           'Wikipedia articles: a first look in a few minutes')
  ulmfit_cli.add_labelled_args(parser)
  parser.set_defaults(max_chars=DEMO['max_chars'])
  wiki = parser.add_argument_group('language model pretraining data')
  wiki.add_argument('--wikitext', type=cli.existing_file, help='a WikiText token file (default: the embedded sample)')
  wiki.add_argument('--pretrain-valid-pct', type=cli.fraction, default=0.1, help='articles held out for perplexity')
  model = parser.add_argument_group('model (one AWD-LSTM for every phase; default: {emb_sz}/{n_hid}/{n_layers})'
                                    .format(**DEMO['size']))
  ulmfit_cli.add_size_arg(model, None)
  for phase, prefix in PHASES:
    ulmfit_cli.add_training_args(parser.add_argument_group(f'{phase} (--{prefix}...)'), DEMO[phase], prefix)
  ulmfit_cli.add_vocab_args(parser)
  parser.set_defaults(max_vocab=DEMO['max_vocab'])
  cli.add_run_args(parser, out='runs/ulmfit')
  parser.set_defaults(precision=DEMO['precision'])
  args = parser.parse_args(argv)
  if args.size is None:  # the demo's size, where no flag sets one
    args.size = 'small'
    for key, value in DEMO['size'].items():
      setattr(args, key, getattr(args, key) or value)
  if args.no_pretrain and args.out == Path('runs/ulmfit'):
    args.out = Path('runs/ulmfit_no_pretrain')
  try:
    args.phases = {phase: ulmfit_cli.phase_args(args, prefix) for phase, prefix in PHASES}
  except ValueError as err:
    parser.error(str(err))
  for phase in args.phases.values():
    cli.check_run_args(parser, phase, phase.bs)
  return args


def _first(items: list, fraction: float) -> list:
  return items[:max(1, round(len(items) * fraction))]


def main(args: argparse.Namespace) -> list[dict]:
  started = time.perf_counter()
  phases = args.phases
  del args.phases
  settings = cli.settings(args)
  train, train_y, valid, valid_y, source = ulmfit_cli.read_labelled(args)
  if args.quick:
    train, train_y, valid, valid_y = (_first(x, QUICK['fraction']) for x in (train, train_y, valid, valid_y))
    source += f', --quick: the first {QUICK["fraction"]:g} of each'
  runs = {'classifier': cli.RunFolder(args.out)}
  if not args.no_pretrain:
    runs |= {'pretrain': cli.RunFolder(args.out / 'pretrain'), 'finetune': cli.RunFolder(args.out / 'finetune')}
  for run in runs.values():  # every refusal (a run without --resume, other settings) before any work
    cli.open_run(run, args, 'ulmfit.py')
  mesh = cli.device_mesh(args.devices)
  from flax_ulmfit import ulmfit
  from flax_ulmfit.text import Tokenizer, corpora
  tokenizer = Tokenizer(cache_dir=runs['classifier'].token_cache, progress=cli.show_progress(args))
  lm = None
  if not args.no_pretrain:
    wiki = corpora.read_wikitext(args.wikitext) if args.wikitext else corpora.wikipedia_sample()
    if args.quick:
      wiki = wiki[:QUICK['pretrain_docs']]
    print(f'== pretraining the language model on {len(wiki)} Wikipedia articles', flush=True)
    history = ulmfit_cli.lm_phase(phases['pretrain'], runs['pretrain'],
                                  *ulmfit_cli.split_texts(wiki, args.pretrain_valid_pct, args.seed), tokenizer,
                                  ulmfit_cli.pretrain_recipe(phases['pretrain']),
                                  settings, mesh=mesh)
    if args.lr_find:
      return []
    print(f'== fine-tuning the language model on the {len(train):,} training texts of {source}', flush=True)
    ulmfit_cli.lm_phase(phases['finetune'], runs['finetune'], train, valid, tokenizer,
                        ulmfit_cli.recipe(ulmfit.LM_FINETUNE, phases['finetune']), settings, mesh=mesh,
                        start=runs['pretrain'].path)
    lm = runs['finetune'].path
  print(f'== training the classifier ({"from the fine-tuned language model" if lm else "random encoder"})', flush=True)
  history = ulmfit_cli.classifier_phase(phases['classifier'], runs['classifier'], (train, train_y, valid, valid_y, source),
                                        tokenizer, ulmfit_cli.recipe(ulmfit.CLASSIFIER, phases['classifier']), settings,
                                        mesh=mesh, lm=lm)
  if history:
    print(f'ulmfit: {time.perf_counter() - started:.0f} s in all (tokenizing included); '
          f'predict with: python scripts/predict.py --model {args.out} "some text"')
    print(f'accuracy={history[-1]["valid_accuracy"]:.4f}')
  return history


if __name__ == '__main__':
  arguments = parse_args()
  cli.start_jax(arguments)
  sys.exit(cli.run_script('ulmfit', lambda: main(arguments)))
