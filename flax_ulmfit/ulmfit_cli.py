"""What the ULMFiT scripts share: their data flags (embedded BBC News, CSV, folder per class,
IMDb), the train/valid split, text preparation, model sizes and per-stage epochs and rates.

Imports no JAX at import time (`cli.use_devices` must run first).
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

from flax_ulmfit import cli

# AWD-LSTM sizes (emb_sz, n_hid, n_layers) over fastai's awd_lstm_*_config
SIZES = {'tiny': dict(emb_sz=16, n_hid=32, n_layers=2),  # a smoke test
         'small': dict(emb_sz=400, n_hid=400, n_layers=3), 'fastai': {}}


def add_size_arg(group, default: str) -> None:
  group.add_argument('--size', choices=sorted(SIZES), default=default,
                     help="AWD-LSTM size: tiny 16/32/2; small 400/400/3; fastai: awd_lstm_lm_config's 400/1152/3")
  group.add_argument('--emb-sz', type=cli.positive_int, help='embedding size (overrides --size)')
  group.add_argument('--n-hid', type=cli.positive_int, help='hidden size of the inner LSTM layers (overrides --size)')
  group.add_argument('--n-layers', type=cli.positive_int, help='LSTM layers (overrides --size)')


def sizes(args: argparse.Namespace) -> dict:
  """`{emb_sz, n_hid, n_layers}` from --size and its overrides."""
  from flax_ulmfit.models import awd_lstm_lm_config
  chosen = dict(awd_lstm_lm_config, **SIZES[args.size])
  return {k: getattr(args, k) or chosen[k] for k in ('emb_sz', 'n_hid', 'n_layers')}


def add_labelled_args(parser: argparse.ArgumentParser) -> None:
  """Where the labelled texts come from and how they split into train and valid."""
  data = parser.add_argument_group('data (default: the embedded BBC News, 2,225 articles, 5 classes)')
  source = data.add_mutually_exclusive_group()
  source.add_argument('--csv', type=cli.existing_file, help='a CSV/TSV file with a header (see --text-col, --label-col)')
  source.add_argument('--folder', type=Path, help='a folder of <class>/*.txt (or train/ and valid/ holding them)')
  source.add_argument('--imdb', type=Path, help="the IMDb folder (train/ and test/ with neg/ and pos/); valid = test")
  data.add_argument('--text-col', default='text', help='--csv: the text column')
  data.add_argument('--label-col', default='label', help='--csv: the label column')
  data.add_argument('--valid-pct', type=cli.fraction, default=0.2,
                    help='share of the texts held out for validation (when the data has no valid split)')
  data.add_argument('--split-seed', type=cli.nonnegative_int, default=42,
                    help='valid = numpy.random.RandomState(SEED).permutation(n)[:round(n * valid_pct)]')
  data.add_argument('--max-chars', type=cli.positive_int, metavar='N',
                    help='read only the first N characters of each text (none: whole texts); saved with the '
                         'classifier: predict.py does the same')
  data.add_argument('--train-chars', type=cli.positive_int, metavar='N',
                    help='train on the first N characters of each text only, at most --max-chars (a language model '
                         'reads them for validation too); the classifier is validated on, and predict.py reads, '
                         '--max-chars (none: training reads --max-chars too)')


def add_direction_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--backwards', action='store_true',
                      help="read every text from its end (fastai's backwards=True; saved with the model); a backward "
                           "classifier's predictions average with a forward one's: predict.py --model FORWARD --model BACKWARD")


def _check_direction(folder, info: dict, backwards: bool) -> None:
  """A language model and the model built on it read texts in the same direction."""
  built_backwards = info.get('backwards', False)
  if built_backwards != backwards:
    read = 'backwards' if built_backwards else 'forwards'
    raise ValueError(f'{folder}: that language model reads texts {read}; '
                     + ('drop --backwards' if read == 'forwards' else 'add --backwards') + ' to build on it')


def add_export_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--export-fastai', action='store_true',
                      help="also write model/lm.pth, lm.pkl (fastai's load_pretrained) and encoder.pth (load_encoder); needs torch")


def add_vocab_args(parser: argparse.ArgumentParser) -> None:
  vocab = parser.add_argument_group('vocabulary (built from the training texts)')
  vocab.add_argument('--min-freq', type=cli.positive_int, default=3, help='minimum token count')
  vocab.add_argument('--max-vocab', type=cli.at_least(9), default=60000, help='maximum size (9 special tokens included)')


# Each phase's defaults: fastai's recipes (flax_ulmfit.ulmfit's presets), here so --help needs no JAX.
PRETRAIN = dict(stages=('all',), drop_mult=1.0, epochs=[1], lrs=[5e-3], bs=32, bptt=72, wd=0.01, clip=0.25)
FINETUNE = dict(stages=('frozen', 'unfrozen'), drop_mult=0.3, epochs=[1, 10], lrs=[2e-2, 2e-3], bs=128, bptt=80,
                wd=0.01, clip=0.0)
CLASSIFIER = dict(stages=('head', 'last_two', 'last_three', 'all'), drop_mult=0.5, epochs=[1, 1, 1, 2],
                  lrs=[2e-2, 1e-2, 5e-3, 1e-3], bs=64, bptt=72, max_len=1440, wd=0.01, clip=0.0)


def add_training_args(group, defaults: dict, prefix: str = '') -> None:
  """A phase's model and training flags, `--{prefix}epochs`, `--{prefix}lr(s)`, `--{prefix}bs`, ...
  (one epoch count and rate per stage; `--lr` for a single stage)."""
  stages = defaults['stages']
  group.add_argument(f'--{prefix}drop-mult', type=cli.nonnegative_float, default=defaults['drop_mult'],
                     help='scales every dropout probability')
  if len(stages) == 1:
    group.add_argument(f'--{prefix}epochs', type=cli.positive_int, default=defaults['epochs'][0])
    group.add_argument(f'--{prefix}lr', type=cli.positive_float, default=defaults['lrs'][0], help='peak of the one-cycle schedule')
  else:
    group.add_argument(f'--{prefix}epochs', type=cli.nonnegative_int, nargs=len(stages), metavar='N',
                       default=defaults['epochs'], help=f'epochs of each stage ({" ".join(stages)}); 0 skips a stage')
    group.add_argument(f'--{prefix}lrs', type=cli.positive_float, nargs=len(stages), metavar='LR', default=defaults['lrs'],
                       help='peak rate of each stage (discriminative stages: of the last group; the others get lr / 2.6**k)')
  group.add_argument(f'--{prefix}bs', type=cli.positive_int, default=defaults['bs'], help='batch size')
  group.add_argument(f'--{prefix}bptt', type=cli.positive_int, default=defaults['bptt'], help='tokens read at a time')
  if 'max_len' in defaults:
    group.add_argument(f'--{prefix}max-len', type=cli.positive_int, default=defaults['max_len'],
                       help='pool over the last MAX_LEN tokens of each text (a multiple of the bptt)')
  group.add_argument(f'--{prefix}wd', type=cli.nonnegative_float, default=defaults['wd'],
                     help='decoupled weight decay (not on biases or BatchNorm)')
  group.add_argument(f'--{prefix}clip', type=cli.nonnegative_float, default=defaults['clip'],
                     help='global-norm gradient clipping; 0: none')


def phase_args(args: argparse.Namespace, prefix: str = '') -> argparse.Namespace:
  """`args` with the `--{prefix}...` flags under their plain names (epochs, lrs, bs, ...);
  a single `lr` becomes `lrs=[lr]`, a single `epochs` `[epochs]`. Checks them (ValueError)."""
  key = prefix.replace('-', '_')
  plain = {name[len(key):]: value for name, value in vars(args).items() if key and name.startswith(key)}
  out = argparse.Namespace(**{**vars(args), **plain})
  if not isinstance(out.epochs, list):  # a single stage: --epochs N --lr LR
    out.epochs, out.lrs = [out.epochs], [out.lr]
  if not any(out.epochs):
    raise ValueError(f'--{prefix}epochs: at least one stage must train, got {out.epochs}')
  if getattr(out, 'max_len', None) is not None and out.max_len % out.bptt:
    raise ValueError(f'--{prefix}max-len {out.max_len} must be a multiple of --{prefix}bptt {out.bptt}')
  return out


def parsed_phase(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
  """A one-phase script's `phase_args(args)`, its run flags checked (errors exit through `parser.error`)."""
  if getattr(args, 'export_fastai', False) and importlib.util.find_spec('torch') is None:
    parser.error('--export-fastai writes torch files: pip install torch (or "flax_ulmfit[torch]")')
  try:
    args = phase_args(args)
  except ValueError as err:
    parser.error(str(err))
  cli.check_run_args(parser, args, args.bs)
  return args


