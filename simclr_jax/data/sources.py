"""Data sources: TFDS by name, image folders, the demo digits.

Every source yields {'image', 'label', 'index'} for this process's shard only: 'image' is uint8
[H, W, 3] or encoded JPEG/PNG bytes (decoded later together with the crop), 'label' int32 (-1
when unlabelled) and 'index' a stable int64 id of the example in the split, used for view seeds.
Configuration mistakes raise one ConfigError naming the config key, when the source is built.
"""
import dataclasses
import itertools
import os
import re
from typing import Any

import jax
import numpy as np
import simplejpeg
from absl import logging

from simclr_jax.data import demo_digits
from simclr_jax.errors import ConfigError
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
  # (ids, labels) of the whole split where they are known without reading an image (folder:
  # the file list; demo: in memory), else None.
  labels_by_id: tuple[np.ndarray, np.ndarray] | None = None
  # The stored order is a seeded shuffle, not the labels' order: TFDS shuffles examples when it
  # writes a data set (unless the builder sets disable_shuffling).
  stored_shuffled: bool = False


def load(data_cfg: Any, split: str, *, process_index: int | None = None,
         process_count: int | None = None) -> Source:
  """The shard `process_index` of `process_count` of `split` of the source config.data names."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  loaders = {'tfds': _tfds, 'folder': _folder, 'demo': _demo}
  if data_cfg.source not in loaders:
    raise ConfigError(f'config.data.source={data_cfg.source!r} is not one of {sorted(loaders)}.')
  return loaders[data_cfg.source](data_cfg, split, pi, pc)


def _tfds(cfg: Any, split: str, pi: int, pc: int) -> Source:
  """A prepared TFDS dataset; never downloads (a missing copy is a config error)."""
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    raise ConfigError(
        f'config.data.name={cfg.name!r} is not a TFDS dataset (nor found in '
        f'config.data.data_dir={cfg.data_dir!r}): {str(e).splitlines()[0]}') from None
  if not builder.is_prepared():
    raise ConfigError(
        f'config.data.data_dir={cfg.data_dir!r} holds no prepared copy of TFDS dataset '
        f'{cfg.name!r} (looked in {builder.data_dir}); point config.data.data_dir at it or run '
        f'`tfds build {cfg.name} --data_dir=...` first (this job never downloads).')
  try:
    total = builder.info.splits[split].num_examples
  except (KeyError, ValueError, TypeError) as e:
    raise ConfigError(
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
  return Source(ds, builder.info.splits[shards[pi]].num_examples, total, num_classes,
                stored_shuffled=not getattr(builder.info, 'disable_shuffling', False))


def _split_dir(cfg: Any, split: str) -> str:
  """config.data.folder/<split>, or a ConfigError naming the keys to set."""
  root = cfg.folder
  if not root:
    raise ConfigError("config.data.folder is not set (config.data.source='folder').")
  split_dir = os.path.join(root, split)
  if not tf.io.gfile.isdir(split_dir):
    found = sorted(tf.io.gfile.listdir(root)) if tf.io.gfile.isdir(root) else 'no such folder'
    raise ConfigError(f'config.data.folder={root!r} has no split folder {split!r} '
                      f'(set {_SPLIT_KEYS}; found: {found}).')
  return split_dir


def _list_split(split_dir: str) -> dict[str, list[str]]:
  """{class folder: sorted image file names} of one split folder (other files are ignored)."""
  classes = sorted(d.rstrip('/') for d in tf.io.gfile.listdir(split_dir)
                   if tf.io.gfile.isdir(os.path.join(split_dir, d)))
  return {c: sorted(f for f in tf.io.gfile.listdir(os.path.join(split_dir, c))
                    if f.lower().endswith(IMAGE_EXTENSIONS)) for c in classes}


def _train_classes(cfg: Any, listing: dict[str, list[str]]) -> tuple[str, ...]:
  """The class folders of the train split's `listing`; an empty one is a ConfigError."""
  where = f'config.data.folder={cfg.folder!r}, split {cfg.train_split!r}'
  if not listing:
    raise ConfigError(f'{where}: no class folders (the folder source reads '
                      f'<folder>/<split>/<class>/*.{{{",".join(IMAGE_EXTENSIONS)}}}).')
  empty = [c for c, files in listing.items() if not files]
  if empty:
    raise ConfigError(
        f'{where}: class folder {empty[0]!r} has no {"/".join(IMAGE_EXTENSIONS)} images '
        f'(empty class folders: {empty}). Every class folder of the train split is a class of '
        'the run: add its images or remove the folder.')
  return tuple(listing)


def folder_classes(data_cfg: Any) -> tuple[str, ...]:
  """The run's class list for the folder source: config.data.classes, else the train split's.

  Labels are indices into this list in every split, so pretraining stores it in config.json
  (config.data.classes) and the evaluation reads it from there.
  """
  if data_cfg.classes:
    classes = tuple(data_cfg.classes)
    if len(set(classes)) != len(classes):
      raise ConfigError(f'config.data.classes={classes} names a class twice.')
    return classes
  return _train_classes(data_cfg, _list_split(_split_dir(data_cfg, data_cfg.train_split)))


