"""checkpoint.save/load: exact round trip of an NNX state (RNG keys, bf16 included) and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_ulmfit import checkpoint


def tree():
  model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Dropout(0.1, rngs=nnx.Rngs(dropout=1)))
  return {'state': nnx.state(model), 'half': jnp.linspace(0, 1, 5, dtype=jnp.bfloat16), 'step': jnp.int32(7)}


def leaves_equal(a, b):
  unkey = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  return all(x.dtype == y.dtype and np.array_equal(np.asarray(unkey(x), np.float32), np.asarray(unkey(y), np.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_round_trip_is_exact_and_keeps_metadata(tmp_path):
  original = tree()
  checkpoint.save(tmp_path / 'sub' / 'c.npz', original, {'epoch': 2, 'valid_loss': 0.5})
  back, meta = checkpoint.load(tmp_path / 'sub' / 'c.npz', original)
  assert meta == {'epoch': 2, 'valid_loss': 0.5}
  assert leaves_equal(back, original)
  assert jax.tree.structure(back) == jax.tree.structure(original)
  assert [p.name for p in (tmp_path / 'sub').iterdir()] == ['c.npz']  # no temporary file left behind


def test_file_is_plain_npz_without_pickles(tmp_path):
  checkpoint.save(tmp_path / 'c.npz', tree())
  with np.load(tmp_path / 'c.npz', allow_pickle=False) as npz:
    assert all(npz[k].dtype != object for k in npz.files)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint at'):
    checkpoint.load(tmp_path / 'nope.npz', tree())


def test_corrupt_file(tmp_path):
  path = tmp_path / 'c.npz'
  checkpoint.save(path, tree())
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(ValueError, match='not a readable checkpoint'):
    checkpoint.load(path, tree())


def test_mismatched_keys_are_all_named(tmp_path):
  checkpoint.save(tmp_path / 'c.npz', {'a': jnp.ones(2), 'b': jnp.ones(2)})
  with pytest.raises(KeyError, match=r"missing entries \[.*c.*\], unexpected entries \[.*b.*\]"):
    checkpoint.load(tmp_path / 'c.npz', {'a': jnp.ones(2), 'c': jnp.ones(2)})
  # also bad input as scripts report it (cli.run_script: one line for a ValueError), unquoted
  with pytest.raises(ValueError, match=r"^checkpoint\.load: "):
    checkpoint.load(tmp_path / 'c.npz', {'a': jnp.ones(2)})


def test_mismatched_shape_names_entry_and_both_shapes(tmp_path):
  checkpoint.save(tmp_path / 'c.npz', {'a': jnp.ones((2, 3))})
  with pytest.raises(ValueError, match=r"entry a in .* has shape \(2, 3\) dtype float32; the target expects shape \(3, 2\)"):
    checkpoint.load(tmp_path / 'c.npz', {'a': jnp.ones((3, 2))})


def test_nan_is_refused_unless_allowed(tmp_path):
  checkpoint.save(tmp_path / 'c.npz', {'a': jnp.array([1.0, jnp.nan])})
  with pytest.raises(ValueError, match='holds inf/NaN'):
    checkpoint.load(tmp_path / 'c.npz', {'a': jnp.ones(2)})
  back, _ = checkpoint.load(tmp_path / 'c.npz', {'a': jnp.ones(2)}, allow_nonfinite=True)
  assert np.isnan(np.asarray(back['a'])[1])


def test_not_a_checkpoint(tmp_path):
  np.savez(tmp_path / 'other.npz', a=np.ones(2))
  with pytest.raises(ValueError, match='was not written by checkpoint.save'):
    checkpoint.load(tmp_path / 'other.npz', {'a': jnp.ones(2)})
