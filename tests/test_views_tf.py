"""SimCLR view ops: distributions against a numpy reference sampler, effects against numpy."""
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_jax.data import views_tf

N = 4000


def _draw(fn, n=N):
  """Stacks fn(i) for i in range(n), run in graph mode through tf.data (fast, no retracing)."""
  return next(tf.data.Dataset.range(n).map(fn).batch(n).as_numpy_iterator())


def _reference_crop(n, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3), rng=np.random.default_rng(0)):
  """Independent numpy rejection sampler of (area fraction, aspect) on a square image."""
  a = rng.uniform(*area, size=(n * 4))
  r = np.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1]), size=n * 4))
  fits = (a * r <= 1) & (a / r <= 1)
  return a[fits][:n], r[fits][:n]


def test_crop_window_distribution():
  side = 1000  # Large, so pixel rounding is negligible against the tolerances.
  w = _draw(lambda i: views_tf.sample_crop_window(
      views_tf.view_seed(0, 0, i, 0), tf.constant([side, side, 3]), (0.08, 1.0), (3 / 4, 4 / 3)))
  y, x, h, wd = w.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= side).all() and (x + wd <= side).all()
  area, aspect = h * wd / side**2, wd / h
  assert area.min() >= 0.079 and area.max() <= 1.0
  assert aspect.min() >= 0.749 and aspect.max() <= 1.334
  ref_area, ref_aspect = _reference_crop(200_000)
  q = [0.1, 0.25, 0.5, 0.75, 0.9]
  np.testing.assert_allclose(np.quantile(area, q), np.quantile(ref_area, q), atol=0.025)
  np.testing.assert_allclose(np.quantile(np.log(aspect), q), np.quantile(np.log(ref_aspect), q),
                             atol=0.025)
  assert abs(area.mean() - ref_area.mean()) < 0.015
  # Offsets spread over the free range: the crop centre is on average the image centre.
  assert abs((x + wd / 2).mean() / side - 0.5) < 0.02


def test_crop_falls_back_to_whole_image():
  w = views_tf.sample_crop_window(views_tf.view_seed(0, 0, 0, 0), tf.constant([40, 30, 3]),
                                 (1.5, 2.0), (3 / 4, 4 / 3))
  np.testing.assert_array_equal(w, [0, 0, 40, 30])


def _params(cfg, n=N):
  return _draw(lambda i: views_tf.sample_view_params(views_tf.view_seed(1, 2, i, 0), cfg), n)


def test_param_rates_and_ranges():
  cfg = views_tf.ViewConfig(size=224, **views_tf.PRESETS['imagenet'])
  p = _params(cfg)
  for key, rate in (('flip', 0.5), ('jitter', 0.8), ('grayscale', 0.2), ('blur', 0.5)):
    assert abs(p[key].mean() - rate) < 0.03, key
  for key in ('brightness', 'contrast', 'saturation'):
    assert p[key].min() >= 0.2 - 1e-6 and p[key].max() <= 1.8 + 1e-6
    assert abs(p[key].mean() - 1.0) < 0.03
  assert p['hue'].min() >= -0.2 and p['hue'].max() <= 0.2
  assert p['sigma'].min() >= 0.1 and p['sigma'].max() <= 2.0
  assert (np.sort(p['order'], axis=1) == np.arange(4)).all()
  assert len({tuple(o) for o in p['order']}) == 24  # Every order of the four ops occurs.


def test_cifar_preset_has_no_blur_and_weaker_jitter():
  p = _params(views_tf.ViewConfig(size=32, **views_tf.PRESETS['cifar']), 1000)
  assert not p['blur'].any()
  assert p['brightness'].min() >= 0.6 - 1e-6 and p['brightness'].max() <= 1.4 + 1e-6
  assert np.abs(p['hue']).max() <= 0.1


