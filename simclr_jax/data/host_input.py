"""Per-process tf.data streams → numpy batches: pretraining (two views), probe/fine-tune, eval.

The train stream is a pure function of (config, step): epoch e is the source shuffled with a seed
from (config.seed, e), and each view is seeded by (config.seed, epoch, example index, view), so a
restart at step k skips the un-augmented stream to example k·b and yields what an uninterrupted
run yields from step k. The probe / fine-tuning stream is the same endless shuffle with one crop
+ flip view per example; the eval stream is every example once, padded to whole batches.
"""
import dataclasses
from typing import Any, Iterator

import jax
import numpy as np

from simclr_jax import parallel
from simclr_jax.data import sources, views, views_tf
from simclr_jax.data.tf_cpu import tf
from simclr_jax.errors import ConfigError

_MAX_EPOCHS = 2**40  # "forever"; tf.data.Dataset.range needs an end.


def _procs(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Explicit (process_index, process_count), defaulting to JAX's."""
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _local_batch(global_batch: int, process_count: int, key: str) -> int:
  """Per-process batch size; a ValueError naming `key` if it does not divide."""
  if global_batch % process_count:
    raise ValueError(f'config.{key}={global_batch} is not divisible by the number of '
                     f'processes ({process_count}).')
  return global_batch // process_count


def num_examples(config: Any, split: str | None = None) -> int:
  """Number of examples in `split` (default config.data.train_split) over all processes."""
  split = config.data.train_split if split is None else split
  return sources.load(config.data, split, process_index=0, process_count=1).num_examples_total


# TensorFlow's graph-level seed when none is set (random_seed.DEFAULT_GRAPH_SEED).
_GRAPH_SEED = 87654321


def _epochs(ds: tf.data.Dataset, n: int, config: Any, start_epoch: int = 0) -> tf.data.Dataset:
  """Endless: epoch e is `ds` in an order seeded by (config.seed, e), each example tagged 'epoch'.

  The fixed per-epoch order (reshuffle off) makes epoch e reproducible on its own. Batching the
  stream afterwards lets batches cross epoch boundaries, as the official input does (shuffle,
  repeat, then batch with drop_remainder).
  """
  buffer = max(min(config.data.shuffle_buffer, n), 1)

  def epoch(e: tf.Tensor) -> tf.data.Dataset:
    # A seeded shuffle still mixes in TensorFlow's graph-level seed, which a caller's
    # tf.random.set_seed would change. Pinned here (in this traced function's graph only, to
    # TensorFlow's default), the order is a function of (config.seed, epoch) alone.
    tf.random.set_seed(_GRAPH_SEED)
    order_seed = tf.cast(views_tf.view_seed(config.seed, e, -1, -1)[0], tf.int64)
    shuffled = ds.shuffle(buffer, seed=order_seed, reshuffle_each_iteration=False)
    return shuffled.map(lambda ex: dict(ex, epoch=e))

  return tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch)


