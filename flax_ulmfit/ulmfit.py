"""ULMFiT's recipe room: where the models, the text pipeline and the training pieces meet.

- Vocabulary transfer: `match_embeds` (fastai's), `load_pretrained` (fastai's published or
  exported AWD-LSTM language model onto a new vocabulary), `save_pretrained` and
  `save_encoder` (files fastai's `load_pretrained` and `load_encoder` accept).
- Parameter groups as fastai's splitters: `awd_lstm_lm_split`, `awd_lstm_clas_split`.
- The stages as data: `Stage`, `Recipe` and the presets `LM_PRETRAIN`, `LM_FINETUNE`,
  `CLASSIFIER`; `stage_optimizers` turns a recipe into one optax optimizer per stage, built
  as fastai's `Learner` builds it (`freeze_to`, discriminative rates, one-cycle with text
  momentum, weight decay except norm layers and biases, clipping).

- The stages as runners: `run_recipe` (any model, split and loss), `train_lm` (pretraining
  or fine-tuning a language model) and `train_classifier` (gradual unfreezing), each stage a
  `fit` with checkpoints, so a run killed in any stage resumes exactly; `stage_lr_find`.

Each stage starts from fresh optimizer state, because fastai's `Learner.freeze_to`,
`freeze` and `unfreeze` end with `opt.clear_state()` (pinned against fastai itself in
parity_tests/test_ulmfit_stages.py). A stage runner is a short loop:

  split = awd_lstm_clas_split(3)
  labels = optim.label_params(nnx.state(model, nnx.Param), split.rules)
  for stage, tx in stage_optimizers(model, split, CLASSIFIER, len(train_dl)):
    state = state._replace(opt_state=tx.init(state.params))   # fastai's clear_state
    trained = optim.trained_mask(labels, frozen_groups(split.groups, stage.freeze_to))
    state, history = fit(make_train_step(model, loss_fn, tx, trained=trained), state, train_dl,
                         stage.epochs, log_group=split.groups[-1], ...)  # the head's lr, as fastai logs it

References:
  Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification", 2018.
"""
from __future__ import annotations

import functools
import math
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

from flax_ulmfit.interop import flax_to_torch, torch_to_flax
from flax_ulmfit.interop._checks import as_numpy
from flax_ulmfit.interop.fastai_files import read_itos, read_state_dict, write_pretrained, write_state_dict
from flax_ulmfit import parallel
from flax_ulmfit.models.awd_lstm import AWDLSTM, LanguageModel
from flax_ulmfit.models.classifier import TextClassifier
from flax_ulmfit.train import optim, schedules
from flax_ulmfit.train import precision as mixed
from flax_ulmfit.train.checkpoints import TrainCheckpoints, stage_directory
from flax_ulmfit.train.clas import clas_batch_check, clas_loss
from flax_ulmfit.train.lm import lm_batch_check, lm_loss
from flax_ulmfit.train.loop import fit
from flax_ulmfit.train.lr_find import LRFinderResult, lr_find
from flax_ulmfit.train.step import init_train_state, make_eval_step, make_train_step, update_model

EMBEDDING, DP_EMBEDDING, DECODER_W, DECODER_B = ('0.encoder.weight', '0.encoder_dp.emb.weight',
                                                  '1.decoder.weight', '1.decoder.bias')


def _itos(vocab: Any, what: str) -> list[str]:
  """The token list of `vocab`: a sequence of strings or an object with `.itos` (a `Vocab`)."""
  itos = getattr(vocab, 'itos', vocab)
  if isinstance(itos, (str, bytes)) or not isinstance(itos, Sequence):
    raise TypeError(f'{what} must be a list of tokens or a Vocab, got {type(vocab).__name__}')
  itos = list(itos)
  if not itos or not all(isinstance(t, str) for t in itos):
    raise ValueError(f'{what} must be a non-empty list of string tokens')
  return itos


# --- Vocabulary transfer -------------------------------------------------------------------

