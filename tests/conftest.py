"""Runs every test on 8 emulated CPU devices: this must execute before JAX initialises.

XLA reads XLA_FLAGS when its CPU backend starts (at the first device query), not at import, so
importing simclr_jax.parallel here for its flags is early enough.
"""
import atexit
import os
import shutil
import tempfile

from simclr_jax.parallel import with_cpu_flags

# 8 devices, and the XLA:CPU flags a CPU-only run of the jobs gets (parallel.set_cpu_devices);
# an XLA_FLAGS that sets those flags itself keeps its own (to test another CPU code path).
os.environ['XLA_FLAGS'] = with_cpu_flags(
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip())
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402  (after the flags on purpose)
import pytest  # noqa: E402

jax.config.update('jax_threefry_partitionable', True)
# A persistent compilation cache for this test process: tests that build the same tiny program
# (the demo's step, its eval forward) through new jax.jit objects compile it once. Set here,
# not through JAX_COMPILATION_CACHE_DIR, so that subprocesses do not inherit it: the processes
# of one multi-process job must compile for themselves (tests/processes.py says why).
_CACHE_DIR = tempfile.mkdtemp(prefix='simclr_jax_tests_xla_cache_')
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


@pytest.fixture(scope='session')
def devices() -> list[jax.Device]:
  """The 8 emulated CPU devices; fails loudly if the flag did not take effect."""
  devs = jax.devices()
  assert len(devs) == 8, f'expected 8 emulated CPU devices, got {len(devs)}'
  return devs
