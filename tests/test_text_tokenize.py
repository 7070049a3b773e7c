"""Tokenizer: token-for-token equal to fastai 2.8 (golden file), parallel, cached, streamed."""
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from flax_ulmfit.text import Tokenizer, rules, tokenize

GOLDEN = Path(__file__).parent / 'golden' / 'tokenizer_fastai.json'


@pytest.fixture(scope='module')
def golden():
    data = json.loads(GOLDEN.read_text(encoding='utf-8'))
    assert data['fastai_version'].startswith('2.8')
    return [c['text'] for c in data['cases']], [c['tokens'] for c in data['cases']]


def test_matches_fastai_golden_in_process(golden):
    texts, expected = golden
    got = Tokenizer(n_workers=1, progress=False)(texts)
    mismatched = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not mismatched, f'texts {mismatched[:5]} differ from fastai 2.8'


FORK_SCRIPT = """
import json, sys
from flax_ulmfit.text import Tokenizer
texts = [c['text'] for c in json.load(open(sys.argv[1], encoding='utf-8'))['cases']]
tok = Tokenizer(n_workers=2, chunk_chars=40_000, cache_dir=sys.argv[2], progress=False, start_method='fork')
json.dump(tok(texts), sys.stdout)
assert 'jax' not in sys.modules
"""


def test_matches_fastai_golden_in_parallel_chunks_keep_order(golden, tmp_path):
    texts, expected = golden
    # ~8 work units over 2 processes: the answers must come back in order
    tok = Tokenizer(n_workers=2, chunk_chars=40_000, cache_dir=tmp_path, progress=False,
                    start_method='forkserver')
    assert tok(texts) == expected
    assert len(list(tmp_path.glob('*.json'))) > 2


def test_matches_fastai_golden_with_forked_workers(golden, tmp_path):
    """`fork` (the default without JAX) runs in a fresh interpreter: this test process has
    JAX's threads running, and forking those can deadlock."""
    _, expected = golden
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, '-c', FORK_SCRIPT, str(GOLDEN), str(tmp_path)], check=True,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(root)))
    assert json.loads(out.stdout) == expected


def test_rules_follow_fastai_docs():
    # examples from fastai's documentation of each rule (docs.fast.ai/text.core)
    assert rules.replace_rep('I\'m so excited!!!!!!!!') == 'I\'m so excited xxrep 8 ! '
    assert rules.replace_wrep('I\'ve never ever ever ever ever ever ever ever done this.') == \
        'I\'ve never xxwrep 7 ever  done this.'
    assert rules.spec_add_spaces('#fastai') == ' # fastai'
    assert rules.spec_add_spaces('/fastai') == ' / fastai'
    assert rules.spec_add_spaces('\\fastai') == ' \\ fastai'
    assert rules.rm_useless_spaces('Inconsistent   use  of     spaces') == \
        'Inconsistent use of spaces'
    assert rules.replace_all_caps('I AM SHOUTING') == 'i xxup am xxup shouting'
    assert rules.replace_all_caps('I\'m suddenly SHOUTING FOR NO REASON') == \
        'I\'m suddenly xxup shouting xxup for xxup no xxup reason'
    assert rules.replace_maj('Jeremy Howard') == 'xxmaj jeremy xxmaj howard'
    assert rules.replace_maj("I don't think there is any maj here") == \
        "i don't think there is any maj here"
    assert rules.fix_html('<br />text\\nline') == '\ntext\nline'
    assert rules.fix_html('#39;bli#146;') == "'bli'"
    assert rules.fix_html('Sarah amp; Duck...') == 'Sarah & Duck …'
    assert rules.fix_html('a nbsp; #36;') == 'a   $'
    assert rules.fix_html('\\" <unk>') == '" xxunk'
    assert rules.fix_html('quot;  @.@  @-@ ') == "' .-"
    assert rules.lowercase('  Hello  ') == 'xxbos hello'


def test_stream_is_lazy():
    endless = itertools.cycle(['Hello there!', 'SECOND text'])
    first = list(itertools.islice(Tokenizer(n_workers=1, chunk_chars=50, progress=False)
                                  .stream(endless), 3))
    assert first == [['xxbos', 'xxmaj', 'hello', 'there', '!'],
                     ['xxbos', 'xxup', 'second', 'text'],
                     ['xxbos', 'xxmaj', 'hello', 'there', '!']]


def test_cache_is_read_instead_of_tokenizing(tmp_path, monkeypatch):
    texts = ['One text.', 'Another ONE']
    expected = Tokenizer(n_workers=1, cache_dir=tmp_path, progress=False)(texts)

    def fail(*args):
        raise AssertionError('tokenized although the cache holds the result')
    monkeypatch.setattr(tokenize.WordSplitter, '__call__', fail)
    assert Tokenizer(n_workers=1, cache_dir=tmp_path, progress=False)(texts) == expected
    with pytest.raises(AssertionError):   # a different text is a cache miss
        Tokenizer(n_workers=1, cache_dir=tmp_path, progress=False)(texts + ['new'])


