"""train.chunks (gradient caching): exact whole-batch gradients with per-chunk batch norm.

References are independent whole-batch functions: chunks=1 against a step built from the
unchanged `compute_grads`; chunks=k against `jax.grad` of one function that applies the model to
each chunk separately (ghost BN), concatenates z and takes the loss over all of it.

Everything here runs in float64 (numerics.float64): the chunked step and its reference sum in
different orders, and in float32 their gradients differ by ~1e-5 relative, an amount that
depends on the CPU's kernels; in float64 the same maths agrees to numerics.F64_RTOL on any CPU.
The programs are the same code at another dtype.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numerics
from configs import base
from simclr_jax import grad_cache, losses, parallel
from simclr_jax import train_step as ts
from simclr_jax.errors import ConfigError
from simclr_jax.models import simclr

GLOBAL_BATCH = 32
IMAGE = (8, 8, 3)
TEMPERATURE = 0.5
CHUNKS = {1: 4, 8: 2}  # devices → chunks of the chunked step tested on that mesh
LEARNING_RATE = lambda step: jnp.zeros((), jnp.float32)  # noqa: E731  (only a metric here)


def _grads_recorder() -> optax.GradientTransformation:
  """An 'optimiser' whose state is the step's gradient and whose update is zero."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  img = rng.random((GLOBAL_BATCH, *IMAGE))
  labels = rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)
  labels[::5] = -1  # unlabelled examples: the probe's mean is over the labelled ones only
  return {'view1': img, 'view2': np.clip(img + 0.1 * rng.normal(size=img.shape), 0, 1),
          'label': labels}


def _chunk_rows(devices, chunks):
  """Chunk c's examples: the c-th slice of every device's rows, in device order (numpy)."""
  per_device = GLOBAL_BATCH // devices
  m = per_device // chunks
  return [np.concatenate([d * per_device + c * m + np.arange(m) for d in range(devices)])
          for c in range(chunks)]


def _ghost_bn_reference(model, params, batch_stats, batch, devices, chunks):
  """(grads, metrics, BN statistics) of the whole batch with the model applied per chunk."""
  rows = _chunk_rows(devices, chunks)

  def loss_fn(p):
    zs, logits, updates = [], [], []
    for idx in rows:
      x = ts.views_to_batch(batch['view1'][idx], batch['view2'][idx])
      out, upd = model.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                             mutable=['batch_stats'])
      zs.append(out['z'])
      logits.append(out['probe_logits'])
      updates.append(upd['batch_stats'])
    # Examples in chunk order: NT-Xent and the probe's mean do not depend on the order.
    z = jnp.concatenate(zs).reshape(GLOBAL_BATCH, 2, -1)
    labels = jnp.repeat(batch['label'][np.concatenate(rows)], 2)
    loss, metrics = losses.nt_xent(z[:, 0], z[:, 1], TEMPERATURE)
    p_loss, p_acc = losses.probe_loss(jnp.concatenate(logits), labels)
    metrics.update(loss=loss, probe_loss=p_loss, probe_acc=p_acc)
    stats = jax.tree.map(lambda *s: sum(s) / len(s), *updates)
    return loss + p_loss, (metrics, stats)

  grads, (metrics, stats) = jax.jit(jax.grad(loss_fn, has_aux=True))(params)
  return grads, metrics, stats


def _setup(mesh, chunks, loops):
  cfg = base.get_config()
  cfg.model.width = 1 / 16
  model = numerics.float64_model(simclr.from_config(cfg.model, num_classes=10))
  tx = _grads_recorder()
  state = numerics.to_float64(ts.init_state(model, tx, jax.random.key(0), IMAGE, mesh))
  step = ts.make_train_step(model, tx, LEARNING_RATE, TEMPERATURE, mesh, chunks=chunks)
  batch = parallel.host_batch_to_global(_batch(), mesh)
  with pytest.MonkeyPatch.context() as patch:
    if loops:  # the program accelerators run; on CPU the chunks are unrolled
      patch.setattr(grad_cache, 'unrolls_loops', lambda mesh: False)
    compiled = step.lower(parallel.replicate(state, mesh), batch, None).compile()
  return model, tx, state, batch, compiled


@pytest.fixture(scope='module', autouse=True)
def x64():
  """float64 for the whole module: the compiled steps take and return float64 arrays."""
  with numerics.float64():
    yield


@pytest.fixture(scope='module')
def steps(devices, x64):
  """{(devices, chunks, loops): (mesh, model, tx, host state, batch, compiled step)}."""
  out = {}
  for n, chunks, loops in [(1, 1, False), (1, CHUNKS[1], True), (8, CHUNKS[8], True),
                           (8, CHUNKS[8], False)]:
    mesh = parallel.make_mesh(devices[:n])
    out[n, chunks, loops] = (mesh, *_setup(mesh, chunks, loops))
  return out


def _run(entry, batch=None):
  mesh, _, _, state, default_batch, compiled = entry
  batch = default_batch if batch is None else parallel.host_batch_to_global(batch, mesh)
  return jax.device_get(compiled(parallel.replicate(state, mesh), batch, None))


def test_one_chunk_is_the_unchunked_step_bit_for_bit(steps):
  mesh, model, tx, state, batch, _ = steps[1, 1, False]

  def unchunked_step(st, b):
    grads, metrics, batch_stats = ts.compute_grads(st.params, st.batch_stats, b, model=model,
                                                   temperature=TEMPERATURE, mesh=mesh)
    updates, opt_state = tx.update(grads, st.opt_state, st.params)
    return st.replace(step=st.step + 1, params=optax.apply_updates(st.params, updates),
                      batch_stats=batch_stats, opt_state=opt_state), metrics

  new, metrics = _run(steps[1, 1, False])
  ref, ref_metrics = jax.device_get(jax.jit(unchunked_step)(parallel.replicate(state, mesh),
                                                            batch))
  numerics.assert_trees_close(new, ref, rtol=0)
  for k, v in ref_metrics.items():
    assert metrics[k] == v, k


