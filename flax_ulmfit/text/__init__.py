"""Text pipeline: fastai-exact tokenization, vocabulary, loaders, readers and corpora."""
from flax_ulmfit.text.tokenize import Tokenizer
from flax_ulmfit.text.vocab import Vocab

__all__ = ['Tokenizer', 'Vocab']
