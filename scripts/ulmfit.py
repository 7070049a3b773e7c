"""ULMFiT end to end: pretrain a language model, fine-tune it on the task's texts, train the
classifier; forward and backward (fastai's backwards=True), their predictions averaged.

With no arguments, the embedded demo: an AWD-LSTM language model pretrained on the Wikipedia
sample (gensim's test data), fine-tuned on the training texts of BBC News (2,225 articles,
5 classes; valid = numpy.random.RandomState(42).permutation(2225)[:445], on which the
language model only measures its perplexity), then the classifier trained with gradual
unfreezing; all of it once reading the texts forwards and once backwards (--direction).
Training reads the first 1,000 characters of each article (--train-chars); the classifiers
are validated on whole articles (--max-chars), as predict.py reads them.
Prints a table per stage (losses, perplexity, accuracy), each direction's accuracy and last
`accuracy=<validation accuracy of the mean of their class probabilities>`.
--no-pretrain trains the same classifiers from random encoders (the transfer gain); --quick
runs the same stages on a fraction of the data for a first look.

--out holds one run per direction, forward/ and backward/, each the classifier's run
(checkpoints/, log-<i>-<stage>.csv, losses-<i>-<stage>.png, model/) with the language
model's two runs in pretrain/ and finetune/ (each with its model/); and model/, the
classifiers together: what `predict.py --model OUT` reads. --resume continues a stopped run
in whichever direction and stage it stopped; --lr-find runs the learning-rate finder of the
first direction's pretraining stage instead.

  python scripts/ulmfit.py                      # the demo
  python scripts/ulmfit.py --no-pretrain        # the same classifiers without the language model
  python scripts/predict.py --model runs/ulmfit "Shares in the bank fell 5% after its results."
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flax_ulmfit import atomic, cli, ulmfit_cli  # import no JAX: --devices must be set first

# The demo's configuration: every default of this script is here.
# Measured on 2 cores (docs/ulmfit.md): training reads the first 1,000 characters of each
# article (validation and predict.py the whole article), a 200/400/2 AWD-LSTM, vocabularies
# of at most 12,000 tokens.
DEMO = dict(
    size=dict(emb_sz=200, n_hid=400, n_layers=2), train_chars=1000, max_vocab=12000, precision='fp32',
    pretrain=dict(ulmfit_cli.PRETRAIN, drop_mult=0.5, epochs=[2], lrs=[1e-2], bs=32, bptt=72, wd=0.01, clip=0.25),
    finetune=dict(ulmfit_cli.FINETUNE, drop_mult=0.3, epochs=[1, 4], lrs=[2e-2, 5e-3], bs=32, bptt=72),
    classifier=dict(ulmfit_cli.CLASSIFIER, drop_mult=0.5, epochs=[1, 1, 1, 4], lrs=[2e-2, 1e-2, 5e-3, 2e-3], bs=32,
                    bptt=72, max_len=1440),
)
# --quick: the same stages on the first PRETRAIN_DOCS Wikipedia articles and a FRACTION of
# the task's train and valid texts.
QUICK = dict(pretrain_docs=20, fraction=0.25)
PHASES = (('pretrain', 'pretrain-'), ('finetune', 'lm-'), ('classifier', 'clas-'))
DIRECTIONS = {'forward': ('forward',), 'backward': ('backward',), 'both': ('forward', 'backward')}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--no-pretrain', action='store_true',
                      help='no language model: the classifier starts from a random encoder (the transfer gain)')
  parser.add_argument('--direction', choices=sorted(DIRECTIONS), default='both',
                      help='read the texts forwards, backwards, or both (two models, their probabilities averaged)')
  parser.add_argument('--quick', action='store_true',
                      help=f'the same stages on {QUICK["fraction"]:g} of the texts and {QUICK["pretrain_docs"]} '
                           'Wikipedia articles: a first look in a few minutes')
  ulmfit_cli.add_labelled_args(parser)
  parser.set_defaults(train_chars=DEMO['train_chars'])
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
  train, train_y, valid, valid_y, source = ulmfit_cli.read_labelled(args)
  if args.quick:
    train, train_y, valid, valid_y = (_first(x, QUICK['fraction']) for x in (train, train_y, valid, valid_y))
    source += f', --quick: the first {QUICK["fraction"]:g} of each'
  directions = DIRECTIONS[args.direction]
  runs = {direction: direction_runs(args.out / direction, args.no_pretrain) for direction in directions}
  for direction, folders in runs.items():  # every refusal (a run without --resume, other settings) before any work
    for run in folders.values():
      cli.open_run(run, direction_args(args, direction), 'ulmfit.py')
  if cli.is_primary():
    atomic.recover_folder(args.out / 'model')  # an export killed between its renames
  mesh = cli.device_mesh(args.devices)
  from flax_ulmfit.text import Tokenizer, corpora
  tokenizer = Tokenizer(cache_dir=args.out / 'token_cache', progress=cli.show_progress(args))
  wiki = None
  if not args.no_pretrain:
    wiki = corpora.read_wikitext(args.wikitext) if args.wikitext else corpora.wikipedia_sample()
    if args.quick:
      wiki = wiki[:QUICK['pretrain_docs']]
  accuracies = {}
  for direction in directions:
    history = train_direction(direction, {name: direction_args(phase, direction) for name, phase in phases.items()},
                              runs[direction], (train, train_y, valid, valid_y, source), wiki, tokenizer,
                              cli.settings(direction_args(args, direction)), mesh)
    if args.lr_find:
      return []
    accuracies[direction] = history[-1]['valid_accuracy']
  accuracy = export_models(args.out, {d: runs[d]['classifier'] for d in directions}, valid, valid_y, tokenizer)
  print(f'ulmfit: {time.perf_counter() - started:.0f} s in all (tokenizing included); '
        f'predict with: python scripts/predict.py --model {args.out} "some text"')
  print('validation accuracy: ' + ', '.join(f'{d} {a:.4f}' for d, a in accuracies.items())
        + (f', both (mean of their probabilities) {accuracy:.4f}' if len(directions) > 1 else ''))
  print(f'accuracy={accuracy:.4f}')
  return history


def direction_args(args: argparse.Namespace, direction: str) -> argparse.Namespace:
  """`args` as one direction's runs see them: `backwards` instead of `direction`, so that a
  direction's runs (and their --resume settings) do not depend on whether the other is trained."""
  own = {key: value for key, value in vars(args).items() if key != 'direction'}
  return argparse.Namespace(**own, backwards=direction == 'backward')


