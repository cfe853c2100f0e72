"""The demo data set as uint8 arrays, without TensorFlow: scikit-learn's bundled 8x8 digits.

Shared by the tf.data demo source (`data/sources.py`) and the device-resident data set
(`device_input.py`, config.data.augment_on='device'), so every mode trains on identical images.
The digits are upscaled with `views_jax.resize`, TF's bicubic resize written in JAX, run on
the CPU so the pixels do not depend on the accelerator.
"""
import functools

import jax
import numpy as np

TEST_SIZE = 360  # of load_digits' 1797 images; the split is fixed (seed 0), not per run.
NUM_CLASSES = 10
SPLITS = ('train', 'test')


@functools.lru_cache(maxsize=4)
def load(split: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images uint8 [n, size, size, 3], labels int32 [n], ids int64 [n]) of `split`, by id.

  `ids` are the digits' positions in `load_digits()`, stable across runs and splits. The arrays
  are read-only (cached).
  """
  from sklearn import datasets  # Imported here: only the demo needs scikit-learn.
  from simclr_jax.data import views_jax
  digits = datasets.load_digits()
  order = np.random.RandomState(0).permutation(len(digits.images))
  splits = {'train': order[TEST_SIZE:], 'test': order[:TEST_SIZE]}
  if split not in splits:
    raise ValueError(f'split {split!r} is not in the demo set (set config.data.train_split / '
                     f'config.data.eval_split to one of {sorted(splits)}).')
  ids = np.sort(splits[split])
  small = digits.images[ids, :, :, None].astype(np.float32) / 16.0
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    images = np.asarray(views_jax.resize(small, size))  # clipped to [0, 1]
  images = np.round(images * 255).astype(np.uint8).repeat(3, axis=-1)
  labels = digits.target[ids].astype(np.int32)
  for a in (images, labels, ids):
    a.flags.writeable = False
  return images, labels, ids
