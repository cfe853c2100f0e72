"""Gradient caching: exact gradients of a whole-batch loss with one chunk's activations at a time.

A contrastive loss couples every example with every other one, so plain gradient accumulation
(each micro-batch with only its own negatives) changes the objective. Gradient caching (Gao et
al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup") keeps the
objective and its gradient exact:

  1. embed every chunk without differentiating (no activations kept), giving all embeddings z;
  2. take the loss over the whole batch and its gradient dz with respect to z (small arrays);
  3. re-run each chunk under `jax.grad` of sum(z_c * dz_c): by the chain rule the chunks'
     parameter gradients sum to the whole-batch gradient.

Both passes are `lax.scan` loops, so the compiled program holds one chunk's activations (about
one extra forward pass of compute). Chunk c is the c-th slice of every device's own rows of a
batch sharded on "data": slicing moves no data between devices, and a per-chunk reduction over
the batch axis (batch norm) spans the chunk's rows on all devices.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simclr_jax.errors import ConfigError
from simclr_jax.parallel import DATA_AXIS

# embed(params, chunk) → (z, local_loss, local_metrics, aux): the chunk's embeddings, a loss term
# additive over chunks (its sum over the chunks is the whole batch's), its metrics (also summed)
# and anything else the caller wants per chunk (e.g. BN statistics). Pure; traced twice.
Embed = Callable[[Any, Any], tuple[jax.Array, jax.Array, dict[str, jax.Array], Any]]
# loss_fn(z) → (loss, metrics) over the embeddings of the whole batch.
LossFn = Callable[[jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def check_chunks(chunks: int, global_batch: int, num_devices: int) -> None:
  """ConfigError naming train.chunks unless every device's rows split into `chunks` equal parts."""
  if chunks < 1:
    raise ConfigError(f'config.train.chunks={chunks} must be >= 1 (1: no chunking).')
  per_device = global_batch // num_devices
  if global_batch % num_devices or per_device % chunks:
    raise ConfigError(
        f'config.train.chunks={chunks} must divide the per-device batch (train.batch_size='
        f'{global_batch} over {num_devices} devices = {global_batch / num_devices:g}); set '
        f'--config.train.chunks to a divisor of {per_device}.')


def _num_devices(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.devices.size


def _constrain(x: jax.Array, mesh: Mesh | None, spec: P) -> jax.Array:
  if mesh is None or mesh.devices.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _grouped(x: jax.Array, chunks: int, mesh: Mesh | None) -> jax.Array:
  """[N, ...] sharded on "data" → [devices, chunks, N / (devices·chunks), ...], a reshape."""
  d = _num_devices(mesh)
  return _constrain(x.reshape(d, chunks, x.shape[0] // (d * chunks), *x.shape[1:]), mesh,
                    P(DATA_AXIS))


def chunk(x: jax.Array, c: jax.Array | int, chunks: int, mesh: Mesh | None) -> jax.Array:
  """Chunk c of a batch sharded on "data", still sharded on "data" and moving no data.

  Rows c·m .. (c+1)·m - 1 of every device's N / devices rows (m = N / (devices·chunks)), in
  device order.
  """
  g = jax.lax.dynamic_index_in_dim(_grouped(x, chunks, mesh), c, axis=1, keepdims=False)
  return _constrain(g.reshape(-1, *g.shape[2:]), mesh, P(DATA_AXIS))


def unchunk(ys: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Inverse of `chunk` over all chunks: [chunks, N / chunks, ...] → [N, ...] in batch order."""
  d, k = _num_devices(mesh), ys.shape[0]
  y = ys.reshape(k, d, ys.shape[1] // d, *ys.shape[2:]).swapaxes(0, 1)
  return _constrain(y.reshape(-1, *ys.shape[2:]), mesh, P(DATA_AXIS))


def unrolls_loops(mesh: Mesh | None) -> bool:
  """Whether the chunk loops are unrolled: on CPU, where a loop would slow the step ~30x.

  XLA:CPU (jaxlib 0.10) runs a kernel-gradient convolution inside a while loop in a layout its
  fast kernels do not take (a ResNet step with 2 chunks: 81 s instead of 2.5 s). Unrolled, it is
  fast, but XLA:CPU then keeps about twice one chunk's activations live (4 chunks: 0.44 of the
  unchunked step's temporaries instead of 0.25). Accelerators, where memory is what chunks are
  for, run the loops.
  """
  platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
  return platform == 'cpu'


def cached_grads(embed: Embed, loss_fn: LossFn, params: Any, inputs: Any, *, chunks: int,
                 mesh: Mesh | None) -> tuple[Any, jax.Array, dict[str, jax.Array], Any]:
  """Exact d(loss_fn(z) + Σ_c local_loss_c)/dparams, embedding `chunks` chunks one at a time.

  `inputs` is a pytree of [N, ...] arrays sharded on "data"; `embed` sees one chunk of each
  (see `chunk`). Returns (grads, loss_fn's loss, loss_fn's metrics updated with the summed local
  metrics, aux stacked over chunks [chunks, ...]).
  """
  n = jax.tree.leaves(inputs)[0].shape[0]
  check_chunks(chunks, n, _num_devices(mesh))
  unrolled = unrolls_loops(mesh)

  def take(c):
    return jax.tree.map(lambda x: chunk(x, c, chunks, mesh), inputs)

  def loop(body, init):
    return jax.lax.scan(body, init, jnp.arange(chunks), unroll=chunks if unrolled else 1)

  # Pass 1: embeddings (and local terms) of every chunk; nothing is differentiated, so no
  # activation outlives its chunk.
  def forward(_, c):
    z, _, local_metrics, aux = embed(params, take(c))
    return None, (z, local_metrics, aux)
  _, (zs, local_metrics, aux) = loop(forward, None)
  z = unchunk(zs, mesh)
  (loss, metrics), dz = jax.value_and_grad(loss_fn, has_aux=True)(z)

  # Pass 2: re-embed each chunk and pull its slice of dz (and its local loss) back to the
  # parameters. The sum over chunks of these vector-Jacobian products is the exact gradient.
  def backward(acc, c):
    dz_c = jax.lax.stop_gradient(chunk(dz, c, chunks, mesh))

    def surrogate(p):
      z_c, local_loss, _, _ = embed(p, take(c))
      return jnp.sum(z_c * dz_c) + local_loss
    return jax.tree.map(jnp.add, acc, jax.grad(surrogate)(params)), None
  grads, _ = loop(backward, jax.tree.map(jnp.zeros_like, params))
  metrics = {**metrics, **{k: jnp.sum(v) for k, v in local_metrics.items()}}
  return grads, loss, metrics, aux
