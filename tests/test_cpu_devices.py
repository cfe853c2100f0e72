"""CPU-only runs get one JAX device per core (config.cpu_devices), unless XLA_FLAGS says otherwise."""
import os
import subprocess
import sys

import pytest

from simclr_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('cores,batch,requested,expected', [
    (2, 128, 0, 2), (16, 4096, 0, 16), (12, 512, 0, 8),  # power of two ≤ cores
    (8, 36, 0, 4), (8, 9, 0, 1), (1, 128, 0, 1),  # ... that divides the global batch
    (2, 128, 3, 3)])  # explicit count
def test_cpu_device_count(cores, batch, requested, expected):
  assert parallel.cpu_device_count(cores, batch, requested) == expected


_PROBE = '''
import os
import jax
from simclr_jax import parallel
parallel.set_cpu_devices(batch_size=128, requested=3)
print('devices', jax.device_count())
print('XLA_FLAGS', os.environ['XLA_FLAGS'])
'''
_USER_YNN = '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'


@pytest.mark.parametrize('xla_flags,expected,flags_after', [
    ('', 3, parallel.CPU_XLA_FLAGS),
    ('--xla_force_host_platform_device_count=5', 5,
     f'--xla_force_host_platform_device_count=5 {parallel.CPU_XLA_FLAGS}'),
    (_USER_YNN, 3, _USER_YNN)])  # the user's own choice of YNNPACK fusions wins
def test_set_cpu_devices_before_jax_starts(xla_flags, expected, flags_after):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags)
  proc = subprocess.run([sys.executable, '-c', _PROBE], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f'devices {expected}' in proc.stdout
  assert f'XLA_FLAGS {flags_after}\n' in proc.stdout


@pytest.mark.parametrize('recipe,error', [
    ('configs/linear_eval.py', 'pretrain_workdir'),  # its batch key is eval_batch_size
    ('configs/demo.py', 'train.batch_size=36')])
def test_main_sets_cpu_devices_for_each_job(tmp_path, recipe, error):
  # No XLA_FLAGS device count: main.py chooses one from the job's batch, then the job stops at
  # its first config error (before compiling anything), not at the device set-up.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  args = [sys.executable, '-m', 'simclr_jax.main', f'--config={recipe}',
          f'--workdir={tmp_path}/w']
  if recipe.endswith('demo.py'):
    # 8 CPU devices asked for and a batch of 36: the batch check names the key.
    args += ['--config.train.batch_size=36', '--config.cpu_devices=8']
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert error in proc.stderr, proc.stderr[-2000:]
  assert 'AttributeError' not in proc.stderr and 'Traceback' not in proc.stderr
