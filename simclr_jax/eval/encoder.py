"""The pretrained encoder of a pretraining workdir, and a random one of the same architecture.

Every job that reads a pretraining run (evaluation, feature extraction, export) starts here: the
model is rebuilt from WORKDIR/config.json exactly (with its online probe head, so the checkpoint
tree matches) and the encoder's variables are restored from a checkpoint, checked leaf by leaf.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from simclr_jax import checkpoint, parallel
from simclr_jax import workdir as workdir_lib
from simclr_jax.errors import ConfigError
from simclr_jax.models import simclr


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/encoder/conv/kernel': shape, ...} of a pytree of arrays or ShapeDtypeStructs."""
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_variables_match(restored: Any, expected: Any, pretrain_workdir: str) -> None:
  """ConfigError naming the first parameter path whose presence or shape differs."""
  got, want = _flat_shapes(restored), _flat_shapes(expected)
  for path in sorted(set(got) | set(want)):
    if got.get(path) != want.get(path):
      show = lambda s: 'absent' if s is None else str(s)  # noqa: E731
      raise ConfigError(
          f'the checkpoint in {pretrain_workdir} does not match the model rebuilt from its '
          f'{workdir_lib.CONFIG_FILE}: {path} is {show(got.get(path))} in the checkpoint but '
          f'{show(want.get(path))} in the model (was config.json edited, or the checkpoint '
          'copied from another run?).')


def build_model(pretrain_config: ml_collections.ConfigDict) -> simclr.SimCLR:
  """The pretraining model exactly (incl. its online probe head, so the checkpoint tree matches)."""
  return simclr.from_config(pretrain_config.model, pretrain_config.data.num_classes)


def _input_shape(pretrain_config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """[H, W, C] of the model input (init only; the encoder pools, so any size runs)."""
  size = pretrain_config.data.image_size
  return (size, size, 3)


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError when a job that reads a pretraining run is not told which one."""
  if not config.pretrain_workdir:
    raise ConfigError('config.pretrain_workdir is not set; pass --config.pretrain_workdir=DIR, '
                      'the --workdir of the pretraining run.')


def read(pretrain_workdir: str, checkpoint_step: int
         ) -> tuple[ml_collections.ConfigDict, simclr.SimCLR, int, Any]:
  """(pretraining config, model, step, host numpy {'params', 'batch_stats'}), checked."""
  pretrain_config = workdir_lib.read_config(pretrain_workdir)
  model = build_model(pretrain_config)
  step, variables = checkpoint.restore_variables(
      pretrain_workdir, None if checkpoint_step < 0 else checkpoint_step)
  # eval_shape: the expected tree without running (or compiling) the initialiser.
  expected = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *_input_shape(pretrain_config))), train=False))
  check_variables_match(variables, expected, pretrain_workdir)
  return pretrain_config, model, step, variables


def restore(pretrain_workdir: str, checkpoint_step: int, mesh: Mesh
            ) -> tuple[ml_collections.ConfigDict, simclr.SimCLR, int, Any]:
  """`read`, with the variables replicated on `mesh`."""
  pretrain_config, model, step, variables = read(pretrain_workdir, checkpoint_step)
  return pretrain_config, model, step, parallel.replicate(variables, mesh)


def random_init(model: simclr.SimCLR, pretrain_config: ml_collections.ConfigDict, seed: int,
                mesh: Mesh) -> Any:
  """Seeded random initialisation of the same architecture (BN statistics at their init 0/1)."""
  # Initialised on one device (compiles far faster than SPMD over the mesh), then replicated.
  # An 'rbg' key: same initialiser distributions, but XLA:CPU compiles the init ~5x faster
  # than with threefry (seconds instead of half a minute for a ResNet-18).
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, *_input_shape(pretrain_config))),
                                        train=False))
  variables = init(jax.random.key(seed, impl='rbg'))
  # Via host numpy, as the restored variables: a committed single-device array cannot be
  # placed on a multi-process mesh, and every process computes the same seeded values.
  return parallel.replicate(jax.tree.map(np.asarray, variables), mesh)
