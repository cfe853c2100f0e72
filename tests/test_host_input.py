"""Train/eval pipelines on the demo digits and device_prefetch on the 8-device CPU mesh."""
import itertools

import jax
import numpy as np
import pytest
import tensorflow as tf
from sklearn import datasets

from configs import base
from simclr_jax import parallel
from simclr_jax.data import host_input


def _config(batch=32, split='test'):
  c = base.get_config()
  c.data.source = 'demo'
  c.data.train_split = split  # The 360-example split: an epoch is ~11 steps at batch 32.
  c.data.image_size = 8
  c.train.batch_size = batch
  return c


def _take(it, n):
  return list(itertools.islice(it, n))


def test_train_batches_shapes_and_range():
  (b,) = _take(host_input.train_iterator(_config(), process_index=0, process_count=1), 1)
  assert set(b) == {'view1', 'view2', 'label'}
  for k in ('view1', 'view2'):
    assert b[k].shape == (32, 8, 8, 3) and b[k].dtype == np.float32
    assert b[k].min() >= 0 and b[k].max() <= 1
  assert b['label'].shape == (32,) and b['label'].dtype == np.int32
  assert not np.array_equal(b['view1'], b['view2'])
  assert host_input.steps_per_epoch(_config()) == 360 // 32
  assert host_input.num_examples(_config()) == 360


def test_train_is_deterministic_and_resumes_mid_stream():
  c = _config()
  full = _take(host_input.train_iterator(c, process_index=0, process_count=1), 14)
  resumed = _take(host_input.train_iterator(c, start_step=10, process_index=0, process_count=1), 4)
  # Bit-identical batches 10..13 (crossing the epoch boundary at 11.25 steps) from a fresh start.
  for a, b in zip(full[10:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other = _config()
  other.seed = 1
  (o,) = _take(host_input.train_iterator(other, process_index=0, process_count=1), 1)
  assert not np.array_equal(o['view1'], full[0]['view1'])


def test_train_epochs_cover_labels_and_reshuffle():
  c = _config(batch=40)  # 360 = 9 batches of 40: an epoch is exactly 9 steps.
  batches = _take(host_input.train_iterator(c, process_index=0, process_count=1), 18)
  labels = [np.concatenate([b['label'] for b in batches[e * 9:(e + 1) * 9]]) for e in (0, 1)]
  digits = datasets.load_digits()
  _, counts = np.unique(labels[0], return_counts=True)
  test_idx = np.random.RandomState(0).permutation(1797)[:360]
  np.testing.assert_array_equal(counts, np.bincount(digits.target[test_idx]))
  np.testing.assert_array_equal(np.sort(labels[0]), np.sort(labels[1]))
  assert not np.array_equal(labels[0], labels[1])  # A new order each epoch.


def test_train_two_processes_split_the_batch():
  c = _config()
  for pi in (0, 1):
    (b,) = _take(host_input.train_iterator(c, process_index=pi, process_count=2), 1)
    assert b['view1'].shape == (16, 8, 8, 3)
  c.train.batch_size = 33
  with pytest.raises(ValueError, match=r'config\.train\.batch_size'):
    host_input.train_iterator(c, process_index=0, process_count=2)


@pytest.mark.parametrize('count', [1, 2])
def test_eval_every_example_once(count):
  c = _config()
  digits = datasets.load_digits()
  test_idx = np.random.RandomState(0).permutation(1797)[:360]
  per_proc = [list(host_input.eval_iterator(c, 'test', 64, process_index=pi, process_count=count))
              for pi in range(count)]
  assert len({len(p) for p in per_proc}) == 1  # Same number of batches on every process.
  batches = [b for p in per_proc for b in p]
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert mask.sum() == 360 and mask.dtype == bool
  np.testing.assert_array_equal(np.sort(labels[mask]), np.sort(digits.target[test_idx]))
  assert all(b['image'].shape == (64 // count, 8, 8, 3) for b in batches)
  assert (labels[~mask] == -1).all()


def test_device_prefetch_gives_sharded_global_arrays(devices):
  mesh = parallel.make_mesh(devices)
  it = host_input.train_iterator(_config(), process_index=0, process_count=1)
  host = _take(host_input.train_iterator(_config(), process_index=0, process_count=1), 3)
  out = _take(parallel.device_prefetch(it, mesh, size=2), 3)
  for h, g in zip(host, out):
    x = g['view1']
    assert isinstance(x, jax.Array) and x.shape == (32, 8, 8, 3)
    assert x.sharding.is_equivalent_to(parallel.batch_sharded(mesh), x.ndim)
    assert len(x.addressable_shards) == 8
    assert all(s.data.shape == (4, 8, 8, 3) for s in x.addressable_shards)
    np.testing.assert_array_equal(np.asarray(x), h['view1'])
    np.testing.assert_array_equal(np.asarray(g['label']), h['label'])


def test_tensorflow_sees_no_accelerator():
  assert tf.config.get_visible_devices('GPU') == []
