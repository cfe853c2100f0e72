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
import abc
import functools
from typing import Any, Iterator

import ml_collections
import numpy as np
from jax.sharding import Mesh

from simclr_jax.data import device_input, views_jax
from simclr_jax.errors import ConfigError
from simclr_jax.parallel import Prepare

AUGMENT_ON = ('host', 'split', 'device')
_DEVICE_SOURCES = ('demo', 'tfds', 'folder')

# This process's rows of one step, as numpy arrays: the two views and labels ('host'), cropped
# images with their keys ('split'), or example indices ('device'). `prepare` turns its global
# array into the step's views.
HostBatch = dict[str, np.ndarray]


class TrainInput(abc.ABC):
  """What the pretraining loop needs from its input, whichever side makes the views."""
  num_examples: int  # in the train split, over all processes
  num_classes: int  # of the train split's labels; 0 if unlabelled
  prepare: Prepare | None = None  # None: the host batch already is the two views
  eval_prepare: Any = None  # images -> eval views in the forward; None: the host made them
  device_arrays: Any = None  # the step's `data` argument: the device-resident split, or None
  data_sharding: Any = None  # sharding of `data` (None: replicated)

  @abc.abstractmethod
  def host_batches(self, start_step: int) -> Iterator[HostBatch]:
    """This process's batches of the steps after `start_step`, in order (endless)."""

  @abc.abstractmethod
  def eval_batches(self, split: str, global_batch: int,
                   ids: np.ndarray | None = None) -> Iterator[HostBatch]:
    """This process's padded eval-view batches {'image', 'label', 'mask'} of `split` (the
    examples `ids`, or all), for evaluation during pretraining."""

  @abc.abstractmethod
  def split_labels(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(example ids, labels) of a whole split, every process alike (the kNN memory's sample),
    or None where reading them would mean reading the split and its stored order is shuffled."""


class _OnDevice(TrainInput):
  """augment_on='device': the uint8 split on the mesh, an index stream, views in the step."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    # TensorFlow only to read a tfds/folder source once; none at all for the demo.
    dataset = device_input.load(config, mesh)
    self._config, self._mesh, self._layout = config, mesh, dataset.layout
    self.num_examples, self.num_classes = dataset.num_examples, dataset.num_classes
    self.prepare = device_input.device_prepare(config, mesh, dataset.layout)
    size = config.data.image_size
    self.eval_prepare = lambda images: views_jax.eval_views(images, size)
    self.device_arrays, self.data_sharding = dataset.arrays, dataset.sharding

  @functools.lru_cache(maxsize=2)  # eval splits are read into host memory once, on first use
  def _read(self, split: str) -> Any:
    return device_input.read_split(self._config.data, split)

  def host_batches(self, start_step: int) -> Iterator[HostBatch]:
    return device_input.index_stream(self._layout, int(self._config.seed),
                                     int(self._config.train.batch_size), self._mesh,
                                     start_step=start_step)

  def eval_batches(self, split: str, global_batch: int,
                   ids: np.ndarray | None = None) -> Iterator[HostBatch]:
    return device_input.eval_batches(self._read(split), global_batch, ids)

  def split_labels(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    return self._read(split).ids, self._read(split).labels


class _OnHost(TrainInput):
  """augment_on='host' (tf.data makes both views) or 'split' (the step finishes them)."""

  def __init__(self, config: ml_collections.ConfigDict):
    # pylint: disable-next=g-import-not-at-top  (TensorFlow, only for these modes)
    from simclr_jax.data import sources
    self._config, self._split = config, config.data.augment_on == 'split'
    source = sources.load(config.data, config.data.train_split, process_index=0,
                          process_count=1)
    self.num_examples, self.num_classes = source.num_examples_total, source.num_classes
    self.prepare = device_input.split_prepare(config) if self._split else None

  def host_batches(self, start_step: int) -> Iterator[HostBatch]:
    from simclr_jax.data import host_input  # pylint: disable=g-import-not-at-top
    return host_input.train_iterator(self._config, start_step=start_step,
                                     finish_views=not self._split)

  def eval_batches(self, split: str, global_batch: int,
                   ids: np.ndarray | None = None) -> Iterator[HostBatch]:
    from simclr_jax.data import host_input  # pylint: disable=g-import-not-at-top
    return host_input.eval_iterator(self._config, split, global_batch, indices=ids)

  def split_labels(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    from simclr_jax.data import host_input  # pylint: disable=g-import-not-at-top
    return host_input.split_labels(self._config, split, read=False)


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
  if config.data.augment_on == 'device':
    return _OnDevice(config, mesh)
  return _OnHost(config)
