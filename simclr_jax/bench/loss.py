"""`python -m simclr_jax.bench loss`: NT-Xent forward+backward as the global batch grows.

For each global batch N (images; 2N views) the loss and its gradient wrt both views'
projections (jax.value_and_grad of losses.nt_xent, jitted, inputs sharded on "data") are
compiled once. Per-device memory comes from the compile (compiled.memory_analysis(): temp,
argument and output bytes of one device's partitioned program), so it is reported for every
size without running. Time is the median of --steps runs after --warmup (block_until_ready).

Each device holds logits of shape [2n_local, 2N] (n_local = N / devices), so its cost grows with
local_rows × global_rows: ×4 per doubling of N at a fixed device count. Timing is skipped (and
the table says so) where the predicted time of a size (the last timed size's, scaled by
local × global rows) exceeds --max_time seconds, or, on CPU, where running it would need more
than 80% of the available host memory (emulated devices share the host).

Emulated devices: `--devices=8` sets XLA_FLAGS=--xla_force_host_platform_device_count=8 when
JAX's backends are not yet initialised (the same as exporting that variable yourself).
"""
import os
import statistics
import time
from typing import Any

from absl import app, flags

flags.DEFINE_list('sizes', ['1024', '2048', '4096', '8192', '16384', '32768', '65536'],
                  'Global batch sizes N (images; 2N views).')
flags.DEFINE_integer('dim', 128, 'Projection dimension d.')
flags.DEFINE_float('temperature', 0.5, 'NT-Xent temperature.')
flags.DEFINE_integer('devices', 8, 'Emulated CPU devices to request (0: leave XLA_FLAGS alone).')
flags.DEFINE_integer('steps', 5, 'Timed runs per size.')
flags.DEFINE_integer('warmup', 1, 'Untimed runs per size after compilation.')
flags.DEFINE_float('max_time', 60.0, 'Seconds allowed for timing one size; predicted beyond it, '
                   'that size gets memory only.')
flags.DEFINE_string('out_dir', 'bench_results', 'Where the JSON goes.')
FLAGS = flags.FLAGS

_DEVICE_FLAG = '--xla_force_host_platform_device_count'
_F32_BYTES = 4


def request_host_devices(count: int) -> bool:
  """Asks XLA for `count` emulated CPU devices if JAX has not started; True if the flag is set."""
  # Private: JAX has no public way to ask whether its backends have started (the flag below
  # only takes effect before they do).
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if count <= 0:
    return False
  if xla_bridge.backends_are_initialized():
    return f'{_DEVICE_FLAG}={count}' in os.environ.get('XLA_FLAGS', '')
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_FLAG)]
  os.environ['XLA_FLAGS'] = ' '.join(kept + [f'{_DEVICE_FLAG}={count}'])
  return True


def _available_host_bytes() -> float:
  try:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    return float('inf')


