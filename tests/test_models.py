"""ResNet family and SimCLR head: shapes, parameter counts, initialisation, BN, probe, dtype."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from simclr_jax.models import resnet, simclr


def _param_count(module, shape=(1, 224, 224, 3)) -> int:
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return sum(x.size for x in jax.tree.leaves(variables['params']))


def test_resnet50_and_18_parameter_counts():
  # torchvision's resnet50/resnet18 minus their 1000-way fc layer.
  assert _param_count(resnet.ResNet(50, 1.0)) == 25_557_032 - 2_049_000  # 23.5M
  assert _param_count(resnet.ResNet(18, 1.0)) == 11_689_512 - 513_000


@pytest.mark.parametrize('depth', sorted(resnet.STAGES))
def test_every_depth_runs_forward(depth):
  model = resnet.ResNet(depth, width=1 / 16, cifar_stem=True)
  x = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 3), np.float32))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  h = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert h.shape == (2, resnet.feature_dim(depth, 1 / 16))
  assert np.all(np.isfinite(h))
  blocks = [k for k in variables['params'] if k.startswith('stage')]
  assert len(blocks) == sum(resnet.STAGES[depth][1])


def test_unknown_depth_names_config_key():
  with pytest.raises(ValueError, match='config.model.depth=42'):
    resnet.ResNet(42).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def _tiny(num_classes=10, num_proj_layers=2, dtype='float32'):
  cfg = base.get_config().model
  cfg.update(width=1 / 16, num_proj_layers=num_proj_layers, dtype=dtype)
  return simclr.from_config(cfg, num_classes)


def test_last_bn_of_each_block_starts_at_zero_and_others_at_one():
  model = _tiny()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))['params']['encoder']
  for name, block in params.items():
    if not name.startswith('stage'):
      continue
    bns = sorted(k for k in block if k.startswith('BatchNorm'))
    assert np.all(block[bns[-1]]['scale'] == 0), name
    for k in bns[:-1]:
      assert np.all(block[k]['scale'] == 1), (name, k)


def test_batch_norm_momentum_and_epsilon():
  """Running mean follows 0.9·old + 0.1·batch mean; normalisation uses eps 1e-5 (numpy)."""
  model = _tiny()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 8, 8, 3)).astype(np.float32))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  stem_kernel = np.asarray(variables['params']['encoder']['stem_conv']['kernel'])
  _, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']))(variables)
  conv = jax.lax.conv_general_dilated(x, stem_kernel, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  conv = np.asarray(conv, np.float64)
  mean, var = conv.mean((0, 1, 2)), conv.var((0, 1, 2))
  bs = updates['batch_stats']['encoder']['stem_bn']
  np.testing.assert_allclose(bs['mean'], 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bs['var'], 0.9 * 1.0 + 0.1 * var, rtol=1e-4)
  assert resnet.BN_EPSILON == 1e-5


@pytest.mark.parametrize('layers', [2, 3])
def test_projection_head_structure(layers):
  model = _tiny(num_proj_layers=layers)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
  head = variables['params']['projection']
  h_dim = resnet.feature_dim(18, 1 / 16)
  assert sorted(k for k in head if k.startswith('dense')) == [f'dense{i}' for i in range(layers)]
  for i in range(layers):
    assert set(head[f'dense{i}']) == {'kernel'}  # no dense bias
    last = i == layers - 1
    assert head[f'dense{i}']['kernel'].shape == (h_dim, 128 if last else h_dim)
    assert set(head[f'bn{i}']) == ({'scale'} if last else {'scale', 'bias'})
  out = model.apply(variables, jnp.ones((2, 8, 8, 3)), train=False)
  assert out['z'].shape == (2, 128) and out['h'].shape == (2, h_dim)
  assert out['probe_logits'].shape == (2, 10)


def test_probe_does_not_train_the_encoder():
  model = _tiny()
  x = jnp.asarray(np.random.default_rng(2).random((4, 8, 8, 3), np.float32))
  variables = jax.jit(model.init)(jax.random.key(0), x)

  def probe_only(params):
    out, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(out['probe_logits'] ** 2)

  grads = jax.jit(jax.grad(probe_only))(variables['params'])
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads['encoder']))
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads['probe']))


def test_bfloat16_compute_keeps_float32_params_stats_and_outputs():
  model = _tiny(dtype='bfloat16')
  x = jnp.ones((2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  leaves = jax.tree.leaves(variables)
  assert all(v.dtype == jnp.float32 for v in leaves)
  out, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert out['z'].dtype == jnp.float32 and out['h'].dtype == jnp.float32
  hlo = jax.jit(lambda v: model.apply(v, x, train=False)['z']).lower(variables).as_text()
  assert 'bf16' in hlo and 'convolution' in hlo


def test_bad_dtype_names_config_key():
  with pytest.raises(ValueError, match='config.model.dtype'):
    _tiny(dtype='float8')
