"""Mixed precision: a dtype policy and dynamic loss scaling as an optax transformation."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Policy:
  """Which dtypes a model uses: fp32 master params, `compute_dtype` arithmetic, fp32 outputs.

  Apply it through the modules' constructors (`**policy.module_kwargs()`), so parameters are
  created in fp32 and cast on use; normalisation layers take `**policy.norm_kwargs()` (fp32
  BatchNorm); the losses in `train.losses` cast logits to fp32 before softmax and reductions.
  """
  compute_dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32

  @property
  def needs_loss_scaling(self) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return jnp.dtype(self.compute_dtype) == jnp.float16

  def module_kwargs(self) -> dict:
    return {'dtype': self.compute_dtype, 'param_dtype': self.param_dtype}

  def norm_kwargs(self) -> dict:
    return {'dtype': jnp.float32, 'param_dtype': self.param_dtype}

  def cast_to_compute(self, tree: Any) -> Any:
    return _cast_floats(tree, self.compute_dtype)

  def cast_to_output(self, tree: Any) -> Any:
    return _cast_floats(tree, self.output_dtype)


def _cast_floats(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


POLICIES = {'fp32': Policy(), 'bf16': Policy(jnp.bfloat16), 'fp16': Policy(jnp.float16)}


def get_policy(name: str) -> Policy:
  """'fp32', 'bf16' or 'fp16'."""
  if name not in POLICIES:
    raise ValueError(f'get_policy: unknown precision {name!r}; expected one of {sorted(POLICIES)}')
  return POLICIES[name]


_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


class DynamicLossScaleState(NamedTuple):
  """The loss scale, the clean steps since it last changed, and the wrapped optimizer's state."""
  scale: jax.Array       # shape=(), dtype=float32
  good_steps: jax.Array  # shape=(), dtype=int32
  inner_state: optax.OptState


def dynamic_loss_scale(inner: optax.GradientTransformation, init_scale: float = 2.0 ** 16,
                       growth_factor: float = 2.0, backoff_factor: float = 0.5,
                       growth_interval: int = 2000, reset_on_overflow: bool = True
                       ) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` to take gradients of `loss * scale` and keep the scale dynamic.

  Each update divides the gradients by the scale and checks every leaf for inf/NaN. On
  overflow the update is zero, `inner`'s state is kept as it was, the scale is multiplied
  by `backoff_factor` and (if `reset_on_overflow`) the clean-step count restarts. Otherwise
  `inner` runs on the unscaled gradients (so clipping inside `inner` sees true gradients)
  and after `growth_interval` clean steps the scale grows by `growth_factor`, unless that
  would overflow float32 (then it stays, and the count restarts, as in torch). The train step
  reads the scale with `loss_scale(opt_state)` to scale the loss.

  The defaults are torch's `GradScaler`; `fastai_course_scaler` is fastai's course-v3 one.

  Args:
    inner: the optimizer to protect.
    init_scale: starting scale, finite and positive.
    growth_factor: multiplier after `growth_interval` clean steps.
    backoff_factor: multiplier on overflow.
    growth_interval: clean steps between growths.
    reset_on_overflow: whether an overflow resets the clean-step count.
  """
  if not (0.0 < backoff_factor < 1.0 and growth_factor >= 1.0 and growth_interval >= 1
          and 0.0 < init_scale <= _FLOAT32_MAX):
    raise ValueError(f'dynamic_loss_scale: expected 0 < backoff_factor < 1, growth_factor >= 1, '
                     f'growth_interval >= 1 and a finite init_scale > 0 (at most float32 max '
                     f'{_FLOAT32_MAX:.4g}); got {backoff_factor=}, {growth_factor=}, '
                     f'{growth_interval=}, {init_scale=}')
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return DynamicLossScaleState(jnp.asarray(init_scale, jnp.float32), jnp.zeros([], jnp.int32),
                                 inner.init(params))

  def update_fn(grads, state, params=None, **extra_args):
    grads = jax.tree.map(lambda g: g / state.scale.astype(g.dtype), grads)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    inner_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner_state, state.inner_state)
    good = state.good_steps + 1
    grow = finite & (good >= growth_interval)
    grown = state.scale * growth_factor
    grown = jnp.where(jnp.isfinite(grown), grown, state.scale)  # torch: never past float32's max
    scale = jnp.where(finite, jnp.where(grow, grown, state.scale), state.scale * backoff_factor)
    overflow_good = jnp.zeros_like(good) if reset_on_overflow else state.good_steps
    good = jnp.where(finite, jnp.where(grow, 0, good), overflow_good)
    return updates, DynamicLossScaleState(scale, good, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


torch_grad_scaler = functools.partial(dynamic_loss_scale, init_scale=2.0 ** 16, growth_factor=2.0,
                                      backoff_factor=0.5, growth_interval=2000, reset_on_overflow=True)
torch_grad_scaler.__doc__ = "torch's `GradScaler` (fastai 2.8's native fp16): 2**16, x2 after 2000 clean steps, x0.5 on overflow, count reset."

fastai_course_scaler = functools.partial(dynamic_loss_scale, init_scale=2.0 ** 24, growth_factor=2.0,
                                         backoff_factor=0.5, growth_interval=500, reset_on_overflow=False)
fastai_course_scaler.__doc__ = "fastai course-v3's MixedPrecision: 2**24, /2 on overflow, x2 after 500 clean steps, count kept."


def loss_scale(opt_state: Any) -> jax.Array | None:
  """The current scale of the outermost `dynamic_loss_scale` in `opt_state`, or None if there is none."""
  is_scaler = lambda x: isinstance(x, DynamicLossScaleState)
  found = [n for n in jax.tree.leaves(opt_state, is_leaf=is_scaler) if is_scaler(n)]
  return found[0].scale if found else None
