"""SimCLR view ops: the crop against the TF op the official code calls, the rest against numpy."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import numerics
from simclr_jax.data import views, views_tf
from simclr_jax.errors import ConfigError

N = 4000
N_CROPS = 20_000  # Per crop distribution test: KS at level 0.001 resolves D ~ 0.02.


def _draw(fn, n=N):
  """Stacks fn(i) for i in range(n), run in graph mode through tf.data (fast, no retracing)."""
  return next(tf.data.Dataset.range(n).map(fn).batch(n).as_numpy_iterator())


def official_windows(shape, n=N_CROPS, **kw):
  """[n, 4] windows [y, x, h, w] from the op and arguments of the official crop_and_resize.

  tf2/data_util.py: distorted_bounding_box_crop(image, bbox=[[[0, 0, 1, 1]]],
  min_object_covered=0.1, aspect_ratio_range=(3/4 * w/h, 4/3 * w/h), area_range=(0.08, 1.0),
  max_attempts=100) with use_image_if_no_bounding_boxes=True; the stateful op, seeded here.
  """
  args = dict(min_object_covered=0.1, aspect_ratio_range=(3. / 4, 4. / 3.),
              area_range=(0.08, 1.0), max_attempts=100)
  args.update(kw)
  tf.random.set_seed(1234)

  def window(_):
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.constant(shape), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        use_image_if_no_bounding_boxes=True, seed=5, **args)
    return tf.stack([begin[0], begin[1], size[0], size[1]])

  return _draw(window, n)


def _view_windows(shape, cfg=views.ViewConfig(), n=N_CROPS):
  """[n, 4] windows our tf.data views crop: the crop seed of each view's params, as apply_view."""
  return _draw(lambda i: views_tf.sample_crop_window(
      views_tf.sample_view_params(views_tf.view_seed(3, 1, i, 0), cfg)['crop_seed'],
      tf.constant(shape), cfg), n)


def check_windows(win, shape):
  """Official-crop invariants: inside the image, >= 10% of it, off the bottom/right edge."""
  y, x, h, w = win.T
  big, wide = shape[0], shape[1]
  assert (y >= 0).all() and (x >= 0).all() and (h >= 1).all() and (w >= 1).all()
  assert (y + h <= big).all() and (x + w <= wide).all()
  assert (h * w >= 0.1 * big * wide).all()  # min_object_covered: no crop under 10%.
  # The kernel draws y in [0, H - h), so a crop shorter than the image never reaches its
  # bottom row (nor a narrower one its right column).
  assert (y[h < big] + h[h < big] < big).all() and (x[w < wide] + w[w < wide] < wide).all()


def same_crop_statistics(ours, ref, shape):
  """KS (level 0.001) of area fraction, aspect and offsets; at 375x500 the quantiles too.

  At 32 px the statistics lie on grids about 0.014 apart, so a quantile may move a step by
  chance: same_counts compares the (h, w) frequencies there instead.
  """
  stat = {'area': lambda win: win[:, 2] * win[:, 3] / (shape[0] * shape[1]),
          'aspect': lambda win: win[:, 3] / win[:, 2],
          'y': lambda win: win[:, 0] / shape[0], 'x': lambda win: win[:, 1] / shape[1]}
  for name, f in stat.items():
    # 4 statistics at level 1e-3 each. The draws are deterministic; a port's rare 1-ulp lrintf
    # flips move a window by a pixel and D by ~1/n.
    assert stats.ks_2samp(f(ours), f(ref)).pvalue > 1e-3, name
  if min(shape[:2]) >= 100:
    q = [0.05, 0.25, 0.5, 0.75, 0.95]
    for name in ('area', 'aspect'):
      # sd of the difference of two n = 20000 sample quantiles, sqrt(2p(1-p)/n) / density:
      # <= 0.0047 (area's 95th percentile), so 0.022 is >= 4.7 sigma (p <= 3e-6 each).
      np.testing.assert_allclose(np.quantile(stat[name](ours), q),
                                 np.quantile(stat[name](ref), q), atol=0.022, err_msg=name)


