"""SimCLR view ops in JAX (views.py): pure functions of (image, key), vmapped per example.

The same distributions as the tf.data ops in data/views_tf.py (not the same random numbers), for
making views inside the jitted step: whole views of a device-resident uint8 data set
(config.data.augment_on='device'), or only the colour half of views that tf.data cropped and
flipped ('split'). Deterministic ops reproduce their TF counterparts to float rounding. Nothing
here imports TensorFlow, so the 'device' path runs where only JAX is installed.
"""
import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.data import views
from simclr_jax.data.views import CROP_TRIES, ViewConfig

# Full f32 matmuls: GPUs and TPUs otherwise round the inputs to TF32 / bf16. On an H100 the
# default precision put crop_resize 1e-3 away from TF; HIGHEST keeps it within 4e-7.
_HIGHEST = jax.lax.Precision.HIGHEST
_GRAY = (0.2989, 0.587, 0.114)  # tf.image.rgb_to_grayscale.
_TABLE_SIZE = 1024


def _cubic_table(a: float = -0.5) -> np.ndarray:
  """TF ResizeBicubic's coefficient table: Keys cubic (a=-0.5) at |d| = i/1024 and 1 + i/1024.

  TF rounds each tap's fractional offset to 1/1024 and reads the weights from this table (built
  in float64, stored as float32); doing the same is what makes the resize match TF to ~1e-7.
  """
  x = np.arange(_TABLE_SIZE + 1, dtype=np.float64) / _TABLE_SIZE
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
  return np.stack([near, far], -1).astype(np.float32)


_CUBIC = _cubic_table()


def view_keys(seed: int, epoch: jax.Array, index: jax.Array, view: int) -> jax.Array:
  """Typed PRNG keys [b]: key(seed) folded with each example's epoch and index, then the view."""
  epoch, index = jnp.broadcast_arrays(jnp.asarray(epoch), jnp.asarray(index))
  fold = jax.random.fold_in
  # One key per (seed, epoch, index, view), independent of the batch it sits in: resumable.
  return jax.vmap(lambda e, i: fold(fold(fold(jax.random.key(seed), e), i), view))(epoch, index)


def _rand_float(bits: jax.Array) -> jax.Array:
  """uint32 → float32 uniform in [0, 1) from 23 bits, as Philox's RandFloat (and jax's uniform)."""
  one = jax.lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32)
  return one - 1.0


def _uniform_int(bits: jax.Array, n: jax.Array) -> jax.Array:
  """int32 uniform in [0, n) from uint32 bits: floor(bits * n / 2^32), for 0 <= n < 2^16.

  The 64-bit product from two 16-bit halves (no x64 in JAX); its bias, at most n / 2^32, is
  far below what any test resolves (TF's Uniform(n) rejects instead). JPEG sides are < 2^16.
  """
  n = n.astype(jnp.uint32)
  high = (bits >> 16) * n + (((bits & np.uint32(0xFFFF)) * n) >> 16)
  return (high >> 16).astype(jnp.int32)


def _lrintf(x: jax.Array) -> jax.Array:
  """C's lrintf: float32 to the nearest integer, halves to even (jnp.round rounds half to even)."""
  return jnp.round(x).astype(jnp.int32)


