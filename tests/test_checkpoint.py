"""Checkpoint round trips, re-sharding on restore, retention, safety and damaged steps.

A tiny pytree state (a flax struct like TrainState, with an optax state holding empty and masked
parts) stands in for the model: what is tested is orbax's handling of the tree, not the model.
"""
import logging
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import processes
from simclr_jax import checkpoint, parallel
from simclr_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A read that fails on a damaged file leaves tensorstore callbacks that land on orbax's closed
# event loop; Python reports them as ignored exceptions at garbage collection. Harmless.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@flax.struct.dataclass
class TinyState:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState


_TX = optax.chain(optax.add_decayed_weights(1e-4, mask={'w': True, 'b': False}),
                  optax.sgd(0.1, momentum=0.9))


def _tiny(step, seed=0):
  """A state whose every leaf is random (init leaves momentum at zero: a blind comparison)."""
  rng = np.random.default_rng(seed)
  params = {'w': rng.standard_normal((4, 3)).astype(np.float32),
            'b': rng.standard_normal(3).astype(np.float32)}
  opt_state = jax.tree.map(lambda x: rng.standard_normal(np.shape(x)).astype(np.float32),
                           _TX.init(params))
  return TinyState(step=np.int32(step), params=params,
                   batch_stats={'mean': rng.standard_normal(3).astype(np.float32)},
                   opt_state=opt_state)


@pytest.fixture(scope='module')
def mesh(devices):
  return parallel.make_mesh(devices)


@pytest.fixture(scope='module')
def state(mesh):
  return parallel.replicate(_tiny(7), mesh)


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
  sharding = parallel.replicated_sharding(mesh)
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
  assert all(x.sharding.is_equivalent_to(parallel.replicated_sharding(mesh), x.ndim)
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
  with pytest.raises(ConfigError, match='no checkpoint in .*checkpoints; run pretraining '
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
  with pytest.raises(checkpoint.SaveError, match=r'saving the checkpoint of step 8 in .* failed '
                     r'\(OSError: simulated failure.*latest: step 7'):
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


def test_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert checkpoint.checkpoint_dir('runs/a') == tmp_path / 'runs' / 'a' / 'checkpoints'
  assert str(checkpoint.checkpoint_dir('gs://bucket/run')) == 'gs://bucket/run/checkpoints'


# --- damaged steps -----------------------------------------------------------------------------


def _data_files(step_dir):
  """The array data files of a saved step (OCDBT 'd/' folders)."""
  return [os.path.join(d, f) for d, _, files in os.walk(step_dir) if os.path.basename(d) == 'd'
          for f in files]


def _damage(step_dir, how):
  """What a user found on the storage: a metadata file deleted or cut short, data cut short."""
  meta = os.path.join(step_dir, 'default', '_METADATA')
  if how == 'delete metadata':
    os.remove(meta)
  elif how == 'truncate metadata':
    os.truncate(meta, os.path.getsize(meta) // 2)
  elif how == 'truncate data':
    for f in _data_files(step_dir):
      os.truncate(f, os.path.getsize(f) // 2)


def _save_steps(workdir, mesh, steps):
  mgr = checkpoint.manager(str(workdir), save_every_steps=1, keep=10)
  for s in steps:
    assert checkpoint.save(mgr, parallel.replicate(_tiny(s, seed=s), mesh))
  checkpoint.close(mgr)


def _tree_files(path):
  return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path)
                for f in fs)


@pytest.mark.parametrize('how', ['delete metadata', 'truncate metadata', 'truncate data'])
def test_damaged_latest_step_is_moved_aside_and_the_previous_restored(tmp_path, mesh, how,
                                                                    caplog):
  _save_steps(tmp_path, mesh, [1, 2])
  ckpts = tmp_path / 'checkpoints'
  _damage(ckpts / '2', how)
  files = _tree_files(ckpts / '2')
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=10)
  with caplog.at_level(logging.WARNING):
    restored = checkpoint.restore_latest(mgr, parallel.replicate(_tiny(0), mesh))
  _assert_identical(restored, _tiny(1, seed=1))
  assert (f'Checkpoint step 2 in {ckpts} does not restore' in caplog.text and
          f'moved it to {ckpts}/2.damaged' in caplog.text and 'resuming from step 1' in caplog.text)
  assert sorted(os.listdir(ckpts)) == ['1', '2.damaged']
  assert _tree_files(ckpts / '2.damaged') == files  # moved whole, nothing deleted
  assert mgr.all_steps() == [1] and checkpoint.latest_step(str(tmp_path)) == 1
  # The run goes on and saves step 2 again; a later damage of it is kept beside the first.
  assert checkpoint.save(mgr, parallel.replicate(_tiny(2, seed=20), mesh))
  checkpoint.close(mgr)
  assert checkpoint.restore_variables(str(tmp_path))[0] == 2
  _damage(ckpts / '2', how)
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=10)
  _assert_identical(checkpoint.restore_latest(mgr, parallel.replicate(_tiny(0), mesh)),
                    _tiny(1, seed=1))
  checkpoint.close(mgr)
  assert sorted(os.listdir(ckpts)) == ['1', '2.damaged', '2.damaged.1']


