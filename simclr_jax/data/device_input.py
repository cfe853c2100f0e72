"""Views made on the devices (config.data.augment_on = 'split' | 'device'), TensorFlow-free.

'device': the train split, uint8 [N, H, W, 3] with its labels, lives on the mesh: replicated on
every device when it is at most config.data.device_replicate_max_mb, else sharded over "data".
The host sends only indices: step k's batch is a pure function of (config.seed, k), an epoch
permutation seeded by (seed, epoch), so a restart at step k continues exactly. Inside the jitted
step, `device_prepare` gathers the examples (each device from its own shard) and makes both views
with views_jax, keyed by (seed, epoch, example id, view).

'split': tf.data crops, resizes and flips (data/host_input.py); `split_prepare` adds colour jitter,
grayscale and blur in the step, keyed by (seed, epoch, example id, view).

The demo source is read without TensorFlow (demo_digits.py); 'tfds' and 'folder' sources are read
once at start-up through their tf.data source (data/sources.read_arrays, which imports TensorFlow),
all images of one size.
"""
import dataclasses
import functools
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simclr_jax import parallel
from simclr_jax.data import demo_digits, views, views_jax

# --- reading the split into host memory -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HostSplit:
  """A whole split in host memory, rows ordered by example id."""
  images: np.ndarray  # uint8 [N, H, W, 3]
  labels: np.ndarray  # int32 [N], -1 when unlabelled
  ids: np.ndarray  # int64 [N], the stable example ids of the source (view keys use them)
  num_classes: int  # 0 if unlabelled


def read_split(data_cfg: Any, split: str) -> HostSplit:
  """The whole `split` of config.data's source as uint8 arrays (every process reads all of it).

  The demo needs no TensorFlow; 'tfds' and 'folder' are read once through their tf.data source.
  """
  if data_cfg.source == 'demo':
    images, labels, ids = demo_digits.load(split, data_cfg.image_size)
    return HostSplit(images, labels, ids, demo_digits.NUM_CLASSES)
  from simclr_jax.data import sources  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return HostSplit(*sources.read_arrays(data_cfg, split, purpose='config.data.augment_on=device',
                                        instead='--config.data.augment_on=split'))


# --- placing it on the mesh --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each example sits in the placed arrays (host-side description, no device data).

  The arrays have `len(sizes) * stride` rows: shard g is rows [g*stride, (g+1)*stride), of which
  the first sizes[g] are examples and the rest padding (never drawn). Replicated: one shard.
  """
  sizes: tuple[int, ...]  # real examples per shard
  stride: int  # rows per shard
  ids: np.ndarray  # int64 [rows]: example id of each row, -1 for padding

  @property
  def sharded(self) -> bool:
    return len(self.sizes) > 1

  @property
  def num_examples(self) -> int:
    return sum(self.sizes)


@dataclasses.dataclass(frozen=True)
class DeviceDataset:
  """The train split on the mesh: `arrays` goes into the jitted step as an argument."""
  arrays: dict[str, jax.Array]  # {'image': uint8 [rows, H, W, 3], 'label': int32 [rows]}
  sharding: NamedSharding  # of every array: P("data") when sharded, P() when replicated
  layout: Layout
  num_classes: int

  @property
  def num_examples(self) -> int:
    return self.layout.num_examples


def make_layout(ids: np.ndarray, num_shards: int) -> Layout:
  """`num_shards` == 1: one replicated copy; else balanced shards padded to one size.

  Shards are a fixed random partition (not contiguous runs of ids, which for a folder source
  would be runs of one class), so the B/shards examples a device draws per step are a uniform
  sample of the split, like the global batch.
  """
  n = len(ids)
  ids = np.asarray(ids, np.int64)
  if num_shards == 1:
    return Layout((n,), n, ids)
  if n < num_shards:
    raise ValueError(f'cannot shard {n} examples over {num_shards} devices; raise '
                     'config.data.device_replicate_max_mb to replicate them.')
  chunks = np.array_split(ids[np.random.default_rng(0).permutation(n)], num_shards)
  stride = len(chunks[0])
  rows = np.full((num_shards, stride), -1, np.int64)
  for g, chunk in enumerate(chunks):
    rows[g, :len(chunk)] = chunk
  return Layout(tuple(len(c) for c in chunks), stride, rows.reshape(-1))


def place(split: HostSplit, mesh: Mesh, replicate_max_mb: float) -> DeviceDataset:
  """Puts `split` on the mesh: replicated if it is at most `replicate_max_mb` MiB, else sharded.

  Every process holds the whole split on the host and places only its devices' part.
  """
  shard = split.images.nbytes > replicate_max_mb * 2**20 and mesh.size > 1
  positions = make_layout(np.arange(len(split.ids)), mesh.size if shard else 1)
  take, real = np.maximum(positions.ids, 0), positions.ids >= 0  # rows of `split`; padding
  layout = dataclasses.replace(positions, ids=np.where(real, split.ids[take], -1))
  host = {'image': np.where(real[:, None, None, None], split.images[take], 0).astype(np.uint8),
          'label': np.where(real, split.labels[take], -1).astype(np.int32)}
  sharding = NamedSharding(mesh, P(parallel.DATA_AXIS) if shard else P())
  arrays = {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in host.items()}
  return DeviceDataset(arrays, sharding, layout, split.num_classes)


def load(config: Any, mesh: Mesh) -> DeviceDataset:
  """The train split of config.data on `mesh` (see `place`)."""
  split = read_split(config.data, config.data.train_split)
  return place(split, mesh, config.data.device_replicate_max_mb)


# --- the eval split, for evaluation during pretraining --------------------------------------------

def eval_batches(split: HostSplit, global_batch: int, indices: np.ndarray | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """This process's padded batches {'image': uint8 [b, H, W, 3], 'label', 'index', 'mask'}.

  The raw images: the eval views are made in the jitted forward (views_jax.eval_views), as the
  train views are. Each process takes rows [process_index::process_count] and every process
  yields the same number of batches (padding rows: mask False, label -1), so every example is
  counted once and multi-process forwards stay in lockstep. `indices`: only the examples with
  these ids (a subset, e.g. the kNN memory), as host_input.eval_iterator's. The in-memory, TF-free
  twin of host_input.padded_eval_views (same batch count and padding rows), for the demo and
  for splits already read into host memory.
  """
  pi, pc = jax.process_index(), jax.process_count()
  local = global_batch // pc
  chosen = (np.arange(len(split.ids)) if indices is None
            else np.flatnonzero(np.isin(split.ids, np.asarray(indices))))
  rows = chosen[pi::pc]
  for start in range(0, parallel.num_padded_batches(len(chosen), global_batch, pc) * local,
                     local):
    take = rows[start:start + local]
    pad = local - len(take)
    yield {'image': np.concatenate([split.images[take],
                                    np.zeros((pad, *split.images.shape[1:]), np.uint8)]),
           'label': np.concatenate([split.labels[take], np.full(pad, -1, np.int32)]),
           'index': np.concatenate([split.ids[take], np.full(pad, -1)]).astype(np.int32),
           'mask': np.arange(local) < len(take)}


# --- the host-side index stream ------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def epoch_order(seed: int, epoch: int, shard: int, n: int) -> np.ndarray:
  """The order of shard `shard`'s n examples in epoch `epoch`: a permutation seeded by all four."""
  seq = np.random.SeedSequence([seed % 2**32, epoch, shard, n, 0x5EED])
  order = np.random.default_rng(seq).permutation(n)
  order.flags.writeable = False
  return order


