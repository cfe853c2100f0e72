"""models/conv.py: the official fixed padding, and every implementation against lax.conv."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from configs import base
from simclr_jax import parallel
from simclr_jax.errors import ConfigError
from simclr_jax.models import conv, resnet, simclr

# (kernel, stride) of every convolution in the ResNets: 1x1 s1/s2 (bottleneck, projections),
# 3x3 s1/s2 (blocks, CIFAR stem), 7x7 s2 (ImageNet stem).
KERNELS = [(1, 1), (1, 2), (3, 1), (3, 2), (7, 2)]
OTHER_IMPLS = [i for i in conv.CONCRETE_IMPLS if i != 'lax']


def _numpy_conv(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
  """tf2/resnet.py's Conv2dFixedPadding with explicit loops: stride 1 'SAME' (TF's rule),
  stride > 1 pads pad_total = k - 1, pad_beg = pad_total // 2, pad_end = the rest, then VALID."""
  k = w.shape[0]
  n, h, wd, cin = x.shape
  if stride == 1:  # TF 'SAME': out = ceil(in / s), total = max((out - 1) * s + k - in, 0)
    pads = []
    for size in (h, wd):
      out = -(-size // stride)
      total = max((out - 1) * stride + k - size, 0)
      pads.append((total // 2, total - total // 2))
  else:
    pad_total = k - 1
    pad_beg = pad_total // 2
    pads = [(pad_beg, pad_total - pad_beg)] * 2
  xp = np.zeros((n, h + sum(pads[0]), wd + sum(pads[1]), cin), np.float64)
  xp[:, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + wd] = x
  ho, wo = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
  y = np.zeros((n, ho, wo, w.shape[-1]), np.float64)
  for b in range(n):
    for i in range(ho):
      for j in range(wo):
        for dy in range(k):
          for dx in range(k):
            for c in range(cin):
              y[b, i, j] += xp[b, i * stride + dy, j * stride + dx, c] * w[dy, dx, c]
  return y


@pytest.mark.parametrize('size', [8, 9])
@pytest.mark.parametrize('k,stride', KERNELS)
def test_fixed_padding_matches_numpy_loops(k, stride, size):
  # Distinct small integers: any misplaced pixel or padding shows as an exact mismatch (sums of
  # small integers are exact in float32 in any order).
  x = (np.arange(2 * size * size * 2).reshape(2, size, size, 2) % 7 - 3).astype(np.float32)
  w = (np.arange(k * k * 2 * 3).reshape(k, k, 2, 3) % 5 - 2).astype(np.float32)
  want = _numpy_conv(x, w, stride)
  for impl in conv.CONCRETE_IMPLS:
    got = jax.jit(conv.conv2d, static_argnums=(2, 3))(x, w, stride, impl)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=impl)


def test_stride_two_differs_from_same_padding():
  """The reason for fixed padding: XLA 'SAME' at stride 2 pads (0, 1) on even inputs."""
  x = np.random.default_rng(0).normal(size=(1, 8, 8, 1)).astype(np.float32)
  w = np.random.default_rng(1).normal(size=(3, 3, 1, 1)).astype(np.float32)
  same = jax.lax.conv_general_dilated(x, w, (2, 2), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert not np.allclose(same, _numpy_conv(x, w, 2))  # a shifted window: O(1) on N(0, 1) data
  # float32 against float64: 9 products, within numerics.sum_rtol(9)·Σ|x·w| (1.4e-5 here).
  np.testing.assert_allclose(conv.conv2d(x, w, 2, 'lax'), _numpy_conv(x, w, 2), rtol=0,
                             atol=1e-4)


def _conv_and_grads(x, w, ct, stride, impl, dtype):
  """(y, dL/dx, dL/dw) of L = sum(conv(x, w) * ct), computed in `dtype`."""
  def f(x, w):
    return conv.conv2d(x.astype(dtype), w.astype(dtype), stride, impl).astype(jnp.float32)
  y, vjp = jax.vjp(f, x, w)
  return (y, *vjp(ct))


def _inputs(k, stride, n=2, size=9, cin=3, cout=4):
  rng = np.random.default_rng(k * 10 + stride)
  x = rng.normal(size=(n, size, size, cin)).astype(np.float32)
  w = rng.normal(size=(k, k, cin, cout)).astype(np.float32)
  out = -(-size // stride)
  ct = rng.normal(size=(n, out, out, cout)).astype(np.float32)
  return x, w, ct


def _assert_close(got, want, inputs, stride, dtype):
  """(y, dx, dw) of two programs within what rounding allows, element by element.

  Each element of y, dx and dw is a sum of L products (y: k·k·cin, dx: at most k·k·cout, dw:
  n·ho·wo) whose magnitudes add up to S, the same convolution and gradients of |x|, |w|, |ct|.
  float32: two summation orders differ by at most numerics.sum_rtol(L)·S. bfloat16: both
  sides round their result to 8 bits (2^-9·S each), and im2col sums dx from up to ⌈k/s⌉²
  bfloat16 partial results, one rounding each. A misplaced tap or a wrong padding moves an
  element by a whole term, about S/L: more than 10x these bounds at these sizes.
  """
  x, w, ct = inputs
  k, cin, cout = w.shape[0], w.shape[2], w.shape[3]
  terms = {'y': k * k * cin, 'dx': k * k * cout, 'dw': ct.shape[0] * ct.shape[1] * ct.shape[2]}
  roundings = {'y': 1, 'dx': (-(-k // stride)) ** 2, 'dw': 1}
  scale = jax.jit(_conv_and_grads, static_argnums=(3, 4, 5))(
      np.abs(x), np.abs(w), np.abs(ct), stride, 'lax', jnp.float32)
  for g, e, s, name in zip(got, want, scale, ('y', 'dx', 'dw')):
    bound = numerics.sum_rtol(terms[name])
    if np.dtype(dtype) == np.dtype(jnp.bfloat16):
      bound += (roundings[name] + 1) * 2.0 ** -8
    g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
    excess = np.abs(g - e) - bound * np.asarray(s, np.float64)
    assert excess.max() <= 0, (name, float(excess.max()), bound)


@pytest.mark.parametrize('impl', OTHER_IMPLS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('k,stride', KERNELS)
def test_forward_and_gradients_match_lax(k, stride, dtype, impl):
  x, w, ct = _inputs(k, stride)
  fn = jax.jit(_conv_and_grads, static_argnums=(3, 4, 5))
  _assert_close(fn(x, w, ct, stride, impl, dtype), fn(x, w, ct, stride, 'lax', dtype),
                (x, w, ct), stride, dtype)


@pytest.mark.parametrize('impl', OTHER_IMPLS)
@pytest.mark.parametrize('k,stride', KERNELS)
def test_batch_sharded_over_8_devices_matches_single_device_lax(devices, k, stride, impl):
  x, w, ct = _inputs(k, stride, n=8)
  mesh = parallel.make_mesh(devices)
  rows, rep = parallel.batch_sharded(mesh), parallel.replicated_sharding(mesh)
  sharded = jax.jit(_conv_and_grads, static_argnums=(3, 4, 5), in_shardings=(rows, rep, rows),
                    out_shardings=(rows, rows, rep))
  got = sharded(x, w, ct, stride, impl, jnp.float32)
  assert got[0].sharding.is_equivalent_to(rows, 4)
  single = jax.jit(_conv_and_grads, static_argnums=(3, 4, 5))
  _assert_close(got, single(x, w, ct, stride, 'lax', jnp.float32), (x, w, ct), stride,
                jnp.float32)


@pytest.mark.parametrize('k,stride', [(3, 2)])
def test_parameters_are_flax_conv_parameters(k, stride):
  """Same tree, shapes and initial values as nn.Conv: checkpoints move between the two."""
  x = jnp.zeros((1, 8, 8, 5))
  ours = conv.Conv(6, k, stride).init(jax.random.key(3), x)
  flax_conv = nn.Conv(6, (k, k), stride, use_bias=False).init(jax.random.key(3), x)
  assert jax.tree.structure(ours) == jax.tree.structure(flax_conv)
  np.testing.assert_array_equal(ours['params']['kernel'], flax_conv['params']['kernel'])


def test_resnet_tree_is_the_same_for_every_impl():
  x = jnp.zeros((2, 8, 8, 3))
  trees = {i: jax.eval_shape(resnet.ResNet(18, 1 / 16, conv_impl=i).init, jax.random.key(0), x)
           for i in conv.CONCRETE_IMPLS}
  for impl, tree in trees.items():
    assert tree == trees['lax'], impl


def test_auto_resolves_to_lax_and_a_bad_name_names_the_key():
  assert conv.resolve_impl('auto') == 'lax'  # measured fastest on CPU, GPU and TPU
  assert conv.resolve_impl('im2col') == 'im2col'
  cfg = base.get_config().model
  assert cfg.conv_impl == 'auto'
  assert simclr.from_config(cfg, 10).conv_impl == 'lax'
  cfg.conv_impl = 'winograd'
  with pytest.raises(ConfigError, match='config.model.conv_impl'):
    simclr.from_config(cfg, 10)


def test_cpu_xla_flags_are_known_to_this_jaxlib_and_keep_results():
  """CPU_XLA_FLAGS as compiler options: an unknown name fails here, not at a run's start-up."""
  name, value = parallel.CPU_XLA_FLAGS.removeprefix('--').split('=')
  x, w, ct = _inputs(3, 1, n=2, size=8, cin=24, cout=24)  # > 16 features: YNNPACK's range
  fn = lambda opts: jax.jit(_conv_and_grads, static_argnums=(3, 4, 5), compiler_options=opts)
  _assert_close(fn({name: value})(x, w, ct, 1, 'lax', jnp.float32),
                fn(None)(x, w, ct, 1, 'lax', jnp.float32), (x, w, ct), 1, jnp.float32)