def sample_crop_window(key: jax.Array, height: int | jax.Array, width: int | jax.Array,
                       cfg: ViewConfig) -> jax.Array:
  """Random-resized-crop window int32 [y, x, h, w]: tf.image.sample_distorted_bounding_box's.

  A port of TF's kernel (sample_distorted_bounding_box_op.cc) with the official SimCLR
  arguments (views_tf.sample_crop_window): the same distribution, not the same random numbers.
  Per attempt: aspect uniform in cfg.crop_aspect; GenerateRandomCrop draws the height
  uniformly between those of the smallest and largest area and rounds as the kernel does, in
  float32; SatisfiesOverlapConstraints keeps crops of at least cfg.min_object_covered of the
  image. The first of CROP_TRIES attempts that passes, else the whole image. The attempts run
  side by side (no loop), for a traced (height, width).
  """
  h_img, w_img = jnp.asarray(height, jnp.int32), jnp.asarray(width, jnp.int32)
  hf, wf = h_img.astype(jnp.float32), w_img.astype(jnp.float32)
  f32 = np.float32
  aspect_lo, aspect_hi = f32(cfg.crop_aspect[0]), f32(cfg.crop_aspect[1])
  # One draw for everything: each vmapped threefry call adds up to a second of CPU compile time.
  bits = jax.random.bits(key, [2 * CROP_TRIES + 2], jnp.uint32)
  aspect = _rand_float(bits[:CROP_TRIES]) * f32(aspect_hi - aspect_lo) + aspect_lo

  # GenerateRandomCrop, every attempt at once.
  min_area = f32(cfg.crop_area[0]) * wf * hf
  max_area = f32(cfg.crop_area[1]) * wf * hf
  h = _lrintf(jnp.sqrt(min_area / aspect))
  max_h = _lrintf(jnp.sqrt(max_area / aspect))
  # Where the widest crop rounds wider than the image, the kernel caps max_height at
  # (W + 0.5 - 1e-7) / aspect, one less if that still rounds wider. It computes that quotient
  # in double: float32 truncates differently only within ~1e-7 of an integer.
  capped = ((wf + 0.5 - f32(1e-7)) / aspect).astype(jnp.int32)
  capped = jnp.where(_lrintf(capped * aspect) > w_img, capped - 1, capped)
  max_h = jnp.where(_lrintf(max_h * aspect) > w_img, capped, max_h)
  max_h = jnp.minimum(max_h, h_img)
  h = jnp.minimum(h, max_h)
  # Uniform(max_h - h + 1): an integer in the closed range [h, max_h].
  h = h + jnp.where(h < max_h, _uniform_int(bits[CROP_TRIES:2 * CROP_TRIES], max_h - h + 1), 0)
  w = _lrintf(h * aspect)
  area = (w * h).astype(jnp.float32)
  # The kernel's corrections of rounding errors: one row more, then one row fewer.
  h = jnp.where(area < min_area, h + 1, h)
  w = _lrintf(h * aspect)
  area = (w * h).astype(jnp.float32)
  h = jnp.where(area > max_area, h - 1, h)
  w = _lrintf(h * aspect)
  area = (w * h).astype(jnp.float32)
  ok = ((area >= min_area) & (area <= max_area) & (w <= w_img) & (h <= h_img) & (w > 0)
        & (h > 0))
  # SatisfiesOverlapConstraints against the one box, the whole image (which contains the crop).
  ok &= (area >= 1.0) & (area / (w_img * h_img).astype(jnp.float32)
                         >= f32(cfg.min_object_covered))

  first, found = jnp.argmax(ok), ok.any()
  h = jnp.where(found, h[first], h_img)
  w = jnp.where(found, w[first], w_img)
  # Uniform(H - h) is in [0, H - h): the crop touches the bottom (right) edge only when h == H.
  # Drawn once for the chosen attempt: the kernel's per-attempt draws are independent of it.
  y = jnp.where(h < h_img, _uniform_int(bits[-2], h_img - h), 0)
  x = jnp.where(w < w_img, _uniform_int(bits[-1], w_img - w), 0)
  return jnp.stack([y, x, h, w]).astype(jnp.int32)


def sample_view_params(key: jax.Array, cfg: ViewConfig, height: int | jax.Array,
                       width: int | jax.Array) -> dict[str, jax.Array]:
  """Every random choice of one train view of a [height, width] image (augment's distributions)."""
  k_crop, k_rest = jax.random.split(key)
  u = jax.random.uniform(k_rest, [13])  # Sliced below rather than one draw per parameter.
  d = 0.8 * cfg.jitter_strength
  lo = max(0.0, 1.0 - d)
  factors = lo + (1.0 + d - lo) * u[5:8]
  hue = 0.2 * cfg.jitter_strength
  return {
      'window': sample_crop_window(k_crop, height, width, cfg),
      'flip': (u[0] < 0.5) & cfg.flip,
      'jitter': u[1] < cfg.jitter_prob,
      'brightness': factors[0], 'contrast': factors[1], 'saturation': factors[2],
      'hue': -hue + 2 * hue * u[8],
      # The jitter ops in random order: argsort of 4 uniforms is a uniform permutation.
      'order': jnp.argsort(u[9:13]).astype(jnp.int32),
      'grayscale': u[2] < cfg.grayscale_prob,
      'blur': (u[3] < cfg.blur_prob) & cfg.blur,
      'sigma': 0.1 + 1.9 * u[4],
  }


def _to_float(image: jax.Array) -> jax.Array:
  """uint8 → float32 in [0, 1] as tf.image.convert_image_dtype does (times 1/255); float as is."""
  if image.dtype == jnp.uint8:
    return image.astype(jnp.float32) * np.float32(1 / 255)
  return image.astype(jnp.float32)