def match_embeds(old_wgts: Mapping, old_vocab: Sequence[str], new_vocab: Sequence[str]) -> dict[str, np.ndarray]:
  """fastai's `match_embeds`: a language model's weights moved from `old_vocab` to `new_vocab`.

  A word of `new_vocab` found in `old_vocab` gets its old embedding row and decoder bias (a
  word repeated in `old_vocab` maps to its last occurrence, as fastai's dict does); any other
  word gets the mean of all old rows and the mean decoder bias.

  Args:
    old_wgts: a state_dict with fastai's LM key names (torch tensors or numpy arrays);
      not modified.
    old_vocab, new_vocab: token lists (or `Vocab`s), id order.

  Returns:
    Every entry of `old_wgts` as a numpy array, with `0.encoder.weight`, its dropout copy
    `0.encoder_dp.emb.weight` (if present), the tied `1.decoder.weight` and `1.decoder.bias`
    (if present) rebuilt with one row per word of `new_vocab`.
  """
  old_itos, new_itos = _itos(old_vocab, 'match_embeds: old_vocab'), _itos(new_vocab, 'match_embeds: new_vocab')
  if EMBEDDING not in old_wgts:
    raise KeyError(f'match_embeds: old_wgts has no {EMBEDDING!r}; expected a fastai AWD-LSTM language '
                   f'model state_dict, got keys {list(old_wgts)[:6]}')
  wgts = {k: as_numpy(v, k) for k, v in old_wgts.items()}
  emb, bias = wgts[EMBEDDING], wgts.get(DECODER_B)
  if emb.ndim != 2 or emb.shape[0] != len(old_itos):
    raise ValueError(f'match_embeds: {EMBEDDING!r} has shape {emb.shape} but old_vocab has {len(old_itos)} '
                     'tokens; the vocabulary does not belong to these weights')
  if bias is not None and bias.shape != emb.shape[:1]:
    raise ValueError(f'match_embeds: {DECODER_B!r} has shape {bias.shape}, expected ({emb.shape[0]},)')
  old_index = {word: i for i, word in enumerate(old_itos)}
  rows = np.array([old_index.get(word, -1) for word in new_itos])
  known, take = rows >= 0, np.maximum(rows, 0)
  mean = lambda a: a.mean(0, dtype=np.float64).astype(a.dtype)  # float64 sum: the exact mean, rounded once
  new_emb = np.where(known[:, None], emb[take], mean(emb))
  wgts[EMBEDDING], wgts[DECODER_W] = new_emb, new_emb.copy()
  if DP_EMBEDDING in wgts:
    wgts[DP_EMBEDDING] = new_emb.copy()
  if bias is not None:
    wgts[DECODER_B] = np.where(known, bias[take], mean(bias))
  return wgts


def load_pretrained(lm: LanguageModel, weights: str | os.PathLike, vocab: str | os.PathLike,
                    new_vocab: Sequence[str]) -> LanguageModel:
  """fastai's `load_pretrained`: a pretrained AWD-LSTM language model moved onto `new_vocab`.

  Reads the `.pth` state_dict (`torch.load(weights_only=True)`, optionally wrapped as
  `{'model': ..., 'opt': ...}`, old `.module.weight_hh_l0` copies dropped) and its vocabulary
  (an `itos` pickle holding only a list of strings, or JSON), applies `match_embeds`, and
  fills `lm` in place. fastai then freezes the learner: `LM_FINETUNE`'s first stage does.

  Args:
    lm: a `LanguageModel` built for `new_vocab` with the pretrained model's config (fastai's
      published WikiText-103 model: `awd_lstm_lm_config`).
    weights: the `.pth` file.
    vocab: the pretrained vocabulary (`.pkl` itos or `.json`).
    new_vocab: the vocabulary of the data to fine-tune on (token list or `Vocab`).

  Returns:
    `lm`.
  """
  if not isinstance(lm, LanguageModel):
    raise TypeError(f'load_pretrained: lm must be a LanguageModel, got {type(lm).__name__}')
  new_itos = _itos(new_vocab, 'load_pretrained: new_vocab')
  if len(new_itos) != lm.encoder.vocab_sz:
    raise ValueError(f'load_pretrained: new_vocab has {len(new_itos)} tokens but lm was built for '
                     f'{lm.encoder.vocab_sz}; build it as LanguageModel(len(new_vocab), config)')
  wgts, old_itos = read_state_dict(weights), read_itos(vocab)
  if EMBEDDING not in wgts:
    raise KeyError(f'load_pretrained: {weights} is not a fastai AWD-LSTM language model: it has no '
                   f'{EMBEDDING!r} (keys: {list(wgts)[:6]}...)')
  if wgts[EMBEDDING].shape[0] != len(old_itos):
    raise ValueError(f'load_pretrained: the vocabulary {vocab} has {len(old_itos)} tokens but the '
                     f'embedding in {weights} has {wgts[EMBEDDING].shape[0]} rows; they do not belong together')
  try:
    return torch_to_flax(match_embeds(wgts, old_itos, new_itos), lm)
  except (KeyError, ValueError) as err:  # the converter names the key; say which file
    raise type(err)(f'load_pretrained: {weights}: {err.args[0]}') from err