def train_dataset(config: Any, *, start_step: int = 0, finish_views: bool = True,
                  process_index: int | None = None,
                  process_count: int | None = None) -> tf.data.Dataset:
  """This process's endless stream of {'view1', 'view2', 'label'} batches from `start_step`.

  With `finish_views=False` the views are only decoded, cropped, resized and flipped (the same
  crop and flip as the whole views for the same seeds); colour jitter, grayscale and blur then
  run in the train step (device_input.split_prepare), which needs each example's 'epoch' and
  'index' (int32), yielded as well.
  """
  pi, pc = _procs(process_index, process_count)
  batch = _local_batch(config.train.batch_size, pc, 'train.batch_size')
  src = sources.load(config.data, config.data.train_split, process_index=pi, process_count=pc)
  ds = src.ds.cache() if config.data.cache else src.ds
  start_epoch, skip = divmod(start_step * batch, src.num_examples)
  seed = config.seed
  stream = _epochs(ds, src.num_examples, config, start_epoch).skip(skip)
  cfg = views.view_config(config)
  if not finish_views:  # Probabilities 0 switch jitter and grayscale off; crop/flip draws stay.
    cfg = dataclasses.replace(cfg, jitter_prob=0.0, grayscale_prob=0.0, blur=False)

  def two_views(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    made = {f'view{v + 1}': views_tf.train_view(
        ex['image'], views_tf.view_seed(seed, ex['epoch'], ex['index'], v), cfg) for v in (0, 1)}
    if not finish_views:
      made.update(epoch=tf.cast(ex['epoch'], tf.int32), index=tf.cast(ex['index'], tf.int32))
    return dict(made, label=ex['label'])

  stream = stream.map(two_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return stream.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """`ds` as numpy batches; a corrupt file met with on_corrupt='error' is a ConfigError."""
  try:
    yield from ds.as_numpy_iterator()
  except tf.errors.InvalidArgumentError as e:
    message = sources.corrupt_image_message(e)
    if message is None:
      raise
    raise ConfigError(message) from None


def train_iterator(config: Any, *, start_step: int = 0, finish_views: bool = True,
                   process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """numpy batches {'view1','view2': float32 [b,H,W,3], 'label': int32 [b]}, b = batch/processes."""
  return _numpy_batches(train_dataset(config, start_step=start_step, finish_views=finish_views,
                                      process_index=process_index, process_count=process_count))


def _keep(ds: tf.data.Dataset, indices: np.ndarray | None) -> tf.data.Dataset:
  """`ds` restricted to the examples whose 'index' id is in `indices` (None: all of them)."""
  if indices is None:
    return ds
  ids = np.asarray(indices, np.int64)
  keep = np.zeros(int(ids.max()) + 1 if len(ids) else 1, bool)
  keep[ids] = True
  table = tf.constant(keep)
  return ds.filter(lambda ex: tf.logical_and(
      ex['index'] < len(keep), tf.gather(table, tf.minimum(ex['index'], len(keep) - 1))))


def split_labels(config: Any, split: str, *, read: bool = True
                 ) -> tuple[np.ndarray, np.ndarray] | None:
  """(example ids, labels) of every example of `split`, without decoding an image.

  Folder and demo sources know them from their file list or arrays. A TFDS split is read
  through once (labels are stored beside the images), unless `read` is False: then None where
  the stored order is already a seeded shuffle (sources.Source.stored_shuffled), so that the
  split's first examples are a random sample of it.
  """
  src = sources.load(config.data, split, process_index=0, process_count=1)
  if src.labels_by_id is not None:
    return src.labels_by_id
  if not read and src.stored_shuffled:
    return None
  ids, labels = [], []
  for i, y in src.ds.map(lambda ex: (ex['index'], ex['label'])).batch(4096).as_numpy_iterator():
    ids.append(i)
    labels.append(y)
  if not ids:
    return np.zeros((0,), np.int64), np.zeros((0,), np.int32)
  return np.concatenate(ids).astype(np.int64), np.concatenate(labels).astype(np.int32)


def padded_eval_views(ds: tf.data.Dataset, size: int, local_batch: int,
                      num_batches: int) -> tf.data.Dataset:
  """`num_batches` batches {'image', 'label', 'index', 'mask'} of the eval views of `ds`'s
  examples, each once, then padding rows (mask False, label and index -1).

  The one padded evaluation stream of tf.data sources: every process runs the same number of
  batches (multi-process forwards stay in lockstep) and the mask drops the padding, so each
  example counts once. int32 indices: JAX arrays are 32-bit unless x64 is on.
  """
  ds = ds.map(lambda ex: {'image': views_tf.eval_view(ex['image'], size), 'label': ex['label'],
                          'index': tf.cast(ex['index'], tf.int32), 'mask': True},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  pad = tf.data.Dataset.from_tensors({'image': tf.zeros([size, size, 3]),
                                      'label': tf.constant(-1, tf.int32),
                                      'index': tf.constant(-1, tf.int32), 'mask': False})
  ds = ds.concatenate(pad.repeat()).take(num_batches * local_batch)
  return ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)


def eval_dataset(config: Any, split: str, batch_size: int, *, indices: np.ndarray | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> tf.data.Dataset:
  """Every example of this process's shard of `split` once (eval view), padded_eval_views.

  `batch_size` is global. `indices`: only the examples with these 'index' ids (a subset).
  """
  pi, pc = _procs(process_index, process_count)
  batch = _local_batch(batch_size, pc, 'eval_batch_size')
  src = sources.load(config.data, split, process_index=pi, process_count=pc)
  num_batches = parallel.num_padded_batches(src.num_examples_total, batch_size, pc,
                                   None if indices is None else len(indices))
  return padded_eval_views(_keep(src.ds, indices), config.data.image_size, batch, num_batches)


def eval_iterator(config: Any, split: str, batch_size: int, *, indices: np.ndarray | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """numpy batches {'image': float32 [b,H,W,3], 'label': int32 [b], 'index', 'mask': bool}."""
  return _numpy_batches(eval_dataset(config, split, batch_size, indices=indices,
                                     process_index=process_index, process_count=process_count))


# Views of the probe / fine-tuning stream are seeded with view index 2: pretraining uses 0 and 1,
# so a probe crop is never a pretraining view's crop.
PROBE_VIEW = 2


def probe_train_dataset(config: Any, batch_size: int, *,
                        crop_area: tuple[float, float] = (0.08, 1.0), flip: bool = True,
                        indices: np.ndarray | None = None, batch_key: str = 'probe.batch_size',
                        process_index: int | None = None,
                        process_count: int | None = None) -> tf.data.Dataset:
  """This process's endless stream of {'image', 'label', 'index'} crop (+ flip) view batches.

  The official linear-evaluation and fine-tuning input: the train split shuffled every epoch
  (`_epochs`, batches cross epoch boundaries), each example a random resized crop and flip
  without colour distortion or blur, seeded by (config.seed, epoch, index), so every epoch
  draws new views. `indices`: only the examples with these 'index' ids (a label subset).
  `batch_size` is global; `batch_key` names its config key in errors.
  """
  pi, pc = _procs(process_index, process_count)
  batch = _local_batch(batch_size, pc, batch_key)
  src = sources.load(config.data, config.data.train_split, process_index=pi, process_count=pc)
  ds = _keep(src.ds, indices)
  ds = ds.cache() if config.data.cache else ds
  # Jitter and grayscale probabilities of 0 switch those ops off: crop + flip only.
  cfg = views.ViewConfig(size=config.data.image_size, crop_area=tuple(crop_area), flip=flip,
                            jitter_prob=0.0, grayscale_prob=0.0, blur=False)
  seed = config.seed

  def view(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = views_tf.train_view(
        ex['image'], views_tf.view_seed(seed, ex['epoch'], ex['index'], PROBE_VIEW), cfg)
    return {'image': image, 'label': ex['label'], 'index': ex['index']}

  stream = _epochs(ds, src.num_examples, config).map(
      view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return stream.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def probe_train_iterator(config: Any, batch_size: int, **kwargs: Any
                         ) -> Iterator[dict[str, np.ndarray]]:
  """numpy batches of `probe_train_dataset` (same arguments): image float32, label, index."""
  return _numpy_batches(probe_train_dataset(config, batch_size, **kwargs))
