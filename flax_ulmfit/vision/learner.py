"""The vision recipe room: where XResNet, image batches and the training pieces meet.

fastai's vision recipe as plain pieces: `xresnet_split` (its parameter groups for XResNet),
`vision_loss` (mixup + label smoothing in training, label smoothing and accuracy in
evaluation), and `VisionLearner` with fastai's `freeze`/`unfreeze`, `fit_one_cycle` and
`fine_tune` (freeze, one epoch at `pct_start` 0.99, halve the rate, unfreeze,
`fit_one_cycle(epochs, slice(base_lr / 100, base_lr), pct_start=0.3, div=5)`) and `lr_find`,
each stage resumable from its checkpoints, and `save_xresnet` / `load_xresnet` for weights
under fastai's names with what rebuilding needs.
"""
from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_ulmfit import checkpoint, parallel
from flax_ulmfit.interop.xresnet import xresnet_to_flax, xresnet_to_torch
from flax_ulmfit.models.transfer import CNNModel, create_cnn_model
from flax_ulmfit.models.xresnet import XResNet, xresnet18, xresnet34, xresnet50, xresnet101, xresnet152
from flax_ulmfit.text.labels import PAD_LABEL
from flax_ulmfit.train import optim, precision, schedules
from flax_ulmfit.train.checkpoints import TrainCheckpoints, stage_directory
from flax_ulmfit.train.losses import cross_entropy, kept_mean, label_smoothing_cross_entropy
from flax_ulmfit.train.loop import Callback, fit
from flax_ulmfit.train.lr_find import LRFinderResult, lr_find
from flax_ulmfit.train.mixup import Mix, mix_inputs, mixup_loss, sample_mix
from flax_ulmfit.train.step import init_train_state, make_eval_step, make_train_step, update_model
from flax_ulmfit.vision.data import ImageLoader, Stats

XRESNET_GROUPS = ('stem', 'body', 'head')  # fastai's order: the first groups freeze first


def xresnet_split(params: Any) -> Any:
  """fastai's `_xresnet_split` as labels: 'stem' (the three stem ConvLayers), 'body' (the
  rest of the body), 'head' (everything after the body), for `XResNet` and `CNNModel` alike."""
  return optim.label_params(params, [('^body/stem/', 'stem'), ('^body/', 'body'), ('', 'head')])


def vision_loss(model, batch, rng: jax.Array | None, carry, *, mixup_alpha: float | None = 0.4,
                ls_eps: float = 0.1):
  """Loss of one image batch for `make_train_step` / `make_eval_step`.

  Training (`rng` given): fastai's `MixUp(mixup_alpha)` around `LabelSmoothingCrossEntropy(ls_eps)`:
  the inputs mixed with a permutation of the batch, the loss the per-sample lerp of both
  targets' losses (mixup off when `mixup_alpha` is None or 0). Evaluation (`rng` None): the
  label-smoothed loss and the accuracy. Rows labelled `PAD_LABEL` (the padding of a short
  last batch) count in neither; `count` weighs the batch in epoch averages.

  Args:
    model: an image classifier `model(x, **kwargs) -> logits`.
    batch: `(x, y)`; or `(x, y, mix)` with a given `Mix`; or `(x, y, mix, model_kwargs)`
      (e.g. explicit dropout masks), as parity tests give them.
    rng: the step's key (draws the mixup weights and permutation); None in evaluation.
    carry: passed through (image models carry nothing).
    mixup_alpha: Beta(alpha, alpha) of the mixup weights.
    ls_eps: label smoothing (0: plain cross-entropy).
  """
  x, y = batch[:2]
  mix = batch[2] if len(batch) > 2 else None
  model_kwargs = batch[3] if len(batch) > 3 else {}
  keep = y != PAD_LABEL
  y = jnp.where(keep, y, 0)
  per_sample = (functools.partial(label_smoothing_cross_entropy, eps=ls_eps, reduction='none') if ls_eps
                else functools.partial(cross_entropy, reduction='none'))
  if rng is not None and (mixup_alpha or mix is not None):
    mix = sample_mix(rng, x.shape[0], mixup_alpha) if mix is None else Mix(*mix)
    logits = model(mix_inputs(x, mix), **model_kwargs)
    losses = mixup_loss(per_sample, logits, y, mix, reduction='none')
  else:
    logits = model(x, **model_kwargs)
    losses = per_sample(logits, y)
  loss = kept_mean(losses, keep)  # over the global batch's real rows
  metrics = {'count': keep.sum()}
  if rng is None:
    metrics['accuracy'] = kept_mean(jnp.argmax(logits, -1) == y, keep)
  return loss, (carry, metrics)