def save_pretrained(lm: LanguageModel, vocab: Sequence[str], path: str | os.PathLike) -> tuple[Path, Path]:
  """Writes `{path}.pth` (the state_dict) and `{path}.pkl` (the itos pickle) of `lm`.

  fastai reads them with `learn.load_pretrained(pth, pkl)` or
  `language_model_learner(..., pretrained_fnames=[name, name])` from its model folder.
  Returns the two paths.
  """
  itos = _itos(vocab, 'save_pretrained: vocab')
  if not isinstance(lm, LanguageModel) or len(itos) != lm.encoder.vocab_sz:
    raise ValueError(f'save_pretrained: expected a LanguageModel whose vocabulary size is len(vocab)={len(itos)}')
  path = Path(path)
  return write_pretrained(path.with_suffix('') if path.suffix in ('.pth', '.pkl') else path, flax_to_torch(lm), itos)


def save_encoder(model: LanguageModel | AWDLSTM, path: str | os.PathLike) -> Path:
  """Writes the AWD-LSTM encoder's state_dict to `path`, as fastai's `save_encoder` does, for
  fastai's `load_encoder` (the classifier must use the language model's vocabulary)."""
  encoder = model.encoder if isinstance(model, LanguageModel) else model
  if not isinstance(encoder, AWDLSTM):
    raise TypeError(f'save_encoder: expected a LanguageModel or AWDLSTM, got {type(model).__name__}')
  return write_state_dict(path, flax_to_torch(encoder))


# --- Parameter groups -----------------------------------------------------------------------

class Split(NamedTuple):
  """fastai's splitter as data: the parameter groups, first to last, and the
  `optim.label_params` rules (path regex, group) that put each parameter in one."""
  groups: tuple[str, ...]
  rules: tuple[tuple[str, str], ...]


def awd_lstm_lm_split(n_layers: int) -> Split:
  """fastai's `awd_lstm_lm_split` for `LanguageModel`: one group per RNN layer (with its hidden
  dropout, which has no parameters), then embedding + decoder, so `freeze` trains only those."""
  rnns = tuple(f'rnn{l}' for l in range(n_layers))
  rules = tuple((f'^encoder/rnns/{l}/', g) for l, g in enumerate(rnns))
  return Split(rnns + ('embeds',), rules + (('^encoder/encoder$', 'embeds'), ('^decoder/', 'embeds')))


def awd_lstm_clas_split(n_layers: int) -> Split:
  """fastai's `awd_lstm_clas_split` for `TextClassifier`: the embedding, one group per RNN
  layer, then the head (paths `encoder/module/encoder`, `encoder/module/rnns/{l}`, `head`)."""
  rnns = tuple(f'rnn{l}' for l in range(n_layers))
  rules = tuple((f'^encoder/module/rnns/{l}/', g) for l, g in enumerate(rnns))
  return Split(('embeds',) + rnns + ('head',),
               (('^encoder/module/encoder$', 'embeds'),) + rules + (('^head/', 'head'),))


def frozen_groups(groups: Sequence[str], freeze_to: int) -> tuple[str, ...]:
  """The groups fastai's `freeze_to(n)` freezes: those before index n (`-1`: all but the last,
  fastai's `freeze`; `0`: none, fastai's `unfreeze`)."""
  if not -len(groups) <= freeze_to < len(groups):
    raise ValueError(f'frozen_groups: freeze_to must be in [-{len(groups)}, {len(groups) - 1}] for '
                     f'{len(groups)} groups (0 trains all, -1 only the last), got {freeze_to=}')
  return tuple(groups[:freeze_to])


def group_lrs(lr: float | slice, n_groups: int) -> list[float]:
  """The learning rate of each group as fastai's `fit_one_cycle(n, lr)` sets it: a float for
  every group, `slice(lo, hi)` geometric from lo to hi, `slice(hi)` hi/10 for all but the last."""
  if isinstance(lr, slice):
    if lr.step is not None or lr.stop is None:
      raise ValueError(f'group_lrs: use slice(hi) or slice(lo, hi), got {lr}')
    lrs = optim.discriminative_lrs(lr.start, lr.stop, n_groups) if lr.start else optim.discriminative_lrs(lr.stop, None, n_groups)
  else:
    lrs = [float(lr)] * n_groups
  if not all(math.isfinite(x) and x > 0 for x in lrs):
    raise ValueError(f'group_lrs: learning rates must be positive and finite, got lr={lr}')
  return lrs


