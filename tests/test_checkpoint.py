"""Checkpoint round trips, re-sharding on restore, retention, safety and config checks."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import base
from simclr_jax import checkpoint, optim, parallel
from simclr_jax import train_step as ts
from simclr_jax.models import simclr


def _config():
  cfg = base.get_config()
  cfg.model.width = 0.0625
  return cfg


@pytest.fixture(scope='module')
def mesh(devices):
  return parallel.make_mesh(devices)


@pytest.fixture(scope='module')
def state(mesh):
  """A tiny ResNet-18 state whose every leaf is random (init leaves momentum at zero, which
  would make a comparison blind), replicated on the 8-device mesh."""
  cfg = _config()
  tx, _ = optim.make_optimizer(cfg.optim, 64, 10, 100)
  # Initialised on one device (compiles much faster than on 8), then replicated on the mesh.
  one = parallel.make_mesh(mesh.devices.flat[:1])
  s = ts.init_state(simclr.from_config(cfg.model, 10), tx, jax.random.key(0), (8, 8, 3), one)
  rng = np.random.default_rng(0)

  def randomise(x):
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
      return rng.standard_normal(x.shape).astype(x.dtype)
    return rng.integers(0, 2**31 - 1, x.shape).astype(x.dtype)
  s = jax.tree.map(randomise, s).replace(step=np.int32(7))
  return parallel.replicate(s, mesh)


def _numpy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_identical(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    a = np.asarray(a)
    assert a.dtype == e.dtype and a.shape == e.shape, path
    np.testing.assert_array_equal(a, e, err_msg=str(path))


def _with_step(state, mesh, step):
  return state.replace(step=parallel.replicate(np.int32(step), mesh))


def _abstract_on(state, mesh):
  """Restore target for `mesh`: shapes and dtypes of `state`, replicated on `mesh`."""
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def test_save_restore_is_bit_identical(tmp_path, state, mesh):
  expected = _numpy(state)
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1000, keep=3)
  copy = jax.tree.map(lambda x: x.copy(), state)
  assert checkpoint.save(mgr, copy, force=True)
  # The train step donates the state right after the save: the async save must not need it.
  jax.tree.map(lambda x: x.delete(), copy)
  checkpoint.wait(mgr)
  assert os.path.isdir(tmp_path / 'checkpoints' / '7')
  assert checkpoint.latest_step(str(tmp_path)) == 7
  restored = checkpoint.restore_latest(mgr, state)
  _assert_identical(restored, expected)
  assert all(x.sharding.is_equivalent_to(parallel.replicated(mesh), x.ndim)
             for x in jax.tree.leaves(restored))
  checkpoint.close(mgr)


@pytest.mark.parametrize('n_devices', [1, 2])
def test_restore_on_a_different_mesh(tmp_path, state, devices, n_devices):
  expected = _numpy(state)
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=3)
  assert checkpoint.save(mgr, state)
  checkpoint.close(mgr)

  small = parallel.make_mesh(devices[:n_devices])
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=3)
  restored = checkpoint.restore(mgr, 7, _abstract_on(state, small))
  _assert_identical(restored, expected)
  for x in jax.tree.leaves(restored):
    assert x.sharding.mesh.devices.size == n_devices and x.sharding.spec == jax.P()
  checkpoint.close(mgr)


def test_keeps_only_the_last_n_and_respects_the_interval(tmp_path, state, mesh):
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=2, keep=2)
  saved = [s for s in range(1, 9) if checkpoint.save(mgr, _with_step(state, mesh, s))]
  assert saved == [2, 4, 6, 8]
  assert not checkpoint.save(mgr, _with_step(state, mesh, 8), force=True)  # already saved
  assert checkpoint.save(mgr, _with_step(state, mesh, 9), force=True)  # e.g. final/SIGTERM
  checkpoint.close(mgr)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['8', '9']
  assert checkpoint.latest_step(str(tmp_path)) == 9


def test_restore_variables_reads_params_and_batch_stats(tmp_path, state, mesh):
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=3)
  checkpoint.save(mgr, state)
  checkpoint.save(mgr, _with_step(state, mesh, 8))
  checkpoint.close(mgr)
  step, variables = checkpoint.restore_variables(str(tmp_path))
  assert step == 8 and set(variables) == {'params', 'batch_stats'}
  _assert_identical(variables, _numpy({'params': state.params, 'batch_stats': state.batch_stats}))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(variables))
  assert checkpoint.restore_variables(str(tmp_path), step=7)[0] == 7


def test_no_checkpoint_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint in .*checkpoints; run pretraining '
                     'first or check config.pretrain_workdir'):
    checkpoint.restore_variables(str(tmp_path))
  assert checkpoint.latest_step(str(tmp_path)) is None
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=1)
  assert checkpoint.restore_latest(mgr, None) is None
  checkpoint.close(mgr)


def test_non_finite_state_is_not_saved(tmp_path, state, mesh):
  expected = _numpy(state)
  assert checkpoint.is_finite(state)
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=3)
  assert checkpoint.save(mgr, state)
  bad_params = jax.tree.map(lambda x: x * np.nan, state.params)
  bad = _with_step(state, mesh, 8).replace(params=bad_params)
  assert not checkpoint.is_finite(bad)
  assert not checkpoint.save(mgr, bad, force=True)
  checkpoint.close(mgr)
  assert checkpoint.latest_step(str(tmp_path)) == 7
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=3)
  _assert_identical(checkpoint.restore_latest(mgr, state), expected)
  checkpoint.close(mgr)


def test_existing_checkpoint_survives_an_aborted_save(tmp_path, state, mesh, monkeypatch):
  expected = _numpy(state)
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=1)
  assert checkpoint.save(mgr, state)
  checkpoint.wait(mgr)

  # A save that dies while writing arrays (disk full, preemption) ...
  def fail(*args, **kwargs):
    raise OSError('simulated failure while writing')
  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, 'serialize', fail)
  with pytest.raises(OSError, match='simulated failure'):
    checkpoint.save(mgr, _with_step(state, mesh, 8))
    checkpoint.wait(mgr)
  monkeypatch.undo()
  # ... and the leftover of a process killed mid-save (orbax's tmp dir, never renamed).
  tmp_dir = tmp_path / 'checkpoints' / '9.orbax-checkpoint-tmp-1234567890'
  (tmp_dir / 'default').mkdir(parents=True)
  (tmp_dir / 'default' / 'garbage').write_bytes(b'\0' * 100)

  assert checkpoint.latest_step(str(tmp_path)) == 7
  fresh = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=1)
  assert fresh.latest_step() == 7
  _assert_identical(checkpoint.restore_latest(fresh, state), expected)
  assert checkpoint.restore_variables(str(tmp_path))[0] == 7
  # The run goes on: its next save succeeds, and the leftover is reclaimed (orbax does that
  # in the background from the manager's creation, finished before its first save).
  assert checkpoint.save(fresh, _with_step(state, mesh, 10))
  checkpoint.close(fresh)
  assert not tmp_dir.exists()
  assert checkpoint.latest_step(str(tmp_path)) == 10


def test_config_round_trip_and_compatibility(tmp_path):
  cfg = _config()
  checkpoint.write_config(str(tmp_path), cfg)
  text = (tmp_path / 'config.json').read_text()
  assert json.loads(text)['model']['width'] == 0.0625
  assert text.index('"augment"') < text.index('"data"')  # sorted
  saved = checkpoint.read_config(str(tmp_path))
  assert saved.train.batch_size == cfg.train.batch_size
  checkpoint.check_compatible(saved, cfg)  # tuples read back as lists still compare equal

  cfg.train.log_every_steps = 7
  cfg.train.checkpoint_every_steps = 3
  cfg.optim.base_lr = 0.3
  checkpoint.check_compatible(saved, cfg)

  cfg.model.width = 0.5
  cfg.train.batch_size = 256
  with pytest.raises(ValueError) as e:
    checkpoint.check_compatible(saved, cfg)
  msg = str(e.value)
  assert 'model.width: 0.0625 -> 0.5' in msg and 'train.batch_size: 512 -> 256' in msg
  assert 'log_every_steps' not in msg and 'base_lr' not in msg
  assert 'use a new --workdir or restore the old values' in msg.lower()


def test_read_config_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    checkpoint.read_config(str(tmp_path))


def test_ensure_writable(tmp_path):
  checkpoint.ensure_writable(str(tmp_path / 'new' / 'dir'))
  assert os.listdir(tmp_path / 'new' / 'dir') == []
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(PermissionError, match='--workdir='):
    checkpoint.ensure_writable(str(tmp_path / 'a_file' / 'sub'))


def test_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert checkpoint.checkpoint_dir('runs/a') == tmp_path / 'runs' / 'a' / 'checkpoints'
  assert str(checkpoint.checkpoint_dir('gs://bucket/run')) == 'gs://bucket/run/checkpoints'