def test_no_step_restores_is_an_error_naming_them(tmp_path, mesh):
  _save_steps(tmp_path, mesh, [1, 2])
  ckpts = tmp_path / 'checkpoints'
  _damage(ckpts / '1', 'truncate data')
  _damage(ckpts / '2', 'delete metadata')
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=10)
  with pytest.raises(ConfigError) as e:
    checkpoint.restore_latest(mgr, parallel.replicate(_tiny(0), mesh))
  checkpoint.close(mgr)
  msg = str(e.value)
  assert f'No checkpoint in {ckpts} restores (step 2: ' in msg and '; step 1: ' in msg
  assert f'mv {ckpts}/2 {ckpts}/2.damaged' in msg and 'new --workdir' in msg
  assert sorted(os.listdir(ckpts)) == ['1', '2']  # left as they are


@flax.struct.dataclass
class _OlderState:
  """The train state of an earlier version: one more field (an RNG) than TinyState."""
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState
  rng: jax.Array


def test_a_checkpoint_of_another_layout_stops_and_is_never_moved(tmp_path, mesh):
  old = _tiny(3)
  older = _OlderState(step=old.step, params=old.params, batch_stats=old.batch_stats,
                      opt_state=old.opt_state, rng=np.zeros(2, np.uint32))
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=10)
  assert checkpoint.save(mgr, parallel.replicate(older, mesh))
  checkpoint.close(mgr)
  mgr = checkpoint.manager(str(tmp_path), save_every_steps=1, keep=10)
  with pytest.raises(ConfigError, match=r"another layout .*only in the checkpoint: \['rng'\].*"
                     r'new --workdir'):
    checkpoint.restore_latest(mgr, parallel.replicate(_tiny(0), mesh))
  checkpoint.close(mgr)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3']  # not treated as damage
  # Its encoder stays readable for evaluation.
  step, variables = checkpoint.restore_variables(str(tmp_path))
  assert step == 3
  _assert_identical(variables, {'params': old.params, 'batch_stats': old.batch_stats})


def test_restore_variables_skips_a_damaged_latest_step(tmp_path, mesh, caplog):
  _save_steps(tmp_path, mesh, [1, 2])
  _damage(tmp_path / 'checkpoints' / '2', 'truncate data')
  with caplog.at_level(logging.WARNING):
    step, variables = checkpoint.restore_variables(str(tmp_path))
  assert step == 1 and 'Checkpoint step 2 in' in caplog.text
  expected = _tiny(1, seed=1)
  _assert_identical(variables, {'params': expected.params, 'batch_stats': expected.batch_stats})
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']  # the eval moves nothing
  with pytest.raises(ConfigError, match=r'checkpoint step 2 in .* does not restore .*pass '
                     r'another --config\.checkpoint_step'):
    checkpoint.restore_variables(str(tmp_path), step=2)


# Each process of a 2-process run: save steps 1 and 2 together, process 0 damages step 2's data
# on the shared directory, then both resume and must end on the same step.
_TWO_PROCESSES = '''
import json, os, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import numpy as np
sys.path.insert(0, os.path.join(sys.argv[4], 'tests'))
from simclr_jax import checkpoint, parallel, workdir
from test_checkpoint import _damage, _tiny
lock = workdir.lock(sys.argv[3])  # held by process 0 for both processes
lock.__enter__()
if jax.process_index() == 0:
  holder = json.load(open(os.path.join(sys.argv[3], workdir.LOCK_FILE)))['pid']
  print('LOCK', holder == os.getpid(), flush=True)
mesh = parallel.make_mesh()
mgr = checkpoint.manager(sys.argv[3], save_every_steps=1, keep=10)
for s in (1, 2):
  checkpoint.save(mgr, parallel.replicate(_tiny(s, seed=s), mesh))
checkpoint.close(mgr)
if jax.process_index() == 0:
  _damage(os.path.join(sys.argv[3], 'checkpoints', '2'), 'truncate data')
mgr = checkpoint.manager(sys.argv[3], save_every_steps=1, keep=10)
restored = checkpoint.restore_latest(mgr, parallel.replicate(_tiny(0), mesh))
expected = _tiny(1, seed=1)
same = all(np.array_equal(np.asarray(a.addressable_data(0)), b) for a, b in
           zip(jax.tree.leaves(restored), jax.tree.leaves(expected)))
print('RESULT', jax.process_index(), int(restored.step.addressable_data(0)), same,
      sorted(mgr.all_steps()), flush=True)
checkpoint.close(mgr)
lock.__exit__(None, None, None)
'''


def test_two_processes_take_the_same_decision(tmp_path):
  """Both processes restore step 1; process 0 moved step 2 aside and held the workdir lock."""
  port, env = processes.free_port(), processes.cpu_env(2)
  procs = [subprocess.Popen(
      [sys.executable, '-c', _TWO_PROCESSES, f'localhost:{port}', str(i), str(tmp_path), ROOT],
      # stdout apart from stderr: gloo writes to stderr from its own threads, in pieces, so in
      # a merged stream its text can land inside the lines printed here.
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=300))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, (out + err)[-3000:]
    assert f'RESULT {i} 1 True [1]' in out.splitlines(), (out + err)[-3000:]
  assert 'LOCK True' in outs[0][0].splitlines() and 'moved it to' in outs[0][1]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2.damaged']
  assert not (tmp_path / 'run.lock').exists()  # released