# --- Stages ---------------------------------------------------------------------------------

class Stage(NamedTuple):
  """One `freeze_to(freeze_to)` + `fit_one_cycle(epochs, lr, div, div_final, pct_start)`."""
  name: str
  epochs: int
  lr: float | slice          # one rate for every group, or fastai's slice(lo, hi) / slice(hi)
  freeze_to: int             # 0: every group trains; -1: only the last (fastai's freeze)
  pct_start: float = 0.25
  div: float = 25.0
  div_final: float = 1e5


class Recipe(NamedTuple):
  """A ULMFiT training recipe: its stages and what fastai's learner fixes for all of them."""
  stages: tuple[Stage, ...]
  drop_mult: float
  moms: tuple[float, float, float] = (0.8, 0.7, 0.8)   # TextLearner's one-cycle momentum
  wd: float = 0.01             # fastai Adam's default; norm layers and biases exempt
  eps: float = 1e-5
  clip: float | None = None    # global gradient-norm clipping (fastai's GradientClip)
  alpha: float = 2.0           # AR (TextLearner)
  beta: float = 1.0            # TAR (TextLearner)
  bs: int = 64
  seq_len: int = 72
  config: Mapping[str, Any] = MappingProxyType({})  # overrides of the model's default config


# fastai's tutorial.wikitext: AWD-LSTM paper dropouts, Adam(wd=0.1, eps=1e-7), GradientClip(0.1),
# fit_one_cycle(1, 5e-3, moms=(0.8, 0.7, 0.8), div=10) (90 epochs for the full result).
LM_PRETRAIN = Recipe(
    stages=(Stage('all', 1, 5e-3, freeze_to=0, div=10.0),), drop_mult=1.0, wd=0.1, eps=1e-7, clip=0.1,
    bs=104, config=MappingProxyType(dict(input_p=0.6, output_p=0.4, weight_p=0.5, embed_p=0.1, hidden_p=0.2)))

# fastai's ULMFiT walkthrough on IMDb (fastbook chapter 10): language_model_learner(drop_mult=0.3)
# is frozen after load_pretrained; fit_one_cycle(1, 2e-2); unfreeze(); fit_one_cycle(10, 2e-3).
# (docs.fast.ai's tutorial.text uses 1e-2 then 1e-3, wd=0.1 and drop_mult 1.0.)
LM_FINETUNE = Recipe(
    stages=(Stage('frozen', 1, 2e-2, freeze_to=-1), Stage('unfrozen', 10, 2e-3, freeze_to=0)),
    drop_mult=0.3, bs=128, seq_len=80)

# fastai's tutorial.text and fastbook chapter 10: text_classifier_learner(drop_mult=0.5) is frozen
# after load_encoder; the head at 2e-2, then gradual unfreezing with discriminative rates (2.6
# per group). TextLearner adds AR/TAR to the classifier too, on the sentence encoder's output.
CLASSIFIER = Recipe(
    stages=(Stage('head', 1, 2e-2, freeze_to=-1),
            Stage('last_two', 1, slice(1e-2 / 2.6 ** 4, 1e-2), freeze_to=-2),
            Stage('last_three', 1, slice(5e-3 / 2.6 ** 4, 5e-3), freeze_to=-3),
            Stage('all', 2, slice(1e-3 / 2.6 ** 4, 1e-3), freeze_to=0)),
    drop_mult=0.5)


def with_stages(recipe: Recipe, epochs: Sequence[int], lrs: Sequence[float], **fields) -> Recipe:
  """`recipe` with each stage's epochs and peak rate replaced (a slice keeps its ratio:
  fastai's `slice(lr / 2.6**4, lr)`), stages of 0 epochs left out, and `fields` replaced."""
  if not len(epochs) == len(lrs) == len(recipe.stages):
    raise ValueError(f'with_stages: give one epoch count and one rate per stage ({len(recipe.stages)}), '
                     f'got {len(epochs)} and {len(lrs)}')
  stages = tuple(stage._replace(epochs=n, lr=slice(lr * stage.lr.start / stage.lr.stop, lr) if isinstance(stage.lr, slice) else lr)
                 for stage, n, lr in zip(recipe.stages, epochs, lrs) if n)
  return recipe._replace(stages=stages, **fields)