def recipe(preset, args: argparse.Namespace):
  """`preset` (a `ulmfit.Recipe`) with the phase's epochs, rates, dropout, wd, clip, bs and bptt."""
  from flax_ulmfit import ulmfit
  return ulmfit.with_stages(preset, args.epochs, args.lrs, drop_mult=args.drop_mult, wd=args.wd,
                            clip=args.clip or None, bs=args.bs, seq_len=args.bptt)


def split(n: int, valid_pct: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, valid) indices: `perm = RandomState(seed).permutation(n)`, the first
  `round(n * valid_pct)` valid (at least one), the rest train."""
  perm = np.random.RandomState(seed).permutation(n)
  n_valid = max(1, round(n * valid_pct))
  if n - n_valid < 1:
    raise ValueError(f'{n} text(s) cannot be split into train and valid; give more texts')
  return perm[n_valid:], perm[:n_valid]


def train_chars(args: argparse.Namespace) -> int | None:
  """How many first characters of each text training reads: --train-chars, else --max-chars.
  Raises ValueError if training would read more than validation and prediction."""
  if args.train_chars is None:
    return args.max_chars
  if args.max_chars is not None and args.train_chars > args.max_chars:
    raise ValueError(f'--train-chars {args.train_chars} exceeds --max-chars {args.max_chars}: training would read '
                     'more of each text than validation and predict.py; lower --train-chars or raise --max-chars')
  return args.train_chars


def read_labelled(args: argparse.Namespace) -> tuple[list[str], list[str], list[str], list[str], str]:
  """`(train_texts, train_labels, valid_texts, valid_labels, source)` from the data flags:
  training texts cut to `train_chars(args)`, validation texts to `--max-chars`."""
  from flax_ulmfit.exports import preprocess
  from flax_ulmfit.text import corpora
  if args.imdb is not None:
    (train, train_y), (valid, valid_y) = corpora.read_imdb(args.imdb, 'train'), corpora.read_imdb(args.imdb, 'test')
    source = f'IMDb {args.imdb}'
  elif args.folder is not None and (args.folder / 'train').is_dir() and (args.folder / 'valid').is_dir():
    train, train_y = corpora.read_folder(args.folder / 'train')
    valid, valid_y = corpora.read_folder(args.folder / 'valid', classes=sorted(set(train_y)))
    source = str(args.folder)
  else:
    if args.csv is not None:
      texts, labels = corpora.read_csv(args.csv, args.text_col, args.label_col)
      source = str(args.csv)
    elif args.folder is not None:
      texts, labels = corpora.read_folder(args.folder)
      source = str(args.folder)
    else:
      texts, labels = corpora.bbc_news()
      source = 'BBC News (embedded)'
    if not texts:
      raise ValueError(f'no text in {source}')
    train_idx, valid_idx = split(len(texts), args.valid_pct, args.split_seed)
    train, train_y = [texts[i] for i in train_idx], [labels[i] for i in train_idx]
    valid, valid_y = [texts[i] for i in valid_idx], [labels[i] for i in valid_idx]
    source += f' (valid: {args.valid_pct:g} of the texts, split seed {args.split_seed})'
  return preprocess(train, train_chars(args)), train_y, preprocess(valid, args.max_chars), valid_y, source


def lm_valid_texts(valid: list[str], args: argparse.Namespace) -> list[str]:
  """A language model's validation texts from `read_labelled`'s: cut as its training texts are,
  to `train_chars(args)` (the language model is part of training; its validation is its perplexity)."""
  from flax_ulmfit.exports import preprocess
  return preprocess(valid, train_chars(args))


def pretrain_recipe(args: argparse.Namespace):
  """pretrain_lm.py's recipe: fastai's language-model training in one stage (Adam eps 1e-5,
  one-cycle with div 25, momentum 0.8/0.7/0.8) with the phase's rate, epochs, dropout, wd, clip."""
  from flax_ulmfit import ulmfit
  return recipe(ulmfit.Recipe(stages=(ulmfit.Stage('all', 1, 5e-3, freeze_to=0),), drop_mult=1.0), args)


