"""Shared cases for the text classifier parity tests: a small config, twin models, numpy masks
per chunk and a batch padded as ClasLoader pads it."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import torch_ref.classifier as ref
from flax_ulmfit.interop import torch_to_flax
from flax_ulmfit.models import TextClassifier
from flax_ulmfit.text.data import pad_chunk

VOCAB, N_CLASS, SEQ_LEN, MAX_LEN = 37, 3, 5, 10
# Dropouts large enough that every mask drops something at these sizes; drop_mult 1.
CONFIG = dict(emb_sz=10, n_hid=14, n_layers=3, pad_token=1, bidir=False, output_p=0.3,
              hidden_p=0.3, input_p=0.3, embed_p=0.2, weight_p=0.4)
LIN_FTRS, PS = [7], [0.2]
# Sorted longest first, as ClasLoader's batches: two rows longer than MAX_LEN, rows that are
# all padding in the first chunks, trailing padding of 0-4 tokens (not a multiple of SEQ_LEN).
DOC_LENS = (23, 17, 10, 9, 3)


def twin_models(seed=0, **kwargs):
  """A torch_ref classifier with fastai's init (BatchNorm moved off its init, so the
  conversion of every entry is exercised) and a Flax classifier with the same weights."""
  options = dict(lin_ftrs=LIN_FTRS, ps=PS) | kwargs
  torch.manual_seed(seed)
  torch_clf = ref.TextClassifier(VOCAB, N_CLASS, SEQ_LEN, CONFIG, drop_mult=1.0, max_len=MAX_LEN, **options)
  with torch.no_grad():
    for block in torch_clf[1].layers:
      bn = block[0]
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.uniform_(-0.1, 0.1)
      bn.running_mean.uniform_(-0.1, 0.1)
      bn.running_var.uniform_(0.5, 1.5)
      bn.num_batches_tracked.fill_(3)
  flax_clf = TextClassifier(VOCAB, N_CLASS, CONFIG, drop_mult=1.0, seq_len=SEQ_LEN, max_len=MAX_LEN,
                            rngs=nnx.Rngs(1), **options)
  return torch_clf, torch_to_flax(torch_clf.state_dict(), flax_clf)


def batch(n_tokens=25, doc_lens=DOC_LENS, seed=0):
  """(B, n_tokens) token ids padded with `pad_chunk` (pad id 1 never inside a text), and labels."""
  rng = np.random.default_rng(seed)
  docs = [rng.integers(2, VOCAB, n) for n in doc_lens]
  tokens = np.stack([pad_chunk(d, n_tokens, SEQ_LEN, CONFIG['pad_token']) for d in docs])
  return tokens, rng.integers(0, N_CLASS, len(doc_lens)).astype(np.int32)


def numpy_masks(batch_size, n_tokens, lin_ftrs=LIN_FTRS, ps=PS, seed=0):
  """Every dropout mask of one classifier call, drawn once in numpy: encoder masks per chunk
  (leading chunk axis) and one mask per head block."""
  rng = np.random.default_rng(seed)
  draw = lambda shape, p: (rng.random(shape) >= p).astype(np.float32) / (1 - p)  # noqa: E731
  n_chunks = n_tokens // SEQ_LEN
  emb, hid, n = CONFIG['emb_sz'], CONFIG['n_hid'], CONFIG['n_layers']
  sizes = [emb] + [hid] * (n - 1) + [emb]
  encoder = dict(embed=draw((n_chunks, VOCAB, 1), CONFIG['embed_p']),
                 input=draw((n_chunks, batch_size, 1, emb), CONFIG['input_p']),
                 weight=[draw((n_chunks, 4 * sizes[l + 1], sizes[l + 1]), CONFIG['weight_p']) for l in range(n)],
                 hidden=[draw((n_chunks, batch_size, 1, sizes[l + 1]), CONFIG['hidden_p']) for l in range(n - 1)])
  dims = [3 * emb, *lin_ftrs]
  head = [draw((batch_size, d), p) for d, p in zip(dims, [CONFIG['output_p'], *ps])]
  return {'encoder': encoder, 'head': head}


def as_jax(masks):
  return {'encoder': {k: [jnp.asarray(m) for m in v] if isinstance(v, list) else jnp.asarray(v)
                      for k, v in masks['encoder'].items()},
          'head': [jnp.asarray(m) for m in masks['head']]}