def same_counts(a, b, name):
  """Chi-square test (level 0.001) that two samples of discrete rows share one distribution."""
  cells, inverse = np.unique(np.concatenate([a, b]), axis=0, return_inverse=True)
  counts = np.zeros((2, len(cells)))
  np.add.at(counts, (np.repeat([0, 1], [len(a), len(b)]), inverse.ravel()), 1)
  rare = counts.sum(0) < 10  # Pooled, so every expected count is at least 5.
  table = np.concatenate([counts[:, ~rare], counts[:, rare].sum(1, keepdims=True)], 1)
  # Level 1e-3 on deterministic draws; a port's rare 1-ulp lrintf flips move a few rows only.
  assert stats.chi2_contingency(table[:, table.sum(0) > 0]).pvalue > 1e-3, name


@pytest.mark.parametrize('shape', [[32, 32, 3], [375, 500, 3]])
def test_view_crop_distribution_is_the_official_ops(shape):
  ours, ref = _view_windows(shape), official_windows(shape)
  check_windows(ours, shape)
  check_windows(ref, shape)
  same_crop_statistics(ours, ref, shape)
  if shape[0] == 32:
    same_counts(ours[:, 2:], ref[:, 2:], 'h, w')
  area = ours[:, 2] * ours[:, 3] / (shape[0] * shape[1])
  assert area.min() >= 0.1 and area.max() <= 1.0


def test_view_crop_matches_the_op_at_the_same_seed():
  """The view's window is the stateless op's, with the official arguments, at the crop seed."""
  seeds = _draw(lambda i: views_tf.sample_view_params(views_tf.view_seed(0, 2, i, 1),
                                                      views.ViewConfig())['crop_seed'], 50)
  for seed in seeds:
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        [375, 500, 3], [[[0.0, 0.0, 1.0, 1.0]]], seed, min_object_covered=0.1,
        aspect_ratio_range=(0.75, 4 / 3), area_range=(0.08, 1.0), max_attempts=100,
        use_image_if_no_bounding_boxes=True)
    np.testing.assert_array_equal(
        views_tf.sample_crop_window(seed, tf.constant([375, 500, 3]), views.ViewConfig()),
        [begin[0], begin[1], size[0], size[1]])


def test_crop_falls_back_to_whole_image():
  # No crop of at most half the image covers all of it: every attempt fails.
  cfg = views.ViewConfig(crop_area=(0.08, 0.5), min_object_covered=1.0)
  shape = [40, 30, 3]
  ours = _view_windows(shape, cfg, 100)
  np.testing.assert_array_equal(ours, np.tile([0, 0, 40, 30], (100, 1)))
  np.testing.assert_array_equal(ours, official_windows(shape, 100, area_range=(0.08, 0.5),
                                                        min_object_covered=1.0))


@pytest.mark.parametrize('kw,key', [
    (dict(crop_area=(0.08, 1.5)), 'crop_area'), (dict(crop_area=(0.0, 1.0)), 'crop_area'),
    (dict(crop_area=(0.5, 0.2)), 'crop_area'), (dict(crop_aspect=(0.0, 1.0)), 'crop_aspect'),
    (dict(min_object_covered=1.2), 'min_object_covered')])
def test_bad_crop_parameters_name_the_config_key(kw, key):
  with pytest.raises(ConfigError, match=f'augment.{key}'):
    views.ViewConfig(**kw)


def _params(cfg, n=N):
  return _draw(lambda i: views_tf.sample_view_params(views_tf.view_seed(1, 2, i, 0), cfg), n)


def test_param_rates_and_ranges():
  cfg = views.ViewConfig(size=224, **views.PRESETS['imagenet'])
  p = _params(cfg)
  for key, rate in (('flip', 0.5), ('jitter', 0.8), ('grayscale', 0.2), ('blur', 0.5)):
    # 4 binomial standard errors (0.025 to 0.032): p = 6e-5, on draws bit-exact on every CPU.
    assert abs(p[key].mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / N), key
  for key in ('brightness', 'contrast', 'saturation'):
    # lo + (hi - lo) * u in float32 may round an ulp (1.2e-7) past 0.2 or 1.8.
    assert p[key].min() >= 0.2 - 1e-6 and p[key].max() <= 1.8 + 1e-6
    assert abs(p[key].mean() - 1.0) < 0.03  # U(0.2, 1.8) mean: se 0.0073, so 4.1 sigma.
  # -0.2 + 0.4 * u in float32: u = 0 gives -0.2f, 3e-9 below -0.2.
  assert p['hue'].min() >= -0.2 - 1e-6 and p['hue'].max() <= 0.2 + 1e-6
  # 0.1f (above 0.1) + 1.9f * u with u <= 1 - 2^-23 stays below 2.0 in float32: exact bounds.
  assert p['sigma'].min() >= 0.1 and p['sigma'].max() <= 2.0
  assert (np.sort(p['order'], axis=1) == np.arange(4)).all()
  assert len({tuple(o) for o in p['order']}) == 24  # Every order of the four ops occurs.


