"""JAX view ops against the tf.data ops: exactly where deterministic, in distribution otherwise.

XLA's CPU compiles dominate this file's time, so each JAX function is jitted once at module level,
tests share shapes, and XLA's LLVM backend runs at optimisation level 0: the same HLO, a third of
the default level's compile time, and views equal to the default level's to float rounding (4e-7,
measured on one CPU).
"""
import dataclasses
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simclr_jax.data import views_jax as da
from simclr_jax.data import views
from simclr_jax.data import views_tf

import test_views_tf  # The official op's windows and their invariants (tests/ is on sys.path).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4000  # Draws per distribution test; tolerances below are derived from it.
IMAGENET = views.ViewConfig(size=16, **views.PRESETS['imagenet'])  # Every op on.
CIFAR = views.ViewConfig(size=32, **views.PRESETS['cifar'])

jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
view_keys = jit(da.view_keys)
crop_resize = jit(jax.vmap(da.crop_resize, (None, 0, None)), static_argnums=2)
resize = jit(da.resize, static_argnums=1)
color_jitter = jit(da.color_jitter)
gaussian_blur = jit(da.gaussian_blur, static_argnums=2)
apply_view = jit(da.apply_view, static_argnums=2)
train_views = jit(da.train_views, static_argnums=2)
finish_views = jit(da.finish_views, static_argnums=2)


@functools.partial(jit, static_argnums=2)
def views_and_params(images, keys, cfg):
  """train_views and the params it drew, from one compiled program."""
  params = jax.vmap(lambda k: da.sample_view_params(k, cfg, *images.shape[1:3]))(keys)
  return da.train_views(images, keys, cfg), params


def _image(h=20, w=17, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _tf_draw(fn, n=N):
  """Stacks fn(i) for i in range(n), in graph mode through tf.data (fast, no retracing)."""
  return next(tf.data.Dataset.range(n).map(fn).batch(n).as_numpy_iterator())


def _keys(n=N, seed=0, view=0):
  return view_keys(seed, jnp.zeros(n, jnp.int32), jnp.arange(n), view)


def _ks_statistic(a, b):
  """Two-sample Kolmogorov-Smirnov D and its critical value at level 0.001 (c = 1.95)."""
  grid = np.concatenate([a, b])
  cdf = lambda s: np.searchsorted(np.sort(s), grid, side='right') / len(s)
  return np.abs(cdf(a) - cdf(b)).max(), 1.95 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def _assert_same_distribution(a, b, name):
  """KS test at level 0.001 and means within 4 standard errors of their difference (p = 6e-5)."""
  d, critical = _ks_statistic(a, b)
  assert d < critical, (name, d, critical)
  se = math.sqrt(a.var() / len(a) + b.var() / len(b))
  assert abs(a.mean() - b.mean()) < 4 * se + 1e-9, (name, a.mean(), b.mean(), se)


# --- Exact agreement where the op is deterministic. -------------------------------------------

# JAX's resize (two einsums) against TF's ResizeBicubic: 2 passes of <= 4 taps, sum|w| <= 1.25,
# |x| <= 1, so each side is within 9.3e-7 of the exact value and the two within 1.9e-6. A 1/1024
# step of TF's coefficient table, a wrong tap or a missing 1/255 moves pixels by >= 1e-4.
RESIZE_ATOL = 2e-6


def _tf_crop_resize(img, window, size):
  y, x, h, w = window
  crop = tf.image.convert_image_dtype(img[y:y + h, x:x + w], tf.float32)
  return np.clip(tf.image.resize(crop, [size, size], 'bicubic').numpy(), 0, 1)


@pytest.mark.parametrize('size', [8, 24])  # Down- and upscaling of the 20x17 image.
def test_crop_resize_matches_tf(size):
  img = _image()
  windows = [(0, 0, 20, 17), (3, 2, 5, 7), (1, 4, 18, 11), (5, 5, 1, 1), (2, 0, 8, 8),
             (0, 9, 20, 8), (4, 3, 16, 14), (12, 9, 8, 8)]
  # One vmapped call: the window is traced, as it is in the train step.
  out = np.asarray(crop_resize(img, jnp.array(windows, jnp.int32), size))
  for got, window in zip(out, windows):
    np.testing.assert_allclose(got, _tf_crop_resize(img, window, size), atol=RESIZE_ATOL, rtol=0)
  # Float input in [0, 1] is taken as is (uint8 is scaled by 1/255 first). Same jitted dots on
  # inputs <= 1 ulp apart, times sum|w|^2 <= 1.6: <= 1e-7; a wrong or missing 1/255 is >= 1e-2.
  np.testing.assert_allclose(crop_resize(img.astype(np.float32) / 255, jnp.array(windows), size),
                             out, atol=1e-6, rtol=0)


def test_resize_matches_tf_on_digits():
  digits = np.random.default_rng(1).integers(0, 17, (6, 8, 8, 1)).astype(np.float32) / 16
  for size in (16, 32):
    ref = np.clip(tf.image.resize(digits, [size, size], 'bicubic').numpy(), 0, 1)
    np.testing.assert_allclose(resize(digits, size), ref, atol=RESIZE_ATOL, rtol=0)
  img = _image()  # A single uint8 RGB image, too.
  np.testing.assert_allclose(resize(img, 12), _tf_crop_resize(img, (0, 0, 20, 17), 12),
                             atol=RESIZE_ATOL, rtol=0)


@pytest.mark.parametrize('shape,size', [((40, 50), 36), ((50, 41), 48), ((16, 16), 16),
                                        ((20, 17), 32)])
def test_eval_views_match_tf_eval_view(shape, size):
  """The eval view made in the step (device input) equals tf.data's for the same image."""
  images = np.random.default_rng(3).integers(0, 256, (2, *shape, 3)).astype(np.uint8)
  got = np.asarray(da.eval_views(images, size))
  for image, view in zip(images, got):
    np.testing.assert_allclose(view, views_tf.eval_view(tf.constant(image), size).numpy(),
                               atol=RESIZE_ATOL, rtol=0)  # The same resize against TF's.


def _float_image(seed=0):
  x = np.random.default_rng(seed).uniform(0, 1, (9, 7, 3)).astype(np.float32)
  x[0, :5] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 0, 0], [0.2, 0.7, 0.7], [0.3, 0.3, 0.9]]  # Edges.
  return x


