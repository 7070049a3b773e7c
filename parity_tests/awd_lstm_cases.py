"""Shared cases for the AWD-LSTM parity tests: a small config, twin models and numpy masks."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import torch_ref.awd_lstm as ref
from flax_ulmfit.interop import torch_to_flax
from flax_ulmfit.models import LanguageModel

VOCAB = 37  # odd sizes everywhere, so a transposed or mixed-up axis cannot go unnoticed
CONFIG = dict(emb_sz=10, n_hid=14, n_layers=3, pad_token=1, bidir=False, output_p=0.1,
              hidden_p=0.15, input_p=0.25, embed_p=0.02, weight_p=0.2, tie_weights=True,
              out_bias=True)
# Dropout probabilities large enough that every mask drops something at these sizes.
HEAVY = dict(CONFIG, output_p=0.3, hidden_p=0.3, input_p=0.3, embed_p=0.2, weight_p=0.4)


def twin_models(config=CONFIG, seed=0):
  """A torch_ref LM with fastai's init and a Flax LM holding the same weights."""
  torch.manual_seed(seed)
  torch_lm = ref.LanguageModel(VOCAB, config)
  with torch.no_grad():  # a nonzero decoder bias, so its conversion is exercised
    torch_lm[1].decoder.bias.uniform_(-0.1, 0.1)
  flax_lm = torch_to_flax(torch_lm.state_dict(), LanguageModel(VOCAB, config, rngs=nnx.Rngs(1)))
  return torch_lm, flax_lm


def numpy_masks(config, batch_size, seed=0):
  """Every dropout mask of one forward pass, drawn once in numpy (Bernoulli(1-p)/(1-p))."""
  rng = np.random.default_rng(seed)
  draw = lambda shape, p: (rng.random(shape) >= p).astype(np.float32) / (1 - p)  # noqa: E731
  emb, hid, n = config['emb_sz'], config['n_hid'], config['n_layers']
  sizes = [emb] + [hid] * (n - 1) + [emb]
  return dict(embed=draw((VOCAB, 1), config['embed_p']),
              input=draw((batch_size, 1, emb), config['input_p']),
              weight=[draw((4 * sizes[l + 1], sizes[l + 1]), config['weight_p']) for l in range(n)],
              hidden=[draw((batch_size, 1, sizes[l + 1]), config['hidden_p']) for l in range(n - 1)],
              output=draw((batch_size, 1, emb), config['output_p']))


def tokens(batch_size, seq_len, seed=0):
  """Token ids that include the padding id, so its no-gradient rule is exercised."""
  ids = np.random.default_rng(seed).integers(0, VOCAB, (batch_size, seq_len)).astype(np.int32)
  ids[0, :3] = CONFIG['pad_token']
  return ids


def to_numpy(x):
  return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def max_diff(a, b) -> float:
  return float(np.max(np.abs(to_numpy(a) - to_numpy(b))))


def as_jax(masks):
  return {k: [jnp.asarray(m) for m in v] if isinstance(v, list) else jnp.asarray(v)
          for k, v in masks.items()}
