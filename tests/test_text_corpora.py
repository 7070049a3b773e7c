"""Readers on small files of each real format, the embedded corpora, and bad input."""
import importlib.util
import re

import pytest

from flax_ulmfit.text import corpora
from flax_ulmfit.text.wikimarkup import strip_markup

WIKITEXT = (' \n = Valkyria Chronicles = \n \n Senjō no <unk> 3 is a role @-@ playing game . \n'
            ' \n = = Gameplay = = \n \n It is played in turns . \n'
            ' = Tower Building = \n \n The building is 1 @,@ 000 ft tall . \n'
            ' = Empty = \n \n')


def test_wikitext_splits_articles_at_titles_only(tmp_path):
    path = tmp_path / 'wiki.train.tokens'
    path.write_text(WIKITEXT, encoding='utf-8')
    with pytest.warns(UserWarning, match='skipped 1 empty'):   # ' = Empty = ' has a title only
        arts = corpora.read_wikitext(path)
    assert len(arts) == 2
    assert arts[0].startswith('= Valkyria Chronicles =') and '= = Gameplay = =' in arts[0]
    assert 'xxunk 3' in arts[0] and '<unk>' not in arts[0]
    assert arts[1] == '= Tower Building = \n \n The building is 1 @,@ 000 ft tall .'


def test_wikitext_with_windows_line_ends_gives_the_same_articles(tmp_path):
    unix, windows = tmp_path / 'unix.tokens', tmp_path / 'windows.tokens'
    unix.write_bytes(WIKITEXT.encode('utf-8'))
    windows.write_bytes(WIKITEXT.replace('\n', '\r\n').encode('utf-8'))
    with pytest.warns(UserWarning, match='skipped 1 empty'):
        expected = corpora.read_wikitext(unix)
    with pytest.warns(UserWarning, match='skipped 1 empty'):
        assert corpora.read_wikitext(windows) == expected   # 2 articles, no '\r' left


def test_wikitext_blank_preamble_is_no_document(tmp_path):
    path = tmp_path / 'w.tokens'
    path.write_bytes(b' \n \n = A = \n text \xff a \n')
    with pytest.warns(UserWarning, match='1 undecodable'):
        assert corpora.read_wikitext(path) == ['= A = \n text \ufffd a']
    with pytest.raises(FileNotFoundError, match='no WikiText token file'):
        corpora.read_wikitext(tmp_path / 'wiki.valid.tokens')


def test_imdb_layout(tmp_path):
    for split, label, name, text in [('train', 'pos', '0_9.txt', 'Great film!'),
                                     ('train', 'neg', '1_2.txt', 'Awful.<br />Bad.'),
                                     ('test', 'pos', '0_8.txt', 'Nice'),
                                     ('test', 'neg', '3_1.txt', 'Meh')]:
        (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / split / label / name).write_text(text)
    (tmp_path / 'unsup').mkdir()
    (tmp_path / 'unsup' / '5_0.txt').write_text('No label here')
    (tmp_path / 'train' / 'labeledBow.feat').write_text('ignored')
    assert corpora.read_imdb(tmp_path) == (['Awful.<br />Bad.', 'Great film!'], ['neg', 'pos'])
    assert corpora.read_imdb(tmp_path, 'test') == (['Meh', 'Nice'], ['neg', 'pos'])
    assert corpora.read_imdb(tmp_path, 'unsup') == ['No label here']
    with pytest.raises(ValueError, match="split must be 'train', 'test' or 'unsup'"):
        corpora.read_imdb(tmp_path, 'valid')
    with pytest.raises(FileNotFoundError, match='no folder at'):
        corpora.read_imdb(tmp_path / 'train')


def test_csv_and_tsv(tmp_path):
    (tmp_path / 'd.csv').write_text('label,text,extra\npos,"Good, and\nmultiline",x\n'
                                    'neg,Bad,y\nneg,   ,z\n', encoding='utf-8')
    with pytest.warns(UserWarning, match='skipped 1 empty'):
        assert corpora.read_csv(tmp_path / 'd.csv') == (['Good, and\nmultiline', 'Bad'],
                                                        ['pos', 'neg'])
    (tmp_path / 'd.tsv').write_text('sentence\tcls\nhello world\t1\nbye\t0\n')
    assert corpora.read_csv(tmp_path / 'd.tsv', 'sentence', 'cls') == (['hello world', 'bye'],
                                                                       ['1', '0'])
    assert corpora.read_csv(tmp_path / 'd.tsv', 'sentence', None) == (['hello world', 'bye'],
                                                                      None)