def split_texts(texts: list[str], valid_pct: float, seed: int) -> tuple[list[str], list[str]]:
  """A language model's (train, valid) texts: `split`'s rule over `texts`."""
  train, valid = split(len(texts), valid_pct, seed)
  return [texts[i] for i in train], [texts[i] for i in valid]


def _lr_find(model, split_, recipe, loss_fn, batches, args, run, init_carry=None) -> None:
  from flax_ulmfit import ulmfit
  result = ulmfit.stage_lr_find(model, split_, recipe, 0, loss_fn, batches, seed=args.seed, init_carry=init_carry,
                                plot_path=run.lr_find_plot)
  print(f'lr_find ({recipe.stages[0].name!r} stage): valley {result.suggestion:.2e} (plot: {run.lr_find_plot})')


def lm_phase(args: argparse.Namespace, run: cli.RunFolder, train_texts: list[str], valid_texts: list[str],
             tokenizer, recipe, settings: dict, mesh=None, start=None) -> list[dict]:
  """Trains a language model through `recipe` on the texts and exports it to `run.model`.

  `start`: None (random weights, config from `args.size`), a model folder (`exports.save_lm`'s)
  whose weights are moved onto the new vocabulary (`match_embeds`), or `(weights, itos)`,
  fastai's files (`ulmfit.load_pretrained`). Uses args: min_freq, max_vocab, size, drop_mult,
  bs, bptt, backwards, precision, seed, save_every, resume, lr_find, export_fastai (optional)."""
  from flax import nnx

  from flax_ulmfit import exports, parallel, ulmfit
  from flax_ulmfit.interop import flax_to_torch, torch_to_flax
  from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config
  from flax_ulmfit.text import Vocab
  from flax_ulmfit.text.data import LMLoader
  from flax_ulmfit.train import precision
  from flax_ulmfit.train.lm import lm_loss

  train_tokens, valid_tokens = (exports.model_tokens(t, tokenizer, backwards=args.backwards)
                                for t in (train_texts, valid_texts))
  vocab = Vocab.from_tokens(train_tokens, max_vocab=args.max_vocab, min_freq=args.min_freq, tokenizer=tokenizer.name)
  dtype = precision.get_policy(args.precision).compute_dtype
  rngs = nnx.Rngs(params=args.seed, dropout=args.seed + 1)
  if isinstance(start, tuple):
    config = dict(awd_lstm_lm_config, **sizes(args))
    lm = ulmfit.load_pretrained(LanguageModel(len(vocab), config, args.drop_mult, dtype=dtype, rngs=rngs), *start, vocab)
    print(f'language model: fastai weights {start[0]} moved onto the new vocabulary')
  elif start is not None:
    old, old_vocab, info = exports.load_lm(start)
    _check_direction(start, info, args.backwards)
    config = info['config']
    lm = LanguageModel(len(vocab), config, args.drop_mult, dtype=dtype, rngs=rngs)
    torch_to_flax(ulmfit.match_embeds(flax_to_torch(old), old_vocab, vocab), lm)
    known = len(set(old_vocab.itos) & set(vocab.itos))
    print(f'language model: {start} ({len(old_vocab):,} tokens) moved onto the new vocabulary ({known:,} of '
          f'{len(vocab):,} tokens known)')
  else:
    config = dict(awd_lstm_lm_config, **sizes(args))
    lm = LanguageModel(len(vocab), config, args.drop_mult, dtype=dtype, rngs=rngs)
  too_high = {k: p * args.drop_mult for k, p in config.items() if k.endswith('_p') and p * args.drop_mult >= 1}
  if too_high:
    raise ValueError(f'--drop-mult {args.drop_mult} makes dropout probabilities >= 1: {too_high}')
  rows = parallel.process_rows(args.bs, mesh)  # this process's streams
  train_dl = LMLoader([vocab.numericalize(t) for t in train_tokens], args.bs, args.bptt, seed=args.seed, rows=rows)
  valid_dl = LMLoader([vocab.numericalize(t) for t in valid_tokens], args.bs, args.bptt, shuffle=False, rows=rows)
  print(f'{len(train_texts):,} train / {len(valid_texts):,} valid texts, {sum(map(len, train_tokens)):,} train tokens, '
        f'vocab {len(vocab):,}, {len(train_dl)} batches of {args.bs}x{args.bptt} per epoch', flush=True)
  if args.lr_find:
    _lr_find(lm, ulmfit.awd_lstm_lm_split(config['n_layers']), recipe, lm_loss, [b for _, b in zip(range(100), train_dl.batches(0))],
             args, run, init_carry=lambda batch: lm.zero_state(batch[0].shape[0]))
    return []
  history = ulmfit.train_lm(lm, train_dl, valid_dl, recipe, precision=args.precision, mesh=mesh, seed=args.seed,
                            out=run.path, save_every=args.save_every, resume=args.resume,
                            progress=cli.show_progress(args),
                            meta={'settings': settings, 'config': config, 'vocab': vocab.itos})
  if cli.is_primary():  # several processes: process 0 alone writes the model, the others wait for it
    with run.export() as stage:
      exports.save_lm(stage, lm, vocab, config, backwards=args.backwards, settings=settings, history=history)
      if getattr(args, 'export_fastai', False):  # lm.pth + lm.pkl (fastai's load_pretrained), encoder.pth (load_encoder)
        ulmfit.save_pretrained(lm, vocab, stage / 'lm')
        ulmfit.save_encoder(lm, stage / 'encoder.pth')
  cli.wait_for_all(f'{run.model} written')
  last = history[-1]
  print(f'language model: valid loss {last["valid_loss"]:.4f}, perplexity {last["perplexity"]:.1f}; weights, '
        f'vocabulary and config in {run.model}/, logs and plots in {run.path}/', flush=True)
  return history