@pytest.mark.parametrize('num_devices', sorted(CHUNKS))
def test_chunked_step_gradients_equal_whole_batch_ghost_bn(steps, num_devices):
  chunks = CHUNKS[num_devices]
  _, model, _, state, _, _ = steps[num_devices, chunks, True]
  new, metrics = _run(steps[num_devices, chunks, True])
  grads, ref_metrics, ref_stats = _ghost_bn_reference(model, state.params, state.batch_stats,
                                                      _batch(), num_devices, chunks)
  rtol = numerics.F64_RTOL
  numerics.assert_trees_close(new.opt_state, grads, rtol)  # the recorder's state is the gradient
  numerics.assert_trees_close(new.batch_stats, ref_stats, rtol)
  for k, v in ref_metrics.items():
    assert numerics.rel_err(metrics[k], v) <= rtol, (k, metrics[k], v)
  # Chunking changes the gradient (BN per chunk): the comparison can tell the two apart.
  unchunked, _ = _run(steps[1, 1, False])
  assert numerics.rel_err(unchunked.opt_state['encoder']['stem_conv']['kernel'],
                          grads['encoder']['stem_conv']['kernel']) > 1e-3


def test_unrolled_chunks_on_cpu_equal_the_loops(steps):
  loops = _run(steps[8, CHUNKS[8], True])
  unrolled = _run(steps[8, CHUNKS[8], False])
  numerics.assert_trees_close(unrolled, loops, numerics.F64_RTOL)


def test_running_statistics_take_the_mean_of_the_chunks_statistics(steps):
  """Stem BN after one step on 8 devices: 0.9·old + 0.1·(mean over chunks of the chunk's mean
  and biased variance), computed in numpy from the stem convolution of each chunk's rows.

  The chunks are made to differ in brightness, so the mean of their variances is far from the
  variance of the whole batch (and k momentum updates in a row would differ more still).
  """
  chunks = CHUNKS[8]
  _, _, _, state, _, _ = steps[8, chunks, True]
  b = _batch()
  rows = _chunk_rows(8, chunks)
  for c, idx in enumerate(rows):
    b['view1'][idx] += 4 * c
    b['view2'][idx] += 4 * c
  new, _ = _run(steps[8, chunks, True], b)
  kernel = np.asarray(state.params['encoder']['stem_conv']['kernel'])
  means, variances, outputs = [], [], []
  for idx in rows:
    x = np.concatenate([b['view1'][idx], b['view2'][idx]])
    y = np.asarray(jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=(
        'NHWC', 'HWIO', 'NHWC')), np.float64)
    means.append(y.mean((0, 1, 2)))
    variances.append(y.var((0, 1, 2)))
    outputs.append(y)
  old = state.batch_stats['encoder']['stem_bn']
  got = new.batch_stats['encoder']['stem_bn']
  want_var = 0.9 * old['var'] + 0.1 * np.mean(variances, 0)
  whole_batch = 0.9 * old['var'] + 0.1 * np.concatenate(outputs).var((0, 1, 2))
  assert np.all(np.abs(whole_batch - want_var) > 1e-3 * want_var)  # far above the bound below
  # The running mean starts at 0: an absolute floor at float64 rounding of O(1) values.
  rtol, atol = numerics.F64_RTOL, numerics.F64_RTOL * np.abs(np.mean(means, 0)).max()
  np.testing.assert_allclose(got['mean'], 0.9 * old['mean'] + 0.1 * np.mean(means, 0),
                             rtol=rtol, atol=atol)
  np.testing.assert_allclose(got['var'], want_var, rtol=rtol)


def test_peak_temporary_memory_falls_with_the_chunk_count(steps):
  temp = {k: steps[1, k, k > 1][-1].memory_analysis().temp_size_in_bytes
          for k in (1, CHUNKS[1])}
  ratio = temp[CHUNKS[1]] / temp[1]
  assert ratio < 1.5 / CHUNKS[1], temp  # activations dominate this model and batch


@pytest.mark.parametrize('loops', [True, False])
def test_chunks_are_local_rows(steps, loops):
  """One device's chunk never leaves it: no all-to-all or permute, and the only gathers are
  NT-Xent's, which still holds each device's rows of the logits against the global batch."""
  hlo = steps[8, CHUNKS[8], loops][-1].as_text()
  assert 'all-to-all' not in hlo and 'collective-permute' not in hlo
  # z1 and z2: [N, proj_dim].
  gathers = set(re.findall(r'= (\w+\[[\d,]*\])\S* all-gather(?:-start)?\(', hlo))
  assert gathers == {f'f64[{GLOBAL_BATCH},128]'}, gathers  # float64: see the module docstring
  assert bool(re.search(r'\bwhile\(', hlo)) == loops
  n_local = GLOBAL_BATCH // 8
  assert f'f64[{2 * n_local},{2 * GLOBAL_BATCH}]' in hlo


def test_chunks_must_divide_the_per_device_batch():
  grad_cache.check_chunks(4, 64, 8)
  for chunks in (0, 3, 16):
    with pytest.raises(ConfigError, match='train.chunks'):
      grad_cache.check_chunks(chunks, 64, 8)
