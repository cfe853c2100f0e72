"""What a SimCLR view is (DESIGN.md "views"): its parameters, shared by both implementations.

A train view is a random resized crop, resized to `size`, then a random flip, colour jitter,
grayscale and blur. `data/views_tf.py` makes views with tf.data on the host, `views_jax.py`
with JAX on the accelerator; both read the same `ViewConfig`, so neither imports the other (and
this module imports neither TensorFlow nor JAX).
"""
import dataclasses
from typing import Any

PRESETS = {  # config.augment overrides for the two standard image sizes.
    'cifar': dict(jitter_strength=0.5, blur=False),
    'imagenet': dict(jitter_strength=1.0, blur=True),
}
CROP_TRIES = 100
EVAL_CROP_FRACTION = 0.875  # 224/256: the official SimCLR / ResNet eval crop.


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """Parameters of the train and eval views (from config.data.image_size and config.augment)."""
  size: int = 32
  crop_area: tuple[float, float] = (0.08, 1.0)
  crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  jitter_strength: float = 0.5
  jitter_prob: float = 0.8
  grayscale_prob: float = 0.2
  blur: bool = False
  blur_prob: float = 0.5


def view_config(config: Any) -> ViewConfig:
  """ViewConfig from a full config (keys config.data.image_size and config.augment.*)."""
  a = config.augment
  return ViewConfig(size=config.data.image_size, crop_area=tuple(a.crop_area),
                    crop_aspect=tuple(a.crop_aspect), flip=a.flip,
                    jitter_strength=a.jitter_strength, jitter_prob=a.jitter_prob,
                    grayscale_prob=a.grayscale_prob, blur=a.blur, blur_prob=a.blur_prob)