def _image(h=48, w=40, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _fixed_params(**kw):
  p = dict(crop_seed=views_tf.view_seed(0, 0, 0, 0), flip=False, jitter=False, brightness=1.0,
           contrast=1.0, saturation=1.0, hue=0.0, order=[0, 1, 2, 3], grayscale=False,
           blur=False, sigma=1.0)
  p.update(kw)
  return {k: tf.constant(v) for k, v in p.items()}


def _reference_crop_resize(img, p, cfg):
  """numpy crop at the sampled window, then resize: checks the view's first stage."""
  y, x, h, w = views_tf.sample_crop_window(p['crop_seed'], tf.constant(img.shape), cfg.crop_area,
                                          cfg.crop_aspect).numpy()
  crop = img[y:y + h, x:x + w].astype(np.float32) / 255
  return np.clip(tf.image.resize(crop, [cfg.size, cfg.size], 'bicubic').numpy(), 0, 1)


def test_apply_view_stages_match_numpy():
  cfg = views_tf.ViewConfig(size=24)
  img = _image()
  base = _reference_crop_resize(img, _fixed_params(), cfg)
  view = lambda **kw: views_tf.apply_view(tf.constant(img), _fixed_params(**kw), cfg).numpy()
  np.testing.assert_allclose(view(), base, atol=1e-5)
  np.testing.assert_allclose(view(flip=True), base[:, ::-1], atol=1e-5)
  np.testing.assert_allclose(view(jitter=True, brightness=1.5), np.clip(base * 1.5, 0, 1),
                             atol=1e-5)
  gray = base @ np.array([0.2989, 0.587, 0.114], np.float32)
  np.testing.assert_allclose(view(grayscale=True), np.repeat(gray[..., None], 3, -1), atol=2e-3)
  # Contrast 0 maps every channel to its mean.
  np.testing.assert_allclose(view(jitter=True, contrast=0.0),
                             np.broadcast_to(base.mean((0, 1)), base.shape), atol=1e-5)


def test_blur_lowers_high_frequencies():
  cfg = views_tf.ViewConfig(size=64, blur=True)
  x = tf.constant(_image(64, 64).astype(np.float32) / 255)
  blurred = views_tf.gaussian_blur(x, tf.constant(1.5), cfg.size // 10).numpy()
  energy = lambda a: (np.diff(a[8:-8, 8:-8], axis=0)**2).mean()  # Interior: no padding effect.
  assert energy(blurred) < 0.2 * energy(x.numpy())
  np.testing.assert_allclose(blurred[8:-8, 8:-8].mean(), x.numpy()[8:-8, 8:-8].mean(), atol=0.01)
  # numpy reference: the official 1-D kernel (side 2*(6//2)+1 = 7), zero-padded 'same' convolution.
  t = np.arange(-3, 4)
  k = np.exp(-t**2 / (2 * 1.5**2))
  k /= k.sum()
  conv = lambda a, axis: np.apply_along_axis(lambda r: np.convolve(r, k, 'same'), axis, a)
  np.testing.assert_allclose(blurred, conv(conv(x.numpy(), 0), 1), atol=1e-5)


@pytest.mark.parametrize('encode', ['raw', 'jpeg', 'png', 'gray_jpeg'])
def test_train_view_shapes_range_and_determinism(encode):
  img = _image(60, 90)
  inputs = {'raw': tf.constant(img), 'jpeg': tf.io.encode_jpeg(img),
            'png': tf.io.encode_png(img), 'gray_jpeg': tf.io.encode_jpeg(img[..., :1])}[encode]
  cfg = views_tf.ViewConfig(size=32, blur=True)
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
  # libjpeg's chroma upsampling differs only at the crop's edges.
  np.testing.assert_allclose(crop[2:-2, 2:-2], full[7:33, 9:46], atol=2)
  assert np.abs(crop - full[5:35, 7:48]).mean() < 2


def test_eval_view_centre_crop():
  img = _image(100, 80)
  ref = lambda a, size: np.clip(tf.image.resize(a.astype(np.float32) / 255, [size, size],
                                                'bicubic').numpy(), 0, 1)
  # 87.5% of 80 = 70: rows 15..85, cols 5..75.
  np.testing.assert_allclose(views_tf.eval_view(tf.constant(img), 64),
                             ref(img[15:85, 5:75], 64), atol=1e-5)
  np.testing.assert_allclose(views_tf.eval_view(tf.io.encode_png(img), 32), ref(img, 32),
                             atol=1e-5)
