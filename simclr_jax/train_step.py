"""Train state and the pure SimCLR train step, jitted with explicit shardings and donation.

The step is written on global arrays: flax BatchNorm's mean over the batch axis of a sharded
array is a global reduction, so BN statistics cover the whole global batch on any mesh.
"""
from functools import partial
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from simclr_jax import losses, parallel
from simclr_jax.optim import PROBE

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# In-step input: (raw batch, device data or None) → {'view1', 'view2', 'label'}; pure, jittable.
Prepare = Callable[[Batch, Any], Batch]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds: step, parameters, BN statistics, optimiser state.

  No RNG: every random choice of a step (the views) is a function of (seed, epoch, example,
  view) made by the input, so a resumed run needs nothing else to continue bit-identically.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               image_shape: tuple[int, int, int], mesh: Mesh) -> TrainState:
  """Initialises the model and optimiser directly as replicated arrays on the mesh."""
  def init(rng):
    variables = model.init(rng, jnp.zeros((2, *image_shape), jnp.float32), train=True)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables['batch_stats'], opt_state=tx.init(params))
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(rng)


def views_to_batch(view1: jax.Array, view2: jax.Array) -> jax.Array:
  """Interleaves the two views as [v1_0, v2_0, v1_1, ...] → [2N, H, W, C].

  Stacking on axis 1 then merging keeps every device's rows on that device (no resharding), and
  the encoder's BN sees both views of the whole global batch, as in the official code.
  """
  x = jnp.stack([view1, view2], axis=1)
  return x.reshape(-1, *x.shape[2:])


def compute_grads(params: Any, batch_stats: Any, batch: Batch, *, model: nn.Module,
                  temperature: float, mesh: Mesh | None) -> tuple[Any, Metrics, Any]:
  """Gradients of NT-Xent + probe loss; returns (grads, metrics, updated BN statistics)."""
  x = views_to_batch(batch['view1'], batch['view2'])
  labels = jnp.repeat(batch['label'], 2)

  def loss_fn(params):
    out, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                               train=True, mutable=['batch_stats'])
    z = out['z'].reshape(-1, 2, out['z'].shape[-1])
    loss, metrics = losses.nt_xent(z[:, 0], z[:, 1], temperature, mesh)
    total = loss
    if 'probe_logits' in out:
      p_loss, p_acc = losses.probe_loss(out['probe_logits'], labels)
      metrics.update(probe_loss=p_loss, probe_acc=p_acc)
      total = total + p_loss
    metrics['loss'] = loss
    return total, (metrics, updates['batch_stats'])

  grads, (metrics, new_batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
  return grads, metrics, new_batch_stats


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, learning_rate: Callable[[Any], Any],
               temperature: float, mesh: Mesh | None) -> tuple[TrainState, Metrics]:
  """One SimCLR step: NT-Xent on both views + the online probe; returns (new state, metrics)."""
  grads, metrics, batch_stats = compute_grads(state.params, state.batch_stats, batch,
                                              model=model, temperature=temperature, mesh=mesh)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics['grad_norm'] = optax.global_norm({k: v for k, v in grads.items() if k != PROBE})
  metrics['learning_rate'] = learning_rate(state.step)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    learning_rate: Callable[[Any], Any], temperature: float, mesh: Mesh, *,
                    prepare: Prepare | None = None,
                    data_sharding: Any = None) -> Callable[..., tuple[TrainState, Metrics]]:
  """`step(state, batch, data)`: `train_step` jitted for `mesh`, state replicated and donated.

  `batch` is sharded on "data"; `prepare(batch, data)` runs in the same jit before the loss and
  returns {'view1', 'view2', 'label'} (views made on the devices, see data/train_input.py; None
  when the host made them). `data` (the device-resident data set, or None) is an
  argument with sharding `data_sharding` (default replicated), never a constant baked into the
  program.
  """
  step = partial(train_step, model=model, tx=tx, learning_rate=learning_rate,
                 temperature=temperature, mesh=mesh)
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)

  def prepared_step(state: TrainState, batch: Batch, data: Any) -> tuple[TrainState, Metrics]:
    return step(state, batch if prepare is None else prepare(batch, data))

  data_sharding = replicated if data_sharding is None else data_sharding
  return jax.jit(prepared_step, in_shardings=(replicated, sharded, data_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=0)