@pytest.mark.parametrize('op,factor,tf_op', [
    ('brightness', 1.5, lambda x, f: x * f), ('brightness', 0.3, lambda x, f: x * f),
    ('contrast', 0.4, tf.image.adjust_contrast), ('contrast', 1.7, tf.image.adjust_contrast),
    ('saturation', 0.3, tf.image.adjust_saturation),
    ('saturation', 1.8, tf.image.adjust_saturation),
    ('hue', 0.15, tf.image.adjust_hue), ('hue', -0.2, tf.image.adjust_hue),
    ('hue', 0.5, tf.image.adjust_hue)])
def test_each_jitter_op_matches_tf(op, factor, tf_op):
  """One op at a fixed factor, the other three at their identity, vs the tf op and a clip."""
  x = _float_image()
  p = dict(brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)
  p[op] = factor
  p = {k: jnp.float32(v) for k, v in p.items()}
  got = color_jitter(x, dict(p, order=jnp.array([3, 1, 0, 2], jnp.int32)))
  # <= ~8 roundings of values < 6 in hue units (ulp 4.8e-7) times chroma <= 1, and contrast's mean
  # of 63 pixels: <= 4e-6. HSL instead of HSV, or a wrong mean, moves pixels by >= 1e-3.
  np.testing.assert_allclose(got, np.clip(tf_op(tf.constant(x), factor).numpy(), 0, 1),
                             atol=4e-6, rtol=0)


def test_grayscale_matches_tf():
  x = _float_image()
  # A 3-term dot, <= 2 roundings per side: <= 2.4e-7; weights 0.299 for 0.2989 move pixels 1e-4.
  np.testing.assert_allclose(da.grayscale(x), tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]),
                             atol=1e-6, rtol=0)


@pytest.mark.parametrize('sigma,kernel', [(0.7, 3), (1.9, 7)])
def test_blur_matches_tf(sigma, kernel):
  x = np.random.default_rng(2).uniform(0, 1, (16, 12, 3)).astype(np.float32)
  ref = views_tf.gaussian_blur(tf.constant(x), tf.constant(sigma), kernel).numpy()
  # 2 passes of <= 7 taps whose weights sum to 1: <= ~1e-6 per side. Zero-vs-reflect padding or
  # a wrong sigma moves pixels by >= 1e-3.
  np.testing.assert_allclose(gaussian_blur(x, jnp.float32(sigma), kernel), ref, atol=2e-6,
                             rtol=0)


