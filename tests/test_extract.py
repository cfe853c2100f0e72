"""The features job: every image once, in file order, with the eval view's features; labels from
class folders; a plain folder; a data split; corrupt files; two processes.

The 'pretraining run' is a saved random ResNet-18 x1/16 (CIFAR stem, 8 px) with BN statistics
away from their init; the reference features are the model applied to views_tf.eval_view of
each file, one by one.
"""
import functools
import os
import subprocess
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import numerics
import processes
from configs import base
from configs import extract as extract_config
from simclr_jax import checkpoint
from simclr_jax import workdir as workdir_lib
from simclr_jax.data import demo_digits, views_tf
from simclr_jax.data.tf_cpu import tf
from simclr_jax.errors import ConfigError
from simclr_jax.eval import extract
from simclr_jax.models import simclr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8
CLASSES = ('cat', 'dog', 'owl')


@flax.struct.dataclass
class _State:
  """What checkpoint.save needs of a train state (restore_variables reads params, batch_stats)."""
  step: Any
  params: Any
  batch_stats: Any


def _fill(path, leaf, rng):
  name, shape = str(getattr(path[-1], 'key', path[-1])), leaf.shape
  if name == 'kernel':
    return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32)
  if name in ('scale', 'var'):
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  return rng.normal(0, 0.1, shape).astype(np.float32)


@pytest.fixture(scope='module')
def pretrain(tmp_path_factory):
  """(workdir, model, variables) of a saved tiny pretraining run on the demo digits."""
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  cfg = base.get_config()
  cfg.data.source, cfg.data.image_size, cfg.data.num_classes = 'demo', SIZE, 10
  cfg.model.width, cfg.model.cifar_stem = 0.0625, True
  model = simclr.from_config(cfg.model, 10)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)),
                                               train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(lambda p, x: _fill(p, x, rng), abstract)
  mgr = checkpoint.manager(workdir, save_every_steps=1000, keep=3)
  assert checkpoint.save(mgr, _State(np.int32(4), variables['params'], variables['batch_stats']),
                         force=True)
  checkpoint.close(mgr)
  workdir_lib.write_config(workdir, cfg)
  return workdir, model, variables


def _write_images(folder, names, rng):
  os.makedirs(folder, exist_ok=True)
  for i, name in enumerate(names):
    shape = (9 + i % 4, 12) if i % 3 else (11, 10, 1)  # varied sizes; some gray
    pixels = rng.integers(0, 256, shape).astype(np.uint8)
    Image.fromarray(pixels.squeeze()).save(os.path.join(folder, name))


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """(class folder, plain folder): 3 classes of 4-6 PNGs plus a corrupt file; 7 plain PNGs."""
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(1)
  classes = str(root / 'classes')
  for c, name in enumerate(CLASSES):
    _write_images(os.path.join(classes, name), [f'{i:02d}.png' for i in range(4 + c)], rng)
  with open(os.path.join(classes, 'dog', 'bad.png'), 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)  # a PNG signature, then nothing decodable
  with open(os.path.join(classes, 'owl', 'notes.txt'), 'w', encoding='utf-8') as f:
    f.write('not an image')
  plain = str(root / 'plain')
  _write_images(plain, [f'img{i}.png' for i in range(7)], rng)
  return classes, plain


def _config(pretrain_workdir, **data):
  c = extract_config.get_config()
  c.pretrain_workdir, c.eval_batch_size = pretrain_workdir, 8
  for key, value in data.items():
    c.data[key] = value
  return c


@functools.lru_cache(maxsize=1)
def _h_fn(model):
  return jax.jit(lambda v, x: model.apply(v, x, train=False)['h'])


def _reference(model, variables, paths):
  """h of each file's eval view, one file at a time (one shape: one compilation in all tests)."""
  h = _h_fn(model)
  return np.concatenate([
      np.asarray(h(variables, views_tf.eval_view(tf.io.read_file(p), SIZE).numpy()[None]))
      for p in paths])


def _assert_rows_close(got, want):
  """Each row of h within numerics.FEATURE_RTOL of its own: the job's program and the reference
  (or another device layout) are different float32 programs; a row out of place moves by O(1)."""
  assert got.shape == want.shape
  err = max(numerics.rel_err(a, b) for a, b in zip(got, want))
  assert err <= numerics.FEATURE_RTOL, err