def check_recipe(recipe: Recipe) -> None:
  """Raises ValueError naming the first field of `recipe` that would train wrongly or not at all."""
  if not recipe.stages:
    raise ValueError('Recipe: stages is empty; give at least one Stage')
  for stage in recipe.stages:
    if not isinstance(stage.epochs, int) or stage.epochs < 1:
      raise ValueError(f'Recipe: stage {stage.name!r} must train >= 1 epoch, got epochs={stage.epochs}')
  problems = {'wd': not 0 <= recipe.wd < math.inf, 'eps': not 0 < recipe.eps < math.inf,
              'clip': recipe.clip is not None and not 0 < recipe.clip < math.inf,
              'moms': len(recipe.moms) != 3 or not all(0 <= m < 1 for m in recipe.moms),
              'drop_mult': not 0 <= recipe.drop_mult < math.inf}
  bad = [name for name, wrong in problems.items() if wrong]
  if bad:
    raise ValueError(f'Recipe: {bad[0]}={getattr(recipe, bad[0])!r} is out of range (wd >= 0, eps > 0, '
                     'clip None or > 0, three moms in [0, 1), drop_mult >= 0)')


def stage_optimizer(labels: Any, groups: Sequence[str], stage: Stage, recipe: Recipe, total_steps: int,
                    wd_mask: Any = None) -> optax.GradientTransformation:
  """The optimizer of one stage: fastai's Adam per group with the stage's one-cycle rates
  (`group_lrs`) and the recipe's momentum cycle, weight decay and clipping; the groups
  before `stage.freeze_to` frozen.

  Args:
    labels: group name of every parameter (`optim.label_params(params, split.rules)`).
    groups: the groups, first to last (`split.groups`).
    stage, recipe: what to train and how.
    total_steps: updates in the stage (epochs x batches per epoch).
    wd_mask: True where weight decay applies (see `stage_optimizers`).
  """
  frozen = frozen_groups(groups, stage.freeze_to)
  lrs = {g: schedules.one_cycle(total_steps, lr, stage.div, stage.div_final, stage.pct_start)
         for g, lr in zip(groups, group_lrs(stage.lr, len(groups))) if g not in frozen}
  return optim.fastai_optimizer(labels, lrs, mom=schedules.one_cycle_moms(total_steps, recipe.moms, stage.pct_start),
                                eps=recipe.eps, wd=recipe.wd, wd_mask=wd_mask, frozen=frozen, clip_norm=recipe.clip)


def stage_optimizers(model: nnx.Module, split: Split, recipe: Recipe,
                     steps_per_epoch: int) -> list[tuple[Stage, optax.GradientTransformation]]:
  """`(stage, optimizer)` for every stage of `recipe`, with `model`'s parameters grouped by `split`.

  Weight decay spares norm layers and biases (`optim.bn_bias_mask`, fastai's
  `wd_bn_bias=False`; an LSTM's `bias_ih`/`bias_hh` decay, as in fastai, whose rule sees only
  `.bias` attributes). fastai's `train_bn` has nothing to do here: the only norm layers (the
  classifier head's) are in the last group, which no stage may freeze. Start each stage from
  `tx.init(params)`: fastai's `freeze_to` clears the optimizer state.
  """
  if int(steps_per_epoch) < 1:
    raise ValueError(f'stage_optimizers: steps_per_epoch must be >= 1, got {steps_per_epoch=}')
  check_recipe(recipe)
  params = nnx.state(model, nnx.Param)
  labels = optim.label_params(params, split.rules)
  empty = sorted(set(split.groups) - set(jax.tree.leaves(labels)))
  if empty:
    raise ValueError(f'stage_optimizers: groups {empty} hold no parameter of {type(model).__name__}; '
                     'does the split match the model (its number of layers)?')
  wd_mask = jax.tree.map(operator.not_, optim.bn_bias_mask(model, params))
  return [(stage, stage_optimizer(labels, split.groups, stage, recipe, stage.epochs * steps_per_epoch, wd_mask))
          for stage in recipe.stages]


# --- Stage runners --------------------------------------------------------------------------

