"""fastai's two parameter rules on every model of the package, and the one freezing mechanism.

- `wd_bn_bias=False`: norm layers' parameters and every module's `bias` get no weight decay
  (fastai's `norm_bias_params(model, with_bias=True)`); `train_bn=True`: norm layers keep
  training in frozen groups (`norm_bias_params(model, with_bias=False)`).
- Freezing is parameter groups + `fastai_optimizer(frozen=..., train_mask=...)`, and a
  frozen stage's step never forms the frozen weights' gradients (`make_train_step(trained=)`).

The expected sets come from fastai's rule applied to the torch twins (module types, not our
code), matched to our parameters through the lossless converters.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import torch_ref.awd_lstm as ref_lm
import torch_ref.xresnet as ref
from flax_ulmfit.interop import flax_to_torch
from flax_ulmfit.interop.xresnet import xresnet_to_torch
from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config, xresnet
from flax_ulmfit.models.batchnorm import BatchNorm
from flax_ulmfit.models.transfer import create_cnn_model
from flax_ulmfit.train import optim
from flax_ulmfit.train.losses import cross_entropy
from flax_ulmfit.train.step import init_train_state, make_train_step
from flax_ulmfit.vision.learner import XRESNET_GROUPS, xresnet_split

TORCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.LayerNorm)  # fastai's norm_types here


def _rngs(seed):
  return nnx.Rngs(jax.random.key(seed, impl='rbg'))  # rbg: fast eager init (see test_xresnet.py)


def fastai_norm_bias_names(model: torch.nn.Module, with_bias: bool) -> set[str]:
  """fastai's `norm_bias_params` (torch_core.py), as parameter names: every parameter of a norm
  layer, and (with_bias) the `bias` attribute of other modules when it is a parameter."""
  ids = set()
  for module in model.modules():
    if isinstance(module, TORCH_NORMS):
      ids |= {id(p) for p in module.parameters()}
    elif with_bias and isinstance(getattr(module, 'bias', None), torch.nn.Parameter):
      ids.add(id(module.bias))
  return {name for name, p in model.named_parameters() if id(p) in ids}


def masked_names(model: nnx.Module, mask, to_torch) -> set[str]:
  """The torch names of the parameters `mask` marks: the mask written into the model as values
  no initialisation or statistic holds (7 marked, -7 not) and read back through the converter."""
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p, m: jnp.full(p.shape, 7.0 if m else -7.0, p.dtype), params, mask))
  return {name for name, value in to_torch(model).items() if value.dtype.kind == 'f' and np.all(value == 7.0)}


@pytest.mark.parametrize('build,build_ref', [
    (lambda: xresnet.xresnet18(c_in=1, n_out=10, rngs=_rngs(0)), lambda: ref.xresnet18(c_in=1, n_out=10)),
    (lambda: create_cnn_model(xresnet.xresnet18(rngs=_rngs(0)), 5, rngs=_rngs(1)),
     lambda: ref.create_cnn_model(ref.xresnet18(), 5))])
def test_vision_models_follow_fastai_norm_and_bias_rules(build, build_ref):
  model, twin = build(), build_ref()
  params = nnx.state(model, nnx.Param)
  exempt = masked_names(model, optim.bn_bias_mask(model, params), xresnet_to_torch)
  assert exempt == fastai_norm_bias_names(twin, with_bias=True)
  norms = masked_names(model, optim.norm_mask(model, params), xresnet_to_torch)
  assert norms == fastai_norm_bias_names(twin, with_bias=False)
  if isinstance(model, xresnet.XResNet):  # the figure of issue 11: 45 of 68 arrays, not 23
    assert (len(jax.tree.leaves(params)), len(exempt)) == (68, 45)


@pytest.mark.parametrize('name', ['xresnet34', 'xresnet50', 'xresnet101', 'xresnet152'])
def test_deeper_presets_exempt_what_fastai_exempts(name):
  """Counts on abstract models (no weights built) against the torch twin on 'meta'."""
  model = nnx.eval_shape(lambda: getattr(xresnet, name)(rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  with torch.device('meta'):
    twin = getattr(ref, name)()
  assert sum(jax.tree.leaves(optim.bn_bias_mask(model, params))) == len(fastai_norm_bias_names(twin, True))
  assert sum(jax.tree.leaves(optim.norm_mask(model, params))) == len(fastai_norm_bias_names(twin, False))


def test_language_model_exempts_only_the_decoder_bias():
  """fastai's rule sees LSTM biases as `bias_ih_l0`/`bias_hh_l0` (not a module's `bias`): they decay."""
  config = dict(awd_lstm_lm_config, emb_sz=6, n_hid=8, n_layers=2)
  lm, twin = LanguageModel(20, config, rngs=nnx.Rngs(0)), ref_lm.LanguageModel(20, config)
  params = nnx.state(lm, nnx.Param)
  assert fastai_norm_bias_names(twin, True) == {'1.decoder.bias'}
  assert masked_names(lm, optim.bn_bias_mask(lm, params), flax_to_torch) == {'1.decoder.bias'}
  assert not any(jax.tree.leaves(optim.norm_mask(lm, params)))


def test_norm_layer_marker():
  """One rule: Flax's own norm layers and any class that declares `is_norm_layer = True`."""
  assert optim.is_norm_layer(BatchNorm(3))
  for layer in (nnx.BatchNorm(3, rngs=nnx.Rngs(0)), nnx.LayerNorm(3, rngs=nnx.Rngs(0)),
                nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0)), nnx.RMSNorm(3, rngs=nnx.Rngs(0))):
    assert optim.is_norm_layer(layer)

  class Scale(nnx.Module):
    is_norm_layer = True

    def __init__(self):
      self.scale = nnx.Param(jnp.ones(2))

  class Net(nnx.Module):
    def __init__(self):
      self.norm, self.linear = Scale(), nnx.Linear(2, 2, rngs=nnx.Rngs(0))

  net = Net()
  assert not optim.is_norm_layer(net.linear) and not optim.is_norm_layer(net)
  mask = optim.norm_mask(net, nnx.state(net, nnx.Param))
  assert {optim.path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)} == {
      'norm/scale': True, 'linear/kernel': False, 'linear/bias': False}


