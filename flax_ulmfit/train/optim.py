"""fastai's Adam and parameter groups as optax transformations.

The pieces: `fastai_adam` (one transformation, lr and momentum schedulable through
`optax.inject_hyperparams`), `label_params` (path rules -> group names),
`discriminative_lrs` (fastai's `slice(lo, hi)`), `is_norm_layer` / `norm_mask` (what
`train_bn=True` keeps training), `bn_bias_mask` (what `wd_bn_bias=False` exempts), and
`fastai_optimizer`, which chains freezing, clipping and one Adam per group with
`optax.multi_transform`. A new stage builds a new optimizer and starts from its `init`:
fastai's `Learner.freeze_to` clears the optimizer state.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

FROZEN = 'frozen'
FLAX_NORM_LAYERS = (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)


class ScaleByFastaiAdamState(NamedTuple):
  """fastai's per-parameter Adam state: its own step count and the two running averages."""
  step: optax.Updates      # per leaf: shape=(), dtype=int32
  grad_avg: optax.Updates  # like params
  sqr_avg: optax.Updates   # like params


def _one_minus_power(beta, n):
  """`1 - beta**n` without float32 cancellation (`-expm1(n log beta)`, the log in float64 for Python floats)."""
  log_beta = math.log(beta) if isinstance(beta, (int, float)) else jnp.log(beta)
  return -jnp.expm1(n * log_beta)


