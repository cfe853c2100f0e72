"""SimCLR view ops (views.py) as pure functions of (image, seed), for tf.data on the host.

Every random draw uses stateless TF ops keyed by a seed derived from (run seed, epoch, example
index, view index), so a view can be recomputed exactly after a restart. Sampling is split from
application (`sample_view_params` / `apply_view`) so tests can check the distributions directly.
"""
from typing import Any

from simclr_jax.data.tf_cpu import tf

from simclr_jax.data.views import CROP_TRIES, EVAL_CROP_FRACTION, ViewConfig


def view_seed(seed: Any, epoch: Any, index: Any, view: Any) -> tf.Tensor:
  """Stateless seed [2] for view `view` of example `index` in epoch `epoch` of run `seed`."""
  s = tf.stack([tf.cast(seed, tf.int64), tf.constant(0x5EED, tf.int64)])
  for x in (epoch, index, view):
    s = tf.random.experimental.stateless_fold_in(s, tf.cast(x, tf.int64), alg='philox')
  return s


def sample_crop_window(seed: tf.Tensor, shape: tf.Tensor, cfg: ViewConfig) -> tf.Tensor:
  """Random-resized-crop window [y, x, h, w] (int32) for an image of `shape` [H, W, C].

  The official SimCLR crop (data_util.distorted_bounding_box_crop): the whole image as the one
  bounding box, at least `min_object_covered` of it kept, `CROP_TRIES` attempts, else the whole
  image; the stateless op, so the window is a function of the seed.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=cfg.min_object_covered, aspect_ratio_range=cfg.crop_aspect,
      area_range=cfg.crop_area, max_attempts=CROP_TRIES, use_image_if_no_bounding_boxes=True)
  return tf.cast(tf.stack([begin[0], begin[1], size[0], size[1]]), tf.int32)


def sample_view_params(seed: tf.Tensor, cfg: ViewConfig) -> dict[str, tf.Tensor]:
  """Every random choice of one train view except the crop window (drawn from the image shape)."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
  u = tf.random.stateless_uniform([5], seeds[0])
  d = 0.8 * cfg.jitter_strength
  lo = max(0.0, 1.0 - d)
  factors = tf.random.stateless_uniform([3], seeds[1], lo, 1.0 + d)
  return {
      'crop_seed': seeds[2],
      'flip': (u[0] < 0.5) & cfg.flip,
      'jitter': u[1] < cfg.jitter_prob,
      'brightness': factors[0], 'contrast': factors[1], 'saturation': factors[2],
      'hue': tf.random.stateless_uniform([], seeds[3], -0.2 * cfg.jitter_strength,
                                         0.2 * cfg.jitter_strength),
      # The jitter ops in random order: argsort of 4 uniforms is a uniform permutation.
      'order': tf.argsort(tf.random.stateless_uniform([4], seeds[4])),
      'grayscale': u[2] < cfg.grayscale_prob,
      'blur': (u[3] < cfg.blur_prob) & cfg.blur,
      'sigma': 0.1 + 1.9 * u[4],
  }


def decode_and_crop(image: tf.Tensor, window_fn: Any) -> tf.Tensor:
  """uint8 [h, w, 3] crop of a decoded uint8 image or of encoded bytes; JPEG decodes only the crop.

  `window_fn(shape) -> [y, x, h, w]` picks the window from the full image shape, which for JPEG
  comes from the header (tf.image.extract_jpeg_shape) without decoding.
  """
  def crop(img: tf.Tensor) -> tf.Tensor:
    w = window_fn(tf.shape(img))
    return img[w[0]:w[0] + w[2], w[1]:w[1] + w[3]]

  if image.dtype != tf.string:
    return crop(image)

  def jpeg() -> tf.Tensor:
    return tf.image.decode_and_crop_jpeg(
        image, window_fn(tf.image.extract_jpeg_shape(image)), channels=3)

  def other() -> tf.Tensor:  # PNG (and anything else decode_image knows).
    return crop(tf.image.decode_image(image, channels=3, expand_animations=False))

  return tf.cond(tf.image.is_jpeg(image), jpeg, other)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """uint8/float image → float32 [size, size, 3] in [0, 1], bicubic (which overshoots, so clip)."""
  image = tf.image.convert_image_dtype(image, tf.float32)
  image = tf.image.resize(image, [size, size], method='bicubic')
  return tf.clip_by_value(image, 0.0, 1.0)


