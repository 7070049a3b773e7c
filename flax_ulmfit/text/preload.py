"""Imported once by the tokenizer's forkserver: builds the English word splitter there, so
every worker forked from it starts ready (no spaCy import or set-up per worker)."""
from flax_ulmfit.text import tokenize
from flax_ulmfit.text.words import WordSplitter

tokenize._splitter = WordSplitter('en')
