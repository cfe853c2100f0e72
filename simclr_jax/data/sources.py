"""Data sources: TFDS by name, image folders, the demo digits.

Every source yields {'image', 'label', 'index'} for this process's shard only: 'image' is uint8
[H, W, 3] or encoded JPEG/PNG bytes (decoded later together with the crop), 'label' int32 (-1
when unlabelled) and 'index' a stable int64 id of the example in the split, used for view seeds.
Configuration mistakes raise one ValueError naming the config key, when the source is built.
"""
import dataclasses
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from simclr_jax.data import demo_digits
from simclr_jax.data.tf_cpu import tf  # before tensorflow_datasets: hides accelerators from TF
import tensorflow_datasets as tfds  # noqa: E402  pylint: disable=g-bad-import-order

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
DEMO_TEST_SIZE = demo_digits.TEST_SIZE
_SPLIT_KEYS = 'config.data.train_split / config.data.eval_split'


@dataclasses.dataclass(frozen=True)
class Source:
  """One process's shard of a split."""
  ds: tf.data.Dataset  # {'image': uint8 [H,W,3] or encoded bytes, 'label': int32, 'index': int64}
  num_examples: int  # in this process's shard
  num_examples_total: int  # in the whole split, over all processes
  num_classes: int  # 0 if unlabelled


