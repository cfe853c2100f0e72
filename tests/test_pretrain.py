"""In-process pretraining: a NaN or a failed save stops the run and keeps the good checkpoints."""
import errno
import json
import os
import re
import signal
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.serialization import serialization

from configs import demo
from simclr_jax import checkpoint, pretrain, stopping
from simclr_jax import train_step as ts

NAN_FROM_STEP = 7


def _tiny_config():
  c = demo.get_config()
  c.model.width = 1 / 16
  c.data.image_size = 8
  c.train.batch_size = 32
  c.train.steps = 12
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 4
  return c


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real = ts.make_train_step

  def poisoned(*args, **kwargs):
    step_fn = real(*args, **kwargs)
    calls = []

    def step(state, batch, data):
      calls.append(1)
      state, metrics = step_fn(state, batch, data)
      if len(calls) >= NAN_FROM_STEP:  # what a diverged update looks like: NaN everywhere
        state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        metrics = dict(metrics, loss=metrics['loss'] * jnp.nan)
      return state, metrics
    return step

  monkeypatch.setattr(pretrain.train_step, 'make_train_step', poisoned)
  with pytest.raises(pretrain.NonFiniteLossError) as err:
    pretrain.run(_tiny_config(), str(tmp_path))
  message = str(err.value)
  assert 'Non-finite metrics at step 8' in message
  assert "'step': 6" in message  # the last finite metrics are reported
  assert checkpoint.latest_step(str(tmp_path)) == 4  # step 8's NaN state was not saved
  step, variables = checkpoint.restore_variables(str(tmp_path))
  assert step == 4
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(variables))


def test_failed_async_save_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  # The disk fills while the step-8 save writes its arrays in orbax's background commit; the
  # step-4 checkpoint is on disk and keep_checkpoints=1 would delete it once step 8 commits.
  config = _tiny_config()
  config.train.keep_checkpoints = 1
  real_write = serialization.async_serialize_from_host

  async def disk_full_from_step_8(rslices, tspec, **kwargs):
    step = int(re.search(r'/(\d+)\.orbax-checkpoint-tmp', json.dumps(tspec)).group(1))
    if step >= 8:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await real_write(rslices, tspec, **kwargs)

  # Step 9 starts only once the step-8 save has ended (failed), however slow this machine is:
  # the run must then stop after step 9 at the latest, not at the next save (step 12, the last).
  managers = []
  real_save, real_make = checkpoint.save, ts.make_train_step

  def save(mgr, state, **kwargs):
    managers.append(mgr)
    return real_save(mgr, state, **kwargs)

  def make_train_step(*args, **kwargs):
    step_fn = real_make(*args, **kwargs)

    def step(state, batch, data):
      if int(state.step) == 8:
        deadline = time.monotonic() + 120
        while managers[-1].is_saving_in_progress() and time.monotonic() < deadline:
          time.sleep(0.01)
      return step_fn(state, batch, data)
    return step

  monkeypatch.setattr(serialization, 'async_serialize_from_host', disk_full_from_step_8)
  monkeypatch.setattr(checkpoint, 'save', save)
  monkeypatch.setattr(pretrain.train_step, 'make_train_step', make_train_step)
  with pytest.raises(checkpoint.SaveError) as err:
    pretrain.run(config, str(tmp_path))
  ckpt_dir = tmp_path / 'checkpoints'
  # The step-8 save fails in orbax's background thread: on a busy machine it may have failed
  # before the check right after step 8, else step 9 waits for it (above). Either way the run
  # stops at the first step boundary that knows, never at the next save (step 12).
  message = str(err.value)
  assert re.fullmatch(r'training stopped after step [89]: .*', message), message
  assert message.split(': ', 1)[1] == (
      f'saving the checkpoint of step 8 in {ckpt_dir} failed '
      '(OSError: [Errno 28] No space left on device); the checkpoints already there are intact '
      '(latest: step 4). Fix the storage (e.g. free disk space, check permissions), then rerun '
      'the same command to resume.')
  assert checkpoint.latest_step(str(tmp_path)) == 4
  step, variables = checkpoint.restore_variables(str(tmp_path))
  assert step == 4 and all(np.all(np.isfinite(v)) for v in jax.tree.leaves(variables))


def test_sigterm_during_start_up_stops_before_the_first_step(tmp_path, monkeypatch):
  heard = threading.Event()
  real_request = stopping.StopRequests.request

  def request(self, kind, why):
    real_request(self, kind, why)
    heard.set()

  def init_state_then_sigterm(*args, **kwargs):  # SIGTERM while the state is being built
    os.kill(os.getpid(), signal.SIGTERM)
    assert heard.wait(30)
    return types.SimpleNamespace(step=0)  # no checkpoint to restore into: nothing else reads it

  monkeypatch.setattr(stopping.StopRequests, 'request', request)
  monkeypatch.setattr(pretrain.train_step, 'init_state', init_state_then_sigterm)
  with pytest.raises(pretrain.Preempted) as stopped:
    pretrain.run(_tiny_config(), str(tmp_path))
  assert stopped.value.code == pretrain.EXIT_PREEMPTED
  assert stopped.value.message == (
      f'SIGTERM during start-up, before the first step: nothing was trained or saved in '
      f'{tmp_path} this time. Rerun the same command to start (or resume).')
  assert checkpoint.latest_step(str(tmp_path)) is None
