"""`python -m simclr_jax.bench step`: the jitted pretraining step alone, on synthetic views.

Median step time over repeated runs after warm-up (block_until_ready on each), images/s overall
and per device, FLOPs per step from XLA's cost analysis, achieved FLOP/s and utilisation
against the device's peak (on CPU: a dense float32 matmul measured in the same run), compile
time, the compiled program's memory per device (XLA's memory analysis) and, where the backend
reports it (GPU), the runtime peak of device memory. `--config.train.chunks=k` benchmarks the
gradient-caching step (k chunks per device):

  python -m simclr_jax.bench step --config.model.width=0.25 --batch=256 --config.train.chunks=4
"""
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from simclr_jax import build, parallel
from simclr_jax.bench import common

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar10.py', 'Recipe to benchmark.',
                                          lock_config=True)
_BATCH = flags.DEFINE_integer('batch', None, 'Global batch (default: the recipe\'s).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (at least 1).', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_OUT = flags.DEFINE_string('out_dir', 'bench_results', 'Where the JSON goes.')

# Published dense peaks per chip (FLOP/s), for utilisation on accelerators. float32 on NVIDIA
# GPUs since Ampere is the TF32 tensor-core peak: XLA's default matmul/conv precision uses TF32.
PEAK_FLOPS = {
    ('gpu', 'H100', 'bfloat16'): 989e12, ('gpu', 'H100', 'float32'): 495e12,
    ('gpu', 'H200', 'bfloat16'): 989e12, ('gpu', 'H200', 'float32'): 495e12,
    ('gpu', 'A100', 'bfloat16'): 312e12, ('gpu', 'A100', 'float32'): 156e12,
    ('tpu', 'v4', 'bfloat16'): 275e12, ('tpu', 'v5e', 'bfloat16'): 197e12,
    ('tpu', 'v5p', 'bfloat16'): 459e12,
}


def measured_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
  """FLOP/s of a float32 n×n matmul on one device: the CPU's practical dense peak."""
  a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / min(times)


def peak_flops(dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s of all devices, where the figure comes from)."""
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    # Emulated devices share the same cores, so one measured peak covers them all.
    return measured_matmul_peak(), 'measured f32 matmul, same run'
  for (platform, kind, dt), value in PEAK_FLOPS.items():
    if dev.platform == platform and kind.lower() in dev.device_kind.lower() and dt == dtype:
      label = 'float32 (TF32 tensor cores)' if platform == 'gpu' and dt == 'float32' else dt
      return value * jax.device_count(), f'published {kind} {label} peak'
  return None, 'unknown device'


def benchmark(config, batch: int, steps: int, warmup: int) -> dict:
  """Compiles and times the step; returns the figures as a flat dict."""
  mesh = parallel.make_mesh()
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.batch_size = batch
  # A CIFAR-10-sized schedule; the schedule's values do not change the step's cost.
  training = build.training(config, mesh, num_examples=50_000)
  chunks, size = config.train.chunks, config.data.image_size
  state = training.init_state(seed=0)
  rng = np.random.default_rng(0)
  views = {'view1': rng.random((batch, size, size, 3), np.float32),
           'view2': rng.random((batch, size, size, 3), np.float32),
           'label': rng.integers(0, max(config.data.num_classes, 1), batch).astype(np.int32)}
  views = parallel.host_batch_to_global(views, mesh)
  step = training.step

  t = time.perf_counter()
  lowered = step.lower(state, views, None)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  # XLA's cost analysis counts a loop body once, so the chunked step's count would miss all but
  # one chunk: count the unchunked step instead (model FLOPs; chunking adds one forward pass).
  if chunks > 1:
    config.train.chunks = 1
  flops = common.program_flops(
      lowered if chunks == 1 else build.training(config, mesh, 50_000).step.lower(
          state, views, None))
  compiled_mem = common.compiled_memory(compiled) or {}
  for _ in range(warmup):
    state, _ = compiled(state, views, None)
  jax.block_until_ready(state)  # with --warmup=0, the state as initialised
  times = []
  cpu_start = time.process_time()
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, views, None)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  # CPU seconds of this process per step: on a shared CPU host, wall time grows with other
  # load but this stays put, so it is the figure to compare settings by.
  cpu_s_per_step = (time.process_time() - cpu_start) / steps
  median = statistics.median(times)
  peak, peak_source = peak_flops(config.model.dtype)
  memory = None
  try:
    stats = jax.devices()[0].memory_stats()
    memory = stats.get('peak_bytes_in_use') if stats else None
  except Exception:  # pylint: disable=broad-except  # backends without memory stats
    pass
  return {
      'depth': config.model.depth, 'width': config.model.width, 'image_size': size,
      'dtype': config.model.dtype, 'remat': bool(config.model.get('remat', False)),
      'global_batch': batch, 'chunks': chunks, 'devices': jax.device_count(),
      'compile_s': compile_s, 'step_s_median': median, 'step_s_min': min(times),
      'cpu_s_per_step': cpu_s_per_step,
      'images_per_s': batch / median, 'images_per_s_per_device': batch / median /
      jax.device_count(), 'gflops_per_step': flops / 1e9,
      'achieved_gflops_per_s': flops / median / 1e9,
      'peak_gflops_per_s': peak / 1e9 if peak else None, 'peak_source': peak_source,
      'utilisation': flops / median / peak if peak else None,
      **{f'compiled_{k}_bytes': v for k, v in compiled_mem.items()},
      'peak_memory_bytes': memory, 'final_loss': float(metrics['loss']),
  }


def _run(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  batch = _BATCH.value or config.train.batch_size
  parallel.set_cpu_devices(batch, config.cpu_devices)  # as a CPU-only run of main.py
  figures = benchmark(config, batch, _STEPS.value, _WARMUP.value)
  common.print_table([{k: v for k, v in figures.items() if k not in ('peak_source',)}])
  path = common.save('step', _OUT.value, {'config': config.to_dict(), 'batch': batch,
                                           'steps': _STEPS.value}, figures)
  print(f'saved {path}')


def main(argv: list[str]) -> None:
  """Entry point used by simclr_jax.bench.__main__ (argv[0] is the program name)."""
  app.run(_run, argv=argv)
