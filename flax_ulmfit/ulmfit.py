"""ULMFiT's recipe room: where the models, the text pipeline and the training pieces meet.

- Vocabulary transfer: `match_embeds` (fastai's), `load_pretrained` (fastai's published or
  exported AWD-LSTM language model onto a new vocabulary), `save_pretrained` and
  `save_encoder` (files fastai's `load_pretrained` and `load_encoder` accept).
- Parameter groups as fastai's splitters: `awd_lstm_lm_split`, `awd_lstm_clas_split`.
- The stages as data: `Stage`, `Recipe` and the presets `LM_PRETRAIN`, `LM_FINETUNE`,
  `CLASSIFIER`; `stage_optimizers` turns a recipe into one optax optimizer per stage, built
  as fastai's `Learner` builds it (`freeze_to`, discriminative rates, one-cycle with text
  momentum, weight decay except norm layers and biases, clipping).

Each stage starts from fresh optimizer state, because fastai's `Learner.freeze_to`,
`freeze` and `unfreeze` end with `opt.clear_state()` (pinned against fastai itself in
parity_tests/test_ulmfit_stages.py). A stage runner is a short loop:

  split = awd_lstm_clas_split(3)
  for stage, tx in stage_optimizers(model, split, CLASSIFIER, len(train_dl)):
    state = state._replace(opt_state=tx.init(state.params))   # fastai's clear_state
    state, history = fit(make_train_step(model, loss_fn, tx), state, train_dl, stage.epochs,
                         log_group=split.groups[-1], ...)     # the head's lr, as fastai logs it

References:
  Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification", 2018.
"""
from __future__ import annotations

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
from flax_ulmfit.models.awd_lstm import AWDLSTM, LanguageModel
from flax_ulmfit.train import optim, schedules

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
