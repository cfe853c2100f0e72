"""What a SimCLR view is: its parameters, shared by both implementations.

A train view is a random resized crop, resized to `size`, then a random flip, colour jitter,
grayscale and blur. The crop is the official SimCLR's (tf2/data_util.py `crop_and_resize`):
`tf.image.sample_distorted_bounding_box` of the whole image with `min_object_covered=0.1`,
aspect ratio in [3/4, 4/3], area in [0.08, 1] and 100 attempts, else the whole image.
`data/views_tf.py` makes views with tf.data on the host (calling that op), `views_jax.py` with
JAX on the accelerator (a port of its kernel); both read the same `ViewConfig`, so neither
imports the other (and this module imports neither TensorFlow nor JAX).
"""
import dataclasses
from typing import Any

from simclr_jax.errors import ConfigError

PRESETS = {  # config.augment overrides for the two standard image sizes.
    'cifar': dict(jitter_strength=0.5, blur=False),
    'imagenet': dict(jitter_strength=1.0, blur=True),
}
CROP_TRIES = 100  # max_attempts of the official crop_and_resize.
EVAL_CROP_FRACTION = 0.875  # 224/256: the official SimCLR / ResNet eval crop.


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """Parameters of the train and eval views (from config.data.image_size and config.augment)."""
  size: int = 32
  crop_area: tuple[float, float] = (0.08, 1.0)
  crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
  min_object_covered: float = 0.1
  flip: bool = True
  jitter_strength: float = 0.5
  jitter_prob: float = 0.8
  grayscale_prob: float = 0.2
  blur: bool = False
  blur_prob: float = 0.5

  def __post_init__(self):
    # The ranges tf.image.sample_distorted_bounding_box accepts; checked here so that a bad
    # value stops the run before tf.data or XLA sees it, on every path.
    lo, hi = self.crop_area
    if not 0 < lo <= hi <= 1:
      raise ConfigError(f'crop_area={self.crop_area}: set augment.crop_area, probe.crop_area or '
                        'finetune.crop_area (the one you changed) to (lo, hi) with '
                        '0 < lo <= hi <= 1, e.g. (0.08, 1.0)')
    lo, hi = self.crop_aspect
    if not 0 < lo <= hi:
      raise ConfigError(f'augment.crop_aspect={self.crop_aspect}: set it to (lo, hi) with '
                        '0 < lo <= hi, e.g. (3/4, 4/3)')
    if not 0 <= self.min_object_covered <= 1:
      raise ConfigError(f'augment.min_object_covered={self.min_object_covered}: set it in '
                        '[0, 1] (official SimCLR: 0.1)')


def view_config(config: Any) -> ViewConfig:
  """ViewConfig from a full config (keys config.data.image_size and config.augment.*)."""
  a = config.augment
  # Configs saved before the key existed get the official value.
  covered = a.get('min_object_covered', ViewConfig.min_object_covered)
  return ViewConfig(size=config.data.image_size, crop_area=tuple(a.crop_area),
                    crop_aspect=tuple(a.crop_aspect), min_object_covered=covered, flip=a.flip,
                    jitter_strength=a.jitter_strength, jitter_prob=a.jitter_prob,
                    grayscale_prob=a.grayscale_prob, blur=a.blur, blur_prob=a.blur_prob)


def eval_window(height: int, width: int, size: int) -> tuple[int, int, int, int]:
  """The eval view's crop (y, x, h, w) of a height x width image, as the official eval.

  A centre square of 87.5% of the shorter side (tf2/data_util.py `center_crop`, offsets
  `((image_height - crop_height) + 1) // 2`); at output sizes <= 32 px the whole image
  (tf2/data.py: "Disable test cropping for small images (e.g. CIFAR)").
  """
  if size <= 32:
    return 0, 0, height, width
  side = round(EVAL_CROP_FRACTION * min(height, width))  # half to even, as tf.math.rint
  return (height - side + 1) // 2, (width - side + 1) // 2, side, side