def _color_jitter(image: tf.Tensor, p: dict[str, tf.Tensor]) -> tf.Tensor:
  """Brightness (multiplicative), contrast, saturation, hue in p['order'], clipping after each."""
  ops = [lambda x: x * p['brightness'],
         lambda x: tf.image.adjust_contrast(x, p['contrast']),
         lambda x: tf.image.adjust_saturation(x, p['saturation']),
         lambda x: tf.image.adjust_hue(x, p['hue'])]
  for i in range(4):
    image = tf.switch_case(
        tf.cast(p['order'][i], tf.int32),
        [lambda op=op, x=image: tf.clip_by_value(op(x), 0.0, 1.0) for op in ops])
  return image


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, kernel_size: int) -> tf.Tensor:
  """Separable Gaussian blur of a [H, W, C] float image (the official SimCLR kernel, zero padding).

  Each 1-D pass is a matmul with a banded (Toeplitz) matrix: same result as the official
  depthwise_conv2d with SAME padding, several times faster on CPU.
  """
  radius = kernel_size // 2
  k_sum = tf.reduce_sum(tf.exp(-tf.range(-radius, radius + 1, dtype=tf.float32)**2
                               / (2.0 * sigma**2)))

  def band(n: int) -> tf.Tensor:
    d = tf.cast(tf.range(n)[None, :] - tf.range(n)[:, None], tf.float32)
    return tf.where(tf.abs(d) <= radius, tf.exp(-d**2 / (2.0 * sigma**2)), 0.0) / k_sum

  out = tf.einsum('ij,jwc->iwc', band(image.shape[0]), image)
  return tf.einsum('wv,ivc->iwc', band(image.shape[1]), out)


def apply_view(image: tf.Tensor, p: dict[str, tf.Tensor], cfg: ViewConfig) -> tf.Tensor:
  """Applies drawn params: crop+resize → flip → jitter → grayscale → blur; float32 in [0, 1]."""
  crop = decode_and_crop(image, lambda shape: sample_crop_window(p['crop_seed'], shape, cfg))
  x = _resize(crop, cfg.size)
  x = tf.cond(p['flip'], lambda: tf.image.flip_left_right(x), lambda: x)
  x = tf.cond(p['jitter'], lambda: _color_jitter(x, p), lambda: x)
  x = tf.cond(p['grayscale'], lambda: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]),
              lambda: x)
  if cfg.blur:
    kernel = max(cfg.size // 10, 1)
    x = tf.cond(p['blur'], lambda: gaussian_blur(x, p['sigma'], kernel), lambda: x)
  x = tf.clip_by_value(x, 0.0, 1.0)
  return tf.ensure_shape(x, [cfg.size, cfg.size, 3])


def train_view(image: tf.Tensor, seed: tf.Tensor, cfg: ViewConfig) -> tf.Tensor:
  """One SimCLR train view of a uint8 image or JPEG/PNG bytes; a function of (image, seed)."""
  return apply_view(image, sample_view_params(seed, cfg), cfg)


def eval_window(shape: tf.Tensor, size: int) -> tf.Tensor:
  """Centre crop [y, x, h, w] keeping 87.5% of the shorter side; the whole image at ≤ 32 px."""
  h, w = shape[0], shape[1]
  if size <= 32:
    return tf.stack([0, 0, h, w])
  side = tf.cast(tf.round(EVAL_CROP_FRACTION * tf.cast(tf.minimum(h, w), tf.float32)), tf.int32)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def eval_view(image: tf.Tensor, size: int) -> tf.Tensor:
  """Eval view: centre crop (see eval_window) and bicubic resize to [size, size, 3] in [0, 1]."""
  crop = decode_and_crop(image, lambda shape: eval_window(shape, size))
  return tf.ensure_shape(_resize(crop, size), [size, size, 3])
