"""config.data.augment_on: the device-resident data set, its index stream, 'split', 'device' runs.

In-process tests check the parts against numpy (gather, layout, index stream, the TF-free demo
images, the split and device views); subprocess runs of `python -m simclr_jax.main` check that a
'device' run resumes bit-identically and never imports TensorFlow, and that a 'split' run runs.
Whether a 24-step run lowers its loss is left to rounding, so no run is judged by it: the
step's learning is shown on a fixed batch (test_train_step), its views against references here.
"""
import dataclasses
import itertools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import processes
from configs import base, demo
from simclr_jax import checkpoint, parallel, pretrain
from simclr_jax import workdir as workdir_lib
from simclr_jax.data import demo_digits, device_input, train_input, views_jax
from simclr_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the device-resident data set -----------------------------------------------------------------

def _split(n=43, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.choice(1000, n, replace=False)).astype(np.int64)  # sparse, like the demo's
  return device_input.HostSplit(rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
                               rng.integers(0, 10, n).astype(np.int32), ids, 10)


@pytest.mark.parametrize('replicate_max_mb', [1.0, 0.0], ids=['replicated', 'sharded'])
def test_gather_equals_numpy_indexing(devices, replicate_max_mb):
  mesh = parallel.make_mesh(devices)
  split = _split()
  data = device_input.place(split, mesh, replicate_max_mb)
  layout = data.layout
  assert layout.sharded == (replicate_max_mb == 0.0)
  shapes = {s.data.shape[0] for s in data.arrays['image'].addressable_shards}
  assert shapes == ({layout.stride} if layout.sharded else {43})  # 43 = 6+6+6+5+5+5+5+5
  # 6 rows per device, each drawn from what that device holds (its shard, or everything).
  rng = np.random.default_rng(1)
  shard = np.arange(48) // 6 if layout.sharded else np.zeros(48, int)
  index = (rng.random(48) * np.asarray(layout.sizes)[shard]).astype(np.int32)
  got = jax.jit(lambda d, i: device_input.gather(d, i, mesh, layout.sharded))(
      data.arrays, parallel.host_batch_to_global({'i': index}, mesh)['i'])
  # Independent: the example id of each drawn row, looked up in the host split by numpy.
  example = layout.ids[shard * layout.stride + index]
  row = np.searchsorted(split.ids, example)
  np.testing.assert_array_equal(split.ids[row], example)
  np.testing.assert_array_equal(np.asarray(got['image']), split.images[row])
  np.testing.assert_array_equal(np.asarray(got['label']), split.labels[row])


def test_layout_shards_are_balanced_and_cover_each_example_once():
  ids = np.arange(100, 143)
  layout = device_input.make_layout(ids, 8)
  assert layout.sizes == (6, 6, 6, 5, 5, 5, 5, 5) and layout.stride == 6
  real = layout.ids[layout.ids >= 0]
  np.testing.assert_array_equal(np.sort(real), ids)  # each id once
  assert not np.array_equal(real, ids)  # a random partition, not runs of ids (of one class)
  rows = layout.ids.reshape(8, 6)
  assert all((rows[g, :n] >= 0).all() and (rows[g, n:] == -1).all()
             for g, n in enumerate(layout.sizes))
  with pytest.raises(ValueError, match='device_replicate_max_mb'):
    device_input.make_layout(np.arange(5), 8)


