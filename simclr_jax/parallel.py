"""Mesh, shardings and the host-batch → global-array step.

One mesh over every device of every process, axis ``"data"``. Parameters and optimiser state
are replicated; batches are sharded on their leading axis. Nothing here imports TensorFlow.
"""
import collections
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simclr_jax.errors import ConfigError

# A global batch on the mesh, sharded on "data": for the train step {'view1', 'view2', 'label'}
# once prepared. (The host's numpy rows before they become one: data.train_input.HostBatch.)
Batch = dict[str, jax.Array]
# The input's in-step half: (raw global batch, device-resident data or None) → {'view1', 'view2',
# 'label'}; pure and jittable. data/train_input makes it for its augment_on mode; the train
# step calls it inside its jit.
Prepare = Callable[[Batch, Any], Batch]

DATA_AXIS = 'data'
_CPU_DEVICE_FLAG = '--xla_force_host_platform_device_count'
# XLA:CPU compiler flags for runs without an accelerator. jaxlib 0.10's XLA:CPU hands
# convolutions to YNNPACK, whose kernel-gradient convolution runs 2-4x slower than Eigen's
# (ResNet-18 CIFAR stage 1: 333 vs 147 CPU-ms); this keeps YNNPACK for dots, reductions and
# elementwise fusions and leaves convolutions to Eigen: the ResNet-18 CIFAR train step needs
# 1.7x fewer CPU-seconds (README "Performance"). Only XLA:CPU reads it.
_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
CPU_XLA_FLAGS = (f'{_YNN_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,'
                 'LIBRARY_FUSION_TYPE_ELTWISE')


def cpu_device_count(cores: int, batch_size: int, requested: int = 0) -> int:
  """Devices for a CPU-only run: `requested` if > 0, else the largest power of two ≤ cores
  that divides batch_size (the global batch must split evenly over the devices)."""
  if requested > 0:
    return requested
  count = 1
  while count * 2 <= cores and batch_size % (count * 2) == 0:
    count *= 2
  return count


def set_cpu_devices(batch_size: int, requested: int = 0) -> None:
  """Call before JAX starts: cpu_device_count(...) CPU devices (config.cpu_devices).

  XLA runs many CPU ops on one thread, so one device per core (data parallel; global BN and
  loss unchanged) keeps every core busy. Skipped when XLA_FLAGS already sets a device count;
  only the CPU backend reads it, so on a GPU/TPU host it changes nothing. Also adds
  CPU_XLA_FLAGS to XLA_FLAGS unless the user set that flag.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = with_cpu_flags(flags)
  if _CPU_DEVICE_FLAG in flags:
    return
  jax.config.update('jax_num_cpu_devices',
                    cpu_device_count(os.cpu_count() or 1, batch_size, requested))


def with_cpu_flags(xla_flags: str) -> str:
  """`xla_flags` (an XLA_FLAGS value) plus CPU_XLA_FLAGS, unless it sets that flag itself."""
  return xla_flags if _YNN_FLAG in xla_flags else f'{xla_flags} {CPU_XLA_FLAGS}'.strip()


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes).

  Axis type Auto: the train step is written on global arrays and XLA's SPMD partitioner
  inserts the collectives (global BN statistics); the NT-Xent loss opts into manual
  partitioning with `jax.shard_map` where the per-device logits shape matters.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (parameters, optimiser state)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the "data" axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, key: str = 'train.batch_size') -> None:
  """ConfigError naming `key` if `global_batch` cannot be split over the mesh and processes."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch < 1:
    raise ConfigError(f'config.{key}={global_batch} must be >= 1.')
  if global_batch % n_dev:
    raise ConfigError(
        f'config.{key}={global_batch} is not divisible by the number of devices ({n_dev}); '
        f'set --config.{key} to a multiple of {n_dev}.')
  if global_batch % n_proc:
    raise ConfigError(
        f'config.{key}={global_batch} is not divisible by the number of processes ({n_proc}).')


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local numpy batch into global arrays sharded on "data".

  Every process passes its own slice (leading axis = global batch / process count); the result
  has the global leading size. Works unchanged on one process.
  """
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def num_padded_batches(num_examples_total: int, batch_size: int, process_count: int,
                       num_selected: int | None = None) -> int:
  """Batches per process of a padded evaluation stream: the same on every process, so their
  forwards stay in lockstep.

  With a subset of `num_selected` examples a process's shard may hold up to all of them, so on
  several processes this is an upper bound (the extra batches are all padding).
  """
  per_process = -(-num_examples_total // process_count)
  if num_selected is not None:
    per_process = min(per_process, num_selected)
  return -(-per_process // (batch_size // process_count))


def process_rows(global_batch: int, mesh: Mesh) -> np.ndarray:
  """The rows of a global batch sharded on "data" that this process's devices hold, in order.

  They are what this process passes to `host_batch_to_global`; a contiguous range, as
  `jax.make_array_from_process_local_data` expects.
  """
  slices = batch_sharded(mesh).addressable_devices_indices_map((global_batch,)).values()
  rows = np.unique(np.concatenate([np.arange(global_batch)[s[0]] for s in slices]))
  if len(rows) != rows[-1] - rows[0] + 1:
    raise ValueError(f'this process\'s devices hold non-contiguous rows of the batch: {rows}')
  return rows


def device_prefetch(it: Iterator[Mapping[str, np.ndarray]], mesh: Mesh,
                    size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Global arrays sharded on "data", keeping `size` batches already transferred (in flight)."""
  queue = collections.deque()
  for batch in it:
    queue.append(host_batch_to_global(batch, mesh))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree on every device of the mesh (for the initial train state)."""
  return jax.device_put(tree, replicated_sharding(mesh))
