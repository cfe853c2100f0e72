"""The pretraining job's one seam to its input: `make(config, mesh)` -> `TrainInput`.

`config.data.augment_on` is read here and nowhere else: it decides who makes the two views.
  'host'   tf.data makes both whole views; the step gets them as they are.
  'split'  tf.data decodes, crops, resizes and flips; the step finishes colour jitter, grayscale
           and blur (views_jax) from each example's (epoch, id) keys.
  'device' the uint8 train split lives on the mesh; the host sends example indices and the step
           gathers its examples and makes both views.
Whichever it is, the job sees the same four things: the split's counts, a host batch stream that
starts at any step, and the in-step `prepare(batch, data)` with its `data` argument.
"""
import dataclasses
import functools
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np
from jax.sharding import Mesh

from simclr_jax.data import device_input, views_jax
from simclr_jax.errors import ConfigError

AUGMENT_ON = ('host', 'split', 'device')
_DEVICE_SOURCES = ('demo', 'tfds', 'folder')

Batch = dict[str, np.ndarray]
# In the jitted step: (this step's sharded batch, `data`) -> {'view1', 'view2', 'label'}.
Prepare = Callable[[dict[str, Any], Any], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class TrainInput:
  """What the pretraining loop needs from its input, whichever side makes the views."""
  num_examples: int  # in the train split, over all processes
  num_classes: int  # of the train split's labels; 0 if unlabelled
  # This process's numpy batches of steps start_step, start_step + 1, ... (endless).
  host_batches: Callable[[int], Iterator[Batch]]
  prepare: Prepare | None  # None: the host batch already is the two views
  # This process's padded eval-view batches {'image', 'label', 'mask'} of (split, global batch,
  # ids or None for all), for evaluation during pretraining; `eval_prepare(images)` finishes the
  # views in the forward.
  eval_batches: Callable[[str, int, np.ndarray | None], Iterator[Batch]]
  # (example ids, labels) of a whole split, every process alike (the kNN memory's sample), or
  # None where reading them would mean reading the split and its stored order is shuffled.
  split_labels: Callable[[str], tuple[np.ndarray, np.ndarray] | None]
  eval_prepare: Callable[[Any], Any] | None = None
  device_arrays: Any = None  # the step's `data` argument: the device-resident split, or None
  data_sharding: Any = None  # sharding of `data` (None: replicated)


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError for an unknown augment_on, or a source 'device' cannot hold in memory."""
  mode = config.data.augment_on
  if mode not in AUGMENT_ON:
    raise ConfigError(f'config.data.augment_on={mode!r} is not one of {list(AUGMENT_ON)}; set '
                      "--config.data.augment_on=host (tf.data makes the views), 'split' or "
                      "'device'.")
  if mode == 'device' and config.data.source not in _DEVICE_SOURCES:
    raise ConfigError(f'config.data.augment_on=device cannot hold config.data.source='
                      f'{config.data.source!r} in device memory (only '
                      f'{list(_DEVICE_SOURCES)}); use --config.data.augment_on=split or host.')


def make(config: ml_collections.ConfigDict, mesh: Mesh) -> TrainInput:
  """The train input of `config` on `mesh` (for 'device', the split is placed on the mesh now)."""
  check_config(config)
  seed, batch, size = int(config.seed), int(config.train.batch_size), config.data.image_size
  if config.data.augment_on == 'device':
    # TensorFlow only to read a tfds/folder source once; none at all for the demo.
    dataset = device_input.load(config, mesh)
    # Eval splits are read into host memory once, on first use.
    read = functools.lru_cache(maxsize=2)(lambda split: device_input.read_split(config.data, split))
    return TrainInput(
        dataset.num_examples, dataset.num_classes,
        host_batches=lambda start: device_input.index_stream(dataset.layout, seed, batch, mesh,
                                                             start_step=start),
        prepare=device_input.device_prepare(config, mesh, dataset.layout),
        eval_batches=lambda split, global_batch, ids=None: device_input.eval_batches(
            read(split), global_batch, ids),
        split_labels=lambda split: (read(split).ids, read(split).labels),
        eval_prepare=lambda images: views_jax.eval_views(images, size),
        device_arrays=dataset.arrays, data_sharding=dataset.sharding)

  from simclr_jax.data import host_input, sources  # pylint: disable=g-import-not-at-top  (TF)
  split = config.data.augment_on == 'split'
  source = sources.load(config.data, config.data.train_split, process_index=0, process_count=1)
  return TrainInput(
      source.num_examples_total, source.num_classes,
      host_batches=lambda start: host_input.train_iterator(config, start_step=start,
                                                           finish_views=not split),
      prepare=device_input.split_prepare(config) if split else None,
      eval_batches=lambda split, global_batch, ids=None: host_input.eval_iterator(
          config, split, global_batch, indices=ids),
      split_labels=lambda split: host_input.split_labels(config, split, read=False))