@pytest.mark.parametrize('kw', [
    dict(), dict(flip=True), dict(grayscale=True), dict(blur=True, sigma=1.3),
    dict(flip=True, jitter=True, brightness=1.4, contrast=0.6, saturation=1.5, hue=0.1,
         order=[2, 0, 3, 1], grayscale=True, blur=True, sigma=0.8),
    dict(jitter=True, brightness=0.5, contrast=1.7, saturation=0.2, hue=-0.15,
         order=[1, 3, 2, 0])])
def test_apply_view_matches_tf_at_fixed_params(kw):
  """The whole view (crop, flip, jitter in a given order, grayscale, blur) vs views_tf's."""
  cfg = views.ViewConfig(size=24, blur=True)
  img = _image(30, 26)
  p = dict(crop_seed=views_tf.view_seed(0, 0, 5, 0), flip=False, jitter=False, brightness=1.0,
           contrast=1.0, saturation=1.0, hue=0.0, order=[0, 1, 2, 3], grayscale=False,
           blur=False, sigma=1.0)
  p.update(kw)
  tf_p = {k: tf.constant(v) for k, v in p.items()}
  ref = views_tf.apply_view(tf.constant(img), tf_p, cfg).numpy()
  window = views_tf.sample_crop_window(p['crop_seed'], tf.constant(img.shape), cfg)
  jax_p = {k: jnp.asarray(v.numpy()) for k, v in tf_p.items() if k != 'crop_seed'}
  jax_p['window'] = jnp.asarray(window.numpy())
  # The resizes' <= 1.9e-6 through the colour ops' gain (~17 at these factors) plus their own
  # <= 4e-6: <= 3.6e-5. A wrong op order, factor or flip moves pixels by >= 1e-2.
  np.testing.assert_allclose(apply_view(img, jax_p, cfg), ref, atol=5e-5, rtol=0)


# --- The crop against the TF op the official code calls. -------------------------------------

N_CROPS = 20_000  # KS at level 0.001 resolves D ~ 0.02.
COVER_ALL = dataclasses.replace(CIFAR, crop_area=(0.08, 0.5), min_object_covered=1.0)


@functools.partial(jit, static_argnums=3)
def _jax_windows(keys, height, width, cfg):
  """Windows for traced (height, width), as in the step: one compile serves every image size."""
  return jax.vmap(lambda k: da.sample_crop_window(k, height, width, cfg))(keys)


def _crop_windows(shape, cfg=CIFAR):
  """[N_CROPS, 4] windows from our JAX port and from the official op (views_tf's test helper)."""
  ours = np.asarray(_jax_windows(_keys(N_CROPS, seed=4), shape[0], shape[1], cfg))
  args = dict(area_range=cfg.crop_area, min_object_covered=cfg.min_object_covered)
  return ours, test_views_tf.official_windows(list(shape) + [3], N_CROPS, **args)


@pytest.mark.parametrize('shape', [(32, 32), (375, 500)])
def test_crop_distribution_is_the_official_ops(shape):
  ours, ref = _crop_windows(shape)
  test_views_tf.check_windows(ours, shape)
  test_views_tf.same_crop_statistics(ours, ref, shape)
  if shape == (32, 32):  # Every (h, w) the kernel's rounding makes, at the op's frequencies.
    test_views_tf.same_counts(ours[:, 2:], ref[:, 2:], 'h, w')


@pytest.mark.parametrize('shape,area', [((7, 5), (0.08, 1.0)), ((3, 16), (0.08, 1.0)),
                                        ((9, 11), (0.3, 0.6))])
def test_crop_windows_of_small_images_are_the_official_ops(shape, area):
  """Whole windows [y, x, h, w] where each rounding step, correction and the fallback matter."""
  ours, ref = _crop_windows(shape, dataclasses.replace(CIFAR, crop_area=area))
  test_views_tf.check_windows(ours, shape)
  test_views_tf.same_counts(ours, ref, (shape, area))


def test_crop_falls_back_to_whole_image():
  # No crop of at most half the image covers all of it: every attempt fails, as in the op.
  whole = np.asarray(_jax_windows(_keys(100), 40, 30, COVER_ALL))
  np.testing.assert_array_equal(whole, np.tile([0, 0, 40, 30], (100, 1)))