def _fastai_adam(learning_rate: float, mom: float = 0.9, sqr_mom: float = 0.99, eps: float = 1e-5,
                 wd: float = 0.01, wd_mask: Any = None) -> optax.GradientTransformation:
  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, dtype=jnp.float32)
    return ScaleByFastaiAdamState(step=jax.tree.map(lambda p: jnp.zeros([], jnp.int32), params),
                                  grad_avg=jax.tree.map(zeros, params), sqr_avg=jax.tree.map(zeros, params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('fastai_adam: update needs params (decoupled weight decay uses them)')
    mask = wd_mask(params) if callable(wd_mask) else wd_mask
    if mask is None:
      mask = jax.tree.map(lambda p: True, params)
    step = jax.tree.map(lambda s: s + 1, state.step)
    grad_avg = jax.tree.map(lambda a, g: mom * a + (1.0 - mom) * g, state.grad_avg, grads)
    sqr_avg = jax.tree.map(lambda s, g: sqr_mom * s + (1.0 - sqr_mom) * g * g, state.sqr_avg, grads)

    def leaf(p, n, a, s, decay):
      n = n.astype(jnp.float32)
      debias1, debias2 = _one_minus_power(mom, n), _one_minus_power(sqr_mom, n)
      adam = (learning_rate / debias1) * a / (jnp.sqrt(s / debias2) + eps)
      # fastai multiplies p by the float32 factor (1 - lr * wd); p * factor - p is that step exactly.
      return ((p * (1.0 - learning_rate * wd) - p) if decay else 0.0) - adam

    updates = jax.tree.map(leaf, params, step, grad_avg, sqr_avg, mask)
    return updates, ScaleByFastaiAdamState(step, grad_avg, sqr_avg)

  return optax.GradientTransformation(init_fn, update_fn)


# sqr_mom and eps stay Python floats (fastai never schedules them), so 1 - sqr_mom is exact.
fastai_adam = optax.inject_hyperparams(_fastai_adam, static_args=('sqr_mom', 'eps', 'wd_mask'))
fastai_adam.__doc__ = """fastai's `Adam` (decoupled weight decay, eps outside the sqrt), as updates.

  Per parameter p with gradient g and its own step count n:
  `p <- p * (1 - lr * wd)` (skipped where `wd_mask` is False), then
  `grad_avg = mom * grad_avg + (1 - mom) * g`, `sqr_avg = sqr_mom * sqr_avg + (1 - sqr_mom) * g**2`,
  `p <- p - lr / (1 - mom**n) * grad_avg / (sqrt(sqr_avg / (1 - sqr_mom**n)) + eps)`.
  The debiasing uses the current momentum, as fastai's `adam_step` does. `learning_rate`,
  `mom` and `wd` may be schedules `step -> value` (through `optax.inject_hyperparams`).

  Args:
    learning_rate: lr (float or schedule).
    mom: beta1 (float or schedule, e.g. `one_cycle_moms`).
    sqr_mom: beta2 (a float).
    eps: added to the square root (a float).
    wd: decoupled weight decay.
    wd_mask: pytree of bools (or `params -> pytree`) saying which parameters decay.

  References:
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019; fastai `optimizer.py`.
  """


def path_str(path: tuple) -> str:
  """'a/b/0/c' from a JAX key path, dropping the `.value` of NNX variables."""
  names = []
  for key in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  if names and names[-1] == 'value':
    names.pop()
  return '/'.join(names)


def label_params(params: Any, rules: Sequence[tuple[str | Callable[[str], bool], str]],
                 default: str | None = None) -> Any:
  """Labels every parameter with the group of the first rule its path matches.

  Args:
    params: a pytree of parameters (e.g. `nnx.state(model, nnx.Param)`).
    rules: `(pattern, label)` pairs; `pattern` is a regex searched in the path string
      ('encoder/embedding', '/'-joined) or a predicate on it.
    default: label of paths no rule matches; None makes an unmatched path an error.

  Returns:
    A pytree of labels with the structure of `params` (for `optax.multi_transform`).
  """
  def label(path, _):
    name = path_str(path)
    for pattern, group in rules:
      if pattern(name) if callable(pattern) else re.search(pattern, name):
        return group
    if default is None:
      raise ValueError(f'label_params: parameter {name!r} matches no rule in '
                       f'{[p if isinstance(p, str) else p.__name__ for p, _ in rules]}; '
                       'add a rule for it or pass default=')
    return default
  return jax.tree_util.tree_map_with_path(label, params)


def discriminative_lrs(lr_lo: float, lr_hi: float | None = None, n_groups: int = 1) -> list[float]:
  """fastai's `slice` over `n_groups` groups, first group first.

  `(lo, hi)` spreads geometrically from lo to hi (ULMFiT uses `lo = hi / 2.6**(n_groups - 1)`);
  `(hi,)` alone (lr_hi None) gives `hi / 10` to every group but the last, which gets hi.
  """
  if n_groups < 1:
    raise ValueError(f'discriminative_lrs: n_groups must be >= 1, got {n_groups=}')
  if lr_hi is None:
    return [lr_lo / 10] * (n_groups - 1) + [lr_lo]
  if n_groups == 1:
    return [lr_hi]
  return [float(x) for x in lr_lo * (lr_hi / lr_lo) ** (np.arange(n_groups) / (n_groups - 1))]


def is_norm_layer(module: Any) -> bool:
  """fastai's `norm_types` test: Flax's own norm layers, and any module whose class sets
  `is_norm_layer = True` (the marker the project's norm layers carry)."""
  return isinstance(module, FLAX_NORM_LAYERS) or getattr(type(module), 'is_norm_layer', False) is True


def norm_mask(model: nnx.Module, params: Any) -> Any:
  """True for the parameters of normalisation layers (`is_norm_layer`): what fastai's
  `train_bn=True` keeps training inside frozen groups.

  Args:
    model: the module `params` came from.
    params: a pytree of its parameters (e.g. `nnx.state(model, nnx.Param)`).
  """
  norm_paths = {tuple(map(str, path)) for path, module in nnx.iter_modules(model) if is_norm_layer(module)}

  def in_norm(path, _):
    names = tuple(path_str(path).split('/'))
    return any(names[:k] in norm_paths for k in range(len(names)))
  return jax.tree_util.tree_map_with_path(in_norm, params)


def bn_bias_mask(model: nnx.Module, params: Any) -> Any:
  """True for the parameters of normalisation layers and for biases (fastai's `norm_bias_params`)."""
  return jax.tree_util.tree_map_with_path(lambda path, in_norm: in_norm or path_str(path).split('/')[-1] == 'bias',
                                          norm_mask(model, params))


def fastai_optimizer(labels: Any, lrs: Mapping[str, float | optax.Schedule], *,
                     mom: float | optax.Schedule = 0.9, sqr_mom: float = 0.99, eps: float = 1e-5,
                     wd: float = 0.01, wd_mask: Any = None, frozen: Sequence[str] = (),
                     train_mask: Any = None, clip_norm: float | None = None) -> optax.GradientTransformation:
  """fastai's `Learner` optimizer: param groups, freezing, clipping, Adam per group.

  Args:
    labels: pytree of group names, like params (from `label_params`).
    lrs: learning rate (float or schedule) of each group.
    mom, sqr_mom, eps, wd: `fastai_adam`'s, shared by every group.
    wd_mask: pytree of bools, True where weight decay applies (fastai's default exempts
      `bn_bias_mask`, i.e. pass `jax.tree.map(lambda b: not b, bn_bias_mask(model, params))`).
    frozen: groups whose parameters do not move (`optax.set_to_zero()`); the one freezing
      mechanism for every model (fastai's `freeze_to`). Their gradients are then unused, so
      XLA never computes them: a frozen body costs no weight-gradient work.
    train_mask: pytree of bools, True for parameters trained even inside a frozen group,
      with that group's learning rate (fastai's `train_bn=True`: pass `norm_mask`).
    clip_norm: if set, `optax.clip_by_global_norm(clip_norm)` over the trainable gradients.

  Returns:
    An `optax.GradientTransformation`; groups' states live under their names in the
    `multi_transform` state.
  """
  groups = set(jax.tree.leaves(labels))
  if FROZEN in groups:
    raise ValueError(f'fastai_optimizer: {FROZEN!r} is reserved for frozen parameters; rename that group')
  unknown = sorted(set(frozen) - groups)
  if unknown:
    raise ValueError(f'fastai_optimizer: frozen groups {unknown} are not among the labels {sorted(groups)}')
  effective = _effective_labels(labels, frozen, train_mask)
  present = set(jax.tree.leaves(effective))
  missing = sorted(present - {FROZEN} - set(lrs))
  if missing:
    raise ValueError(f'fastai_optimizer: no learning rate for groups {missing} (a frozen group needs one when '
                     f'train_mask keeps some of its parameters training); lrs has {sorted(lrs)}')
  def group_mask(group):  # wd_mask restricted to one group, shaped like multi_transform's masked params
    if wd_mask is None:
      return None
    return jax.tree.map(lambda m, g: m if g == group else optax.MaskedNode(), wd_mask, effective)
  # sorted, not set order: set order follows the process's string hashing, and the step's
  # program (its compilation-cache key, possibly XLA's fusions) would differ between runs
  trained = sorted(present - {FROZEN})
  transforms = {g: fastai_adam(lrs[g], mom, sqr_mom, eps, wd, group_mask(g)) for g in trained}
  transforms[FROZEN] = optax.set_to_zero()
  steps = []
  if clip_norm is not None:
    keep = {g: optax.identity() for g in trained} | {FROZEN: optax.set_to_zero()}
    steps += [optax.multi_transform(keep, effective), optax.clip_by_global_norm(clip_norm)]
  return optax.chain(*steps, optax.multi_transform(transforms, effective))


def _effective_labels(labels: Any, frozen: Sequence[str], train_mask: Any) -> Any:
  """`labels` with every frozen parameter (not kept training by `train_mask`) relabelled `FROZEN`."""
  if train_mask is None:
    train_mask = jax.tree.map(lambda _: False, labels)
  return jax.tree.map(lambda g, keep: g if g not in frozen or keep else FROZEN, labels, train_mask)


def trained_mask(labels: Any, frozen: Sequence[str] = (), train_mask: Any = None) -> Any:
  """True for the parameters that `fastai_optimizer(labels, ..., frozen=frozen,
  train_mask=train_mask)` moves: pass it as `make_train_step(trained=...)`, whose inf/NaN check
  then reads only their gradients (a frozen parameter's gradient is never formed)."""
  return jax.tree.map(lambda g: g != FROZEN, _effective_labels(labels, frozen, train_mask))


def hyperparams(opt_state: Any, group: str | None = None) -> dict[str, jax.Array]:
  """The hyperparameters (lr, mom, ...) last used by `group`, or by the last group by name.

  Empty if `opt_state` holds no `optax.inject_hyperparams` state (for `group`: a frozen group has none).
  """
  is_inject = lambda x: isinstance(x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))
  found = [(path, node) for path, node in jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_inject)[0]
           if is_inject(node) and (group is None or any(getattr(k, 'key', None) == group for k in path))]
  return dict(found[-1][1].hyperparams) if found else {}