def index_batch(layout: Layout, seed: int, step: int, global_batch: int,
                rows: np.ndarray) -> dict[str, np.ndarray]:
  """Rows `rows` of step `step`'s global batch: {'index', 'epoch', 'example_id'}, int32.

  Shard g (the device at mesh position g when sharded; the only one when replicated) serves the
  batch rows of that device, B/shards per step, walking its examples epoch by epoch, each epoch
  in `epoch_order`. 'index' is the row in the device's shard, 'example_id' the source's id.
  """
  shards = len(layout.sizes)
  assert global_batch % shards == 0, (global_batch, shards)  # parallel.check_batch_size
  per_shard = global_batch // shards
  rows = np.asarray(rows, np.int64)
  shard = rows // per_shard
  position = step * per_shard + rows % per_shard  # in shard g's endless stream
  sizes = np.asarray(layout.sizes, np.int64)[shard]
  epoch, within = position // sizes, position % sizes
  local = np.empty_like(rows)
  for g, e in set(zip(shard.tolist(), epoch.tolist())):
    hit = (shard == g) & (epoch == e)
    local[hit] = epoch_order(seed, e, g, layout.sizes[g])[within[hit]]
  return {'index': local.astype(np.int32), 'epoch': epoch.astype(np.int32),
          'example_id': layout.ids[shard * layout.stride + local].astype(np.int32)}


def index_stream(layout: Layout, seed: int, global_batch: int, mesh: Mesh, *,
                 start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of the index batches of steps start_step, start_step + 1, ..."""
  rows = parallel.process_rows(global_batch, mesh)
  step = start_step
  while True:
    yield index_batch(layout, seed, step, global_batch, rows)
    step += 1


# --- inside the jitted step -----------------------------------------------------------------------

def gather(arrays: dict[str, jax.Array], index: jax.Array, mesh: Mesh,
           sharded: bool) -> dict[str, jax.Array]:
  """arrays[index] per device: each device reads its batch rows from its own copy or shard."""
  data_spec = P(parallel.DATA_AXIS) if sharded else P()
  fn = jax.shard_map(lambda data, i: jax.tree.map(lambda a: a[i], data), mesh=mesh,
                     in_specs=(data_spec, P(parallel.DATA_AXIS)), out_specs=P(parallel.DATA_AXIS))
  return fn(arrays, index)


def device_prepare(config: Any, mesh: Mesh, layout: Layout):
  """The 'device' prepare for train_step: (index batch, data set arrays) → views and labels."""
  cfg, seed = views.view_config(config), int(config.seed)

  def prepare(batch: dict[str, jax.Array], data: dict[str, jax.Array]) -> dict[str, jax.Array]:
    examples = gather(data, batch['index'], mesh, layout.sharded)
    made = {f'view{v + 1}': views_jax.train_views(
        examples['image'], views_jax.view_keys(seed, batch['epoch'], batch['example_id'], v),
        cfg) for v in (0, 1)}
    return dict(made, label=examples['label'])
  return prepare


def split_prepare(config: Any):
  """The 'split' prepare: cropped, flipped host views → colour jitter, grayscale, blur."""
  cfg, seed = views.view_config(config), int(config.seed)

  def prepare(batch: dict[str, jax.Array], data: None) -> dict[str, jax.Array]:
    del data
    made = {k: views_jax.finish_views(
        batch[k], views_jax.view_keys(seed, batch['epoch'], batch['index'], v), cfg)
        for v, k in enumerate(('view1', 'view2'))}
    return dict(made, label=batch['label'])
  return prepare