@pytest.fixture(scope='module')
def params():
  """N draws of the view params from both samplers, and of our CIFAR preset's."""
  ours, cifar = jit(lambda keys: (
      jax.vmap(lambda k: da.sample_view_params(k, IMAGENET, 64, 64))(keys),
      jax.vmap(lambda k: da.sample_view_params(k, CIFAR, 32, 32))(keys)))(_keys())

  def tf_params(i):
    p = views_tf.sample_view_params(views_tf.view_seed(1, 0, i, 0), IMAGENET)
    del p['crop_seed']  # The crop is tested against the TF op above.
    return p

  return jax.tree.map(np.asarray, ours), _tf_draw(tf_params), jax.tree.map(np.asarray, cifar)


def test_param_rates_match_tf(params):
  ours, ref, _ = params
  for key, rate in (('flip', 0.5), ('jitter', 0.8), ('grayscale', 0.2), ('blur', 0.5)):
    assert ours[key].dtype == bool
    se = math.sqrt(rate * (1 - rate) / N)  # Binomial standard error: 0.0063 to 0.0079.
    assert abs(ours[key].mean() - rate) < 4 * se, key  # 4 sigma, two-sided p = 6e-5.
    # The difference of two independent proportions: se * sqrt(2), again 4 sigma. Threefry and
    # TF's stateless draws are bit-exact on every CPU: the outcome does not depend on the machine.
    assert abs(ours[key].mean() - ref[key].mean()) < 4 * math.sqrt(2) * se, key


def test_param_ranges_and_means_match_tf(params):
  ours, ref, _ = params
  ranges = {'brightness': (0.2, 1.8), 'contrast': (0.2, 1.8), 'saturation': (0.2, 1.8),
            'hue': (-0.2, 0.2), 'sigma': (0.1, 2.0)}
  for key, (lo, hi) in ranges.items():
    a = ours[key]
    # lo + (hi - lo) * u in float32 may round past lo or hi by an ulp (<= 1.2e-7 at 1.8): 1e-6
    # is 8 ulps there; a range off by a factor (e.g. hue in turns vs degrees) misses by far more.
    assert lo - 1e-6 <= a.min() and a.max() <= hi + 1e-6, key
    # Uniform: the extremes of N draws lie within 0.5% of the ends (miss chance e^-20).
    assert a.min() < lo + 0.005 * (hi - lo) and a.max() > hi - 0.005 * (hi - lo), key
    # 4 sigma of a U(lo, hi) mean, p = 6e-5; the draws are bit-exact on every CPU.
    assert abs(a.mean() - (lo + hi) / 2) < 4 * (hi - lo) / math.sqrt(12 * N), key
    _assert_same_distribution(a, ref[key], key)  # KS c(0.001) = 1.95: same draws on any CPU.


def test_cifar_preset_ranges(params):
  p = params[2]
  # -0.1 + 0.2 * u in float32: u = 0 gives -0.1f, 1.5e-9 beyond -0.1.
  assert not p['blur'].any() and abs(p['hue']).max() <= 0.1 + 1e-6
  assert p['brightness'].min() >= 0.6 - 1e-6 and p['brightness'].max() <= 1.4 + 1e-6


def test_order_is_a_uniform_permutation(params):
  order = params[0]['order']
  assert order.dtype == np.int32 and (np.sort(order, axis=1) == np.arange(4)).all()
  freq = (order[:, :, None] == np.arange(4)).mean(0)  # [position, op]
  # 4 se = 0.027 for each of the 16 cells: family-wise p <= 16 * 6e-5 = 1e-3.
  assert np.abs(freq - 0.25).max() < 4 * math.sqrt(0.25 * 0.75 / N)
  assert len({tuple(o) for o in order}) == 24


def test_jittered_view_statistics_match_tf():
  """Per-channel mean/std of whole views over many draws agree with views_tf.train_view."""
  n, cfg = 2000, dataclasses.replace(IMAGENET, jitter_prob=1.0)
  # Colour gradients plus noise: crops, flips and every colour op move the statistics.
  yy, xx = np.mgrid[:24, :20] / 24.0
  base = np.stack([yy, xx, 1 - 0.5 * (yy + xx)], -1)
  imgs = np.stack([np.clip(base[:, :, perm] * 255 + _image(24, 20, s) * 0.2 - 25, 0, 255)
                   for s, perm in enumerate(([0, 1, 2], [2, 0, 1]))]).astype(np.uint8)
  which = np.arange(n) % len(imgs)
  ours = np.asarray(train_views(imgs[which], _keys(seed=3)[:n], cfg))  # _keys' compiled shape.
  tf_imgs = tf.constant(imgs)
  ref = _tf_draw(lambda i: views_tf.train_view(tf_imgs[i % len(imgs)],
                                              views_tf.view_seed(3, 0, i, 0), cfg), n)
  for i in range(len(imgs)):
    a, b = ours[which == i], ref[which == i]
    for stat in ('mean', 'std'):  # Of each view's channel, over its pixels: n/2 values per side.
      sa, sb = getattr(a, stat)((1, 2)), getattr(b, stat)((1, 2))
      for c in range(3):
        # Keys are bit-exact; view values move by <= ~1e-4 across CPUs, which moves D by
        # <= 1e-3, far below D_crit = 0.087 at n = 1000 per side.
        _assert_same_distribution(sa[:, c], sb[:, c], (i, stat, c))