def test_cifar_preset_has_no_blur_and_weaker_jitter():
  p = _params(views.ViewConfig(size=32, **views.PRESETS['cifar']), 1000)
  assert not p['blur'].any()
  assert p['brightness'].min() >= 0.6 - 1e-6 and p['brightness'].max() <= 1.4 + 1e-6
  assert np.abs(p['hue']).max() <= 0.1 + 1e-6  # u = 0 gives -0.1f, 1.5e-9 beyond -0.1.


def _image(h=48, w=40, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _fixed_params(**kw):
  p = dict(crop_seed=views_tf.view_seed(0, 0, 0, 0), flip=False, jitter=False, brightness=1.0,
           contrast=1.0, saturation=1.0, hue=0.0, order=[0, 1, 2, 3], grayscale=False,
           blur=False, sigma=1.0)
  p.update(kw)
  return {k: tf.constant(v) for k, v in p.items()}


def _reference_crop_resize(img, p, cfg):
  """numpy crop at the op's window for the view's crop seed, then resize: the first stage."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      img.shape, [[[0.0, 0.0, 1.0, 1.0]]], p['crop_seed'], min_object_covered=0.1,
      aspect_ratio_range=(0.75, 4 / 3), area_range=(0.08, 1.0), max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  (y, x), (h, w) = begin.numpy()[:2], size.numpy()[:2]
  crop = img[y:y + h, x:x + w].astype(np.float32) / 255
  return np.clip(tf.image.resize(crop, [cfg.size, cfg.size], 'bicubic').numpy(), 0, 1)


def test_apply_view_stages_match_numpy():
  cfg = views.ViewConfig(size=24)
  img = _image()
  base = _reference_crop_resize(img, _fixed_params(), cfg)
  view = lambda **kw: views_tf.apply_view(tf.constant(img), _fixed_params(**kw), cfg).numpy()
  # The same resize op on inputs <= 1 ulp apart (convert_image_dtype vs / 255): <= 3e-7, x1.5
  # for brightness. A wrong window or flip moves pixels by >= 1e-2.
  np.testing.assert_allclose(view(), base, atol=1e-5)
  np.testing.assert_allclose(view(flip=True), base[:, ::-1], atol=1e-5)
  np.testing.assert_allclose(view(jitter=True, brightness=1.5), np.clip(base * 1.5, 0, 1),
                             atol=1e-5)
  # The 3-term dots differ by <= 2.4e-7 plus the resizes' 3e-7; the weights 0.299 for 0.2989
  # move pixels by up to 1e-4, so 1e-5 tells them apart.
  gray = base @ np.array([0.2989, 0.587, 0.114], np.float32)
  np.testing.assert_allclose(view(grayscale=True), np.repeat(gray[..., None], 3, -1), atol=1e-5)
  # Contrast 0 maps every channel to its mean: TF's float32 mean of 24 x 24 pixels <= 1 is within
  # sum_rtol(576) = 6.9e-5 of the float64 one; the mean of all channels is >= 6e-3 away.
  np.testing.assert_allclose(view(jitter=True, contrast=0.0),
                             np.broadcast_to(base.astype(np.float64).mean((0, 1)), base.shape),
                             atol=numerics.sum_rtol(24 * 24))


def test_blur_lowers_high_frequencies():
  cfg = views.ViewConfig(size=64, blur=True)
  x = tf.constant(_image(64, 64).astype(np.float32) / 255)
  blurred = views_tf.gaussian_blur(x, tf.constant(1.5), cfg.size // 10).numpy()
  energy = lambda a: (np.diff(a[8:-8, 8:-8], axis=0)**2).mean()  # Interior: no padding effect.
  assert energy(blurred) < 0.2 * energy(x.numpy())  # Measured 0.0044 at sigma 1.5; 0.5 gives 0.31.
  # Measured 4.6e-4 (leakage across the interior's border); an unnormalised kernel multiplies the
  # mean by 13.6.
  np.testing.assert_allclose(blurred[8:-8, 8:-8].mean(), x.numpy()[8:-8, 8:-8].mean(), atol=0.01)
  # numpy reference: the official 1-D kernel (side 2*(6//2)+1 = 7), zero-padded 'same' convolution.
  t = np.arange(-3, 4)
  k = np.exp(-t**2 / (2 * 1.5**2))
  k /= k.sum()
  conv = lambda a, axis: np.apply_along_axis(lambda r: np.convolve(r, k, 'same'), axis, a)
  # float64 reference; 2 float32 passes of <= 7 taps: <= 1.2e-6. Zero-vs-reflect padding moves
  # edge pixels by >= 1e-2.
  np.testing.assert_allclose(blurred, conv(conv(x.numpy(), 0), 1), atol=1e-5)


@pytest.mark.parametrize('encode', ['raw', 'jpeg', 'png', 'gray_jpeg'])
def test_train_view_shapes_range_and_determinism(encode):
  img = _image(60, 90)
  inputs = {'raw': tf.constant(img), 'jpeg': tf.io.encode_jpeg(img),
            'png': tf.io.encode_png(img), 'gray_jpeg': tf.io.encode_jpeg(img[..., :1])}[encode]
  cfg = views.ViewConfig(size=32, blur=True)
  view = lambda e, v: views_tf.train_view(inputs, views_tf.view_seed(7, e, 3, v), cfg).numpy()
  a = view(0, 0)
  assert a.shape == (32, 32, 3) and a.dtype == np.float32
  assert a.min() >= 0 and a.max() <= 1
  np.testing.assert_array_equal(a, view(0, 0))
  assert not np.array_equal(a, view(1, 0)) and not np.array_equal(a, view(0, 1))


def test_jpeg_decode_and_crop_matches_decode_then_crop():
  enc = tf.io.encode_jpeg(_image(64, 80))
  window = lambda shape: tf.constant([5, 7, 30, 41])
  full = tf.io.decode_jpeg(enc, channels=3).numpy()
  crop = views_tf.decode_and_crop(enc, window).numpy().astype(int)
  assert crop.shape == (30, 41, 3)
  # libjpeg's fancy chroma upsampling reads across the crop's edge: values differ only within
  # 2 px of it (measured: 0 inside, mean 0.2 overall); a 1-px offset gives a mean of ~55.
  np.testing.assert_allclose(crop[2:-2, 2:-2], full[7:33, 9:46], atol=2)
  assert np.abs(crop - full[5:35, 7:48]).mean() < 2


def test_jpeg_view_crops_the_window_of_the_whole_image():
  """decode_and_crop_jpeg gets the window drawn for the header's shape, not the crop's."""
  img = _image(75, 100)
  enc = tf.io.encode_jpeg(img)
  seed = views_tf.view_seed(0, 0, 1, 0)
  window_fn = lambda shape: views_tf.sample_crop_window(seed, shape, views.ViewConfig())
  y, x, h, w = window_fn(tf.constant([75, 100, 3])).numpy()
  assert (h, w) != (75, 100)
  crop = views_tf.decode_and_crop(enc, window_fn).numpy().astype(int)
  assert crop.shape == (h, w, 3)
  # As above: chroma upsampling moves only edge pixels; a 1-px offset gives a mean of ~55.
  assert np.abs(crop - tf.io.decode_jpeg(enc, channels=3).numpy()[y:y + h, x:x + w]).mean() < 2


def test_eval_view_centre_crop():
  img = _image(100, 80)
  ref = lambda a, size: np.clip(tf.image.resize(a.astype(np.float32) / 255, [size, size],
                                                'bicubic').numpy(), 0, 1)
  # 87.5% of 80 = 70: rows 15..85, cols 5..75. The same resize on inputs <= 1 ulp apart:
  # <= 3e-7; a window off by a pixel moves pixels by >= 1e-2.
  np.testing.assert_allclose(views_tf.eval_view(tf.constant(img), 64),
                             ref(img[15:85, 5:75], 64), atol=1e-5)
  np.testing.assert_allclose(views_tf.eval_view(tf.io.encode_png(img), 32), ref(img, 32),
                             atol=1e-5)