@pytest.mark.parametrize('shards, batch', [(1, 8), (8, 16)], ids=['replicated', 'sharded'])
def test_index_stream_epochs_reshuffle_and_restart(shards, batch):
  ids = np.arange(500, 543)  # 43 examples
  layout = device_input.make_layout(ids, shards)
  steps = 40
  full = [device_input.index_batch(layout, 7, s, batch, np.arange(batch)) for s in range(steps)]
  per = batch // shards
  for g, n in enumerate(layout.sizes):
    # Shard g's draws in stream order: its rows of every step.
    draws = np.concatenate([b['example_id'][g * per:(g + 1) * per] for b in full])
    epochs = np.concatenate([b['epoch'][g * per:(g + 1) * per] for b in full])
    local = np.concatenate([b['index'][g * per:(g + 1) * per] for b in full])
    own = layout.ids[g * layout.stride:g * layout.stride + n]
    np.testing.assert_array_equal(own[local], draws)  # 'index' is the row in the shard
    np.testing.assert_array_equal(epochs, np.arange(len(draws)) // n)
    whole = len(draws) // n
    assert whole >= 2
    orders = [draws[e * n:(e + 1) * n] for e in range(whole)]
    for order in orders:
      np.testing.assert_array_equal(np.sort(order), np.sort(own))  # each example once an epoch
    assert not np.array_equal(orders[0], orders[1])  # a new order each epoch
  # Restart at step 13: the same batches as the uninterrupted stream from there on.
  mesh = parallel.make_mesh(jax.devices())
  resumed = list(itertools.islice(device_input.index_stream(layout, 7, batch, mesh, start_step=13),
                                  steps - 13))
  for a, b in zip(full[13:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Each process computes its own rows: halves of the batch agree with the whole.
  halves = [device_input.index_batch(layout, 7, 21, batch, r)
            for r in np.split(np.arange(batch), 2)]
  for k in full[21]:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[21][k])
  other = device_input.index_batch(layout, 8, 0, batch, np.arange(batch))
  assert not np.array_equal(other['example_id'], full[0]['example_id'])  # seeded by config.seed


def test_demo_digits_without_tensorflow_equal_the_tf_resize():
  import tensorflow as tf
  from sklearn import datasets
  digits = datasets.load_digits()
  for size in (8, 16):
    for split in ('train', 'test'):
      images, labels, ids = demo_digits.load(split, size)
      small = digits.images[ids, :, :, None].astype(np.float32) / 16.0
      ref = tf.image.resize(small, [size, size], method='bicubic').numpy()
      ref = np.round(np.clip(ref, 0, 1) * 255).astype(np.uint8).repeat(3, axis=-1)
      diff = np.abs(images.astype(int) - ref)
      # Float rounding may move a pixel sitting on a .5 boundary by one level; nothing more.
      assert diff.max() <= 1 and (diff > 0).mean() < 1e-5, (size, split, (diff > 0).sum())
      np.testing.assert_array_equal(labels, digits.target[ids])
  assert len(demo_digits.load('train', 8)[2]) == 1797 - demo_digits.TEST_SIZE


# --- config errors --------------------------------------------------------------------------------

def _tiny(**data):
  c = demo.get_config()
  c.model.width = 1 / 16
  c.data.image_size = 8
  c.train.batch_size = 32
  c.train.steps = 2
  c.data.update(data)
  return c


def test_unknown_augment_on_is_a_config_error(tmp_path):
  with pytest.raises(ValueError,
                     match=r'config\.data\.augment_on=.gpu. .*--config\.data\.augment_on'):
    pretrain.run(_tiny(augment_on='gpu'), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_device_needs_images_of_one_size(tmp_path):
  from PIL import Image
  for i, side in enumerate((12, 12, 16)):
    d = tmp_path / 'data' / 'train' / f'c{i % 2}'
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), i, np.uint8)).save(d / f'{i}.png')
  config = _tiny(augment_on='device', source='folder', folder=str(tmp_path / 'data'),
                 num_classes=2)
  with pytest.raises(ValueError, match=r'config\.data\.augment_on=device needs every image .*'
                                       r'augment_on=split'):
    pretrain.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
  config.data.source = 'other'
  with pytest.raises(ValueError, match=r'config\.data\.augment_on=device .*config\.data\.source'):
    train_input.check_config(config)