def _tiny_cnn():
  """A small transfer model whose BatchNorm scales are all 0.5: fastai's zero-initialised last
  scale of each residual branch would otherwise keep every gradient out of the branch."""
  body = xresnet.XResNet(1, [1, 1], c_in=1, stem_szs=(4, 4, 64), widen=0.25, conv_impl='xla', rngs=_rngs(0))
  model = create_cnn_model(body, 3, lin_ftrs=[8], rngs=_rngs(1))
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.full_like(p, 0.5) if optim.path_str(path).endswith('bn/scale') else p, params))
  return model


def _loss(model, batch, rng, carry):
  x, y = batch
  return cross_entropy(model(x, dropout_masks=[None, None]), y), (carry, {})


def _compiled(model, tx, batch, trained=None):
  """The jitted train step compiled for `batch`, its initial state, and its FLOP count."""
  state = init_train_state(model, tx)
  compiled = make_train_step(model, _loss, tx, trained=trained).lower(state, batch, jax.random.key(0), None).compile()
  cost = compiled.cost_analysis()
  return compiled, state, (cost[0] if isinstance(cost, list) else cost)['flops']


def test_frozen_body_trains_only_its_norm_layers_and_skips_their_gradients():
  model = _tiny_cnn()
  params = nnx.state(model, nnx.Param)
  labels = xresnet_split(params)
  assert set(jax.tree.leaves(labels)) == set(XRESNET_GROUPS)
  norms = optim.norm_mask(model, params)
  tx = optim.fastai_optimizer(labels, {g: 1e-2 for g in XRESNET_GROUPS}, frozen=['stem', 'body'], train_mask=norms)
  rng = np.random.default_rng(0)
  batch = (jnp.asarray(rng.standard_normal((4, 12, 12, 1)), jnp.float32), jnp.asarray([0, 1, 2, 1]))
  step, state, frozen_flops = _compiled(model, tx, batch, optim.trained_mask(labels, ['stem', 'body'], norms))
  after = step(state, batch, jax.random.key(0), None)[0].params
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), after, params)
  for path, did_move in jax.tree_util.tree_leaves_with_path(moved):
    name = optim.path_str(path)
    assert did_move != (name.startswith('body/') and '/bn/' not in name), name
  # The frozen weights' gradients feed nothing, so XLA drops them and the frozen step does
  # less work than the unfrozen one (xresnet18's body at 28x28: 9.0 against 13.5 GFLOP);
  # without `trained` the inf/NaN check reads every gradient, and they are formed again.
  unfrozen_flops = _compiled(model, optim.fastai_optimizer(labels, {g: 1e-2 for g in XRESNET_GROUPS}), batch)[2]
  assert frozen_flops < 0.85 * unfrozen_flops, (frozen_flops, unfrozen_flops)
  assert _compiled(model, tx, batch)[2] > 1.1 * frozen_flops, frozen_flops


def test_frozen_group_kept_training_needs_a_learning_rate():
  model = _tiny_cnn()
  params = nnx.state(model, nnx.Param)
  labels = xresnet_split(params)
  with pytest.raises(ValueError, match=r"no learning rate for groups \['body', 'stem'\].*train_mask"):
    optim.fastai_optimizer(labels, {'head': 1e-2}, frozen=['stem', 'body'], train_mask=optim.norm_mask(model, params))
  tx = optim.fastai_optimizer(labels, {'head': 1e-2}, frozen=['stem', 'body'])  # fully frozen: no rate needed
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert all(not np.any(u) for p, u in jax.tree_util.tree_leaves_with_path(updates)
             if optim.path_str(p).startswith('body/'))
  assert isinstance(tx, optax.GradientTransformation)
