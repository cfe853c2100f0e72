"""One build path from a config and a mesh to what a pretraining step needs.

`training(config, mesh, num_examples)` makes the model, the optimiser and its schedule, the number
of steps and the jitted step; `Training.init_state` makes the replicated train state, and
`Training.abstract_state` / `abstract_batch` the shapes alone (for compiling without memory).
Pretraining, the step benchmark, the compile check and the tests all build through here, so
what is timed and compiled is what trains.
"""
import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import optax
from flax import linen as nn
from jax.sharding import Mesh

from simclr_jax import grad_cache, optim, parallel, train_step
from simclr_jax.models import simclr


@dataclasses.dataclass(frozen=True)
class Training:
  """The built pieces of one pretraining configuration on one mesh."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: nn.Module
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  num_steps: int
  # step(state, batch, data) -> (state, metrics): train_step.make_train_step's jitted step.
  step: Callable[..., tuple[train_step.TrainState, train_step.Metrics]]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    size = self.config.data.image_size
    return (size, size, 3)

  def init_state(self, seed: int | None = None) -> train_step.TrainState:
    """The initial train state (config.seed unless given), replicated on the mesh."""
    seed = self.config.seed if seed is None else seed
    return train_step.init_state(self.model, self.tx, jax.random.key(seed), self.image_shape,
                                 self.mesh)

  def abstract_state(self) -> train_step.TrainState:
    """init_state's shapes, dtypes and shardings; nothing is computed or allocated."""
    state = jax.eval_shape(lambda: self.init_state())
    rep = parallel.replicated_sharding(self.mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), state)

  def abstract_batch(self) -> parallel.Batch:
    """The shapes of a prepared batch of config.train.batch_size view pairs, sharded."""
    n, shape = self.config.train.batch_size, self.image_shape
    sharded = parallel.batch_sharded(self.mesh)
    return {'view1': jax.ShapeDtypeStruct((n, *shape), 'float32', sharding=sharded),
            'view2': jax.ShapeDtypeStruct((n, *shape), 'float32', sharding=sharded),
            'label': jax.ShapeDtypeStruct((n,), 'int32', sharding=sharded)}


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """ConfigError unless config.train.batch_size and config.train.chunks fit `mesh`; no compiling."""
  parallel.check_batch_size(config.train.batch_size, mesh)
  grad_cache.check_chunks(config.train.chunks, config.train.batch_size, mesh.devices.size)


def training(config: ml_collections.ConfigDict, mesh: Mesh, num_examples: int, *,
             prepare: parallel.Prepare | None = None, data_sharding: Any = None
             ) -> Training:
  """Model, LARS and its schedule over the run's steps (`num_examples` train examples), and the
  step jitted for `mesh` (`prepare`, `data_sharding`: the input's in-step half, see
  train_step.make_train_step)."""
  check(config, mesh)
  model = simclr.from_config(config.model, config.data.num_classes)
  num_steps = optim.train_steps(num_examples, config.train)
  tx, learning_rate = optim.make_optimizer(config.optim, config.train.batch_size, num_examples,
                                           num_steps)
  step = train_step.make_train_step(model, tx, learning_rate, config.loss.temperature, mesh,
                                    chunks=config.train.chunks, prepare=prepare,
                                    data_sharding=data_sharding)
  return Training(config, mesh, model, tx, learning_rate, num_steps, step)
