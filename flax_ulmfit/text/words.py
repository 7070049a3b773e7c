"""fastai's word tokenization inside one process: rules, then spaCy's splitting, memoised.

spaCy cuts a text at whitespace and tokenizes every piece between single spaces on its own
(which is why spaCy caches pieces); only its special-case matcher (`''`, `it's`, `a.m.`,
emoticons) looks across a space. So we split the text at the single spaces that no
special case can bridge, send each distinct piece through spaCy once, and build every
text from a dictionary look-up per piece, instead of a spaCy `Doc` and one Python `Token`
per token as fastai does.
"""
import itertools
import re

from flax_ulmfit.text.rules import SPECIAL_TOKENS, apply_rules, replace_space

_SEP = '\ue000'            # private-use character: separates unseen pieces in one spaCy call
_MAX_PIECES = 2_000_000    # distinct pieces memoised per process before starting afresh


def blank_tokenizer(lang: str):
    """spaCy's rule-based tokenizer for `lang` with fastai's special tokens kept whole."""
    import spacy
    from spacy.symbols import ORTH
    tokenizer = spacy.blank(lang).tokenizer
    for tok in SPECIAL_TOKENS:
        tokenizer.add_special_case(tok, [{ORTH: tok}])
    # lexical attributes (shape, like_num, ...) never change where tokens split; not
    # computing them for each new word makes spaCy ~30% faster on unseen text
    tokenizer.vocab.lex_attr_getters = {}
    return tokenizer


def _bridging_pairs(tokenizer) -> set[tuple[str, str]]:
    """Neighbouring pieces of every special case, as spaCy's affix rules split it."""
    from spacy.tokenizer import Tokenizer
    plain = Tokenizer(tokenizer.vocab, rules={}, prefix_search=tokenizer.prefix_search,
                      suffix_search=tokenizer.suffix_search,
                      infix_finditer=tokenizer.infix_finditer,
                      token_match=tokenizer.token_match, url_match=tokenizer.url_match)
    pairs = set()
    for case in tokenizer.rules:
        parts = [t.text for t in plain(case)]
        pairs.update(zip(parts[:-1], parts[1:]))
    return pairs


def _safe_spaces(pairs) -> re.Pattern:
    """Single spaces between non-spaces that no special case can bridge.

    A pair (a, b) can only join across a space preceded by a's last character and
    followed by b's first; we leave out every space next to such a character.
    """
    before = {a[-1] for a, b in pairs if not a[-1].isalnum()}
    after = {b[0] for a, b in pairs if a[-1].isalnum()}
    cls = lambda chars: ''.join(re.escape(c) for c in sorted(chars))
    return re.compile(rf'(?<=[^\s{cls(before)}]) (?=[^\s{cls(after)}])')


class WordSplitter:
    """Tokenizes texts exactly as fastai 2.8's default rules + spaCy do, with memoised pieces."""

    def __init__(self, lang: str = 'en'):
        self.lang = lang
        self.spacy_tokenizer = blank_tokenizer(lang)
        self.safe_spaces = _safe_spaces(_bridging_pairs(self.spacy_tokenizer))
        self.pieces: dict[str, tuple[str, ...]] = {}   # piece -> its tokens, post-rule applied
        self.special_cases = frozenset(self.spacy_tokenizer.rules)

    def _spacy(self, text: str) -> list[str]:
        return [replace_space(t.text) for t in self.spacy_tokenizer(text)]

    def _learn(self, pieces: list[str]):
        """Tokenizes unseen pieces with one spaCy call (`_SEP` makes a token of its own)."""
        # only punctuation and symbols start affix or infix splits: a piece of ASCII lowercase
        # letters or of digits alone is one token unless it is a special case ("cannot")
        plain = [p for p in pieces if p.isascii() and (p.isalpha() and p.islower() or p.isdigit())
                 and p not in self.special_cases]
        self.pieces.update((p, (p,)) for p in plain)
        pieces = list(set(pieces).difference(plain))
        for p in [p for p in pieces if p[-1].isspace()]:   # a text's end: no space may follow
            self.pieces[p] = tuple(self._spacy(p))
        pieces = [p for p in pieces if not p[-1].isspace()]
        toks = self._spacy(f' {_SEP} '.join(pieces))
        ends = [i for i, t in enumerate(toks) if t == _SEP] + [len(toks)]
        starts = [0] + [e + 1 for e in ends[:-1]]
        self.pieces.update((p, tuple(toks[s:e])) for p, s, e in zip(pieces, starts, ends))

    def __call__(self, texts: list[str]) -> list[list[str]]:
        """The token list of each text."""
        split = []
        for text in texts:
            t = apply_rules(text)
            # spaCy keeps leading whitespace whole (never after fastai's `lowercase`)
            split.append(t if t[:1].isspace() or _SEP in t else self.safe_spaces.split(t))
        if len(self.pieces) > _MAX_PIECES:
            self.pieces.clear()
        unseen = set().union(*(s for s in split if isinstance(s, list))).difference(self.pieces)
        if unseen:
            self._learn(list(unseen))
        get = self.pieces.__getitem__
        return [self._spacy(s) if isinstance(s, str) else
                list(itertools.chain.from_iterable(map(get, s))) for s in split]
