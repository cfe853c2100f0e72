"""ResNet family and SimCLR head: shapes, parameter counts, initialisation, BN, probe, dtype."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from configs import base
from simclr_jax.models import resnet, simclr


def _param_count(module, shape=(1, 224, 224, 3)) -> int:
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return sum(x.size for x in jax.tree.leaves(variables['params']))


# The official architecture written out (tf2/resnet.py): block kind and blocks per stage.
_ARCH = {18: ('basic', [2, 2, 2, 2]), 34: ('basic', [3, 4, 6, 3]),
         50: ('bottleneck', [3, 4, 6, 3]), 101: ('bottleneck', [3, 4, 23, 3]),
         152: ('bottleneck', [3, 8, 36, 3]), 200: ('bottleneck', [3, 24, 36, 3])}


def _closed_form_count(depth: int, base: int = 64, cifar_stem: bool = False, sk: float = 0.0,
                       se: float = 0.0) -> int:
  """Parameters counted from the architecture: bias-free convolutions, BN gamma + beta, and a
  projection shortcut (1x1 convolution + BN) on the first block of every stage. With `sk`:
  the ResNet-D stem (3x3 convolutions to base/2, base/2, base) and, in bottleneck blocks, the
  SK 3x3 (to two streams, BN over both) with its mixing 1x1s (to max(int(f * sk), 32), BN, to
  2f); average pooling has none. With `se`: two 1x1 convolutions with biases per block,
  out → r → out with r = max(1, int(f * se)) (f, the block's base width, sets only r)."""
  kind, blocks = _ARCH[depth]
  conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731
  bn = lambda c: 2 * c  # noqa: E731
  if sk and not cifar_stem:
    half = base // 2
    total = conv(3, 3, half) + bn(half) + conv(3, half, half) + bn(half) + conv(3, half, base)
    total += bn(base)
  else:
    total = conv(3 if cifar_stem else 7, 3, base) + bn(base)
  cin = base
  for stage, n in enumerate(blocks):
    f = base * 2**stage
    out = f if kind == 'basic' else 4 * f
    for i in range(n):
      if kind == 'basic':
        total += conv(3, cin, f) + bn(f) + conv(3, f, f) + bn(f)
      elif sk:
        mid = max(int(f * sk), 32)
        total += conv(1, cin, f) + bn(f) + conv(3, f, 2 * f) + bn(2 * f)
        total += conv(1, f, mid) + bn(mid) + conv(1, mid, 2 * f) + conv(1, f, out) + bn(out)
      else:
        total += conv(1, cin, f) + bn(f) + conv(3, f, f) + bn(f) + conv(1, f, out) + bn(out)
      if i == 0:
        total += conv(1, cin, out) + bn(out)
      if se:
        r = max(1, int(f * se))
        total += out * r + r + r * out + out
      cin = out
  return total


@pytest.mark.parametrize('depth', sorted(resnet.STAGES))
def test_parameter_counts_match_the_architecture(depth):
  assert _param_count(resnet.ResNet(depth, 1.0)) == _closed_form_count(depth)
  assert _param_count(resnet.ResNet(depth, 0.25, cifar_stem=True), (1, 32, 32, 3)) == \
      _closed_form_count(depth, 16, cifar_stem=True)


@pytest.mark.parametrize('depth', [18, 50])
@pytest.mark.parametrize('sk, se', [(0.0625, 0.0), (0.0, 0.25), (0.0625, 0.25)])
def test_sk_and_se_parameter_counts_match_the_architecture(depth, sk, se):
  model = resnet.ResNet(depth, 1.0, sk_ratio=sk, se_ratio=se)
  assert _param_count(model) == _closed_form_count(depth, sk=sk, se=se)
  model = resnet.ResNet(depth, 0.25, cifar_stem=True, sk_ratio=sk, se_ratio=se)
  assert _param_count(model, (1, 32, 32, 3)) == _closed_form_count(depth, 16, True, sk, se)


# The official README's table of the published SimCLRv2 encoders: (depth, width, SK) → millions
# of parameters, rounded to 1M. Two R152-2x rows are 0.6M and 0.75M above our count (233 for
# 232.25, 354 for 353.40) where every other row is the count rounded; 1M is the table's own
# resolution. A missing stream, mixing bottleneck or stem convolution moves a count by more.
PUBLISHED_M = {(50, 1, False): 24, (50, 1, True): 35, (50, 2, False): 94, (50, 2, True): 140,
               (101, 1, False): 43, (101, 1, True): 65, (101, 2, False): 170,
               (101, 2, True): 257, (152, 1, False): 58, (152, 1, True): 89,
               (152, 2, False): 233, (152, 2, True): 354, (152, 3, True): 795}


def _v2_presets():
  """(depth, width, SK) of configs/import_official.py's SimCLRv2 architectures."""
  from configs import import_official  # pylint: disable=g-import-not-at-top
  return {name: (d, int(w), sk > 0) for name, (d, w, sk, head) in
          import_official.ARCHITECTURES.items() if head}


def test_the_import_configs_are_the_published_table():
  assert sorted(_v2_presets().values()) == sorted(PUBLISHED_M)


@pytest.mark.parametrize('name', sorted(_v2_presets()))
def test_published_simclr_v2_encoders_have_the_published_sizes(name):
  from configs import import_official  # pylint: disable=g-import-not-at-top
  model_cfg = import_official.get_config(name).model
  arch = depth, width, sk = _v2_presets()[name]
  assert (model_cfg.depth, model_cfg.width, model_cfg.sk_ratio) == (depth, width,
                                                                    0.0625 if sk else 0.0)
  count = _closed_form_count(depth, 64 * width, sk=model_cfg.sk_ratio)
  assert abs(count / 1e6 - PUBLISHED_M[arch]) < 1.0, count
  if depth == 50:  # the model itself, where tracing it is cheap
    assert _param_count(resnet.ResNet(depth, width, sk_ratio=model_cfg.sk_ratio)) == count


def test_resnet50_and_18_parameter_counts():
  # torchvision's resnet50/resnet18 minus their 1000-way fc layer. ResNet-50 is unchanged (its
  # stage 1 already needs a projection, 64 -> 256); ResNet-18's stage 1 gains the official
  # projection shortcut that torchvision's omits: a 1x1 64 -> 64 convolution and its BN.
  assert _param_count(resnet.ResNet(50, 1.0)) == 25_557_032 - 2_049_000  # 23.5M
  assert _param_count(resnet.ResNet(18, 1.0)) == 11_689_512 - 513_000 + 64 * 64 + 2 * 64


@pytest.mark.parametrize('depth', [18, 50])
def test_projection_shortcut_on_the_first_block_of_every_stage(depth):
  params = jax.eval_shape(lambda: resnet.ResNet(depth, 1 / 16).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))['params']
  kind, blocks = _ARCH[depth]
  cin = 4  # 64 / 16
  for stage, n in enumerate(blocks):
    out = 4 * 2**stage * (1 if kind == 'basic' else 4)
    for i in range(n):
      block = params[f'stage{stage + 1}_block{i + 1}']
      if i == 0:
        assert block['proj_conv']['kernel'].shape == (1, 1, cin, out)
        assert set(block['proj_bn']) == {'scale', 'bias'}
      else:
        assert 'proj_conv' not in block and 'proj_bn' not in block
      cin = out


