"""The pretraining job through `python -m simclr_jax.main`: outputs, resume, SIGTERM, NaN stop."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import processes
from simclr_jax import checkpoint
from simclr_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CKPT_EVERY = 24, 4
TINY = processes.TINY_DEMO + [f'--config.train.steps={STEPS}', '--config.train.log_every_steps=4',
                              f'--config.train.checkpoint_every_steps={CKPT_EVERY}']


def _env(cache_dir):
  # One compilation shared by every run of this module: the runs differ in timing only.
  return processes.cpu_env(8, cache_dir)


def _start(workdir, cache_dir, extra=()):
  return subprocess.Popen([sys.executable, '-m', 'simclr_jax.main', f'--workdir={workdir}',
                           *TINY, *extra], cwd=ROOT, env=_env(cache_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(workdir, cache_dir, extra=()):
  proc = _start(workdir, cache_dir, extra)
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def _wait_for_checkpoint(workdir, proc, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if checkpoint.latest_step(str(workdir)) is not None:
      return
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    time.sleep(0.02)
  raise TimeoutError('no checkpoint appeared')


def _final_params(workdir):
  step, variables = checkpoint.restore_variables(str(workdir))
  return step, variables


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp('full')
  code, out = _run(workdir, cache)
  assert code == 0, out[-3000:]
  return workdir, out


def test_outputs_exist(uninterrupted):
  """What a run writes. Whether 24 steps lower the loss is left to rounding (it moved by 0.3
  either way between two x86 CPUs); learning is shown on a fixed batch (test_train_step)."""
  workdir, out = uninterrupted
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(STEPS)))
  config = json.load(open(os.path.join(workdir, 'config.json')))
  assert config['train']['steps'] == STEPS and config['data']['source'] == 'demo'
  rows = metrics.read_metrics(str(workdir))
  assert [r['step'] for r in rows] == list(range(4, STEPS + 1, 4))
  for key in ('loss', 'contrastive_acc', 'contrastive_entropy', 'probe_acc', 'learning_rate',
              'grad_norm', 'images_per_sec', 'step_time'):
    assert key in rows[-1], key
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents*'))
  assert all(np.isfinite(r['loss']) and np.isfinite(r['grad_norm']) for r in rows), rows
  assert f'step {STEPS}/{STEPS}' in out and 'Done:' in out


def test_sigkill_then_resume_matches_uninterrupted(uninterrupted, tmp_path, cache):
  reference, _ = uninterrupted
  proc = _start(tmp_path, cache)
  _wait_for_checkpoint(tmp_path, proc)
  proc.kill()
  proc.wait()
  killed_at = checkpoint.latest_step(str(tmp_path))
  assert killed_at < STEPS, 'the run finished before it could be killed'
  code, out = _run(tmp_path, cache)
  assert code == 0, out[-3000:]
  assert f'Resuming from the checkpoint at step {killed_at}' in out
  step, resumed = _final_params(tmp_path)
  ref_step, expected = _final_params(reference)
  assert step == ref_step == STEPS
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)  # bit-identical on CPU


def test_sigterm_saves_current_step_and_restart_continues(uninterrupted, tmp_path, cache):
  reference, _ = uninterrupted
  proc = _start(tmp_path, cache)
  _wait_for_checkpoint(tmp_path, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 3, out[-3000:]
  assert 'SIGTERM at step' in out and 'Rerun the same command to resume' in out
  stopped_at = int(out.split('SIGTERM at step ')[1].split(':')[0])
  assert checkpoint.latest_step(str(tmp_path)) == stopped_at
  code, out = _run(tmp_path, cache)
  assert code == 0 and f'Resuming from the checkpoint at step {stopped_at}' in out, out[-3000:]
  _, resumed = _final_params(tmp_path)
  _, expected = _final_params(reference)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_restart_with_another_model_is_refused(uninterrupted, tmp_path, cache):
  reference, _ = uninterrupted
  code, out = _run(reference, cache, ['--config.model.width=0.125'])
  assert code != 0 and 'model.width' in out and '--workdir' in out, out[-2000:]


def test_batch_not_divisible_by_devices_is_refused_before_compiling(tmp_path, cache):
  code, out = _run(tmp_path, cache, ['--config.train.batch_size=36'])
  assert code != 0 and 'config.train.batch_size=36' in out, out[-2000:]
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_misspelt_config_key_is_an_error(tmp_path, cache):
  code, out = _run(tmp_path, cache, ['--config.train.batchsize=32'])
  assert code != 0 and 'batchsize' in out
