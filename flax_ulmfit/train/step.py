"""Pure, jitted train and eval steps over a split NNX model; the model and loss come from the caller.

A loss function has the signature `loss_fn(model, batch, rng, carry) -> (loss, (carry, metrics))`:
`carry` is what a recurrent model passes from batch to batch (None otherwise; return it
with `jax.lax.stop_gradient` applied) and `metrics` a dict of scalars to average.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax.sharding import Mesh

from flax_ulmfit import parallel, xla_cpu
from flax_ulmfit.parallel import BATCH, DATA_AXIS, REPLICATED
from flax_ulmfit.train.precision import loss_scale

LossFn = Callable[[nnx.Module, Any, jax.Array, Any], tuple[jax.Array, tuple[Any, dict]]]


class TrainState(NamedTuple):
  """What a train step updates: the model's parameters, its other state, the optimizer's state."""
  params: nnx.State     # nnx.Param variables, fp32
  rest: nnx.State       # BatchStat, RNG counters and the like
  opt_state: optax.OptState


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> TrainState:
  """Splits `model` into parameters and the rest (copied: steps donate their buffers, the
  model keeps its own), and initialises `tx` on the parameters."""
  _, params, rest = jax.tree.map(jnp.copy, nnx.split(model, nnx.Param, ...))
  return TrainState(params, rest, tx.init(params))


def _mean_over_devices(tree):
  """pmean over the data axis of every floating leaf (BatchNorm statistics); keys and counters stay."""
  return jax.tree.map(lambda x: jax.lax.pmean(x, DATA_AXIS) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _metrics_over_devices(metrics: dict) -> dict:
  """Metrics of the global batch from each device's: means averaged, the row `count` summed."""
  return {k: jax.lax.psum(v, DATA_AXIS) if k == 'count' else jax.lax.pmean(v, DATA_AXIS) for k, v in metrics.items()}


def _on_mesh(step: Callable, mesh: Mesh, where: str, replicated: Callable | None = None) -> Callable:
  """`step(state, batch, *args)` fed global arrays: `batch` and the carry (last argument) from
  this process's rows (`parallel.shard_batch`); a batch whose rows do not split over the
  devices raises, or, given `replicated` (one process only), runs whole on every device."""
  n_devices = mesh.shape[DATA_AXIS]

  def placed(state, batch, *args):
    leaves = jax.tree.leaves(batch)
    rows = leaves[0].shape[0] * jax.process_count() if leaves else 0
    if rows % n_devices:
      if replicated is not None and jax.process_count() == 1:
        return replicated(state, batch, *args)
      parallel.check_divisible(rows, mesh, where)
    *args, carry = args
    return step(state, parallel.shard_batch(batch, mesh), *args, parallel.shard_batch(carry, mesh))
  return placed


def check_ids(ids, upper: int, what: str) -> None:
  """Raises unless `ids` are integers in [0, `upper`): a host-side check, since inside jit
  an out-of-range id is silently clamped (or gives NaN) and the step still updates."""
  ids = np.asarray(ids)
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f'{what} must be integer ids, got dtype {ids.dtype}')
  if ids.size and (ids.min() < 0 or ids.max() >= upper):
    bad = np.argwhere((ids < 0) | (ids >= upper))[0]
    raise ValueError(f'{what} must lie in [0, {upper}), got {ids[tuple(bad)]} at index {tuple(bad.tolist())} '
                     f'(min {ids.min()}, max {ids.max()}); were they made with another vocabulary or label map?')


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.inexact)] or [True]))


def _checked(step: Callable, check_batch: Callable | None) -> Callable:
  if check_batch is None:
    return step

  def checked(state, batch, *args):
    check_batch(batch)
    return step(state, batch, *args)
  return checked


