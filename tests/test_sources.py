"""Sources: a TFDS dataset built offline in the test, image folders written here, the demo."""
import io
import logging

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import base
from simclr_jax.data import sources, views_tf

TINY_SIZES = {'train': 25, 'test': 7}


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A 16x16 PNG image dataset with 10 labels, generated locally (no download)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(16, 16, 3)),
        'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s, n) for s, n in TINY_SIZES.items()}

  def _generate_examples(self, split, n):
    for i in range(n):
      # Label i % 10 and pixel value i: lets tests map an example back to its position.
      yield i, {'image': np.full((16, 16, 3), i, np.uint8), 'label': i % 10}


@pytest.fixture(scope='module')
def tiny_tfds(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  TinyImages(data_dir=data_dir).download_and_prepare()
  return data_dir


def _data_cfg(**kw) -> ml_collections.ConfigDict:
  cfg = base.get_config().data
  cfg.update(kw)
  return cfg


def _read(src):
  return list(src.ds.as_numpy_iterator())


@pytest.mark.parametrize('count', [1, 2, 3])
def test_tfds_shards_are_disjoint_and_cover_split(tiny_tfds, count):
  cfg = _data_cfg(source='tfds', name='tiny_images', data_dir=tiny_tfds)
  seen = []
  for pi in range(count):
    src = sources.load(cfg, 'train', process_index=pi, process_count=count)
    exs = _read(src)
    assert len(exs) == src.num_examples and src.num_examples_total == 25
    assert src.num_classes == 10
    for ex in exs:
      assert ex['image'].shape == (16, 16, 3) and ex['image'].dtype == np.uint8
      assert ex['label'] == ex['image'][0, 0, 0] % 10
    seen += [(int(ex['index']), int(ex['image'][0, 0, 0])) for ex in exs]
  assert sorted(i for i, _ in seen) == list(range(25))  # Every index once...
  assert sorted(v for _, v in seen) == list(range(25))  # ...and every example once.


def test_tfds_index_is_stable(tiny_tfds):
  cfg = _data_cfg(source='tfds', name='tiny_images', data_dir=tiny_tfds)
  one = {int(e['index']): int(e['image'][0, 0, 0])
         for e in _read(sources.load(cfg, 'test', process_index=0, process_count=1))}
  two = {int(e['index']): int(e['image'][0, 0, 0]) for pi in (0, 1)
         for e in _read(sources.load(cfg, 'test', process_index=pi, process_count=2))}
  assert one == two and len(one) == 7


@pytest.mark.parametrize('kw, split, key', [
    (dict(name='cifar11'), 'train', 'config.data.name'),
    (dict(name='cifar10'), 'train', 'config.data.data_dir'),
    (dict(name='tiny_images'), 'validation', 'config.data.train_split'),
])
def test_tfds_config_errors_name_the_key(tiny_tfds, tmp_path, kw, split, key):
  data_dir = tiny_tfds if kw['name'] == 'tiny_images' else str(tmp_path)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    sources.load(_data_cfg(source='tfds', data_dir=data_dir, **kw), split,
                 process_index=0, process_count=1)


def _write_folder(root, corrupt=True):
  """train/<cat|dog>/: RGB/gray JPEG and PNG (one RGBA), varied sizes; + garbage and a cut JPEG."""
  rng = np.random.default_rng(0)
  files = []
  for c, cls in enumerate(['cat', 'dog']):
    d = root / 'train' / cls
    d.mkdir(parents=True)
    for i in range(5):
      h, w = rng.integers(20, 70, 2)
      mode, ext = [('RGB', 'jpg'), ('L', 'png'), ('RGBA', 'png'), ('L', 'JPEG'), ('RGB', 'jpeg')][i]
      arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8).squeeze()
      fmt = 'JPEG' if 'j' in ext.lower() else 'PNG'
      Image.fromarray(arr, mode).save(d / f'{i}.{ext}', format=fmt)
      files.append((cls, f'{i}.{ext}'))
    (d / 'notes.txt').write_text('not an image')
  if corrupt:
    (root / 'train' / 'cat' / 'bad.jpg').write_bytes(b'this is not a jpeg at all')
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(good, format='JPEG')
    (root / 'train' / 'dog' / 'trunc.jpg').write_bytes(good.getvalue()[:-300])
  return files


def test_folder_skips_corrupt_files_and_logs(tmp_path, caplog):
  _write_folder(tmp_path)
  cfg = _data_cfg(source='folder', folder=str(tmp_path), on_corrupt='skip')
  src = sources.load(cfg, 'train', process_index=0, process_count=1)
  assert src.num_classes == 2 and src.num_examples_total == 12  # Listed before the check.
  with caplog.at_level(logging.WARNING):
    exs = _read(src)
  assert len(exs) == 10
  assert sorted(e['label'] for e in exs) == [0] * 5 + [1] * 5
  logged = caplog.text
  assert 'bad.jpg' in logged and 'trunc.jpg' in logged
  for e in exs:  # Every kept file decodes to RGB through the view ops.
    assert views_tf.eval_view(tf.constant(e['image']), 24).shape == (24, 24, 3)


def test_folder_error_mode_names_the_file(tmp_path):
  _write_folder(tmp_path)
  cfg = _data_cfg(source='folder', folder=str(tmp_path), on_corrupt='error')
  with pytest.raises(tf.errors.InvalidArgumentError, match='bad.jpg'):
    _read(sources.load(cfg, 'train', process_index=0, process_count=1))


def test_folder_shards_for_two_processes(tmp_path):
  _write_folder(tmp_path, corrupt=False)
  cfg = _data_cfg(source='folder', folder=str(tmp_path))
  idx = [sorted(int(e['index']) for e in _read(sources.load(cfg, 'train', process_index=pi,
                                                            process_count=2))) for pi in (0, 1)]
  assert not set(idx[0]) & set(idx[1]) and sorted(idx[0] + idx[1]) == list(range(10))


def test_folder_errors_name_the_key(tmp_path):
  (tmp_path / 'train' / 'empty_class').mkdir(parents=True)
  with pytest.raises(ValueError, match=r'config\.data\.folder'):
    sources.load(_data_cfg(source='folder', folder=str(tmp_path)), 'train')
  with pytest.raises(ValueError, match=r'config\.data\.train_split'):
    sources.load(_data_cfg(source='folder', folder=str(tmp_path)), 'val')


def test_demo_source_offline():
  from sklearn import datasets
  digits = datasets.load_digits()
  cfg = _data_cfg(source='demo', image_size=32)
  train = sources.load(cfg, 'train', process_index=0, process_count=1)
  test = sources.load(cfg, 'test', process_index=0, process_count=1)
  assert train.num_examples + test.num_examples == 1797 and test.num_examples == 360
  assert train.num_classes == 10
  exs = _read(train) + _read(test)
  idx = np.array([e['index'] for e in exs])
  assert sorted(idx) == list(range(1797))
  labels = np.array([e['label'] for e in exs])
  np.testing.assert_array_equal(labels, digits.target[idx])
  assert set(labels) == set(range(10))
  img = exs[0]['image']
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8
  assert (img[..., 0] == img[..., 2]).all()
  # Block-averaging the 32x32 image back to 8x8 recovers the digit.
  small = img[..., 0].reshape(8, 4, 8, 4).mean((1, 3))
  assert np.corrcoef(small.ravel(), digits.images[idx[0]].ravel())[0, 1] > 0.95
