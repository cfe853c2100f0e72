"""Multi-host path on one machine: two CPU processes (4 devices each, gloo collectives) vs one.

With two processes each reads its own shard of the data (sources.load with process_index/count)
and shuffles it on its own, so a 2-process global batch is [process 0's local batch, process
1's local batch]: the same *distribution* as a 1-process run, not the same rows. The exact
comparison is therefore against an in-process 8-device run fed those same global batches
(train_iterator for both process indices, concatenated), which is what the two processes must
compute. Checkpoints move between the two layouts in both directions. A SIGTERM sent to one
process stops both after the same step, which both save.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from ml_collections import config_flags

import numerics
import processes
from simclr_jax import build, checkpoint, parallel
from simclr_jax import metrics
from simclr_jax.data import host_input, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# 16 px, not 8: at initialisation every block's last BN scale is 0, so the encoder is the stem
# followed by the 1x1 stride-2 projection shortcuts, and at 8 px h depends on one pixel of the
# stem (rank 1 over the batch, a black corner on digits). The first gradient is then zero in
# exact arithmetic (float64: 1e-13) and a float32 one is its rounding noise, different for every
# reduction order, which the momentum carries into every later step. At 16 px h has full rank.
TINY = ['--config=configs/demo.py', '--config.model.width=0.0625', '--config.data.image_size=16',
        '--config.train.batch_size=32', f'--config.train.steps={STEPS}',
        '--config.train.log_every_steps=2', '--config.train.checkpoint_every_steps=2',
        '--config.train.keep_checkpoints=10', '--config.optim.warmup_epochs=0.5']
# Two processes (gloo across them) and one process reduce in other orders, so float32 results
# are close, not equal. A gradient then differs by ~1e-5 relative (BN-scale leaves; 1e-6
# elsewhere). After a few steps a leaf that started at zero (BN betas, the last BN's gammas,
# biases) holds only updates, so its relative error is about the gradients', and leaves that
# started elsewhere are dominated by their unchanged initial values: 1e-3 per leaf is 100x
# that. A wrong cross-process reduction (BN statistics or negatives of one process only)
# changes gradients, losses and so those leaves by more than 1e-1.
RTOL = 1e-3


def _cmd(workdir, extra):
  return [sys.executable, '-m', 'simclr_jax.main', f'--workdir={workdir}', *TINY, *extra]


def _start_two(workdir, extra=()):
  """Starts both processes of a 2-process job (stdout and stderr together, as text).

  No persistent compilation cache: JAX writes entries from process 0 only, so process 1 would
  recompile what process 0 loads, fall behind, and a gloo collective's rendezvous (30 s, fixed
  in jaxlib) would time out.
  """
  port = processes.free_port()
  return [subprocess.Popen(
      _cmd(workdir, [f'--coordinator_address=localhost:{port}', '--num_processes=2',
                     f'--process_id={i}', *extra]),
      cwd=ROOT, env=processes.cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]


def _outputs(procs, timeout):
  """Each process's output once it has exited; kills what is still running after `timeout` s."""
  deadline = time.monotonic() + timeout
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def _run_two(workdir, extra=()):
  """Both processes of a 2-process job; returns their outputs (asserting both exit 0)."""
  procs = _start_two(workdir, extra)
  outs = _outputs(procs, 900)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _wait_for_checkpoint(workdir, procs, timeout=600):
  """Returns once the first checkpoint is on disk: both processes are in the training loop."""
  deadline = time.monotonic() + timeout
  while checkpoint.latest_step(str(workdir)) is None:
    for p in procs:
      assert p.poll() is None, p.communicate()[0][-3000:]
    assert time.monotonic() < deadline, 'no checkpoint appeared'
    time.sleep(0.05)