def make_train_step(model: nnx.Module, loss_fn: LossFn, tx: optax.GradientTransformation,
                    mesh: Mesh | None = None, check_batch: Callable[[Any], None] | None = None,
                    trained: Any = None) -> Callable:
  """Returns `step(state, batch, rng, carry) -> (state, carry, metrics)`, jitted, `state` donated.

  `model` is put in train mode and split once; the step merges the graph with the state
  it is given, so `model` itself is not updated (use `update_model`). If `tx` contains a
  `dynamic_loss_scale`, the loss is multiplied by its current scale before differentiation.
  `metrics` holds the device scalars of `loss_fn`'s metrics and:
  - `loss`: `loss_fn`'s own 'loss' metric when it gives one (what fastai's Recorder logs,
    e.g. a language model's cross-entropy before AR/TAR), else the differentiated loss;
  - `nonfinite`: True when the differentiated loss, or (without a loss scaler, which skips
    overflowing steps itself) the gradient of a trained parameter, was inf/NaN. The step is
    applied all the same (keeping the old state instead would cost a pass over the weights and
    the optimizer state: a quarter of an xresnet18 step on a CPU); `fit` stops the run at such
    a step before it saves anything (fastai's TerminateOnNaNCallback), so no inf/NaN weights
    reach a checkpoint or a file.

  `trained`: a pytree of bools like the parameters, True for those `tx` moves
  (`optim.trained_mask`); the inf/NaN check then reads only their gradients, and a frozen
  parameter's gradient is never formed. None checks every gradient.

  `check_batch(batch)` runs on the host before the batch enters the jitted step (e.g.
  `train.lm.lm_batch_check(vocab_size)`); device-array batches are copied to the host for it.

  With `mesh` (`parallel.data_mesh()`), the step is data-parallel and computes what one
  device computes on the whole batch: place `state` with `parallel.replicate`; `batch` and
  `carry` may be host arrays (each process gives its rows, `parallel.process_rows`) or
  global arrays, split along their leading axis, whose size (the global batch) must divide
  by the number of devices. Each device runs the one-device step on its rows; randomness
  per row is drawn for the global batch and BatchNorm statistics are over the global batch
  (see `flax_ulmfit.parallel`), gradients and metrics are averaged (a `count` metric summed).
  Batches with explicit dropout masks (parity tests) are for one device.
  """
  model.train()
  graphdef = nnx.graphdef(model)

  def step(state: TrainState, batch, rng, carry):
    scale = loss_scale(state.opt_state)

    def objective(params):
      module = nnx.merge(graphdef, params, state.rest, copy=True)
      loss, (new_carry, metrics) = loss_fn(module, batch, rng, carry)
      _, _, rest = nnx.split(module, nnx.Param, ...)
      scaled = loss if scale is None else loss * scale
      return scaled, (loss, new_carry, metrics, rest)

    grads, (loss, carry, metrics, rest) = jax.grad(objective, has_aux=True)(state.params)
    if mesh is not None:
      grads, loss, rest = _mean_over_devices((grads, loss, rest))
      metrics = _metrics_over_devices(metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(loss)
    if scale is None:
      finite &= _all_finite(grads if trained is None else jax.tree.map(lambda g, t: g if t else None, grads, trained))
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    return TrainState(params, rest, opt_state), carry, {'loss': metrics.pop('loss', loss), **metrics,
                                                        'nonfinite': ~finite}

  # not the carry: callers may pass one zeros array twice
  options = xla_cpu.compiler_options()
  if mesh is None:
    return _checked(jax.jit(step, donate_argnums=0, compiler_options=options), check_batch)
  step = jax.jit(parallel.data_parallel(step, mesh, in_specs=(REPLICATED, BATCH, REPLICATED, BATCH),
                                        out_specs=(REPLICATED, BATCH, REPLICATED)), donate_argnums=0,
                 compiler_options=options)
  return _checked(_on_mesh(step, mesh, 'make_train_step'), check_batch)


def make_eval_step(model: nnx.Module, loss_fn: LossFn, check_batch: Callable[[Any], None] | None = None,
                   mesh: Mesh | None = None) -> Callable:
  """Returns `step(state, batch, carry) -> (carry, metrics)`, jitted, with `model` in eval mode.

  `loss_fn` is called with `rng=None`; eval mode needs no randomness. `metrics['loss']` is
  `loss_fn`'s 'loss' metric if it gives one, else its loss. `check_batch` as for `make_train_step`.
  With `mesh`, the batch is split over its devices as in `make_train_step` and the metrics
  are the global batch's; a batch whose rows do not split over the devices (a short last
  validation batch) runs whole on every device (one process; with several it raises).
  """
  model.eval()
  graphdef = nnx.graphdef(model)

  def step(state: TrainState, batch, carry):
    module = nnx.merge(graphdef, state.params, state.rest)
    loss, (carry, metrics) = loss_fn(module, batch, None, carry)
    metrics = {'loss': jnp.asarray(loss, jnp.float32), **metrics}
    return carry, metrics if mesh is None or parallel.shard()[1] == 1 else _metrics_over_devices(metrics)

  options = xla_cpu.compiler_options()
  if mesh is None:
    return _checked(jax.jit(step, compiler_options=options), check_batch)
  sharded = jax.jit(parallel.data_parallel(step, mesh, in_specs=(REPLICATED, BATCH, BATCH),
                                           out_specs=(BATCH, REPLICATED)), compiler_options=options)
  return _checked(_on_mesh(sharded, mesh, 'make_eval_step', replicated=jax.jit(step, compiler_options=options)),
                  check_batch)


def update_model(model: nnx.Module, state: TrainState) -> None:
  """Writes the trained parameters and state back into `model`."""
  nnx.update(model, state.params, state.rest)