def _resample_matrix(start: jax.Array | int, length: jax.Array | int, in_size: int,
                     out_size: int) -> jax.Array:
  """[out_size, in_size] weights resizing input rows [start, start+length) to out_size rows.

  Row o holds the 4 taps of TF's ResizeBicubic with half-pixel centres (what tf.image.resize
  runs for 'bicubic'): taps outside the crop get weight 0 and the rest are renormalised.
  """
  scale = jnp.asarray(length, jnp.float32) / out_size
  loc = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5
  base = jnp.floor(loc)
  offset = jnp.round((loc - base) * _TABLE_SIZE).astype(jnp.int32)  # lrintf: half to even.
  table = jnp.asarray(_CUBIC)
  weights = jnp.stack([table[offset, 1], table[offset, 0], table[_TABLE_SIZE - offset, 0],
                       table[_TABLE_SIZE - offset, 1]], -1)
  taps = base.astype(jnp.int32)[:, None] + jnp.arange(-1, 3)  # Relative to the crop.
  weights = jnp.where((taps >= 0) & (taps < length), weights, 0.0)
  weights = weights / weights.sum(-1, keepdims=True)
  hit = (start + taps)[..., None] == jnp.arange(in_size)  # [out, 4, in]
  return jnp.where(hit, weights[..., None], 0.0).sum(1)