def test_csv_missing_column_or_label_is_an_error(tmp_path):
    (tmp_path / 'd.csv').write_text('review,score\nok,1\n')
    with pytest.raises(ValueError, match=r"no column\(s\) \['text', 'label'\]; its header has "
                                         r"\['review', 'score'\]"):
        corpora.read_csv(tmp_path / 'd.csv')
    (tmp_path / 'e.csv').write_text('text,label\nfine,1\nno label,\n')
    with pytest.raises(ValueError, match="line 3: empty or missing 'label'"):
        corpora.read_csv(tmp_path / 'e.csv')
    with pytest.raises(FileNotFoundError, match='no file at'):
        corpora.read_csv(tmp_path / 'absent.csv')


def test_folder_per_class_bad_bytes_and_empty_files(tmp_path):
    (tmp_path / 'sport').mkdir()
    (tmp_path / 'tech').mkdir()
    (tmp_path / 'sport' / 'a.txt').write_bytes(b'caf\xe9 \xff\xfe goal \xef\xbf\xbd')
    (tmp_path / 'sport' / 'b.txt').write_text('  \n ')
    (tmp_path / 'tech' / 'c.txt').write_text('chips')
    with pytest.warns(UserWarning) as record:
        texts, labels = corpora.read_folder(tmp_path)
    messages = [str(w.message) for w in record]
    # 3 bad sequences (\xe9 cut short, \xff, \xfe); the file's own U+FFFD is not counted
    assert any('a.txt: 3 undecodable' in m for m in messages), messages
    assert any('skipped 1 empty' in m for m in messages)
    assert texts == ['caf\ufffd \ufffd\ufffd goal \ufffd', 'chips'] and labels == ['sport', 'tech']
    with pytest.raises(FileNotFoundError, match='no folder at'):
        corpora.read_folder(tmp_path / 'nope')


def test_strip_markup():
    wiki = ("{{Infobox|name={{nested|x}}}}'''Bold''' is a [[political philosophy]] of "
            "[[self-governance|self-governed]] groups.&lt;ref&gt;A cite&lt;/ref&gt; See "
            "[http://example.org the site].<!-- hidden -->\n== History ==\n"
            "{| class=wikitable\n|-\n| cell\n|}\n[[File:X.jpg|thumb|A [[caption]] here]]\n"
            "* item one\n[[Category:Philosophy]]")
    assert strip_markup(wiki) == ('Bold is a political philosophy of self-governed groups. '
                                  'See the site.\nHistory\n\nitem one')


MARKUP = {'template': re.compile(r'\{\{[^{}]*\}\}'), 'link': re.compile(r'\[\[[^\[\]]*\]\]'),
          'table': re.compile(r'\{\|[^{}]*?\|\}'), 'comment': re.compile(r'<!--'),
          'tag': re.compile(r'</?(?:ref|div|span|small|big|br|sup|sub|center|blockquote|gallery|math|nowiki)\b[^>]*>', re.I),
          'bold/italic': re.compile(r"''"), 'heading': re.compile(r'^=+.*=+[ \t]*$', re.M)}


def test_embedded_corpora():
    arts = corpora.wikipedia_sample()
    assert len(arts) == 106   # the 106 articles of gensim's sample (100 more pages redirect)
    assert arts[0].startswith('Anarchism\n\nAnarchism is a political philosophy')
    assert sum(len(a.split()) for a in arts) > 400_000
    # No complete piece of markup survives anywhere (an innermost template, link, table, ref or
    # other tag, comment, bold/italic quotes, heading). Stray `{{` or `[[` may remain only where
    # the source itself holds literal brackets inside a caption or template (none is complete).
    for name, pattern in MARKUP.items():
        found = [(a.split('\n', 1)[0], m.group(0)) for a in arts for m in pattern.finditer(a)]
        assert not found, f'{name} left in {found[:3]}'
    with pytest.warns(UserWarning, match='199.txt: 1 undecodable'):   # one file holds a bad byte
        texts, labels = corpora.bbc_news()
    assert len(texts) == 2225
    assert {c: labels.count(c) for c in set(labels)} == {
        'business': 510, 'entertainment': 386, 'politics': 417, 'sports': 511, 'tech': 401}


def test_missing_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'gensim' else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r'pip install "flax_ulmfit\[data\]" '
                                                  r'\(or pip install gensim\)'):
        corpora.wikipedia_sample()
