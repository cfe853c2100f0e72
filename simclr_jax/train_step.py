"""Train state and the pure SimCLR train step, jitted with explicit shardings and donation.

The step is written on global arrays: flax BatchNorm's mean over the batch axis of a sharded
array is a global reduction, so BN statistics cover the whole global batch on any mesh. With
`chunks` > 1 the step uses gradient caching (grad_cache.py): NT-Xent and its gradient stay exact
over the global batch, while the encoder holds one chunk's activations at a time and its BN
statistics are those of the chunk (the chunk's rows on every device).
"""
from functools import partial
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from simclr_jax import grad_cache, losses, parallel
from simclr_jax.models.simclr import PROBE

Metrics = dict[str, jax.Array]


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
  return jax.jit(init, out_shardings=parallel.replicated_sharding(mesh))(rng)


def views_to_batch(view1: jax.Array, view2: jax.Array) -> jax.Array:
  """Interleaves the two views as [v1_0, v2_0, v1_1, ...] → [2N, H, W, C].

  Stacking on axis 1 then merging keeps every device's rows on that device (no resharding), and
  the encoder's BN sees both views of the whole global batch, as in the official code.
  """
  x = jnp.stack([view1, view2], axis=1)
  return x.reshape(-1, *x.shape[2:])


def _forward(params: Any, batch_stats: Any, batch: parallel.Batch, model: nn.Module
             ) -> tuple[jax.Array, Metrics, jax.Array, Any]:
  """The training forward of one batch of view pairs, shared by both gradient functions.

  Returns (z as [N, 2, d] pairs; the probe's mean loss and accuracy over this batch's labelled
  rows, {} without a probe; the number of those rows; updated BN statistics).
  """
  x = views_to_batch(batch['view1'], batch['view2'])
  out, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                             mutable=['batch_stats'])
  z = out['z'].reshape(-1, 2, out['z'].shape[-1])
  labels = jnp.repeat(batch['label'], 2)
  probe = {}
  if 'probe_logits' in out:
    probe['probe_loss'], probe['probe_acc'] = losses.probe_loss(out['probe_logits'], labels)
  return z, probe, jnp.sum(labels >= 0), updates['batch_stats']


def compute_grads(params: Any, batch_stats: Any, batch: parallel.Batch, *, model: nn.Module,
                  temperature: float, mesh: Mesh | None) -> tuple[Any, Metrics, Any]:
  """Gradients of NT-Xent + probe loss; returns (grads, metrics, updated BN statistics)."""
  def loss_fn(params):
    z, probe, _, new_stats = _forward(params, batch_stats, batch, model)
    loss, metrics = losses.nt_xent(z[:, 0], z[:, 1], temperature, mesh)
    metrics.update(probe)
    metrics['loss'] = loss
    return loss + probe.get('probe_loss', 0.0), (metrics, new_stats)

  grads, (metrics, new_batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
  return grads, metrics, new_batch_stats


def compute_grads_chunked(params: Any, batch_stats: Any, batch: parallel.Batch, *,
                          model: nn.Module, temperature: float, mesh: Mesh | None,
                          chunks: int) -> tuple[Any, Metrics, Any]:
  """`compute_grads` by gradient caching over `chunks` chunks of every device's rows.

  Exact gradients of the same objective, except that batch norm normalises each chunk with the
  chunk's own statistics (ghost batch norm over the chunk's global rows). The running
  statistics get one update per step: the mean over chunks of each chunk's update, i.e. the
  usual momentum update with the mean of the chunks' means and of their variances.

  It stays a function of its own rather than `compute_grads` being `cached_grads` with one
  chunk: that would embed the batch twice (once without, once under the gradient), a third
  more compute for every unchunked step.
  """
  # The probe's loss is a mean over the valid labels of the whole batch (both views): each
  # chunk adds its mean weighted by its share of them, which sums to the whole-batch mean.
  num_valid = 2 * jnp.sum(batch['label'] >= 0)

  def embed(p, c):
    z, probe, valid, new_stats = _forward(p, batch_stats, c, model)
    share = valid / jnp.maximum(num_valid, 1)
    local = {k: v * share for k, v in probe.items()}
    return z, local.get('probe_loss', jnp.zeros((), jnp.float32)), local, new_stats

  def loss_fn(z):
    return losses.nt_xent(z[:, 0], z[:, 1], temperature, mesh)

  inputs = {k: batch[k] for k in ('view1', 'view2', 'label')}
  grads, loss, metrics, chunk_stats = grad_cache.cached_grads(
      embed, loss_fn, params, inputs, chunks=chunks, mesh=mesh)
  metrics['loss'] = loss
  # Each chunk's update is momentum * old + (1 - momentum) * chunk statistic, affine in the
  # statistic, so their mean is one update with the mean of the chunks' statistics.
  return grads, metrics, jax.tree.map(lambda s: jnp.mean(s, axis=0), chunk_stats)


def train_step(state: TrainState, batch: parallel.Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, learning_rate: Callable[[Any], Any],
               temperature: float, mesh: Mesh | None,
               chunks: int = 1) -> tuple[TrainState, Metrics]:
  """One SimCLR step: NT-Xent on both views + the online probe; returns (new state, metrics).

  `chunks` > 1: gradient caching over that many chunks per device (`compute_grads_chunked`).
  """
  grads_fn = compute_grads if chunks == 1 else partial(compute_grads_chunked, chunks=chunks)
  grads, metrics, batch_stats = grads_fn(state.params, state.batch_stats, batch, model=model,
                                         temperature=temperature, mesh=mesh)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics['grad_norm'] = optax.global_norm({k: v for k, v in grads.items() if k != PROBE})
  metrics['learning_rate'] = learning_rate(state.step)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    learning_rate: Callable[[Any], Any], temperature: float, mesh: Mesh, *,
                    chunks: int = 1, prepare: parallel.Prepare | None = None,
                    data_sharding: Any = None) -> Callable[..., tuple[TrainState, Metrics]]:
  """`step(state, batch, data)`: `train_step` jitted for `mesh`, state replicated and donated.

  `batch` is sharded on "data"; `prepare(batch, data)` runs in the same jit before the loss and
  returns {'view1', 'view2', 'label'} (views made on the devices, see data/train_input.py; None
  when the host made them). `data` (the device-resident data set, or None) is an
  argument with sharding `data_sharding` (default replicated), never a constant baked into the
  program. `chunks` (config.train.chunks): see `train_step`.
  """
  step = partial(train_step, model=model, tx=tx, learning_rate=learning_rate,
                 temperature=temperature, mesh=mesh, chunks=chunks)
  replicated, sharded = parallel.replicated_sharding(mesh), parallel.batch_sharded(mesh)

  def prepared_step(state: TrainState, batch: parallel.Batch,
                    data: Any) -> tuple[TrainState, Metrics]:
    return step(state, batch if prepare is None else prepare(batch, data))

  data_sharding = replicated if data_sharding is None else data_sharding
  return jax.jit(prepared_step, in_shardings=(replicated, sharded, data_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=0)