def _read(workdir):
  names = os.listdir(workdir)
  out = {n.split('.')[0]: np.load(os.path.join(workdir, n)) for n in names if n.endswith('.npy')}
  for n in names:
    if n.endswith('.txt'):
      with open(os.path.join(workdir, n), encoding='utf-8') as f:
        out[n.split('.')[0]] = f.read().splitlines()
  return out


@pytest.fixture(scope='module')
def class_run(pretrain, folders, tmp_path_factory, devices):
  """The job on the class folder, 8 devices, one process; (workdir, summary)."""
  del devices
  workdir = str(tmp_path_factory.mktemp('features'))
  return workdir, extract.run(_config(pretrain[0], folder=folders[0]), workdir)


def test_class_folder_every_image_once_in_order(class_run, pretrain, folders):
  workdir, summary = class_run
  _, model, variables = pretrain
  out = _read(workdir)
  want_paths = [os.path.join(folders[0], c, f'{i:02d}.png')
                for n, c in enumerate(CLASSES) for i in range(4 + n)]
  assert out['paths'] == want_paths  # sorted classes, sorted files; corrupt and .txt absent
  assert out['classes'] == list(CLASSES)
  np.testing.assert_array_equal(out['labels'], np.repeat([0, 1, 2], [4, 5, 6]))
  assert out['features'].dtype == np.float32 and out['features'].shape == (15, 32)
  _assert_rows_close(out['features'], _reference(model, variables, want_paths))
  assert (summary['num_images'], summary['num_skipped']) == (15, 1)
  assert 'ids' not in out


def test_plain_folder_has_no_labels(pretrain, folders, tmp_path):
  _, model, variables = pretrain
  extract.run(_config(pretrain[0], folder=folders[1]), str(tmp_path))
  out = _read(str(tmp_path))
  assert 'labels' not in out and 'classes' not in out
  assert out['paths'] == [os.path.join(folders[1], f'img{i}.png') for i in range(7)]
  _assert_rows_close(out['features'], _reference(model, variables, out['paths']))


def test_pretraining_split_by_default(pretrain, tmp_path):
  """No folder: the run's own data set (the demo digits' test split), ids and labels."""
  extract.run(_config(pretrain[0]), str(tmp_path))
  out = _read(str(tmp_path))
  _, labels, ids = demo_digits.load('test', SIZE)
  np.testing.assert_array_equal(out['ids'], np.sort(ids))
  np.testing.assert_array_equal(out['labels'], labels[np.argsort(ids)])
  assert out['features'].shape == (len(ids), 32) and 'paths' not in out


def test_corrupt_file_stops_the_job_when_asked(pretrain, folders, tmp_path):
  with pytest.raises(tf.errors.InvalidArgumentError, match='bad.png'):
    extract.run(_config(pretrain[0], folder=folders[0], on_corrupt='error'), str(tmp_path))


def test_config_errors(pretrain, folders, tmp_path):
  with pytest.raises(ConfigError, match='pretrain_workdir'):
    extract.run(_config(None), str(tmp_path))
  with pytest.raises(ConfigError, match='config.feature'):
    c = _config(pretrain[0])
    c.feature = 'g'
    extract.run(c, str(tmp_path))
  mixed = os.path.join(os.path.dirname(folders[0]), 'mixed')
  _write_images(os.path.join(mixed, 'a'), ['x.png'], np.random.default_rng(2))
  _write_images(mixed, ['y.png'], np.random.default_rng(3))
  with pytest.raises(ConfigError, match='both images'):
    extract.run(_config(pretrain[0], folder=mixed), str(tmp_path))


def test_two_processes_same_as_one(class_run, pretrain, folders, tmp_path):
  """Two processes (2 CPU devices each, gloo): the same files, rows and features."""
  port = processes.free_port()
  script = (
      'import sys, jax\n'
      'jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))\n'
      'from configs import extract as ec\n'
      'from simclr_jax.eval import extract\n'
      'c = ec.get_config()\n'
      'c.pretrain_workdir, c.data.folder, c.eval_batch_size = sys.argv[3], sys.argv[4], 8\n'
      'extract.run(c, sys.argv[5])\n')
  env = processes.cpu_env(2)
  procs = [subprocess.Popen(
      [sys.executable, '-c', script, str(port), str(i), pretrain[0], folders[0], str(tmp_path)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, outs):
    assert p.returncode == 0, log[-3000:]
  two, one = _read(str(tmp_path)), _read(class_run[0])
  assert two['paths'] == one['paths'] and two['classes'] == one['classes']
  np.testing.assert_array_equal(two['labels'], one['labels'])
  _assert_rows_close(two['features'], one['features'])  # 2 processes x 2 devices against 8
