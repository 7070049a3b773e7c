"""Wikipedia markup to plain text, well enough for language modelling (not a full parser)."""
import html
import re

_COMMENT = re.compile(r'<!--.*?-->', re.S)
_REF = re.compile(r'<ref[^>/]*/>|<ref[^>]*>.*?</ref>', re.S | re.I)
_BLOCK_TAGS = re.compile(r'<(gallery|math|timeline|score|syntaxhighlight|source|pre|imagemap)'
                         r'\b[^>]*>.*?</\1>', re.S | re.I)
_TAG = re.compile(r'</?[a-zA-Z][^>]*>')
_TEMPLATE = re.compile(r'\{\{[^{}]*\}\}')         # innermost; repeated for nesting
_TABLE = re.compile(r'\{\|[^{}]*?\|\}', re.S)     # innermost; repeated for nesting
_NAMESPACE = r'(?:File|Image|Category|Media|[a-z]{2,3}(?:-[a-z]+)?):'   # and interlanguage
_FILE_LINK = re.compile(rf'\[\[{_NAMESPACE}[^\[\]]*\]\]', re.I)   # innermost only
_LINK = re.compile(rf'\[\[(?!{_NAMESPACE})(?:[^\[\]|]*\|)?([^\[\]]*)\]\]', re.I)
_EXT_LINK = re.compile(r'\[(?:https?|ftp)://[^\s\]]*\s*([^\]]*)\]')
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r'^(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$', re.M)
_LIST_MARK = re.compile(r'^[*#:;]+\s*', re.M)
_BLANK_LINES = re.compile(r'\n{3,}')


def _repeat(pattern: re.Pattern, repl, text: str) -> str:
    """Substitutes until nothing changes (nested templates, tables and file links)."""
    while True:
        text, n = pattern.subn(repl, text)
        if not n:
            return text


def strip_markup(wikitext: str) -> str:
    """Plain text of an article: templates, tables, refs, comments, files and categories
    removed; links replaced by their label; headings kept as their title line."""
    t = html.unescape(wikitext)   # the dump stores `&lt;ref&gt;` inside <text>
    t = _COMMENT.sub('', t)
    t = _REF.sub('', t)
    t = _BLOCK_TAGS.sub('', t)
    t = _repeat(_TEMPLATE, '', t)
    t = _repeat(_TABLE, '', t)
    t = _EXT_LINK.sub(r'\1', t)
    while True:   # links inside file captions go first, then the file link itself
        t, n_links = _LINK.subn(r'\1', t)
        t, n_files = _FILE_LINK.subn('', t)
        if not n_links + n_files:
            break
    t = _TAG.sub('', t)
    t = _BOLD_ITALIC.sub('', t)
    t = _HEADING.sub(r'\2', t)
    t = _LIST_MARK.sub('', t)
    t = _BLANK_LINES.sub('\n\n', t)
    return html.unescape(t).strip()