def test_device_reads_a_folder_source_once(tmp_path, devices):
  from PIL import Image
  rng = np.random.default_rng(0)
  expected = {}
  for i in range(10):
    d = tmp_path / 'train' / f'c{i % 3}'
    d.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(image).save(d / f'{i}.png')
    expected[i] = image
  config = _tiny(augment_on='device', source='folder', folder=str(tmp_path), num_classes=3)
  data = device_input.load(config, parallel.make_mesh(devices))
  assert data.num_examples == 10 and data.num_classes == 3 and not data.layout.sharded
  images, labels = np.asarray(data.arrays['image']), np.asarray(data.arrays['label'])
  # sources._folder numbers files by sorted class then name: c0/{0,3,6,9}, c1/{1,4,7}, c2/{2,5,8}.
  files = [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
  for row, i in enumerate(files):
    np.testing.assert_array_equal(images[row], expected[i])
    assert labels[row] == i % 3


class AugmentOnFixedImages(tfds.core.GeneratorBasedBuilder):
  """5x5 images, example i all of value i (label i % 3); built locally, no download."""
  VERSION = tfds.core.Version('1.0.0')
  SHAPE = (5, 5, 3)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=self.SHAPE),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(9):
      yield i, {'image': np.full((5, 5 + i % 2 * (self.SHAPE[1] is None), 3), i, np.uint8),
                'label': i % 3}


class AugmentOnAnyImages(AugmentOnFixedImages):
  """The same with images of two widths, as TFDS ImageNet has many."""
  SHAPE = (None, None, 3)


def test_device_reads_tfds_once_and_refuses_variable_image_shapes(tmp_path, devices,
                                                                   monkeypatch):
  from simclr_jax.data import sources
  for builder in (AugmentOnFixedImages, AugmentOnAnyImages):
    builder(data_dir=str(tmp_path)).download_and_prepare()
  config = _tiny(augment_on='device', source='tfds', name='augment_on_fixed_images',
                 data_dir=str(tmp_path), num_classes=3)
  data = device_input.load(config, parallel.make_mesh(devices))
  assert data.num_examples == 9 and data.num_classes == 3
  images, labels = np.asarray(data.arrays['image']), np.asarray(data.arrays['label'])
  values = images[:, 0, 0, 0]  # TFDS stores the examples in its own order: match them by value
  np.testing.assert_array_equal(np.sort(values), np.arange(9))
  np.testing.assert_array_equal(images, values[:, None, None, None] * np.ones((5, 5, 3)))
  np.testing.assert_array_equal(labels, values % 3)
  # A variable shape is refused from the metadata, before the split is read.
  monkeypatch.setattr(sources, 'load', lambda *a, **k: pytest.fail('read the split'))
  config.data.name = 'augment_on_any_images'
  with pytest.raises(ValueError, match=r'config\.data\.augment_on=device needs every image.*'
                                       r'\(None, None, 3\)'):
    device_input.load(config, parallel.make_mesh(devices))


# --- 'split': tf.data crops and flips, the step finishes the views --------------------------------

def _split_config(**augment):
  c = base.get_config()
  c.data.update(source='demo', train_split='test', image_size=8)
  c.train.batch_size = 32
  c.augment.update(augment)
  return c


def test_split_host_views_are_the_host_views_without_colour():
  from simclr_jax.data import host_input, sources, views, views_tf
  import tensorflow as tf
  split = _split_config()
  plain = _split_config(jitter_prob=0.0, grayscale_prob=0.0, blur=False)
  got = list(itertools.islice(host_input.train_iterator(split, finish_views=False,
                                                        process_index=0, process_count=1), 13))
  ref = list(itertools.islice(host_input.train_iterator(plain, process_index=0, process_count=1), 13))
  for g, r in zip(got, ref):
    assert set(g) == {'view1', 'view2', 'label', 'epoch', 'index'} and set(r) == set(g) - {
        'epoch', 'index'}
    for k in r:
      np.testing.assert_array_equal(g[k], r[k])
    assert g['epoch'].dtype == g['index'].dtype == np.int32
  assert {int(e) for b in got for e in b['epoch']} == {0, 1}  # 13 x 32 > 360: crosses an epoch
  # 'epoch' and 'index' name the example: rebuild a few views from the source by hand.
  images = {int(ex['index']): ex['image'] for ex in sources.load(
      split.data, 'test', process_index=0, process_count=1).ds.as_numpy_iterator()}
  cfg = dataclasses.replace(views.view_config(split), jitter_prob=0.0, grayscale_prob=0.0,
                            blur=False)
  for b, row in [(got[0], 0), (got[12], 31)]:
    for v in (0, 1):
      seed = views_tf.view_seed(split.seed, int(b['epoch'][row]), int(b['index'][row]), v)
      view = views_tf.train_view(tf.constant(images[int(b['index'][row])]), seed, cfg).numpy()
      np.testing.assert_array_equal(view, b[f'view{v + 1}'][row])


