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
                  'preprocess': how a text becomes its tokens, e.g. {'max_chars': 1000, 'backwards': False}, ...}

An ensemble's folder (`ulmfit.py`, e.g. a forward and a backward classifier; predictions
average the members' class probabilities):
  <member>/       a classifier's folder per member
  config.json     {'format': ENSEMBLE_FORMAT, 'members': [<member>, ...], 'classes': [...]}

Write a folder inside `cli.RunFolder.export()` so its files are replaced together.
"""
from __future__ import annotations

import json
import os
import shutil
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
ENSEMBLE_FORMAT = 'flax_ulmfit.ensemble/1'


def preprocess(texts: Sequence[str], max_chars: int | None = None) -> list[str]:
  """Texts as a model reads them: the first `max_chars` characters of each (all if None)."""
  if isinstance(texts, (str, bytes)):
    raise TypeError('preprocess: texts must be a list of texts, got one string; wrap it in a list')
  if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
    raise ValueError(f'preprocess: max_chars must be an integer >= 1 or None, got {max_chars!r}')
  return [t[:max_chars] for t in texts]


def model_tokens(texts: Sequence[str], tokenizer, *, max_chars: int | None = None,
                 backwards: bool = False) -> list[list[str]]:
  """Texts as a model reads them: `preprocess`ed, tokenized, and with `backwards` each text's
  tokens reversed (fastai's `backwards=True`: the model reads every text from its end)."""
  return _directed(tokenizer(preprocess(texts, max_chars)), backwards)


def _directed(tokens: Sequence[Sequence[str]], backwards: bool) -> list[list[str]]:
  return [list(t)[::-1] for t in tokens] if backwards else [list(t) for t in tokens]


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
  `model/`), its vocabulary, its labels and its config.json (with 'preprocess', and 'folder':
  where it was read)."""
  folder = _model_folder(path, 'classifier.npz')
  info = read_json(folder / 'config.json', CLASSIFIER_FORMAT, 'load_classifier')
  vocab, labels = _vocab(folder, info['vocab_size']), CategoryMap.load(folder / 'labels.json')
  if labels.classes != info['classes']:
    raise ValueError(f'{folder / "labels.json"} lists {labels.classes} but the weights in {folder} were trained '
                     f'for {info["classes"]}: the labels belong to another model')
  preprocessing = info.get('preprocess')
  if not isinstance(preprocessing, dict) or not set(preprocessing) <= {'max_chars', 'backwards'}:
    raise ValueError(f'{folder / "config.json"}: unknown preprocessing {preprocessing!r} (this library knows '
                     "'max_chars' and 'backwards'): the model was written by another version; export it again")
  clf = build_classifier(len(vocab), len(labels), info['arch'], dtype=dtype)
  state_dict, _ = checkpoint.load(folder / 'classifier.npz', flax_to_torch(clf))
  return torch_to_flax(state_dict, clf), vocab, labels, dict(info, folder=str(folder))


def save_ensemble(folder: str | os.PathLike, members: Mapping[str, str | os.PathLike]) -> None:
  """Writes an ensemble's folder: a copy of each classifier folder (`save_classifier`'s, or a
  run folder holding one) under its name in `members`; their classes must agree."""
  folder = Path(folder)
  classes = None
  for name, source in members.items():
    _check_member_name(name, folder)
    source = _model_folder(source, 'classifier.npz')
    info = read_json(source / 'config.json', CLASSIFIER_FORMAT, 'save_ensemble')
    if classes is not None and info['classes'] != classes:
      raise ValueError(f'save_ensemble: {source} classifies into {info["classes"]}, the other members into {classes}')
    classes = info['classes']
    shutil.copytree(source, folder / name)
  write_json(folder / 'config.json', {'format': ENSEMBLE_FORMAT, 'members': list(members), 'classes': classes})


def _check_member_name(name: str, folder: Path) -> None:
  if not isinstance(name, str) or not name or name != Path(name).name or name.startswith('.'):
    raise ValueError(f'{folder}: ensemble member {name!r} must be a plain folder name inside the ensemble')


def _format(config: Path) -> str | None:
  """The 'format' a config.json declares (None if it is missing or unreadable: `read_json` says why)."""
  try:
    data = json.loads(config.read_bytes())
  except (OSError, ValueError):
    return None
  return data.get('format') if isinstance(data, dict) else None


def load_classifiers(path: str | os.PathLike, *, dtype=None) -> list[tuple[TextClassifier, Vocab, CategoryMap, dict]]:
  """`load_classifier`'s tuple for each member of an ensemble's folder (`save_ensemble`'s, or a
  run folder holding one in `model/`), or for the one classifier of a classifier's folder."""
  path = Path(path)
  for folder in (path, path / 'model'):
    config = folder / 'config.json'
    declared = _format(config)
    if declared == LM_FORMAT:
      raise ValueError(f'{folder} holds a language model, not a classifier: give the --out folder of '
                       'train_classifier.py or ulmfit.py')
    if declared == ENSEMBLE_FORMAT or (config.is_file() and not (folder / 'classifier.npz').is_file()):
      info = read_json(config, ENSEMBLE_FORMAT, 'load_classifiers')  # names what is wrong with another file
      members = info.get('members')
      if not isinstance(members, list) or not members:
        raise ValueError(f'{config} lists no members ({members!r}): rebuild the ensemble')
      for name in members:
        _check_member_name(name, folder)
      return [load_classifier(folder / name, dtype=dtype) for name in members]
  return [load_classifier(path, dtype=dtype)]


def predict_texts(classifiers: Sequence[tuple], texts: Sequence[str], tokenizer, bs: int = 64) -> np.ndarray:
  """(n_texts, n_class) class probabilities of raw texts, averaged over `classifiers`
  (`load_classifiers`' tuples, which must share their classes), each reading the texts as its
  'preprocess' says (first characters, direction); texts are tokenized once
  per prefix length, however many classifiers read them."""
  first = classifiers[0][3]['folder']
  classes = classifiers[0][2].classes
  tokenized, probs = {}, []
  for clf, vocab, labels, info in classifiers:
    if labels.classes != classes:
      raise ValueError(f'{info["folder"]} classifies into {labels.classes}, {first} into {classes}: models averaged '
                       'together need the same classes in the same order')
    if tokenizer.name != vocab.tokenizer:
      raise ValueError(f'{info["folder"]}: the vocabulary was made by tokenizer {vocab.tokenizer!r}; this '
                       f'installation tokenizes with {tokenizer.name!r}, whose tokens would not match it')
    max_chars = info['preprocess'].get('max_chars')
    if max_chars not in tokenized:
      tokenized[max_chars] = tokenizer(preprocess(texts, max_chars))
    tokens = _directed(tokenized[max_chars], info['preprocess'].get('backwards', False))
    probs.append(predict_proba(clf, [vocab.numericalize(t) for t in tokens], bs))
  return np.mean(probs, axis=0)


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