# --- Purity, ranges and sharding. -------------------------------------------------------------

PURITY_CFG = views.ViewConfig(size=16, blur=True, jitter_strength=1.0)


def test_view_keys_depend_only_on_seed_epoch_index_view():
  data = lambda k: np.asarray(jax.random.key_data(k)).reshape(len(k), -1)
  epoch, index = np.repeat([3, 4], 8), np.arange(16) % 5
  a = data(view_keys(0, epoch, index, 0))
  # An example's key does not depend on the rest of its batch (views can be recomputed on resume).
  np.testing.assert_array_equal(data(view_keys(0, epoch[::-1], index[::-1], 0)), a[::-1])
  assert len({tuple(r) for r in a}) == 10  # The 10 distinct (epoch, index) pairs.
  for changed in (view_keys(1, epoch, index, 0), view_keys(0, epoch + 1, index, 0),
                  view_keys(0, epoch, index + 5, 0), view_keys(0, epoch, index, 1)):
    assert not (data(changed) == a).all(-1).any()  # Seed, epoch, index and view each matter.


def test_train_views_pure_in_range_and_sharded(devices):
  imgs = np.stack([_image(20, 18, s) for s in range(16)])
  keys = view_keys(7, np.full(16, 2), np.arange(16), 0)
  a = np.asarray(views_and_params(imgs, keys, PURITY_CFG)[0])
  assert a.shape == (16, 16, 16, 3) and a.dtype == np.float32
  assert a.min() >= 0 and a.max() <= 1
  np.testing.assert_array_equal(a, np.asarray(views_and_params(imgs, keys, PURITY_CFG)[0]))
  other = views_and_params(imgs, view_keys(7, np.full(16, 2), np.arange(16), 1), PURITY_CFG)[0]
  # Another view key draws another crop and colour: pixels move by ~0.1, far beyond 1e-5.
  assert all(not np.allclose(x, y) for x, y in zip(a, np.asarray(other)))
  # Batch sharded over the 8-device mesh: the same views as the single-device run, to float
  # rounding (another program, fused differently): the resize's <= 1.9e-6 through the colour
  # ops' gain <= 65 is <= 1.2e-4. Another example's key or window moves pixels by ~0.1.
  shard = NamedSharding(Mesh(np.array(devices), ('data',)), P('data'))
  sharded = jit(functools.partial(da.train_views, cfg=PURITY_CFG),
                in_shardings=(shard, shard), out_shardings=shard)(
                    jax.device_put(imgs, shard), jax.device_put(keys, shard))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), a, atol=2e-4, rtol=0)


def test_finish_views_is_the_colour_half_of_train_views():
  """'split' mode: TF crops and flips at the key's window, finish_views does the rest."""
  imgs = np.stack([_image(20, 18, s) for s in range(16)])
  keys = view_keys(3, np.zeros(16, np.int32), np.arange(16), 0)
  whole, p = jax.tree.map(np.asarray, views_and_params(imgs, keys, PURITY_CFG))
  crops = np.stack([_tf_crop_resize(img, w, 16) for img, w in zip(imgs, p['window'])])
  crops = np.where(p['flip'][:, None, None, None], crops[:, :, ::-1], crops)
  # TF's and JAX's resizes differ by <= 1.9e-6, which the colour ops' gain <= 65 makes 1.2e-4;
  # a wrong flip, window or colour key moves pixels by >= 1e-2.
  np.testing.assert_allclose(finish_views(crops, keys, PURITY_CFG), whole, atol=2e-4, rtol=0)
  assert not np.allclose(whole, crops)  # The colour half did change the views (by ~0.1).


def test_import_needs_no_tensorflow():
  code = "import simclr_jax.data.views_jax, sys; assert 'tensorflow' not in sys.modules"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, check=True)