def load(data_cfg: Any, split: str, *, process_index: int | None = None,
         process_count: int | None = None) -> Source:
  """The shard `process_index` of `process_count` of `split` of the source config.data names."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  loaders = {'tfds': _tfds, 'folder': _folder, 'demo': _demo}
  if data_cfg.source not in loaders:
    raise ValueError(f'config.data.source={data_cfg.source!r} is not one of {sorted(loaders)}.')
  return loaders[data_cfg.source](data_cfg, split, pi, pc)


def _tfds(cfg: Any, split: str, pi: int, pc: int) -> Source:
  """A prepared TFDS dataset; never downloads (a missing copy is a config error)."""
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    raise ValueError(
        f'config.data.name={cfg.name!r} is not a TFDS dataset (nor found in '
        f'config.data.data_dir={cfg.data_dir!r}): {str(e).splitlines()[0]}') from None
  if not builder.is_prepared():
    raise ValueError(
        f'config.data.data_dir={cfg.data_dir!r} holds no prepared copy of TFDS dataset '
        f'{cfg.name!r} (looked in {builder.data_dir}); point config.data.data_dir at it or run '
        f'`tfds build {cfg.name} --data_dir=...` first (this job never downloads).')
  try:
    total = builder.info.splits[split].num_examples
  except (KeyError, ValueError, TypeError) as e:
    raise ValueError(
        f'split {split!r} is not in TFDS dataset {cfg.name!r} (set {_SPLIT_KEYS}; available: '
        f'{sorted(builder.info.splits)}): {e}') from None
  # Contiguous, disjoint shards: each process reads its own, none twice (tfds.even_splits).
  shards = tfds.even_splits(split, n=pc, drop_remainder=False)
  offset = sum(builder.info.splits[s].num_examples for s in shards[:pi])
  features = builder.info.features
  jpeg = getattr(features['image'], 'encoding_format', None) == 'jpeg'
  # JPEG stays encoded so augment can decode only the crop window (decode_and_crop_jpeg).
  decoders = {'image': tfds.decode.SkipDecoding()} if jpeg else None
  ds = builder.as_dataset(split=shards[pi], shuffle_files=False, decoders=decoders)
  has_label = 'label' in features

  def convert(i: tf.Tensor, ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = ex['image']
    if not jpeg and image.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    label = tf.cast(ex['label'], tf.int32) if has_label else tf.constant(-1, tf.int32)
    return {'image': image, 'label': label, 'index': i}

  ds = ds.enumerate(start=offset).map(convert, num_parallel_calls=tf.data.AUTOTUNE)
  num_classes = getattr(features['label'], 'num_classes', 0) if has_label else 0
  return Source(ds, builder.info.splits[shards[pi]].num_examples, total, num_classes)


def _folder(cfg: Any, split: str, pi: int, pc: int) -> Source:
  """Images under config.data.folder/<split>/<class>/*.{jpg,jpeg,png}; labels = sorted classes."""
  root = cfg.folder
  if not root:
    raise ValueError("config.data.folder is not set (config.data.source='folder').")
  split_dir = os.path.join(root, split)
  if not tf.io.gfile.isdir(split_dir):
    found = sorted(tf.io.gfile.listdir(root)) if tf.io.gfile.isdir(root) else 'no such folder'
    raise ValueError(f'config.data.folder={root!r} has no split folder {split!r} '
                     f'(set {_SPLIT_KEYS}; found: {found}).')
  classes = sorted(d.rstrip('/') for d in tf.io.gfile.listdir(split_dir)
                   if tf.io.gfile.isdir(os.path.join(split_dir, d)))
  files, labels = [], []
  for label, name in enumerate(classes):
    for f in sorted(tf.io.gfile.listdir(os.path.join(split_dir, name))):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(split_dir, name, f))
        labels.append(label)
  if not files:
    raise ValueError(f'config.data.folder={root!r}: no {"/".join(IMAGE_EXTENSIONS)} images in '
                     f'{split_dir}/<class>/ (found classes: {classes}).')
  index = np.arange(len(files))[pi::pc]  # Strided shards: disjoint, together the whole split.
  ds = tf.data.Dataset.from_tensor_slices({
      'path': np.asarray(files)[index], 'label': np.asarray(labels, np.int32)[index],
      'index': index.astype(np.int64)})
  ds = ds.map(lambda ex: dict(ex, image=tf.io.read_file(ex['path'])),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = _check_images(ds, cfg.on_corrupt)
  ds = ds.map(lambda ex: {k: ex[k] for k in ('image', 'label', 'index')})
  return Source(ds, len(index), len(files), len(classes))


_skipped: list[str] = []  # Files skipped as corrupt in this process (for the log count).


def _log_skip(path: tf.Tensor) -> bool:
  """Logs a skipped corrupt file with the running count (runs only for bad files)."""
  _skipped.append(path.numpy().decode())
  logging.warning('Skipping corrupt image %s (%d skipped so far; config.data.on_corrupt=skip).',
                  _skipped[-1], len(_skipped))
  return False


def _check_images(ds: tf.data.Dataset, on_corrupt: str) -> tf.data.Dataset:
  """Drops (and logs) or stops at files that are not whole JPEG/PNG streams.

  A cheap structural check without decoding: JPEG must start with SOI and end with EOI, PNG start
  with its signature and end with the IEND chunk. This catches garbage and truncated files.
  """
  if on_corrupt not in ('skip', 'error'):
    raise ValueError(f"config.data.on_corrupt={on_corrupt!r} must be 'skip' or 'error'.")

  def ok(ex: dict[str, tf.Tensor]) -> tf.Tensor:
    b = ex['image']
    n = tf.strings.length(b)
    head, tail = tf.strings.substr(b, 0, 8), tf.strings.substr(b, tf.maximum(n - 8, 0), 8)
    jpeg = (tf.strings.substr(head, 0, 3) == b'\xff\xd8\xff') & (
        tf.strings.substr(tail, 6, 2) == b'\xff\xd9')
    png = (head == b'\x89PNG\r\n\x1a\n') & (tail == b'IEND\xaeB`\x82')
    return (n >= 8) & (jpeg | png)

  if on_corrupt == 'error':
    def assert_ok(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      check = tf.debugging.Assert(ok(ex), ['Corrupt image (config.data.on_corrupt=error):',
                                           ex['path']])
      with tf.control_dependencies([check]):
        return dict(ex, image=tf.identity(ex['image']))
    return ds.map(assert_ok)
  return ds.filter(lambda ex: tf.cond(
      ok(ex), lambda: True, lambda: tf.py_function(_log_skip, [ex['path']], tf.bool)))


def _demo(cfg: Any, split: str, pi: int, pc: int) -> Source:
  """scikit-learn's bundled 8x8 digits (offline), upscaled to config.data.image_size, RGB uint8.

  The arrays come from `demo_digits.load` (TF-free), which the device-resident data set uses too.
  """
  images, labels, ids = demo_digits.load(split, cfg.image_size)
  ds = tf.data.Dataset.from_tensor_slices({
      'image': images[pi::pc], 'label': labels[pi::pc], 'index': ids[pi::pc].astype(np.int64)})
  return Source(ds, len(ids[pi::pc]), len(ids), demo_digits.NUM_CLASSES)


def read_arrays(data_cfg: Any, split: str, *, purpose: str,
                instead: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """The whole `split` decoded into memory: (uint8 [N, H, W, 3], int32 labels, int64 ids, classes).

  Rows are ordered by id. Every image must have one size (a ValueError naming `purpose` and
  suggesting `instead` otherwise); for TFDS a variable image shape is refused from the metadata,
  before anything is read.
  """
  fix = (f'{purpose} needs every image of the split at one size, to hold them as one uint8 '
         f'array; use {instead} for this data set')
  if data_cfg.source == 'tfds':
    try:
      shape = tfds.builder(data_cfg.name, data_dir=data_cfg.data_dir).info.features['image'].shape
    except (tfds.core.registered.DatasetNotFoundError, ValueError, KeyError):
      shape = None  # load() below reports a bad name or data_dir with its own message
    if shape is not None and None in shape[:2]:
      raise ValueError(f'{fix} (TFDS {data_cfg.name!r} has images of shape {shape}).')
  src = load(data_cfg, split, process_index=0, process_count=1)

  def decode(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = ex['image']
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=3, expand_animations=False)
    return dict(ex, image=image)

  images, labels, ids = [], [], []
  for ex in src.ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator():
    if images and ex['image'].shape != images[0].shape:
      raise ValueError(f"{fix} (example {ex['index']} is {ex['image'].shape}, example "
                       f'{ids[0]} is {images[0].shape}).')
    images.append(ex['image'])
    labels.append(ex['label'])
    ids.append(ex['index'])
  order = np.argsort(ids, kind='stable')
  return (np.stack(images)[order], np.asarray(labels, np.int32)[order],
          np.asarray(ids, np.int64)[order], src.num_classes)