class _EpochsFrom:
  """A loader seen from a stage: the stage's epoch `e` is the loader's epoch `first + e`, so
  every epoch of a run draws a new order (as fastai's loaders, which count epochs across fits)."""

  def __init__(self, loader, first: int):
    self.loader, self.first = loader, first

  def __len__(self) -> int:
    return len(self.loader)

  def batches(self, epoch: int, start: int = 0):
    return self.loader.batches(self.first + epoch, start)


def run_recipe(model: nnx.Module, split: Split, recipe: Recipe, loss_fn, train_dl, valid_dl, *,
               check_batch=None, init_carry=None, language_model: bool = False, precision: str = 'fp32',
               mesh=None, seed: int = 0, out: str | os.PathLike | None = None, meta: Mapping | None = None,
               save_every: int | None = None, resume: bool = False, progress: bool = True) -> list[dict]:
  """Trains `model` in place through the stages of `recipe`, each a `fit` with its own
  optimizer (fresh state: fastai's `freeze_to` clears it); returns every epoch's record with
  its `stage` name first.

  With `out`, stage i saves its training state in `out/checkpoints/<i>-<name>/` (each epoch,
  every `save_every` steps, on Ctrl-C) and writes `out/log-<i>-<name>.csv` and
  `out/losses-<i>-<name>.png`; `resume=True` restores the finished stages' results and
  continues the stage where the run stopped, exactly where the uninterrupted run would be.
  The run's key is `seed`; stage i's steps draw from `fold_in(key(seed), i)`, and its epoch e
  is epoch `e + (epochs of the stages before)` of the loaders.

  Args:
    model: the model, built with the precision's compute dtype; updated after each stage.
    split, recipe: the parameter groups and the stages (`awd_lstm_*_split`, `LM_*`, `CLASSIFIER`).
    loss_fn: as for `make_train_step` (`lm_loss`, `clas_loss`, with the recipe's alpha/beta).
    train_dl, valid_dl: loaders with `batches(epoch, start)` and `len()` (`LMLoader`, `ClasLoader`).
    check_batch: host-side batch check (`lm_batch_check`, `clas_batch_check`).
    init_carry: `batch -> carry` at the start of each epoch (a language model's zero state).
    language_model: adds the validation perplexity to the table.
    precision: 'fp32', 'bf16' or 'fp16' (fp16 adds torch's dynamic loss scaling).
    mesh: `parallel.data_mesh(...)` to split each batch over devices, or None.
    meta: JSON-able description of the run (vocabulary, labels, config, settings), saved with
      every checkpoint; a checkpoint with another meta is refused.
  """
  names = [s.name for s in recipe.stages]
  if len(set(names)) != len(names) or not all(n.replace('_', '').replace('-', '').isalnum() for n in names):
    raise ValueError(f'run_recipe: stage names must be distinct words (letters, digits, _ and -), got {names}')
  if (save_every is not None or resume) and out is None:
    raise ValueError('run_recipe: save_every and resume need out= (the folder of the checkpoints)')
  policy = mixed.get_policy(precision)
  if mesh is not None:
    parallel.check_divisible(train_dl.bs, mesh)
  eval_step = make_eval_step(model, loss_fn, check_batch=check_batch, mesh=mesh)
  primary = jax.process_index() == 0  # several processes: all save the checkpoints (orbax), one writes the logs
  progress = progress and primary
  key, history, first_epoch = jax.random.key(seed), [], 0
  labels = optim.label_params(nnx.state(model, nnx.Param), split.rules)
  for index, (stage, tx) in enumerate(stage_optimizers(model, split, recipe, len(train_dl))):
    if policy.needs_loss_scaling:
      tx = mixed.torch_grad_scaler(tx)
    state = init_train_state(model, tx)
    if mesh is not None:
      state = parallel.replicate(state, mesh)
    files = {}
    if out is not None:
      files = dict(checkpoints=TrainCheckpoints(stage_directory(Path(out) / 'checkpoints', index, stage.name),
                                                meta=dict(meta or {}, stage=stage.name)),
                   save_every=save_every, resume=resume)
      if primary:
        files.update(log_path=Path(out) / f'log-{index}-{stage.name}.csv',
                     plot_path=Path(out) / f'losses-{index}-{stage.name}.png')
    frozen = frozen_groups(split.groups, stage.freeze_to)
    if progress:
      print(f'stage {index} {stage.name!r}: {stage.epochs} epoch(s), lr {stage.lr}, '
            f'{len(frozen)} of {len(split.groups)} groups frozen', flush=True)
    trained = optim.trained_mask(labels, frozen)
    state, records = fit(make_train_step(model, loss_fn, tx, mesh=mesh, check_batch=check_batch, trained=trained), state,
                         _EpochsFrom(train_dl, first_epoch), stage.epochs, rng=jax.random.fold_in(key, index),
                         eval_step=eval_step, valid_data=_EpochsFrom(valid_dl, first_epoch), init_carry=init_carry,
                         language_model=language_model, progress=progress, log_group=split.groups[-1], **files)
    update_model(model, state)
    history += [{'stage': stage.name, **r} for r in records]
    first_epoch += stage.epochs
  return history


