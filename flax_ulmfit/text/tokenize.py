"""`Tokenizer`: fastai's default tokenization, in parallel processes, cached on disk, streamed."""
import collections
import hashlib
import itertools
import multiprocessing
import multiprocessing.forkserver
import os
import re
import select
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from tqdm.auto import tqdm

from flax_ulmfit.text.files import read_json, write_json
from flax_ulmfit.text.words import WordSplitter

CACHE_FORMAT = 'flax_ulmfit.tokens/1'
_SURROGATE = re.compile('[\ud800-\udfff]')   # alone in a str: never a valid character
_REPLACEMENT = '\ufffd'

_splitter = None   # this process's WordSplitter (in a forkserver, `preload` builds it)


def _init_worker(lang: str):
    global _splitter
    if _splitter is None or _splitter.lang != lang:
        _splitter = WordSplitter(lang)


def _start_worker(lang: str, parent: int):
    """Pool initializer: Ctrl-C is the parent's to handle (no worker tracebacks), and the
    worker ends when `parent` does, even when it was killed (pool workers otherwise wait
    on their queue forever, and keep the forkserver alive with them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_after, args=(parent,), daemon=True).start()
    _init_worker(lang)


def _exit_after(pid: int):
    try:
        fd = os.pidfd_open(pid)        # Linux: wakes up exactly when `pid` exits
        select.select([fd], [], [])
    except (AttributeError, OSError):  # elsewhere (or `pid` already gone): poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(1.0)
    os._exit(1)


def _split_chunk(texts: list[str]) -> list[str]:
    """Tokens of each text joined by spaces (tokens never hold one: `replace_space`)."""
    return [' '.join(toks) for toks in _splitter(texts)]


def _pool_context(lang: str, start_method: str | None):
    """fork, with workers inheriting a ready splitter, unless JAX is loaded (forking a JAX
    process can deadlock); then forkserver, whose server holds the ready English splitter."""
    if start_method is None:
        start_method = 'forkserver' if 'jax' in sys.modules else 'fork'
    ctx = multiprocessing.get_context(start_method)
    if start_method == 'fork':
        _init_worker(lang)
    elif start_method == 'forkserver':
        ctx.set_forkserver_preload(['flax_ulmfit.text.preload'])
        _start_forkserver_ignoring_ctrl_c()
    return ctx


def _start_forkserver_ignoring_ctrl_c():
    """Starts the forkserver with SIGINT ignored (inherited through exec): it imports spaCy
    for seconds before it would ignore Ctrl-C itself, and printed a traceback when hit then."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def _submit(pool: ProcessPoolExecutor, fn, *args):
    """`pool.submit`, with Ctrl-C held back until it returns: submit may start a worker, and a
    KeyboardInterrupt inside that start left a worker the pool did not know about, which
    then failed (with a traceback) once the parent had cleaned up its queues."""
    if threading.current_thread() is not threading.main_thread():
        return pool.submit(fn, *args)
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        return pool.submit(fn, *args)
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):   # the handler it held back (default: KeyboardInterrupt)
            previous(signal.SIGINT, None)


def _chunks(texts: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk, size, n_surrogates, first = [], 0, 0, None
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f'Tokenizer: text #{i} is a {type(text).__name__}, expected str; '
                            'decode bytes first (the readers in flax_ulmfit.text.corpora do)')
        if _SURROGATE.search(text):
            text, n = _SURROGATE.subn(_REPLACEMENT, text)
            n_surrogates, first = n_surrogates + n, i if first is None else first
        chunk.append(text)
        size += len(text) + 1
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
    if n_surrogates:
        warnings.warn(f'Tokenizer: {n_surrogates} lone surrogate code point(s) (undecodable '
                      f'bytes kept by errors="surrogateescape", or broken UTF-16; first in text '
                      f'#{first}) replaced by U+FFFD; decode the text with errors="replace"',
                      stacklevel=2)


def _check_texts(texts) -> None:
    if isinstance(texts, (str, bytes)):
        raise TypeError(f'Tokenizer: texts must be a list of texts, got one '
                        f'{type(texts).__name__} (it would be read one character per text); '
                        'wrap it in a list: tokenizer([text])')


