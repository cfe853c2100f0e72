"""In-process pretraining: a NaN stops the run with its step and keeps the good checkpoints."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from simclr_jax import checkpoint, pretrain
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