def _folder(cfg: Any, split: str, pi: int, pc: int) -> Source:
  """Images under config.data.folder/<split>/<class>/*.{jpg,jpeg,png}; labels from one class list.

  The class list is config.data.classes, or the train split's class folders (sorted), the same
  in every split: a split may lack classes of the list, but a class folder the list does not
  have is a ConfigError (its label would mean nothing to a model trained on the list).
  """
  split_dir = _split_dir(cfg, split)
  listing = _list_split(split_dir)
  derive_here = not cfg.classes and split == cfg.train_split  # Saves listing it twice.
  classes = _train_classes(cfg, listing) if derive_here else folder_classes(cfg)
  unknown = sorted(set(listing) - set(classes))
  if unknown:
    source = ("config.data.classes, the run's list in its config.json" if cfg.classes else
              f'the train split {cfg.train_split!r}')
    raise ConfigError(
        f'config.data.folder={cfg.folder!r}: split {split!r} has class folders {unknown} that '
        f'are not classes of the run (from {source}: {list(classes)}). Labels are positions in '
        'that list, so these images cannot be labelled: remove or rename those folders, or '
        'evaluate on a split with the training classes only.')
  files, labels = [], []
  for label, name in enumerate(classes):
    for f in listing.get(name, ()):
      files.append(os.path.join(split_dir, name, f))
      labels.append(label)
  if not files:
    raise ConfigError(f'config.data.folder={cfg.folder!r}: no {"/".join(IMAGE_EXTENSIONS)} '
                      f'images in {split_dir}/<class>/ (found classes: {sorted(listing)}).')
  index = np.arange(len(files))[pi::pc]  # Strided shards: disjoint, together the whole split.
  ds = tf.data.Dataset.from_tensor_slices({
      'path': np.asarray(files)[index], 'label': np.asarray(labels, np.int32)[index],
      'index': index.astype(np.int64)})
  ds = ds.map(lambda ex: dict(ex, image=tf.io.read_file(ex['path'])),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = check_images(ds, cfg.on_corrupt, len(files))
  ds = ds.map(lambda ex: {k: ex[k] for k in ('image', 'label', 'index')})
  return Source(ds, len(index), len(files), len(classes),
                labels_by_id=(np.arange(len(files), dtype=np.int64),
                              np.asarray(labels, np.int32)))


_CORRUPT_START = 'Corrupt image '
_CORRUPT_END = '--config.data.on_corrupt=skip to skip (and log) such files.'
_skipped = itertools.count(1)  # Running count of files skipped as corrupt in this process.
# TensorFlow's JPEG decoder refuses images of 2**29 output bytes or more (jpeg_mem.cc).
_TF_MAX_JPEG_BYTES = 1 << 29


def _jpeg_problem(data: bytes) -> str:
  """Why the JPEG `data` would not decode whole in TensorFlow ('' if it would).

  libjpeg-turbo decodes a scan that ends early (a file cut short, its end marker kept) as grey
  with only a warning ("premature end of data segment"), which TensorFlow hides; simplejpeg's
  strict mode reports it. Its decode at the smallest DCT scale still reads every bit of the
  scan. Other messages of simplejpeg (harmless junk between segments, subsampling layouts its
  API does not name) leave the verdict to TensorFlow's own decoder, the one the views use.
  """
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    if height * width * 3 >= _TF_MAX_JPEG_BYTES:
      return f'{width}x{height} pixels, more than TensorFlow decodes'
    simplejpeg.decode_jpeg(data, strict=True, min_height=1, min_width=1, fastdct=True,
                           fastupsample=True)
    return ''
  except ValueError as e:
    message = str(e)
  lost_data = (message.startswith('Premature end') or (
      message.startswith('Corrupt JPEG data') and 'extraneous bytes' not in message))
  if lost_data:
    return message
  try:
    tf.io.decode_jpeg(data, channels=3, ratio=8)
  except tf.errors.OpError as e:
    return f'{_op_message(e)} ({message})'
  return ''


def _op_message(error: tf.errors.OpError) -> str:
  """A TensorFlow op's error message without the graph node and op name around it."""
  return re.sub(r'\{\{[^}]*\}\}\s*|\s*\[Op:\w+\]', '', error.message).strip()


def image_problem(data: bytes) -> str:
  """Why `data` is not a whole JPEG or PNG image that the views can decode ('' if it is one)."""
  if data.startswith(b'\xff\xd8\xff'):
    return _jpeg_problem(data)
  if data.startswith(b'\x89PNG\r\n\x1a\n'):
    try:  # A PNG has no partial decode: the whole image, by the decoder the views use.
      tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.OpError as e:
      return _op_message(e)
    return ''
  return f'not JPEG or PNG data ({len(data)} bytes, starting {data[:8]!r})'


def check_images(ds: tf.data.Dataset, on_corrupt: str, num_files: int) -> tf.data.Dataset:
  """Drops (and logs) or stops at elements whose 'image' bytes are not a whole JPEG/PNG.

  Elements are dicts with 'path', 'index' (in [0, num_files), one per file) and 'image' (the
  file's bytes). Each file is checked once per process, the first time it is read (JPEG: one
  decode at 1/8 scale, which still reads all of its data; PNG: a full decode); later epochs
  only look its verdict up. 'skip' logs each corrupt file with a running count; 'error' stops
  the input pipeline with an InvalidArgumentError naming the file and the key (see
  `corrupt_image_message`).
  """
  if on_corrupt not in ('skip', 'error'):
    raise ConfigError(f"config.data.on_corrupt={on_corrupt!r} must be 'skip' or 'error'.")
  # By index: 0 not checked yet, 1 whole, 2 corrupt. A variable, so that a lookup stays in the
  # graph (a Python call per element would cost a third of a decode).
  verdicts = tf.Variable(tf.zeros([num_files], tf.int8), trainable=False)

  def problem(path: tf.Tensor, image: tf.Tensor) -> str:
    found = image_problem(image.numpy())
    if found and on_corrupt == 'skip':
      logging.warning('Skipping corrupt image %s: %s (%d skipped so far; '
                      'config.data.on_corrupt=skip).', path.numpy().decode(), found,
                      next(_skipped))
    return found

  def with_problem(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    def check() -> tf.Tensor:
      found = tf.ensure_shape(tf.py_function(problem, [ex['path'], ex['image']], tf.string), [])
      verdict = tf.where(tf.equal(found, ''), tf.constant(1, tf.int8), tf.constant(2, tf.int8))
      with tf.control_dependencies([verdicts[ex['index']].assign(verdict)]):
        return tf.identity(found)

    known = verdicts[ex['index']]
    found = tf.cond(tf.equal(known, 0), check, lambda: tf.where(
        tf.equal(known, 1), '', 'corrupt (reported when first read)'))
    return dict(ex, problem=found)

  ds = ds.map(with_problem, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if on_corrupt == 'error':
    def assert_whole(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      message = tf.strings.join([
          _CORRUPT_START, ex['path'], ': ', ex['problem'], '. config.data.on_corrupt=error '
          f'stops at the first corrupt file: delete or replace it, or set {_CORRUPT_END}'])
      check = tf.debugging.Assert(tf.equal(ex['problem'], ''), [message])
      with tf.control_dependencies([check]):
        return dict(ex, image=tf.identity(ex['image']))
    ds = ds.map(assert_whole)
  else:
    ds = ds.filter(lambda ex: tf.equal(ex['problem'], ''))
  return ds.map(lambda ex: {k: v for k, v in ex.items() if k != 'problem'})


def corrupt_image_message(error: Exception) -> str | None:
  """The 'Corrupt image PATH: ...' message inside a tf.data error of check_images' 'error' mode.

  For the loop that iterates a dataset: it can re-raise that as a ConfigError (one line naming
  the file and the key) instead of TensorFlow's traceback; None for any other error.
  """
  text = str(error)
  start, end = text.find(_CORRUPT_START), text.find(_CORRUPT_END)
  return text[start:end + len(_CORRUPT_END)] if 0 <= start < end else None


def _demo(cfg: Any, split: str, pi: int, pc: int) -> Source:
  """scikit-learn's bundled 8x8 digits (offline), upscaled to config.data.image_size, RGB uint8.

  The arrays come from `demo_digits.load` (TF-free), which the device-resident data set uses too.
  """
  images, labels, ids = demo_digits.load(split, cfg.image_size)
  ds = tf.data.Dataset.from_tensor_slices({
      'image': images[pi::pc], 'label': labels[pi::pc], 'index': ids[pi::pc].astype(np.int64)})
  return Source(ds, len(ids[pi::pc]), len(ids), demo_digits.NUM_CLASSES,
                labels_by_id=(ids.astype(np.int64), labels.astype(np.int32)))


def read_arrays(data_cfg: Any, split: str, *, purpose: str,
                instead: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """The whole `split` decoded into memory: (uint8 [N, H, W, 3], int32 labels, int64 ids, classes).

  Rows are ordered by id. Every image must have one size (a ConfigError naming `purpose` and
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
      raise ConfigError(f'{fix} (TFDS {data_cfg.name!r} has images of shape {shape}).')
  src = load(data_cfg, split, process_index=0, process_count=1)

  def decode(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = ex['image']
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=3, expand_animations=False)
    return dict(ex, image=image)

  images, labels, ids = [], [], []
  for ex in src.ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator():
    if images and ex['image'].shape != images[0].shape:
      raise ConfigError(f"{fix} (example {ex['index']} is {ex['image'].shape}, example "
                        f'{ids[0]} is {images[0].shape}).')
    images.append(ex['image'])
    labels.append(ex['label'])
    ids.append(ex['index'])
  order = np.argsort(ids, kind='stable')
  return (np.stack(images)[order], np.asarray(labels, np.int32)[order],
          np.asarray(ids, np.int64)[order], src.num_classes)