def _lm_pieces(lm: LanguageModel, recipe: Recipe, mesh) -> dict:
  def zero_state(batch):
    carry = lm.zero_state(batch[0].shape[0])
    return parallel.shard_batch(carry, mesh) if mesh is not None else carry
  return dict(loss_fn=functools.partial(lm_loss, alpha=recipe.alpha, beta=recipe.beta),
              check_batch=lm_batch_check(lm.encoder.vocab_sz), init_carry=zero_state, language_model=True)


def train_lm(lm: LanguageModel, train_dl, valid_dl, recipe: Recipe = LM_FINETUNE, **run) -> list[dict]:
  """Trains a language model through `recipe`'s stages with fastai's LM groups (each RNN
  layer, then embedding + decoder): `LM_PRETRAIN` (pretraining: every group at one rate) or
  `LM_FINETUNE` (one epoch training only the embedding and decoder, then all).

  `train_dl`, `valid_dl`: `LMLoader`s; `run`: the keyword arguments of `run_recipe`
  (precision, mesh, seed, out, meta, save_every, resume, progress). Returns the records.
  """
  if not isinstance(lm, LanguageModel):
    raise TypeError(f'train_lm: expected a LanguageModel, got {type(lm).__name__}')
  return run_recipe(lm, awd_lstm_lm_split(len(lm.encoder.rnns)), recipe, train_dl=train_dl, valid_dl=valid_dl,
                    **_lm_pieces(lm, recipe, run.get('mesh')), **run)


def train_classifier(clf: TextClassifier, train_dl, valid_dl, recipe: Recipe = CLASSIFIER, **run) -> list[dict]:
  """Trains a text classifier through `recipe`'s stages (fastai's gradual unfreezing: the
  head, then the last two groups, then three, then all; discriminative rates per stage).

  `train_dl`, `valid_dl`: `ClasLoader`s with the classifier's `seq_len` as bptt; `run`: the
  keyword arguments of `run_recipe`. Returns the records (`valid_accuracy` in each).
  """
  if not isinstance(clf, TextClassifier):
    raise TypeError(f'train_classifier: expected a TextClassifier, got {type(clf).__name__}')
  return run_recipe(clf, awd_lstm_clas_split(len(clf.encoder.module.rnns)), recipe,
                    functools.partial(clas_loss, alpha=recipe.alpha, beta=recipe.beta), train_dl, valid_dl,
                    check_batch=clas_batch_check(clf), **run)


def stage_lr_find(model: nnx.Module, split: Split, recipe: Recipe, stage: int, loss_fn, batches, *, seed: int = 0,
                  init_carry=None, plot_path: str | os.PathLike | None = None) -> LRFinderResult:
  """fastai's `lr_find` before stage `stage` of `recipe`: the same frozen groups, weight
  decay, clipping and eps, one swept rate for every trained group, Adam's momentum 0.9.
  `.suggestion` of the result is fastai's valley."""
  check_recipe(recipe)
  chosen = recipe.stages[stage]
  params = nnx.state(model, nnx.Param)
  labels = optim.label_params(params, split.rules)
  wd_mask = jax.tree.map(operator.not_, optim.bn_bias_mask(model, params))
  frozen = frozen_groups(split.groups, chosen.freeze_to)

  def make_tx(schedule):
    return optim.fastai_optimizer(labels, {g: schedule for g in split.groups if g not in frozen}, eps=recipe.eps,
                                  wd=recipe.wd, wd_mask=wd_mask, frozen=frozen, clip_norm=recipe.clip)
  return lr_find(model, loss_fn, make_tx, batches, rng=jax.random.key(seed), init_carry=init_carry, plot_path=plot_path,
                 trained=optim.trained_mask(labels, frozen))