def test_split_prepare_finishes_each_view_with_its_own_key(devices):
  config = _split_config(jitter_prob=1.0, grayscale_prob=0.5)
  mesh = parallel.make_mesh(devices)
  rng = np.random.default_rng(0)
  batch = {'view1': rng.random((16, 8, 8, 3), np.float32),
           'view2': rng.random((16, 8, 8, 3), np.float32),
           'label': np.arange(16, dtype=np.int32), 'epoch': np.full(16, 3, np.int32),
           'index': rng.permutation(100)[:16].astype(np.int32)}
  out = jax.jit(device_input.split_prepare(config))(
      parallel.host_batch_to_global(batch, mesh), None)
  cfg = device_input.views.view_config(config)
  for v in (0, 1):
    for i in (0, 9):  # one example at a time, key from its own (seed, epoch, index, view)
      key = views_jax.view_keys(config.seed, batch['epoch'][i:i + 1],
                                     batch['index'][i:i + 1], v)
      want = views_jax.finish_views(batch[f'view{v + 1}'][i:i + 1], key, cfg)[0]
      np.testing.assert_allclose(np.asarray(out[f'view{v + 1}'][i]), want, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out['label']), batch['label'])
  assert not np.allclose(np.asarray(out['view1']), batch['view1'])


# --- 'device': the step's input is each example's own view ---------------------------------------

def test_device_prepare_makes_each_examples_own_views(devices):
  """Gather + keys + labels of device_prepare against views recomputed one example at a time."""
  config = _tiny(augment_on='device', device_replicate_max_mb=0.0)
  mesh = parallel.make_mesh(devices)
  data = device_input.load(config, mesh)
  assert data.layout.sharded and data.num_examples == 1797 - demo_digits.TEST_SIZE
  batch = device_input.index_batch(data.layout, config.seed, 60, 32, np.arange(32))  # epoch 1 too
  assert set(batch['epoch']) == {1}
  out = jax.jit(device_input.device_prepare(config, mesh, data.layout))(
      parallel.host_batch_to_global(batch, mesh), data.arrays)
  images, labels, ids = demo_digits.load('train', 8)
  cfg = device_input.views.view_config(config)
  for row in (0, 5, 31):
    i = int(np.searchsorted(ids, batch['example_id'][row]))
    assert ids[i] == batch['example_id'][row] and out['label'][row] == labels[i]
    for v in (0, 1):
      key = views_jax.view_keys(config.seed, batch['epoch'][row:row + 1],
                                     batch['example_id'][row:row + 1], v)
      want = views_jax.train_views(images[i:i + 1], key, cfg)[0]
      np.testing.assert_allclose(np.asarray(out[f'view{v + 1}'][row]), want, atol=1e-6)
  assert not np.allclose(np.asarray(out['view1']), np.asarray(out['view2']))


