"""For tests that run the jobs (or a script) in fresh Python processes on CPU JAX devices."""
import os
import re
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A localhost port nothing listens on now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def cpu_env(devices: int, cache_dir: object = None) -> dict[str, str]:
  """This environment with the repository importable and JAX on `devices` CPU devices.

  With `cache_dir`, every compilation goes to that persistent cache, so the runs of a module
  compile once. Never for the processes of one multi-process job: JAX writes entries from
  process 0 only, the others recompile, fall behind and miss gloo's 30 s rendezvous.
  """
  # This process's other XLA flags (the CPU code path under test) with another device count.
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 os.environ.get('XLA_FLAGS', ''))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={devices}'.strip())
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return env


# The demo job at test size (add --config.train.steps and the intervals).
TINY_DEMO = ['--config=configs/demo.py', '--config.model.width=0.0625',
             '--config.data.image_size=8', '--config.train.batch_size=32',
             '--config.train.keep_checkpoints=10', '--config.optim.warmup_epochs=0.5']