def _lrs(lr: float | slice, groups: Sequence[str]) -> dict[str, float]:
  """fastai's reading of a learning rate for the groups: a float for all, `slice(hi)` hi/10 for
  all but the last, `slice(lo, hi)` geometric from lo to hi."""
  if isinstance(lr, slice):
    values = optim.discriminative_lrs(lr.stop, None, len(groups)) if lr.start is None else \
        optim.discriminative_lrs(lr.start, lr.stop, len(groups))
  else:
    values = [float(lr)] * len(groups)
  return dict(zip(groups, values))


class VisionLearner:
  """fastai's vision `Learner` for one model and its image loaders.

  Owns the model's weights between stages; every `fit_one_cycle` starts a fresh optimizer
  state (fastai clears it on `freeze`/`unfreeze`, the only way `fine_tune` changes stage).
  Parameter groups come from `splitter`; freezing the first groups leaves their norm layers
  training (fastai's `train_bn=True`), and XLA skips the frozen weights' gradients; biases
  and norm layers get no weight decay (`wd_bn_bias=False`).

  Args:
    model: an image classifier (`XResNet`, `CNNModel`), built with the policy's dtype.
    train_dl, valid_dl: image loaders (the validation one with the training `stats`).
    mixup_alpha, ls_eps: see `vision_loss`.
    wd: decoupled weight decay.
    splitter: params -> group labels.
    groups: the labels `splitter` gives, first group (frozen first) first.
    policy: 'fp32', 'bf16' or 'fp16' (fp16 adds dynamic loss scaling).
    mesh: a `parallel.data_mesh()` to split each batch over its devices, or None.
    seed: the run's key; each stage folds in its index.
    out: folder for each stage's log (`log.csv`, or `log-<name>.csv`) and plot; None writes none.
    callbacks: `fit` callbacks (`EarlyStopping`, `SaveBest`), for every stage.
    progress: tqdm bars.
    checkpoints: a folder for the training state: stage k (each `fit_one_cycle`, counted
      from 0) saves in `stage_directory(checkpoints, k, name)` after each epoch, every
      `save_every` steps and on Ctrl-C; None saves none.
    meta: JSON description of the run saved with every checkpoint (settings, classes);
      a checkpoint with another is refused.
    save_every: also save every this many steps of a stage.
    resume: each stage continues from its newest checkpoint (a finished stage returns its
      result at once), so rerunning the same calls continues a killed run exactly.
  """

  def __init__(self, model: nnx.Module, train_dl: ImageLoader, valid_dl: ImageLoader, *,
               mixup_alpha: float | None = 0.4, ls_eps: float = 0.1, wd: float = 0.01, splitter=xresnet_split,
               groups: Sequence[str] = XRESNET_GROUPS, policy: str = 'fp32', mesh=None, seed: int = 0, out: str | os.PathLike | None = None,
               callbacks: Sequence[Callback] = (), progress: bool = True,
               checkpoints: str | os.PathLike | None = None, meta: dict | None = None, save_every: int | None = None,
               resume: bool = False):
    self.model, self.train_dl, self.valid_dl = model, train_dl, valid_dl
    self.loss_fn = functools.partial(vision_loss, mixup_alpha=mixup_alpha, ls_eps=ls_eps)
    self.wd, self.policy, self.mesh, self.seed = wd, precision.get_policy(policy), mesh, seed
    self.out, self.callbacks, self.progress = (Path(out) if out is not None else None), callbacks, progress
    self.checkpoints = Path(checkpoints) if checkpoints is not None else None
    self.meta, self.save_every, self.resume = meta, save_every, resume
    if mesh is not None:
      parallel.check_divisible(train_dl.bs, mesh)
    params = nnx.state(model, nnx.Param)
    self.labels, self.groups = splitter(params), tuple(groups)
    if set(jax.tree.leaves(self.labels)) != set(self.groups):
      raise ValueError(f'VisionLearner: the splitter labels the parameters {sorted(set(jax.tree.leaves(self.labels)))}'
                       f' but groups are {self.groups}; pass the groups it uses, first group first')
    self.norms = optim.norm_mask(model, params)
    self.wd_mask = jax.tree.map(lambda exempt: not exempt, optim.bn_bias_mask(model, params))
    self.frozen: tuple[str, ...] = ()
    self.stages, self.epochs_done = 0, 0
    self.eval_step = make_eval_step(model, self.loss_fn, mesh=mesh)

  def freeze_to(self, n: int) -> None:
    """Freezes the groups before `n` (negative counts from the end); their norm layers still train."""
    self.frozen = tuple(self.groups[:n])

  def freeze(self) -> None:
    """Every group but the last frozen (fastai's `Learner.freeze`)."""
    self.freeze_to(-1)

  def unfreeze(self) -> None:
    self.freeze_to(0)

  def _optimizer(self, lrs: dict[str, float | optax.Schedule], mom: float | optax.Schedule):
    """fastai's Adam over the groups with the current freezing (and loss scaling for fp16)."""
    tx = optim.fastai_optimizer(self.labels, lrs, mom=mom, wd=self.wd, wd_mask=self.wd_mask, frozen=self.frozen,
                                train_mask=self.norms)
    return precision.torch_grad_scaler(tx) if self.policy.needs_loss_scaling else tx

  def _trained(self) -> Any:
    """True for the parameters the current freezing trains (`make_train_step(trained=)`)."""
    return optim.trained_mask(self.labels, self.frozen, self.norms)

  def fit_one_cycle(self, n_epoch: int, lr_max: float | slice = 1e-3, div: float = 25.0, div_final: float = 1e5,
                    pct_start: float = 0.25, moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
                    name: str | None = None) -> list[dict]:
    """fastai's `fit_one_cycle`; returns one record per epoch (see `train.loop.fit`).

    `lr_max`: a float for every group, `slice(hi)` or `slice(lo, hi)` (fastai's reading).
    `name` tells this stage's log and plot files apart (`log-<name>.csv`).
    """
    n_steps = n_epoch * len(self.train_dl)
    tx = self._optimizer({g: schedules.one_cycle(n_steps, v, div, div_final, pct_start)
                          for g, v in _lrs(lr_max, self.groups).items()},
                         schedules.one_cycle_moms(n_steps, moms, pct_start))
    state = init_train_state(self.model, tx)
    if self.mesh is not None:
      state = parallel.replicate(state, self.mesh)
    step = make_train_step(self.model, self.loss_fn, tx, mesh=self.mesh, trained=self._trained())
    first_epoch = self.epochs_done
    suffix = f'-{name}' if name else ''
    primary = jax.process_index() == 0  # several processes: all save the checkpoints (orbax), one writes the logs
    files = {} if self.out is None or not primary else {'log_path': self.out / f'log{suffix}.csv',
                                                         'plot_path': self.out / f'losses{suffix}.png'}
    checkpoints = None if self.checkpoints is None else \
        TrainCheckpoints(stage_directory(self.checkpoints, self.stages, name or 'fit'), self.meta)
    state, history = fit(step, state, lambda epoch: self.train_dl.batches(first_epoch + epoch), n_epoch,
                         rng=jax.random.fold_in(jax.random.key(self.seed), self.stages),
                         eval_step=self.eval_step, valid_data=self.valid_dl.batches, callbacks=self.callbacks,
                         progress=self.progress and primary, checkpoints=checkpoints, save_every=self.save_every,
                         resume=self.resume, log_group=self.groups[-1], **files)
    update_model(self.model, state)
    self.stages += 1
    self.epochs_done += len(history)
    return history

  def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1, lr_mult: float = 100,
                pct_start: float = 0.3, div: float = 5.0) -> list[dict]:
    """fastai's `fine_tune`: `freeze_epochs` with the body frozen (`slice(base_lr)`, pct_start
    0.99), then, at half the rate, `epochs` unfrozen with `slice(base_lr / 2 / lr_mult, base_lr / 2)`."""
    self.freeze()
    history = self.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99, name='frozen')
    base_lr /= 2
    self.unfreeze()
    return history + self.fit_one_cycle(epochs, slice(base_lr / lr_mult, base_lr), pct_start=pct_start, div=div)

  def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
              plot_path: str | os.PathLike | None = None) -> LRFinderResult:
    """fastai's `lr_find` with the current freezing: every trained group at the sweep's lr,
    momentum 0.9, `num_it` training batches (epochs 0, 1, ... as needed); the model is left unchanged."""
    epochs = (self.train_dl.batches(e) for e in itertools.count())
    return lr_find(self.model, self.loss_fn, lambda lr: self._optimizer({g: lr for g in self.groups}, 0.9),
                   itertools.islice(itertools.chain.from_iterable(epochs), num_it),
                   rng=jax.random.key(self.seed), start_lr=start_lr, end_lr=end_lr, num_it=num_it,
                   plot_path=plot_path, trained=self._trained())