def test_corrupt_cache_file_is_reported_and_replaced(tmp_path):
    texts = ['Some text here']
    expected = Tokenizer(n_workers=1, cache_dir=tmp_path, progress=False)(texts)
    (path,) = tmp_path.glob('*.json')
    path.write_text('{"format": "flax_ulmfit.tokens/1", "docs": [tru')
    with pytest.warns(UserWarning, match='ignoring unusable cache file'):
        assert Tokenizer(n_workers=1, cache_dir=tmp_path, progress=False)(texts) == expected
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # rewritten: read silently now
        assert Tokenizer(n_workers=1, cache_dir=tmp_path, progress=False)(texts) == expected


def test_cache_key_depends_on_tokenizer_name(tmp_path):
    tok = Tokenizer(n_workers=1, cache_dir=tmp_path, progress=False)
    tok(['Same text'])
    tok.name = tok.name + '-other-settings'
    tok(['Same text'])
    assert len(list(tmp_path.glob('*.json'))) == 2


def test_non_string_text_is_rejected_with_its_index():
    with pytest.raises(TypeError, match=r'text #1 is a bytes, expected str'):
        Tokenizer(n_workers=1, progress=False)(['fine', b'raw bytes'])


def test_one_string_instead_of_a_list_is_rejected():
    tok = Tokenizer(n_workers=1, progress=False)
    with pytest.raises(TypeError, match=r'got one str .*wrap it in a list'):
        tok('one document, not a list')
    with pytest.raises(TypeError, match='got one str'):
        next(tok.stream('one document'))


def test_lone_surrogates_become_replacement_characters_with_a_warning(tmp_path):
    tok = Tokenizer(n_workers=1, progress=False, cache_dir=tmp_path)   # the cache is UTF-8 JSON
    broken = b'caf\xe9 ok'.decode('utf-8', errors='surrogateescape')   # 'caf\udce9 ok'
    with pytest.warns(UserWarning, match=r'1 lone surrogate .* first in text #1'):
        tokens = tok(['fine', broken])
    assert tokens[1] == Tokenizer(n_workers=1, progress=False)(['caf\ufffd ok'])[0]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match='n_workers=0'):
        Tokenizer(n_workers=0)


def test_workers_avoid_fork_once_jax_is_loaded(monkeypatch):
    monkeypatch.setitem(sys.modules, 'jax', sys)   # forking a running JAX can deadlock
    assert tokenize._pool_context('en', None).get_start_method() == 'forkserver'
    monkeypatch.delitem(sys.modules, 'jax')
    assert tokenize._pool_context('en', None).get_start_method() == 'fork'


STOPPED_PARENT = '''
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started in the background
import jax   # as in a training script: workers start from a forkserver
from flax_ulmfit.text import Tokenizer
if __name__ == '__main__':
    stream = Tokenizer(n_workers=2, chunk_chars=2000, progress=False).stream(['Some text.'] * 2000)
    next(stream)
    try:
        print('TOKENIZING', flush=True)
        time.sleep(120)
    except KeyboardInterrupt:
        print('STOPPED', flush=True)
'''


def _state(pid: int) -> str | None:
    """The /proc state letter of `pid` ('Z' for an exited, unreaped process), None if gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (read from /proc)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat') as f:
                children.setdefault(int(f.read().rsplit(')', 1)[1].split()[1]), []).append(int(entry))
        except (OSError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return [p for p in found if _state(p) not in (None, 'Z')]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
@pytest.mark.parametrize('stop', ['kill -9 the parent', 'Ctrl-C to the process group'])
def test_workers_end_with_their_parent_and_leave_ctrl_c_to_it(stop):
    """SIGKILL gives the parent no chance to stop its pool: the workers must notice (and
    with them gone, the forkserver and resource tracker end too). Ctrl-C in a terminal hits
    every process of the group: only the parent may react, with no worker tracebacks."""
    parent = subprocess.Popen([sys.executable, '-c', STOPPED_PARENT], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert parent.stdout.readline().strip() == 'TOKENIZING'
    helpers = _descendants(parent.pid)   # forkserver, 2 workers, resource tracker
    assert len(helpers) >= 3
    if stop == 'kill -9 the parent':
        parent.kill()
    else:
        os.killpg(parent.pid, signal.SIGINT)
    out, err = parent.communicate(timeout=60)
    deadline = time.monotonic() + 10
    alive = helpers
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in helpers if _state(p) not in (None, 'Z')]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert alive == []
    if stop != 'kill -9 the parent':
        assert out.strip() == 'STOPPED' and 'Traceback' not in err, err
