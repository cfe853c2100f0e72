"""Per-process train (two views) and eval datasets → numpy batches → global arrays on the mesh.

The train stream is a pure function of (config, step): epoch e is the source shuffled with a seed
from (config.seed, e), and each view is seeded by (config.seed, epoch, example index, view), so a
restart at step k skips the un-augmented stream to example k·b and yields what an uninterrupted
run yields from step k.
"""
import dataclasses
from typing import Any, Iterator

import jax
import numpy as np

from simclr_jax.data import sources, views_tf
from simclr_jax.data.tf_cpu import tf

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


def steps_per_epoch(config: Any) -> int:
  """Train steps per epoch at the global batch config.train.batch_size (at least 1)."""
  return max(num_examples(config) // config.train.batch_size, 1)


def train_dataset(config: Any, *, start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> tf.data.Dataset:
  """This process's endless stream of {'view1', 'view2', 'label'} batches from `start_step`.

  With config.data.augment_on='split' the views are only decoded, cropped, resized and flipped
  (the same crop and flip as 'host' for the same seeds); colour jitter, grayscale and blur run in
  the train step (device_input.split_prepare), which needs each example's 'epoch' and 'index'
  (int32), yielded as well.
  """
  pi, pc = _procs(process_index, process_count)
  batch = _local_batch(config.train.batch_size, pc, 'train.batch_size')
  src = sources.load(config.data, config.data.train_split, process_index=pi, process_count=pc)
  ds = src.ds.cache() if config.data.cache else src.ds
  n = src.num_examples
  start_epoch, skip = divmod(start_step * batch, n)
  buffer = max(min(config.data.shuffle_buffer, n), 1)
  seed = config.seed

  def epoch(e: tf.Tensor) -> tf.data.Dataset:
    # Fixed per-epoch order (reshuffle off, seed from (seed, e)) makes epoch e reproducible alone.
    order_seed = tf.cast(views_tf.view_seed(seed, e, -1, -1)[0], tf.int64)
    shuffled = ds.shuffle(buffer, seed=order_seed, reshuffle_each_iteration=False)
    return shuffled.map(lambda ex: dict(ex, epoch=e))

  stream = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch).skip(skip)
  cfg = views_tf.view_config(config)
  split = config.data.augment_on == 'split'
  if split:  # Probabilities of 0 switch jitter and grayscale off; crop/flip draws are unchanged.
    cfg = dataclasses.replace(cfg, jitter_prob=0.0, grayscale_prob=0.0, blur=False)

  def two_views(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    views = {f'view{v + 1}': views_tf.train_view(
        ex['image'], views_tf.view_seed(seed, ex['epoch'], ex['index'], v), cfg) for v in (0, 1)}
    if split:
      views.update(epoch=tf.cast(ex['epoch'], tf.int32), index=tf.cast(ex['index'], tf.int32))
    return dict(views, label=ex['label'])

  stream = stream.map(two_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return stream.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def train_iterator(config: Any, *, start_step: int = 0, process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """numpy batches {'view1','view2': float32 [b,H,W,3], 'label': int32 [b]}, b = batch/processes."""
  return train_dataset(config, start_step=start_step, process_index=process_index,
                       process_count=process_count).as_numpy_iterator()


def eval_dataset(config: Any, split: str, batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None) -> tf.data.Dataset:
  """Every example of this process's shard once, padded to the same number of batches everywhere.

  `batch_size` is global. Padding rows have mask False and label -1; every process gets
  ceil(ceil(N / processes) / local batch) batches so multi-host eval steps stay in lockstep.
  """
  pi, pc = _procs(process_index, process_count)
  batch = _local_batch(batch_size, pc, 'eval batch size')
  src = sources.load(config.data, split, process_index=pi, process_count=pc)
  num_batches = -(-(-(-src.num_examples_total // pc)) // batch)
  size = config.data.image_size
  ds = src.ds.map(lambda ex: {'image': views_tf.eval_view(ex['image'], size),
                              'label': ex['label'], 'mask': True},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  pad = tf.data.Dataset.from_tensors({'image': tf.zeros([size, size, 3]),
                                      'label': tf.constant(-1, tf.int32), 'mask': False})
  ds = ds.concatenate(pad.repeat()).take(num_batches * batch)
  return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def eval_iterator(config: Any, split: str, batch_size: int, *, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """numpy batches {'image': float32 [b,H,W,3], 'label': int32 [b], 'mask': bool [b]}."""
  return eval_dataset(config, split, batch_size, process_index=process_index,
                      process_count=process_count).as_numpy_iterator()


def probe_train_dataset(config: Any, batch_size: int, *, epoch: int,
                        crop_area: tuple[float, float] = (0.08, 1.0), flip: bool = True,
                        process_index: int | None = None, process_count: int | None = None,
                        indices: np.ndarray | None = None,
                        shuffle: bool = False) -> tf.data.Dataset:
  """Every train example once as a random-resized-crop (+ flip) view, padded like `eval_dataset`.

  The linear-probe view of the official SimCLR evaluation (no colour distortion, no blur); the
  view of example i in epoch e is seeded by (config.seed, e, i), so an epoch is reproducible.
  `indices` (optional): keep only the examples whose 'index' id is in it (a label-fraction
  subset); every process then pads to probe_num_batches(...) batches. `shuffle`: the epoch's
  examples in a fixed order seeded by (config.seed, epoch), as the pretraining stream (for
  fine-tuning; the probe paths keep the source order).
  """
  pi, pc = _procs(process_index, process_count)
  batch = _local_batch(batch_size, pc, 'probe.batch_size')
  src = sources.load(config.data, config.data.train_split, process_index=pi, process_count=pc)
  num_batches = probe_num_batches(src.num_examples_total, batch_size, pc,
                                  None if indices is None else len(indices))
  size = config.data.image_size
  # Jitter and grayscale probabilities of 0 switch those ops off: crop + flip only.
  cfg = views_tf.ViewConfig(size=size, crop_area=tuple(crop_area), flip=flip, jitter_prob=0.0,
                           grayscale_prob=0.0, blur=False)
  seed = config.seed

  def view(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = views_tf.train_view(ex['image'], views_tf.view_seed(seed, epoch, ex['index'], 0), cfg)
    return {'image': image, 'label': ex['label'], 'mask': True}

  ds = src.ds
  if indices is not None:
    ids = np.asarray(indices, np.int64)
    keep = np.zeros(int(ids.max()) + 1 if len(ids) else 1, bool)
    keep[ids] = True
    keep_t = tf.constant(keep)
    ds = ds.filter(lambda ex: tf.logical_and(
        ex['index'] < len(keep), tf.gather(keep_t, tf.minimum(ex['index'], len(keep) - 1))))
  if shuffle:
    order_seed = int(views_tf.view_seed(seed, epoch, -1, -1)[0].numpy())
    ds = ds.shuffle(max(min(config.data.shuffle_buffer, src.num_examples), 1), seed=order_seed,
                    reshuffle_each_iteration=False)
  ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  pad = tf.data.Dataset.from_tensors({'image': tf.zeros([size, size, 3]),
                                      'label': tf.constant(-1, tf.int32), 'mask': False})
  ds = ds.concatenate(pad.repeat()).take(num_batches * batch)
  return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def probe_num_batches(num_examples_total: int, batch_size: int, process_count: int,
                      num_selected: int | None = None) -> int:
  """Batches per process of `probe_train_dataset` (the same on every process, for lockstep).

  With a subset of `num_selected` examples, a process's shard may hold up to all of them, so
  on several processes this is an upper bound (extra batches are all padding); on one
  process it is exactly ceil(num_selected / batch_size).
  """
  batch = batch_size // process_count
  per_process = -(-num_examples_total // process_count)
  if num_selected is not None:
    per_process = min(per_process, num_selected)
  return -(-per_process // batch)


def probe_train_iterator(config: Any, batch_size: int, *, epoch: int,
                         crop_area: tuple[float, float] = (0.08, 1.0), flip: bool = True,
                         process_index: int | None = None, process_count: int | None = None,
                         indices: np.ndarray | None = None,
                         shuffle: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """numpy batches {'image', 'label', 'mask'} of `probe_train_dataset` (augmented probe path)."""
  return probe_train_dataset(config, batch_size, epoch=epoch, crop_area=crop_area, flip=flip,
                             process_index=process_index, process_count=process_count,
                             indices=indices, shuffle=shuffle).as_numpy_iterator()