def compile_loss_grad(global_batch: int, dim: int, temperature: float, mesh) -> Any:
  """The compiled value_and_grad of NT-Xent wrt (z1, z2), for inputs sharded on "data"."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from simclr_jax import losses, parallel  # pylint: disable=g-import-not-at-top

  def loss(z1, z2):
    return losses.nt_xent(z1, z2, temperature, mesh)[0]

  sharding = parallel.batch_sharded(mesh)
  spec = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=sharding)
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(sharding, sharding))
  return fn.lower(spec, spec).compile()


def _time(compiled, global_batch: int, dim: int, mesh, steps: int, warmup: int) -> list[float]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from simclr_jax import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  z = {k: rng.standard_normal((global_batch, dim), np.float32) for k in ('z1', 'z2')}
  z = parallel.host_batch_to_global(z, mesh)
  for _ in range(warmup):
    jax.block_until_ready(compiled(z['z1'], z['z2']))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(z['z1'], z['z2']))
    times.append(time.perf_counter() - t)
  return times


def benchmark(sizes: list[int], dim: int, temperature: float, steps: int, warmup: int,
              max_time: float) -> list[dict[str, Any]]:
  """One row per global batch: per-device logits and compiled memory, and the median time."""
  import jax  # pylint: disable=g-import-not-at-top
  from simclr_jax import parallel  # pylint: disable=g-import-not-at-top
  from simclr_jax.bench import common  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  devices = mesh.devices.size
  rows = []
  last = None  # (seconds per run, local×global rows) of the last timed size, for prediction
  for n in sizes:
    parallel.check_batch_size(n, mesh, key='sizes')
    n_local = n // devices
    local_rows, global_rows = 2 * n_local, 2 * n
    t = time.perf_counter()
    compiled = compile_loss_grad(n, dim, temperature, mesh)
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    temp, arg, out = (int(mem.temp_size_in_bytes), int(mem.argument_size_in_bytes),
                      int(mem.output_size_in_bytes))
    row = {'global_batch': n, 'devices': devices, 'local_rows': local_rows,
           'global_rows': global_rows, 'local_x_global_rows': local_rows * global_rows,
           'logits_bytes_per_device': local_rows * global_rows * _F32_BYTES,
           'temp_bytes_per_device': temp, 'argument_bytes_per_device': arg,
           'output_bytes_per_device': out, 'compile_s': compile_s}
    predicted = (last[0] * local_rows * global_rows / last[1] if last else None)
    runs = warmup + steps
    # Emulated CPU devices share host memory: all of them hold their temp buffers at once.
    needed = (temp + arg + out) * devices
    device_limit = common.device_bytes_limit(jax.devices()[0])
    if jax.default_backend() == 'cpu' and needed > 0.8 * _available_host_bytes():
      row.update(time_s_median=None, time_s_min=None,
                 timing=f'skipped: needs {needed / 2**30:.1f} GiB host memory')
    elif temp + arg + out > 0.9 * device_limit:
      row.update(time_s_median=None, time_s_min=None,
                 timing=f'skipped: needs {(temp + arg + out) / 2**30:.1f} GiB of '
                 f'{device_limit / 2**30:.1f} GiB device memory')
    elif predicted is not None and predicted * runs > max_time:
      row.update(time_s_median=None, time_s_min=None,
                 timing=f'skipped: predicted {predicted * runs:.0f}s > max_time {max_time:g}s')
    else:
      times = _time(compiled, n, dim, mesh, steps, warmup)
      median = statistics.median(times)
      row.update(time_s_median=median, time_s_min=min(times), timing=f'median of {steps}')
      last = (median, local_rows * global_rows)
    rows.append(row)
    del compiled
  return rows


def _run(argv: list[str]) -> None:
  del argv
  forced = request_host_devices(FLAGS.devices)
  import jax  # pylint: disable=g-import-not-at-top  # after XLA_FLAGS on purpose
  from simclr_jax.bench import common  # pylint: disable=g-import-not-at-top
  if FLAGS.devices and jax.device_count() != FLAGS.devices:
    print(f'note: asked for {FLAGS.devices} devices, running on {jax.device_count()} '
          f'(XLA_FLAGS {"set" if forced else "not set"}: JAX had already started)')
  sizes = [int(s) for s in FLAGS.sizes]
  rows = benchmark(sizes, FLAGS.dim, FLAGS.temperature, FLAGS.steps, FLAGS.warmup,
                   FLAGS.max_time)
  mib = lambda b: b / 2**20
  common.print_table([{
      'N': r['global_batch'], '2n_local': r['local_rows'], '2N': r['global_rows'],
      'local*global': r['local_x_global_rows'],
      'logits_MiB/dev': mib(r['logits_bytes_per_device']),
      'temp_MiB/dev': mib(r['temp_bytes_per_device']),
      'arg_MiB/dev': mib(r['argument_bytes_per_device']),
      'out_MiB/dev': mib(r['output_bytes_per_device']),
      'compile_s': r['compile_s'],
      'median_ms': '-' if r['time_s_median'] is None else f"{1000 * r['time_s_median']:.4g}",
      'timing': r['timing']} for r in rows])
  path = common.save('loss', FLAGS.out_dir,
                     {'sizes': sizes, 'dim': FLAGS.dim, 'temperature': FLAGS.temperature,
                      'steps': FLAGS.steps, 'warmup': FLAGS.warmup, 'max_time': FLAGS.max_time,
                      'devices': jax.device_count(), 'dtype': 'float32'}, rows)
  print(f'saved {path}')


def main(argv: list[str]) -> None:
  """Entry point used by simclr_jax.bench.__main__ (argv[0] is the program name)."""
  app.run(_run, argv=argv)