def test_device_data_set_is_an_argument_of_the_step_not_a_constant(devices):
  from simclr_jax import build
  config = _tiny(augment_on='device', device_replicate_max_mb=0.0)
  mesh = parallel.make_mesh(devices)
  data = device_input.load(config, mesh)
  training = build.training(config, mesh, data.num_examples,
                            prepare=device_input.device_prepare(config, mesh, data.layout),
                            data_sharding=data.sharding)
  state, step = training.abstract_state(), training.step  # shapes only: nothing compiles
  batch = parallel.host_batch_to_global(
      device_input.index_batch(data.layout, 0, 0, 32, np.arange(32)), mesh)
  text = step.lower(state, batch, data.arrays).as_text()
  rows = data.arrays['image'].shape[0]
  main = text[text.index('func.func public @main'):].split('\n')[0]
  assert f'tensor<{rows}x8x8x3xui8>' in main  # an argument of the entry function
  assert not [l for l in text.split('\n') if 'constant' in l and f'{rows}x8x8x3xui8' in l]


# --- whole runs: python -m simclr_jax.main in subprocesses ----------------------------------------

STEPS, CKPT_EVERY = 24, 4
TINY = processes.TINY_DEMO + [f'--config.train.steps={STEPS}', '--config.train.log_every_steps=1',
                              f'--config.train.checkpoint_every_steps={CKPT_EVERY}']
# Sharded even for the small demo set: the harder of the two layouts.
DEVICE = ['--config.data.augment_on=device', '--config.data.device_replicate_max_mb=0']
# Runs the job with TensorFlow made unimportable, then fails if any TensorFlow module got loaded.
_WITHOUT_TF = '''
import runpy, sys
sys.modules['tensorflow'] = None  # `import tensorflow` now raises ImportError
sys.argv = ['simclr_jax.main'] + sys.argv[1:]
try:
  runpy.run_module('simclr_jax.main', run_name='__main__')
except SystemExit as e:
  if e.code not in (None, 0):
    raise
loaded = sorted(m for m, v in sys.modules.items() if m.startswith('tensorflow') and v is not None)
print(f'TENSORFLOW MODULES: {loaded}', flush=True)  # one write: other threads log too
sys.exit(1 if loaded else 0)
'''


def _start(workdir, cache_dir, extra=(), without_tf=False):
  entry = ['-c', _WITHOUT_TF] if without_tf else ['-m', 'simclr_jax.main']
  return subprocess.Popen([sys.executable, *entry, f'--workdir={workdir}', *TINY, *extra],
                          cwd=ROOT, env=processes.cpu_env(8, cache_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _run(workdir, cache_dir, extra=(), without_tf=False):
  proc = _start(workdir, cache_dir, extra, without_tf)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  return out


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def device_run(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp('device')
  out = _run(workdir, cache, DEVICE, without_tf=True)
  return workdir, out


def test_device_run_imports_no_tensorflow(device_run):
  workdir, out = device_run
  assert 'TENSORFLOW MODULES: []' in out
  assert f'step {STEPS}/{STEPS}' in out
  assert workdir_lib.read_config(str(workdir))['data']['augment_on'] == 'device'
  rows = metrics.read_metrics(str(workdir))
  assert [r['step'] for r in rows] == list(range(1, STEPS + 1))
  assert all(np.isfinite(r['loss']) for r in rows), rows


def test_device_run_resumes_bit_identically(device_run, tmp_path, cache):
  proc = _start(tmp_path, cache, DEVICE)
  while checkpoint.latest_step(str(tmp_path)) is None:
    assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.kill()
  proc.wait()
  killed_at = checkpoint.latest_step(str(tmp_path))
  assert killed_at < STEPS, 'the run finished before it could be killed'
  out = _run(tmp_path, cache, DEVICE)
  assert f'Resuming from the checkpoint at step {killed_at}' in out
  step, resumed = checkpoint.restore_variables(str(tmp_path))
  ref_step, expected = checkpoint.restore_variables(str(device_run[0]))
  assert step == ref_step == STEPS
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_split_run_logs_every_step(tmp_path, cache):
  _run(tmp_path, cache, ['--config.data.augment_on=split', '--config.train.steps=8'])
  rows = metrics.read_metrics(str(tmp_path))
  assert [r['step'] for r in rows] == list(range(1, 9))
  assert all(np.isfinite(r['loss']) for r in rows), rows