def _run_one(workdir, cache, extra=()):
  proc = subprocess.run(_cmd(workdir, extra), cwd=ROOT, env=processes.cpu_env(8, cache), timeout=900,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  assert proc.returncode == 0, proc.stdout[-3000:]
  return proc.stdout


def _copy_up_to(src, dst, step):
  """A copy of workdir `src` whose checkpoints stop at `step` (later ones removed)."""
  shutil.copytree(src, dst)
  for s in os.listdir(os.path.join(dst, 'checkpoints')):
    if s.isdigit() and int(s) > step:
      shutil.rmtree(os.path.join(dst, 'checkpoints', s))
  assert checkpoint.latest_step(str(dst)) == step


def _config():
  sys.path.insert(0, ROOT)
  flags = dict(a.removeprefix('--config.').split('=') for a in TINY[1:])
  config = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      'cfg', os.path.join(ROOT, 'configs', 'demo.py')).get_config()
  for key, value in flags.items():
    *path, leaf = key.split('.')
    node = config
    for p in path:
      node = node[p]
    node[leaf] = type(node[leaf])(float(value) if isinstance(node[leaf], float) else int(value))
  return config


class _Reference:
  """The pretraining job's state and step, in this (8-device) process, fed chosen batches."""

  def __init__(self, devices):
    self.config = c = _config()
    self.mesh = parallel.make_mesh(devices)
    # The job's own build path, with the job's step count (config.train.steps = STEPS).
    self.training = build.training(c, self.mesh, host_input.num_examples(c))
    self.step_fn = self.training.step

  def init(self):
    return self.training.init_state()

  def restore(self, workdir, step):
    mgr = checkpoint.manager(str(workdir), save_every_steps=1000, keep=100)
    try:
      return checkpoint.restore(mgr, step, self.init())
    finally:
      checkpoint.close(mgr)

  def train(self, state, start, end, process_count):
    """Steps start+1..end on the global batches a `process_count`-process job assembles."""
    its = [host_input.train_iterator(self.config, start_step=start, process_index=i,
                                   process_count=process_count) for i in range(process_count)]
    losses = {}
    for step in range(start + 1, end + 1):
      parts = [next(it) for it in its]  # process 0's rows first: its devices come first
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      state, out = self.step_fn(state, parallel.host_batch_to_global(batch, self.mesh), None)
      losses[step] = float(out['loss'])
    return state, losses


def _assert_params_close(workdir, state):
  step, saved = checkpoint.restore_variables(str(workdir))
  assert step == int(state.step)
  expected = {'params': state.params, 'batch_stats': state.batch_stats}
  assert jax.tree.structure(saved) == jax.tree.structure(expected)
  numerics.assert_trees_close(saved, jax.device_get(expected), RTOL)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache_multihost')


@pytest.fixture(scope='module')
def reference(devices):
  return _Reference(devices)


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('two')
  return workdir, _run_two(workdir)


def test_two_processes_match_one_process_on_the_same_global_batches(two_process_run, reference):
  workdir, (out0, out1) = two_process_run
  for i, out in enumerate((out0, out1)):
    assert f'JAX process {i} of 2: 4 local devices, 8 global devices (cpu)' in out, out[-2000:]
  # Only process 0 logs progress and writes metrics; each logged step appears once.
  assert f'step {STEPS}/{STEPS}' in out0 and 'Done:' in out0
  assert f'step {STEPS}/{STEPS}' not in out1 and 'Done:' not in out1
  rows = metrics.read_metrics(str(workdir))
  assert [r['step'] for r in rows] == [2, 4]
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [2, 4]

  state, losses = reference.train(reference.init(), 0, STEPS, process_count=2)
  np.testing.assert_allclose([r['loss'] for r in rows], [losses[2], losses[4]], rtol=RTOL)
  _assert_params_close(workdir, state)


@pytest.fixture(scope='module')
def resumed_in_one_process(two_process_run, tmp_path_factory, cache):
  """Two-process checkpoint at step 2 → one 8-device process to the end, saving every step."""
  src, _ = two_process_run
  workdir = tmp_path_factory.mktemp('two_then_one') / 'w'
  _copy_up_to(src, workdir, 2)
  out = _run_one(workdir, cache, ['--config.train.checkpoint_every_steps=1'])
  return workdir, out