class Tokenizer:
    """fastai 2.8's default word tokenization (`xxbos`, `xxmaj`, `xxup`, ... then spaCy).

    `Tokenizer()(texts)` returns, for each text, exactly fastai's token list; `stream(texts)`
    does the same lazily for corpora larger than memory. Work is cut into chunks of about
    `chunk_chars` characters, spread over `n_workers` processes (default: the CPUs this
    process may use) and, given `cache_dir`, stored there as JSON keyed by the chunk's texts
    and `name`, so a second run reads instead of tokenizing.

    Args:
      lang: spaCy language of `spacy.blank(lang)`.
      n_workers: processes; 1 tokenizes in this process.
      chunk_chars: characters per unit of work (and per cache file).
      cache_dir: folder for the on-disk cache, or None for no cache.
      progress: show a tqdm progress bar (documents).
      start_method: how worker processes start (multiprocessing's name); None: 'fork',
        or 'forkserver' once JAX is imported (then, as with 'spawn', the main script is
        imported again in each worker: guard it with `if __name__ == '__main__':`).
    """

    def __init__(self, lang: str = 'en', n_workers: int | None = None,
                 chunk_chars: int = 500_000, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True, start_method: str | None = None):
        import spacy
        if n_workers is None:
            n_workers = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                         else os.cpu_count() or 1)
        if n_workers < 1 or chunk_chars < 1:
            raise ValueError(f'Tokenizer: need n_workers >= 1 and chunk_chars >= 1, got '
                             f'{n_workers=}, {chunk_chars=}')
        self.lang, self.n_workers, self.chunk_chars = lang, n_workers, chunk_chars
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.progress, self.start_method = progress, start_method
        self.name = f'fastai-2.8-default-rules/spacy-{spacy.__version__}-blank-{lang}'

    def __call__(self, texts: Iterable[str]) -> list[list[str]]:
        """The token list of each text (each starts with `xxbos`)."""
        _check_texts(texts)
        total = len(texts) if hasattr(texts, '__len__') else None
        return list(self.stream(texts, total=total))

    def stream(self, texts: Iterable[str], total: int | None = None) -> Iterator[list[str]]:
        """Yields each text's tokens in order, holding only a few chunks at a time."""
        _check_texts(texts)
        chunks = _chunks(texts, self.chunk_chars)
        head = list(itertools.islice(chunks, 2))
        chunks = itertools.chain(head, chunks)
        with tqdm(total=total, unit='doc', desc='tokenizing', disable=not self.progress,
                  leave=False) as bar:
            if self.n_workers == 1 or len(head) < 2:
                for chunk in chunks:
                    key = self._key(chunk)
                    docs = self._load(key, len(chunk)) or self._local(key, chunk)
                    yield from self._emit(docs, bar)
                return
            ctx = _pool_context(self.lang, self.start_method)
            with ProcessPoolExecutor(self.n_workers, mp_context=ctx, initializer=_start_worker,
                                     initargs=(self.lang, os.getpid())) as pool:
                pending = collections.deque()
                for chunk in chunks:
                    key = self._key(chunk)
                    cached = self._load(key, len(chunk))
                    pending.append((key, cached, None if cached else
                                    _submit(pool, _split_chunk, chunk)))
                    while len(pending) > 2 * self.n_workers:
                        yield from self._finish(pending.popleft(), bar)
                while pending:
                    yield from self._finish(pending.popleft(), bar)

    def _local(self, key: str, chunk: list[str]) -> list[str]:
        _init_worker(self.lang)
        docs = _split_chunk(chunk)
        self._store(key, docs)
        return docs

    def _finish(self, item, bar) -> Iterator[list[str]]:
        key, cached, future = item
        docs = cached or future.result()
        if not cached:
            self._store(key, docs)
        yield from self._emit(docs, bar)

    @staticmethod
    def _emit(docs: list[str], bar) -> Iterator[list[str]]:
        for doc in docs:
            yield doc.split(' ')
        bar.update(len(docs))

    def _key(self, chunk: list[str]) -> str:
        h = hashlib.sha256(self.name.encode())
        for text in chunk:
            data = text.encode('utf-8', 'surrogatepass')
            h.update(len(data).to_bytes(8, 'little'))
            h.update(data)
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / f'{key}.json'

    def _load(self, key: str, n_docs: int) -> list[str] | None:
        if self.cache_dir is None:
            return None
        path = self._path(key)
        if not path.exists():
            return None
        try:
            data = read_json(path, CACHE_FORMAT, 'Tokenizer cache')
            docs = data['docs']
            if data['tokenizer'] != self.name or len(docs) != n_docs:
                raise ValueError(f"made by {data['tokenizer']!r} with {len(docs)} documents")
            return docs
        except (ValueError, KeyError, TypeError) as err:
            warnings.warn(f'Tokenizer: ignoring unusable cache file {path} ({err}); '
                          'tokenizing again and overwriting it', stacklevel=3)
            return None

    def _store(self, key: str, docs: list[str]):
        if self.cache_dir is not None:
            write_json(self._path(key), {'format': CACHE_FORMAT, 'tokenizer': self.name,
                                         'docs': docs})
