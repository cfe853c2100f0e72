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
    assert b[k].min() >= 0 and b[k].max() <= 1  # clipped: exact bounds
  assert b['label'].shape == (32,) and b['label'].dtype == np.int32
  assert not np.array_equal(b['view1'], b['view2'])
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


def test_train_stream_ignores_tensorflows_global_seed():
  # Every process must build the same stream whatever else ran in it before (a library or a
  # test calling tf.random.set_seed), or a multi-process global batch differs from its parts.
  c = _config()
  before = _take(host_input.train_iterator(c, process_index=0, process_count=1), 12)
  tf.random.set_seed(1234)
  try:
    after = _take(host_input.train_iterator(c, process_index=0, process_count=1), 12)
  finally:
    tf.random.set_seed(None)
  for a, b in zip(before, after):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


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


def test_eval_subset_pads_every_process_to_the_same_batches():
  ids = np.sort(np.random.RandomState(0).permutation(1797)[:360])[::7]  # 52 test-split ids
  per_proc = [list(host_input.eval_iterator(_config(), 'test', 16, indices=ids, process_index=pi,
                                            process_count=2)) for pi in (0, 1)]
  # Upper bound min(ceil(360 / 2), 52) rows per process: 7 batches of 8 on both processes.
  assert [len(p) for p in per_proc] == [7, 7]
  masks = np.concatenate([b['mask'] for p in per_proc for b in p])
  assert masks.sum() == len(ids)


def _probe_stream(c, batch, count, **kwargs):
  """The first `count` rows of the probe stream, concatenated."""
  rows = _take(host_input.probe_train_iterator(c, batch, process_index=0, process_count=1,
                                               **kwargs), -(-count // batch))
  return {k: np.concatenate([b[k] for b in rows])[:count] for k in rows[0]}


def test_probe_stream_is_an_endless_shuffle_with_new_views_every_epoch():
  c = _config()  # the 360-example split, batch 64: epochs end mid-batch (360 = 5 * 64 + 40)
  rows = _probe_stream(c, 64, 3 * 360)
  epochs = [slice(e * 360, (e + 1) * 360) for e in range(3)]
  test_ids = np.sort(np.random.RandomState(0).permutation(1797)[:360])
  for e in epochs:  # every example exactly once per epoch, batches crossing the boundaries
    np.testing.assert_array_equal(np.sort(rows['index'][e]), test_ids)
  assert not np.array_equal(rows['index'][epochs[0]], rows['index'][epochs[1]])  # reshuffled
  # Fresh crop + flip views every epoch: example i's epoch-0 and epoch-1 views differ.
  by_id = [dict(zip(rows['index'][e], rows['image'][e])) for e in epochs[:2]]
  # A new view moves some pixel by ≥ 0.39 here, a repeated one is bitwise equal: allclose's
  # default tolerance sits far from both.
  changed = [not np.allclose(by_id[0][i], by_id[1][i]) for i in test_ids]
  # The same window and flip come up twice for 0.5% of examples (21 of 3960 pairs over 12
  # epochs): expect 0.995, s.e. 0.004 on 360; 0.9 is 26 s.e. below (measured 360 of 360).
  assert np.mean(changed) > 0.9
  assert rows['image'].min() >= 0.0 and rows['image'].max() <= 1.0  # clipped: exact bounds
  # The labels travel with their examples.
  digits = datasets.load_digits()
  np.testing.assert_array_equal(rows['label'], digits.target[rows['index']])
  # A fixed stream: the same config gives the same rows.
  again = _probe_stream(c, 64, 100)
  np.testing.assert_array_equal(again['image'], rows['image'][:100])


def test_probe_stream_whole_crop_without_flip_is_the_eval_view():
  c = _config()
  rows = _probe_stream(c, 40, 360, crop_area=(1.0, 1.0), flip=False)
  evals = list(host_input.eval_iterator(c, 'test', 40, process_index=0, process_count=1))
  images = np.concatenate([b['image'][b['mask']] for b in evals])
  ids = np.sort(np.random.RandomState(0).permutation(1797)[:360])  # eval rows come in id order
  order = np.argsort(rows['index'])
  np.testing.assert_array_equal(rows['index'][order], ids)
  # Whole-image crop, bicubic resize and clip: the same TF ops on the same pixels, bit for bit.
  np.testing.assert_array_equal(rows['image'][order], images)


def test_probe_stream_of_a_subset_and_its_batch_key():
  c = _config()
  ids = np.sort(np.random.RandomState(0).permutation(1797)[:360])[::10]  # 36 examples
  rows = _probe_stream(c, 16, 2 * 36, indices=ids)
  for e in (slice(0, 36), slice(36, 72)):
    np.testing.assert_array_equal(np.sort(rows['index'][e]), ids)
  with pytest.raises(ValueError, match=r'config\.finetune\.batch_size'):
    host_input.probe_train_iterator(c, 33, process_index=0, process_count=2,
                                    batch_key='finetune.batch_size')


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
