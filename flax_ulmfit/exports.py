"""The model folders a ULMFiT run exports (`<run>/model/`), and reading them back.

A language model's folder (`pretrain_lm.py`, `finetune_lm.py`):
  lm.npz        weights under fastai's state_dict names (`checkpoint.save`)
  vocab.json    its vocabulary (`Vocab`)
  config.json   {'format': LM_FORMAT, 'config': the AWD-LSTM config, 'vocab_size', ...}

A classifier's folder (`train_classifier.py`, `ulmfit.py`; what `predict.py --model` reads):
  classifier.npz  weights under fastai's `get_text_classifier` names
  vocab.json      the vocabulary the texts are numericalized with
  labels.json     the classes (`CategoryMap`), id order
  config.json     {'format': CLASSIFIER_FORMAT, 'arch': TextClassifier's arguments,
                  'preprocess': what is done to a text before tokenizing, e.g. {'max_chars': 1000}, ...}

Write a folder inside `cli.RunFolder.export()` so its files are replaced together.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from flax_ulmfit import checkpoint
from flax_ulmfit.interop import flax_to_torch, torch_to_flax
from flax_ulmfit.models.awd_lstm import LanguageModel
from flax_ulmfit.models.classifier import TextClassifier
from flax_ulmfit.text.data import ClasLoader
from flax_ulmfit.text.files import read_json, write_json
from flax_ulmfit.text.labels import CategoryMap
from flax_ulmfit.text.vocab import Vocab

LM_FORMAT = 'flax_ulmfit.lm_run/1'
CLASSIFIER_FORMAT = 'flax_ulmfit.classifier/1'


def preprocess(texts: Sequence[str], max_chars: int | None = None) -> list[str]:
  """Texts as a model was trained on them: the first `max_chars` characters of each (all if None)."""
  if isinstance(texts, (str, bytes)):
    raise TypeError('preprocess: texts must be a list of texts, got one string; wrap it in a list')
  if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
    raise ValueError(f'preprocess: max_chars must be an integer >= 1 or None, got {max_chars!r}')
  return [t[:max_chars] for t in texts]


def _model_folder(path: str | os.PathLike, weights: str) -> Path:
  """`path` itself if it holds `weights`, else `path/model` (a run folder's export)."""
  path = Path(path)
  for folder in (path, path / 'model'):
    if (folder / weights).is_file():
      return folder
  raise FileNotFoundError(f'no {weights} in {path} or {path / "model"}: give the --out folder of the run that '
                          'trained the model, or its model/ folder')


def _vocab(folder: Path, vocab_size: int) -> Vocab:
  vocab = Vocab.load(folder / 'vocab.json')
  if len(vocab) != vocab_size:
    raise ValueError(f'{folder / "vocab.json"} has {len(vocab)} tokens but the weights in {folder} were trained '
                     f'with {vocab_size}: the vocabulary belongs to another model; export them together again')
  return vocab


def save_lm(folder: str | os.PathLike, lm: LanguageModel, vocab: Vocab, config: Mapping, **info: Any) -> None:
  """Writes a language model's folder; `info` (JSON-able: settings, history) goes into config.json."""
  folder = Path(folder)
  checkpoint.save(folder / 'lm.npz', flax_to_torch(lm), {'config': dict(config), 'vocab_size': len(vocab)})
  vocab.save(folder / 'vocab.json')
  write_json(folder / 'config.json', {'format': LM_FORMAT, 'config': dict(config), 'vocab_size': len(vocab), **info})


def load_lm(path: str | os.PathLike, *, drop_mult: float = 1.0, dtype=None,
            seed: int = 0) -> tuple[LanguageModel, Vocab, dict]:
  """The language model of a folder `save_lm` wrote (or a run folder holding it in `model/`),
  its vocabulary and its config.json; dropout scaled by `drop_mult`."""
  folder = _model_folder(path, 'lm.npz')
  info = read_json(folder / 'config.json', LM_FORMAT, 'load_lm')
  vocab = _vocab(folder, info['vocab_size'])
  lm = LanguageModel(len(vocab), info['config'], drop_mult, dtype=dtype, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  state_dict, _ = checkpoint.load(folder / 'lm.npz', flax_to_torch(lm))
  return torch_to_flax(state_dict, lm), vocab, info


def save_classifier(folder: str | os.PathLike, clf: TextClassifier, vocab: Vocab, labels: CategoryMap,
                    arch: Mapping, preprocess: Mapping | None = None, **info: Any) -> None:
  """Writes a classifier's folder. `arch`: the `TextClassifier` keyword arguments it was built
  with (config, drop_mult, seq_len, max_len, lin_ftrs, ps); `preprocess`: the `preprocess`
  arguments its texts went through; `info` (JSON-able) goes into config.json."""
  folder = Path(folder)
  meta = {'arch': dict(arch), 'vocab_size': len(vocab), 'classes': labels.classes}
  checkpoint.save(folder / 'classifier.npz', flax_to_torch(clf), meta)
  vocab.save(folder / 'vocab.json')
  labels.save(folder / 'labels.json')
  write_json(folder / 'config.json', {'format': CLASSIFIER_FORMAT, **meta, 'preprocess': dict(preprocess or {}), **info})


def build_classifier(vocab_size: int, n_class: int, arch: Mapping, *, dtype=None, seed: int = 0) -> TextClassifier:
  """`TextClassifier(vocab_size, n_class, **arch)` with params from `seed` and dropout from `seed + 1`."""
  return TextClassifier(vocab_size, n_class, **arch, dtype=dtype, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def load_classifier(path: str | os.PathLike, *, dtype=None) -> tuple[TextClassifier, Vocab, CategoryMap, dict]:
  """The classifier of a folder `save_classifier` wrote (or a run folder holding it in
  `model/`), its vocabulary, its labels and its config.json (with 'preprocess')."""
  folder = _model_folder(path, 'classifier.npz')
  info = read_json(folder / 'config.json', CLASSIFIER_FORMAT, 'load_classifier')
  vocab, labels = _vocab(folder, info['vocab_size']), CategoryMap.load(folder / 'labels.json')
  if labels.classes != info['classes']:
    raise ValueError(f'{folder / "labels.json"} lists {labels.classes} but the weights in {folder} were trained '
                     f'for {info["classes"]}: the labels belong to another model')
  clf = build_classifier(len(vocab), len(labels), info['arch'], dtype=dtype)
  state_dict, _ = checkpoint.load(folder / 'classifier.npz', flax_to_torch(clf))
  return torch_to_flax(state_dict, clf), vocab, labels, info


def predict_proba(clf: TextClassifier, docs: Sequence[np.ndarray], bs: int = 64) -> np.ndarray:
  """(n_docs, n_class) class probabilities of numericalized documents, in evaluation mode,
  batched longest first and padded as in training (`ClasLoader`); rows in `docs`' order."""
  loader = ClasLoader(docs, np.zeros(len(docs), np.int32), bs, clf.encoder.seq_len, shuffle=False,
                      pad_idx=clf.encoder.pad_idx)
  clf.eval()
  probs = nnx.jit(lambda model, x: jax.nn.softmax(model(x), axis=-1))
  out = np.empty((len(docs), clf.n_class), np.float32)
  order = loader.order(0)
  for b, (x, _) in enumerate(loader.batches(0)):
    out[order[b * bs:(b + 1) * bs]] = np.asarray(probs(clf, x))
  return out