def classifier_phase(args: argparse.Namespace, run: cli.RunFolder, data, tokenizer, recipe, settings: dict,
                     mesh=None, lm=None) -> list[dict]:
  """Trains a text classifier through `recipe` and exports it to `run.model` (what
  `predict.py --model` reads). `data`: `read_labelled`'s tuple; `lm`: a language model's
  folder whose vocabulary and encoder it starts from (None: a random encoder of `sizes(args)`,
  vocabulary from the training texts). Uses args: min_freq, max_vocab, size, drop_mult, bs,
  bptt, max_len, max_chars, backwards, precision, seed, save_every, resume, lr_find."""
  from flax_ulmfit import exports, parallel, ulmfit
  from flax_ulmfit.interop import flax_to_torch, load_encoder
  from flax_ulmfit.text import Vocab
  from flax_ulmfit.text.data import ClasLoader
  from flax_ulmfit.text.labels import CategoryMap
  from flax_ulmfit.train import precision
  from flax_ulmfit.train.clas import clas_loss

  train_texts, train_y, valid_texts, valid_y, source = data
  labels = CategoryMap.from_labels(train_y)
  train_tokens, valid_tokens = (exports.model_tokens(t, tokenizer, backwards=args.backwards)
                                for t in (train_texts, valid_texts))
  encoder = None
  if lm is not None:
    lm_model, vocab, info = exports.load_lm(lm)
    _check_direction(lm, info, args.backwards)
    if vocab.tokenizer != tokenizer.name:
      raise ValueError(f'{lm}: its vocabulary was made by tokenizer {vocab.tokenizer!r}, not {tokenizer.name!r}')
    shape, encoder = {k: info['config'][k] for k in ('emb_sz', 'n_hid', 'n_layers')}, flax_to_torch(lm_model.encoder)
  else:
    vocab = Vocab.from_tokens(train_tokens, max_vocab=args.max_vocab, min_freq=args.min_freq, tokenizer=tokenizer.name)
    shape = sizes(args)
  arch = {'config': shape, 'drop_mult': args.drop_mult, 'seq_len': args.bptt, 'max_len': args.max_len}
  clf = exports.build_classifier(len(vocab), len(labels), arch, dtype=precision.get_policy(args.precision).compute_dtype,
                                 seed=args.seed)
  if encoder is not None:
    load_encoder(encoder, clf)
  # With a mesh: this process's rows of every batch; validation's short last batch padded to bs
  # (rows that count in no metric) so that it too splits over the devices.
  rows = parallel.process_rows(args.bs, mesh)
  train_dl = ClasLoader([vocab.numericalize(t) for t in train_tokens], labels.encode(train_y), args.bs, args.bptt,
                        seed=args.seed, rows=rows)
  valid_dl = ClasLoader([vocab.numericalize(t) for t in valid_tokens], labels.encode(valid_y, 'valid labels'), args.bs,
                        args.bptt, shuffle=False, pad_last=mesh is not None, rows=rows)
  print(f'{source}: {len(train_texts):,} train / {len(valid_texts):,} valid texts, {len(labels)} classes '
        f'{labels.classes}, vocab {len(vocab):,}, encoder {"from " + str(lm) if lm else "random"}, '
        f'{len(train_dl)} batches of {args.bs} per epoch', flush=True)
  if args.lr_find:
    _lr_find(clf, ulmfit.awd_lstm_clas_split(shape['n_layers']), recipe, clas_loss,
             [b for _, b in zip(range(100), train_dl.batches(0))], args, run)
    return []
  history = ulmfit.train_classifier(clf, train_dl, valid_dl, recipe, precision=args.precision, mesh=mesh,
                                    seed=args.seed, out=run.path, save_every=args.save_every, resume=args.resume,
                                    progress=cli.show_progress(args),
                                    meta={'settings': settings, 'arch': arch, 'vocab': vocab.itos,
                                          'labels': labels.classes})
  if cli.is_primary():
    with run.export() as stage:
      preprocess = {'max_chars': args.max_chars, 'backwards': args.backwards}
      exports.save_classifier(stage, clf, vocab, labels, arch, preprocess, settings=settings, history=history)
  cli.wait_for_all(f'{run.model} written')
  print(f'classifier: valid accuracy {history[-1]["valid_accuracy"]:.4f}; weights, vocabulary, labels and config in '
        f'{run.model}/ (python scripts/predict.py --model {run.path} "some text")', flush=True)
  return history