def test_two_process_checkpoint_resumes_in_one_process(two_process_run, resumed_in_one_process,
                                                       reference):
  src, _ = two_process_run
  workdir, out = resumed_in_one_process
  assert 'Resuming from the checkpoint at step 2 of 4' in out, out[-2000:]
  assert 'JAX process 0 of 1: 8 local devices, 8 global devices' in out
  state, _ = reference.train(reference.restore(src, 2), 2, STEPS, process_count=1)
  _assert_params_close(workdir, state)


def test_one_process_checkpoint_resumes_in_two_processes(resumed_in_one_process, reference,
                                                         tmp_path):
  src, _ = resumed_in_one_process  # its step 3 was written by the one-process run
  workdir = tmp_path / 'w'
  _copy_up_to(src, workdir, 3)
  out0, _ = _run_two(workdir)
  assert 'Resuming from the checkpoint at step 3 of 4' in out0, out0[-2000:]
  state, _ = reference.train(reference.restore(src, 3), 3, STEPS, process_count=2)
  _assert_params_close(workdir, state)


def _indices(source):
  return [int(ex['index']) for ex in source.ds.as_numpy_iterator()]


@pytest.mark.parametrize('kind', ['demo', 'folder'])
def test_processes_read_disjoint_shards_covering_the_split(kind, tmp_path):
  config = _config()
  if kind == 'folder':
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    png = tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy()
    for i in range(7):
      d = tmp_path / 'train' / f'class{i % 2}'
      d.mkdir(parents=True, exist_ok=True)
      (d / f'{i}.png').write_bytes(png)
    config.data.source, config.data.folder = 'folder', str(tmp_path)
  whole = sources.load(config.data, 'train', process_index=0, process_count=1)
  shards = [sources.load(config.data, 'train', process_index=i, process_count=2) for i in (0, 1)]
  idx = [_indices(s) for s in shards]
  assert not set(idx[0]) & set(idx[1])
  assert sorted(idx[0] + idx[1]) == sorted(_indices(whole))
  assert [s.num_examples for s in shards] == [len(i) for i in idx]
  assert all(s.num_examples_total == whole.num_examples_total for s in shards)


def test_eval_counts_every_example_once_across_processes():
  config = _config()
  batches = [list(host_input.eval_iterator(config, 'test', 64, process_index=i, process_count=2))
             for i in (0, 1)]
  assert len(batches[0]) == len(batches[1])  # lockstep: same number of eval steps
  assert sum(int(b['mask'].sum()) for bs in batches for b in bs) == sources.DEMO_TEST_SIZE


# Long enough that a signal sent after the first checkpoint lands mid-run; the first signal
# stops the run there, so the steps are never all run.
STOP_RUN = ['--config.train.steps=400', '--config.train.checkpoint_every_steps=2',
            '--config.train.log_every_steps=100', '--config.evals.online_probe.every_steps=0',
            '--config.evals.knn.every_steps=0']


def test_sigterm_to_one_process_stops_every_process_at_the_same_saved_step(tmp_path):
  procs = _start_two(tmp_path, STOP_RUN)
  _wait_for_checkpoint(tmp_path, procs)
  procs[1].send_signal(signal.SIGTERM)  # a scheduler preempting one host only
  outs = _outputs(procs, 300)  # both hung until SIGKILL when only process 1 stopped
  stopped = []
  for p, out in zip(procs, outs):
    assert p.returncode == 3, out[-3000:]
    found = re.search(r'SIGTERM \(received by process 1\) at step (\d+): checkpoint saved in '
                      r'\S+/checkpoints\. Rerun the same command to resume\.', out)
    assert found, out[-3000:]
    stopped.append(int(found.group(1)))
  assert stopped[0] == stopped[1] < 400, stopped
  assert checkpoint.latest_step(str(tmp_path)) == stopped[0]
  step, variables = checkpoint.restore_variables(str(tmp_path))
  assert step == stopped[0]
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(variables))