def _filled(shapes, seed=0):
  """Variables of the given shapes filled with positive random values: no init to compile."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.05, 0.15, s.shape), s.dtype), shapes)


@pytest.mark.parametrize('depth', sorted(resnet.STAGES))
def test_every_depth_runs_forward(depth):
  model = resnet.ResNet(depth, width=1 / 16, cifar_stem=True)
  x = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 3), np.float32))
  variables = _filled(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x))
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


@pytest.fixture(scope='module')
def tiny():
  """(model, initialised variables) of the tiny SimCLR, compiled once for the whole module."""
  model = _tiny()
  return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))


def test_last_bn_of_each_block_starts_at_zero_and_others_at_one(tiny):
  params = tiny[1]['params']['encoder']
  for name, block in params.items():
    if not name.startswith('stage'):
      continue
    bns = sorted(k for k in block if k.startswith('BatchNorm'))
    assert np.all(block[bns[-1]]['scale'] == 0), name
    for k in bns[:-1]:
      assert np.all(block[k]['scale'] == 1), (name, k)


def test_batch_norm_momentum_and_epsilon(tiny):
  """Running mean follows 0.9·old + 0.1·batch mean; normalisation uses eps 1e-5 (numpy)."""
  model, variables = tiny
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 8, 8, 3)).astype(np.float32))
  stem_kernel = np.asarray(variables['params']['encoder']['stem_conv']['kernel'])
  _, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']))(variables)
  conv = lambda a, k: np.asarray(jax.lax.conv_general_dilated(
      a, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')), np.float64)
  out, mags = conv(x, stem_kernel), conv(jnp.abs(x), np.abs(stem_kernel))  # mags: sum |w·x|.
  mean, var = out.mean((0, 1, 2)), out.var((0, 1, 2))
  bs = updates['batch_stats']['encoder']['stem_bn']
  # Each side sums the 27 products of an output in its own order, and the model averages 384
  # outputs in float32: 0.1·(sum_rtol(27)·mean sum|w·x| + sum_rtol(384)·mean|out|) <= 4.4e-6.
  # Momentum 0.99 would move the running mean by 0.09·|mean| >= 1.6e-3.
  mean_atol = 0.1 * (numerics.sum_rtol(27) * mags.mean((0, 1, 2))
                     + numerics.sum_rtol(384) * np.abs(out).mean((0, 1, 2))).max()
  np.testing.assert_allclose(bs['mean'], 0.1 * mean, rtol=0, atol=mean_atol)
  # The same sums for the mean of 384 squares: <= 6e-6, a sixteenth of rtol 1e-4 of ~1; the
  # unbiased variance (ddof=1) would move it by 0.1·var/383 >= 1.6e-4.
  np.testing.assert_allclose(bs['var'], 0.9 * 1.0 + 0.1 * var, rtol=1e-4)
  assert resnet.BN_EPSILON == 1e-5


@pytest.mark.parametrize('layers', [2, 3])
def test_projection_head_structure(layers):
  model = _tiny(num_proj_layers=layers)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
  head = variables['params']['projection']
  h_dim = resnet.feature_dim(18, 1 / 16)
  assert sorted(k for k in head if k.startswith('dense')) == [f'dense{i}' for i in range(layers)]
  for i in range(layers):
    assert set(head[f'dense{i}']) == {'kernel'}  # no dense bias
    last = i == layers - 1
    assert head[f'dense{i}']['kernel'].shape == (h_dim, 128 if last else h_dim)
    assert set(head[f'bn{i}']) == ({'scale'} if last else {'scale', 'bias'})
  out = jax.eval_shape(lambda v: model.apply(v, jnp.ones((2, 8, 8, 3)), train=False), variables)
  assert out['z'].shape == (2, 128) and out['h'].shape == (2, h_dim)
  assert out['probe_logits'].shape == (2, 10)


def test_probe_does_not_train_the_encoder(tiny):
  model, variables = tiny
  x = jnp.asarray(np.random.default_rng(2).random((4, 8, 8, 3), np.float32))

  def probe_only(params):
    out, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(out['probe_logits'] ** 2)

  grads = jax.jit(jax.grad(probe_only))(variables['params'])
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads['encoder']))
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads['probe']))


def test_probe_is_the_official_supervised_head(tiny):
  """tf2/model.py LinearLayer: dense with a zero bias and an N(0, 0.01^2) kernel."""
  probe = tiny[1]['params']['probe']
  assert set(probe) == {'kernel', 'bias'}
  np.testing.assert_array_equal(probe['bias'], np.zeros(10))
  kernel = np.asarray(probe['kernel'])
  assert kernel.shape == (resnet.feature_dim(18, 1 / 16), 10)
  # 320 draws (threefry: the same on every CPU): the sample std's sd is 1/sqrt(640) = 3.96% of
  # 0.01, so +-15% is 3.8 sigma; the mean's se is 0.01/sqrt(320) = 5.6e-4, so 2e-3 is 3.6 sigma.
  # flax's default initialiser would give 1/sqrt(32) = 0.18.
  assert 0.0085 < kernel.std() < 0.0115 and abs(kernel.mean()) < 2e-3


def test_bfloat16_compute_keeps_float32_params_stats_and_outputs(tiny):
  _, variables = tiny
  model = _tiny(dtype='bfloat16')
  x = jnp.ones((2, 8, 8, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes))
  step = jax.jit(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']))
  out, updates = step(variables)
  assert out['z'].dtype == jnp.float32 and out['h'].dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(updates))
  hlo = step.lower(variables).as_text()
  assert 'bf16' in hlo and 'convolution' in hlo


def test_bad_dtype_names_config_key():
  with pytest.raises(ValueError, match='config.model.dtype'):
    _tiny(dtype='float8')


@pytest.mark.parametrize('key', ['sk_ratio', 'se_ratio'])
def test_negative_sk_or_se_ratio_names_config_key(key):
  cfg = base.get_config()
  cfg.model[key] = -0.0625
  with pytest.raises(ValueError, match=f'config.model.{key}=-0.0625 must be >= 0'):
    simclr.from_config(cfg.model, 10)
  with pytest.raises(ValueError, match=f'config.model.{key}'):
    simclr.encoder_from_config(cfg.model)


def _loss_and_grads(model, variables, x):
  def loss(params):
    h, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                             train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(h)), updates['batch_stats']
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])


def test_remat_gives_the_same_outputs_gradients_and_statistics(tiny):
  """In float64: XLA may fuse the recomputation differently, and float32 rounding amplified
  through BN's backward would sit near 1e-5; float64's sits near 1e-14, far below F64_RTOL, which
  is far below the >= 1e-2 that recomputing with other statistics or inputs makes."""
  # The tiny SimCLR's encoder: ResNet-18 at width 1/16 with the CIFAR stem.
  variables = numerics.to_float64({k: v['encoder'] for k, v in tiny[1].items()})
  x = np.random.default_rng(5).normal(size=(4, 8, 8, 3))
  plain = numerics.float64_model(resnet.ResNet(18, 1 / 16, cifar_stem=True, conv_impl='im2col'))
  with numerics.float64():
    want = _loss_and_grads(plain, variables, x)
    got = _loss_and_grads(plain.clone(remat=True), variables, x)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(leaf.dtype == np.float64 for leaf in jax.tree.leaves(got))
  numerics.assert_trees_close(got, want, numerics.F64_RTOL)


def test_remat_keeps_only_block_inputs_for_the_backward_pass():
  """Bytes the backward pass keeps (the closure of jax.vjp) fall to a quarter with remat.

  Compiled temporaries show the same saving on GPU/TPU; XLA:CPU's pipeline merges the
  recomputation back into the forward pass, so on CPU its temporaries do not change.
  """
  x = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32)
  plain = resnet.ResNet(18, 1 / 4, cifar_stem=True, conv_impl='lax')
  variables = jax.eval_shape(plain.init, jax.random.key(0), x)

  def kept_bytes(model):
    def loss(params, batch_stats, x):
      h, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                         train=True, mutable=['batch_stats'])
      return jnp.sum(h)
    vjp = jax.eval_shape(lambda *a: jax.vjp(loss, *a)[1], variables['params'],
                         variables['batch_stats'], x)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp))

  without, with_remat = kept_bytes(plain), kept_bytes(plain.clone(remat=True))
  # Without remat: every block's convolution, BN and ReLU outputs; with it: block inputs,
  # parameters and BN statistics (42.6 MiB vs 10.7 MiB here).
  assert with_remat < 0.3 * without, (with_remat, without)
