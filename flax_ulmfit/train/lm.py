"""Language-model training and evaluation steps: cross-entropy plus AR/TAR, state carried.

The model is any NNX module with fastai's LM calling convention,
`model(tokens, state, masks) -> (logits, state, extras(raw, dropped))` and
`model.sample_masks(key, batch_size)`; nothing here imports a model. Steps are pure
functions of (params, optimizer state, batch, recurrent state, key), jitted with donated
buffers, free of host synchronisation; with a mesh they run data-parallel (parallel.py).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from flax import nnx

from flax_ulmfit.parallel import BATCH, DATA_AXIS, REPLICATED, data_parallel
from flax_ulmfit.train.losses import ar_tar, cross_entropy_flat


def lm_loss(model, x: jax.Array, y: jax.Array, state, key: jax.Array | None,
            alpha: float = 2.0, beta: float = 1.0):
  """Loss of one batch and what to carry to the next.

  Args:
    model: a language model in train or eval mode.
    x, y: (B, T) input ids and next-token targets.
    state: recurrent state from the previous batch (None = zeros).
    key: draws this batch's dropout masks (None: the model's own rngs, or eval mode).
    alpha, beta: AR and TAR weights (fastai's TextLearner: 2 and 1); AR/TAR only in training.

  Returns:
    `(loss, (new_state with its gradient stopped, cross_entropy))`.
  """
  masks = model.sample_masks(key, x.shape[0]) if key is not None else None
  logits, new_state, extras = model(x, state, masks)
  cross_entropy = cross_entropy_flat(logits, y)
  loss = cross_entropy + ar_tar(extras.raw, extras.dropped, alpha, beta) if key is not None else cross_entropy
  return loss, (jax.lax.stop_gradient(new_state), cross_entropy)


def make_lm_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *,
                       alpha: float = 2.0, beta: float = 1.0, mesh=None) -> Callable:
  """Builds `step(params, opt_state, rest, x, y, state, key) -> (params, opt_state, state,
  metrics)`, jitted, donating params, optimizer state and recurrent state.

  `graphdef, params, rest = nnx.split(model, nnx.Param, ...)` with the model in train mode.
  With `mesh` (parallel.data_mesh), x, y and state are split over its devices; each device
  draws its own masks; gradients and metrics are averaged across devices.
  """

  def loss_of_params(params, rest, x, y, state, key):
    return lm_loss(nnx.merge(graphdef, params, rest), x, y, state, key, alpha, beta)

  def step(params, opt_state, rest, x, y, state, key):
    if mesh is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
    (loss, (state, cross_entropy)), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
        params, rest, x, y, state, key)
    metrics = {'loss': loss, 'cross_entropy': cross_entropy}
    if mesh is not None:
      grads, metrics = jax.lax.pmean((grads, metrics), DATA_AXIS)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, metrics

  if mesh is not None:
    step = data_parallel(step, mesh, in_specs=(REPLICATED,) * 3 + (BATCH,) * 3 + (REPLICATED,),
                         out_specs=(REPLICATED, REPLICATED, BATCH, REPLICATED))
  return jax.jit(step, donate_argnums=(0, 1, 5))


def make_lm_eval_step(graphdef: nnx.GraphDef) -> Callable:
  """Builds jitted `step(params, rest, x, y, state) -> (state, cross_entropy)` (eval mode:
  split the model after `.eval()`)."""

  def step(params, rest, x, y, state):
    _, (state, cross_entropy) = lm_loss(nnx.merge(graphdef, params, rest), x, y, state, None)
    return state, cross_entropy

  return jax.jit(step)