def _resample(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """Applies row then column weights to [..., H, W, C] (TF's order: y first, then x); clips."""
  x = jnp.einsum('oh,...hwc->...owc', rows, x, precision=_HIGHEST)
  x = jnp.einsum('pw,...owc->...opc', cols, x, precision=_HIGHEST)
  return jnp.clip(x, 0.0, 1.0)  # Bicubic overshoots.


def crop_resize(image: jax.Array, window: jax.Array, size: int) -> jax.Array:
  """float32 [size, size, 3] in [0, 1]: tf.image.resize(crop, 'bicubic') of a traced window.

  The output shape is static whatever the window, so crop and resize are two matmuls with
  weight matrices [size, H] and [size, W] that are zero outside the window.
  """
  x = _to_float(image)
  rows = _resample_matrix(window[0], window[2], x.shape[0], size)
  cols = _resample_matrix(window[1], window[3], x.shape[1], size)
  return _resample(x, rows, cols)


def resize(images: jax.Array, size: int) -> jax.Array:
  """Bicubic resize of [H, W, C] or [n, H, W, C] (any C, uint8 or float) to size x size, clipped.

  Equals np.clip(tf.image.resize(images, [size, size], 'bicubic'), 0, 1) (uint8 scaled to [0, 1]).
  """
  x = _to_float(images)
  h, w = x.shape[-3], x.shape[-2]
  return _resample(x, _resample_matrix(0, h, h, size), _resample_matrix(0, w, w, size))


def eval_views(images: jax.Array, size: int) -> jax.Array:
  """Eval views of [n, H, W, 3] uint8 or float images: views_tf.eval_view's crop and resize.

  The centre crop of views.eval_window (static: every image of the batch has the same shape),
  then TF's bicubic resize to [n, size, size, 3] float32 in [0, 1].
  """
  height, width = images.shape[1:3]
  y, x, h, w = views.eval_window(height, width, size)
  return _resample(_to_float(images), _resample_matrix(y, h, height, size),
                   _resample_matrix(x, w, width, size))


def _hue_range(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """RGB [..., 3] → (hue in [0, 6), min channel, max channel): HSV with V = max, S = 1 - min/max."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  hi, lo = x.max(-1), x.min(-1)
  chroma = hi - lo
  safe = jnp.where(chroma > 0, chroma, 1.0)
  hue = jnp.where(hi == r, jnp.mod((g - b) / safe, 6.0),
                  jnp.where(hi == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
  return jnp.where(chroma > 0, hue, 0.0), lo, hi


def _from_hue_range(hue: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Inverse of _hue_range: each channel is hi minus chroma times its piecewise-linear hue ramp."""
  k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + hue[..., None], 6.0)  # r, g, b.
  ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return hi[..., None] - (hi - lo)[..., None] * ramp


def _adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  """tf.image.adjust_contrast: scale each channel's deviation from its mean over the image."""
  mean = x.mean((0, 1), keepdims=True)
  return (x - mean) * factor + mean


def _adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
  """tf.image.adjust_saturation: S = 1 - min/max scaled and clipped to [0, 1]; H and V kept."""
  hue, lo, hi = _hue_range(x)
  sat = jnp.where(hi > 0, (hi - lo) / jnp.where(hi > 0, hi, 1.0), 0.0)
  return _from_hue_range(hue, hi * (1.0 - jnp.clip(sat * factor, 0.0, 1.0)), hi)


def _adjust_hue(x: jax.Array, delta: jax.Array) -> jax.Array:
  """tf.image.adjust_hue: rotate the hue by delta turns; min and max channel kept."""
  hue, lo, hi = _hue_range(x)
  return _from_hue_range(jnp.mod(hue + 6.0 * delta, 6.0), lo, hi)


def color_jitter(x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
  """Brightness (multiplicative), contrast, saturation, hue in params['order']; clip after each."""
  ops = (lambda y: y * params['brightness'],
         lambda y: _adjust_contrast(y, params['contrast']),
         lambda y: _adjust_saturation(y, params['saturation']),
         lambda y: _adjust_hue(y, params['hue']))
  branches = [lambda y, op=op: jnp.clip(op(y), 0.0, 1.0) for op in ops]
  # A loop over the 4 positions keeps one copy of the ops in the program, not four (faster
  # compiles); under vmap the switch becomes a select over the four ops.
  return jax.lax.fori_loop(
      0, 4, lambda i, y: jax.lax.switch(params['order'][i], branches, y), x)


def grayscale(x: jax.Array) -> jax.Array:
  """tf.image.rgb_to_grayscale weights, tiled back to 3 channels."""
  gray = x[..., 0] * _GRAY[0] + x[..., 1] * _GRAY[1] + x[..., 2] * _GRAY[2]
  return jnp.repeat(gray[..., None], 3, axis=-1)


def gaussian_blur(x: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
  """views_tf.gaussian_blur: separable Gaussian (official SimCLR kernel, zero padding) of [H, W, C].

  Each 1-D pass is a matmul with a banded matrix, which needs no per-example convolution kernel.
  """
  radius = kernel_size // 2
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  k_sum = jnp.exp(-taps**2 / (2.0 * sigma**2)).sum()

  def band(n: int) -> jax.Array:
    d = (jnp.arange(n)[None, :] - jnp.arange(n)[:, None]).astype(jnp.float32)
    return jnp.where(jnp.abs(d) <= radius, jnp.exp(-d**2 / (2.0 * sigma**2)), 0.0) / k_sum

  x = jnp.einsum('ij,jwc->iwc', band(x.shape[0]), x, precision=_HIGHEST)
  return jnp.einsum('wv,ivc->iwc', band(x.shape[1]), x, precision=_HIGHEST)


def finish_view(x: jax.Array, params: dict[str, jax.Array], cfg: ViewConfig) -> jax.Array:
  """Colour half of a view ('split' mode): jitter → grayscale → blur → clip, on a cropped view."""
  x = _to_float(x)
  x = jnp.where(params['jitter'], color_jitter(x, params), x)
  x = jnp.where(params['grayscale'], grayscale(x), x)
  if cfg.blur:
    kernel = max(cfg.size // 10, 1)
    x = jnp.where(params['blur'], gaussian_blur(x, params['sigma'], kernel), x)
  return jnp.clip(x, 0.0, 1.0)


def apply_view(image: jax.Array, params: dict[str, jax.Array], cfg: ViewConfig) -> jax.Array:
  """Applies drawn params: crop+resize → flip → jitter → grayscale → blur; [size, size, 3] f32."""
  x = crop_resize(image, params['window'], cfg.size)
  x = jnp.where(params['flip'], x[:, ::-1], x)
  return finish_view(x, params, cfg)


def train_views(images: jax.Array, keys: jax.Array, cfg: ViewConfig) -> jax.Array:
  """One train view per example: images [b, H, W, 3] (uint8 or float), keys [b] → [b, s, s, 3]."""
  height, width = images.shape[1:3]
  return jax.vmap(lambda image, key: apply_view(
      image, sample_view_params(key, cfg, height, width), cfg))(images, keys)


def finish_views(views: jax.Array, keys: jax.Array, cfg: ViewConfig) -> jax.Array:
  """finish_view per example of cropped, resized, flipped views [b, s, s, 3] with keys [b]."""
  height, width = views.shape[1:3]
  return jax.vmap(lambda view, key: finish_view(
      view, sample_view_params(key, cfg, height, width), cfg))(views, keys)