def direction_runs(out: Path, no_pretrain: bool) -> dict[str, cli.RunFolder]:
  """One direction's run folders: the classifier's at `out`, the language model's inside it."""
  runs = {'classifier': cli.RunFolder(out)}
  if not no_pretrain:
    runs |= {'pretrain': cli.RunFolder(out / 'pretrain'), 'finetune': cli.RunFolder(out / 'finetune')}
  return runs


def train_direction(direction: str, phases: dict, runs: dict, data: tuple, wiki: list[str] | None, tokenizer,
                    settings: dict, mesh) -> list[dict]:
  """ULMFiT's three phases reading the texts in one direction (no language model without `wiki`);
  the classifier's history (empty after --lr-find)."""
  from flax_ulmfit import ulmfit
  train, _, valid, _, source = data
  lm = None
  if wiki is not None:
    print(f'== {direction}: pretraining the language model on {len(wiki)} Wikipedia articles', flush=True)
    pretrain = phases['pretrain']
    wiki_train, wiki_valid = ulmfit_cli.split_texts(wiki, pretrain.pretrain_valid_pct, pretrain.seed)
    ulmfit_cli.lm_phase(pretrain, runs['pretrain'], wiki_train, wiki_valid, tokenizer,
                        ulmfit_cli.pretrain_recipe(pretrain), settings, mesh=mesh)
    if pretrain.lr_find:
      return []
    valid = ulmfit_cli.lm_valid_texts(valid, phases['finetune'])
    print(f'== {direction}: fine-tuning the language model on the {len(train):,} training texts of {source}', flush=True)
    ulmfit_cli.lm_phase(phases['finetune'], runs['finetune'], train, valid, tokenizer,
                        ulmfit_cli.recipe(ulmfit.LM_FINETUNE, phases['finetune']), settings, mesh=mesh,
                        start=runs['pretrain'].path)
    lm = runs['finetune'].path
  print(f'== {direction}: training the classifier ({"from the fine-tuned language model" if lm else "random encoder"})',
        flush=True)
  return ulmfit_cli.classifier_phase(phases['classifier'], runs['classifier'], data, tokenizer,
                                     ulmfit_cli.recipe(ulmfit.CLASSIFIER, phases['classifier']), settings, mesh=mesh,
                                     lm=lm)


def export_models(out: Path, classifiers: dict[str, cli.RunFolder], valid: list[str], valid_y: list[str],
                  tokenizer) -> float:
  """Writes `out/model/`, the directions' classifiers together (process 0; the others wait),
  and returns its validation accuracy: read back as predict.py reads it."""
  import numpy as np

  from flax_ulmfit import exports
  if cli.is_primary():
    with atomic.replace_folder(out / 'model') as stage:
      exports.save_ensemble(stage, {name: run.model for name, run in classifiers.items()})
  cli.wait_for_all(f'{out / "model"} written')
  models = exports.load_classifiers(out)
  probs = exports.predict_texts(models, valid, tokenizer)
  return float(np.mean(probs.argmax(1) == models[0][2].encode(valid_y, 'valid labels')))


if __name__ == '__main__':
  arguments = parse_args()
  cli.start_jax(arguments)
  sys.exit(cli.run_script('ulmfit', lambda: main(arguments)))
