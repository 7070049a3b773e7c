"""Against fastai 2.8 itself (golden file written by golden/make_fastai_awd_lstm.py):
fastai's state_dict loads into torch_ref (strict) and into Flax, both give fastai's logits
over two consecutive batches, and our export has exactly fastai's keys and shapes."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import torch_ref.awd_lstm as ref
from flax_ulmfit.interop import flax_to_torch, torch_to_flax
from flax_ulmfit.models import LanguageModel

GOLDEN = np.load(Path(__file__).parent / 'golden' / 'fastai_awd_lstm.npz', allow_pickle=False)
CONFIG = json.loads(str(GOLDEN['config']))
VOCAB = int(GOLDEN['vocab'])
STATE_DICT = {k.removeprefix('state_dict/'): GOLDEN[k] for k in GOLDEN.files if k.startswith('state_dict/')}
TOL = 1e-5  # fp32 forward bound of the numerical contract


def test_fastai_state_dict_loads_strictly_into_torch_ref_and_gives_fastai_logits():
  model = ref.LanguageModel(VOCAB, CONFIG)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in STATE_DICT.items()}, strict=True)
  model.eval()
  ids, state = GOLDEN['tokens'], None
  for half, key in ((ids[:, :8], 'logits_batch1'), (ids[:, 8:], 'logits_batch2')):
    with torch.no_grad():
      logits, state, _ = model(torch.from_numpy(half), state)
    assert np.abs(logits.numpy() - GOLDEN[key]).max() <= TOL


def test_flax_reproduces_fastai_logits_and_exports_fastai_keys():
  lm = torch_to_flax(STATE_DICT, LanguageModel(VOCAB, CONFIG, rngs=nnx.Rngs(0)))
  lm.eval()
  ids, state = GOLDEN['tokens'], None
  for half, key in ((ids[:, :8], 'logits_batch1'), (ids[:, 8:], 'logits_batch2')):
    logits, state, _ = lm(jnp.asarray(half, jnp.int32), state)
    state = jax.lax.stop_gradient(state)
    assert np.abs(np.asarray(logits) - GOLDEN[key]).max() <= TOL
  exported = flax_to_torch(lm)
  assert list(exported) == list(STATE_DICT)
  for key, value in STATE_DICT.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