ARCHS = {'xresnet18': xresnet18, 'xresnet34': xresnet34, 'xresnet50': xresnet50, 'xresnet101': xresnet101,
         'xresnet152': xresnet152}


def save_xresnet(path: str | os.PathLike, model: XResNet | CNNModel, arch: str, classes: Sequence[str],
                 stats: Stats) -> None:
  """Weights under fastai's state_dict names (.npz, atomic) with what rebuilding the model needs:
  arch, c_in, whether the head is XResNet's own or a transfer head, classes and the
  normalisation statistics."""
  checkpoint.save(path, xresnet_to_torch(model), {
      'arch': arch, 'c_in': model.body.c_in, 'head': 'transfer' if isinstance(model, CNNModel) else 'xresnet',
      'classes': list(classes), 'stats': {'mean': [float(v) for v in stats.mean], 'std': [float(v) for v in stats.std]}})


def load_xresnet(path: str | os.PathLike, *, dtype=None, conv_impl: str = 'auto') -> tuple[XResNet | CNNModel, dict]:
  """The model `save_xresnet` wrote (an `XResNet`, or a `CNNModel` with fastai's default head), and its
  metadata (`meta['stats']` as `Stats`: normalise new data with them, as fastai does for a pretrained model)."""
  meta = checkpoint.metadata(path)
  missing = sorted({'arch', 'c_in', 'head', 'classes', 'stats'} - set(meta))
  if missing or meta['arch'] not in ARCHS or meta['head'] not in ('xresnet', 'transfer'):
    raise ValueError(f'load_xresnet: {str(path)!r} was not written by save_xresnet (its metadata lacks {missing} '
                     f'or names an unknown arch or head: {meta.get("arch")!r}, {meta.get("head")!r})')
  rngs = nnx.Rngs(jax.random.key(0, impl='rbg'))  # the weights are overwritten; rbg builds fastest
  n_out = len(meta['classes'])
  model = ARCHS[meta['arch']](c_in=meta['c_in'], n_out=n_out, dtype=dtype, conv_impl=conv_impl, rngs=rngs)
  if meta['head'] == 'transfer':
    model = create_cnn_model(model, n_out, dtype=dtype, rngs=rngs)
  state_dict, _ = checkpoint.load(path, xresnet_to_torch(model))
  meta['stats'] = Stats(*(np.asarray(meta['stats'][k], np.float32) for k in ('mean', 'std')))
  return xresnet_to_flax(state_dict, model), meta
