"""The linear-evaluation job on a tiny pretraining workdir (demo digits, ResNet-18 width 1/16).

The 'pretraining run' is an initialised train state with perturbed BN statistics, saved through
the real checkpoint code: restoring it exactly does not depend on any training having happened.
"""
import json
import shutil

import jax
import numpy as np
import pytest

from configs import base, linear_eval
from simclr_jax import checkpoint, optim, parallel
from simclr_jax.eval import features, knn, linear_probe
from simclr_jax.eval import job as evaluate
from simclr_jax import metrics
from simclr_jax import train_step as ts
from simclr_jax.data import host_input
from simclr_jax.models import simclr

DEMO_TRAIN, DEMO_TEST = 1797 - 360, 360
STEP = 5


def _pretrain_config():
  cfg = base.get_config()
  cfg.data.source = 'demo'
  cfg.data.image_size = 8
  cfg.data.num_classes = 10
  cfg.model.width = 0.0625
  cfg.model.cifar_stem = True
  cfg.train.batch_size = 64
  return cfg


@pytest.fixture(scope='module')
def mesh(devices):
  return parallel.make_mesh(devices)


def _fill(path, leaf, rng):
  """A random value for one leaf of the abstract train state (numpy: no RNG compile in JAX)."""
  name, shape = str(path[-1]), leaf.shape
  if not np.issubdtype(leaf.dtype, np.floating):
    return rng.integers(0, 2**31 - 1, shape).astype(leaf.dtype)
  if "'kernel'" in name:  # He-normal, as flax's ResNet init: keeps activations O(1)
    return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(leaf.dtype)
  if "'scale'" in name:
    # Every BN scale nonzero: at init the last BN of each block has gamma 0, so the blocks
    # are shortcuts only and, at 8 px, h would see little more than one corner pixel.
    return rng.uniform(0.5, 1.5, shape).astype(leaf.dtype)
  if "'var'" in name:
    return rng.uniform(0.5, 1.5, shape).astype(leaf.dtype)
  # BN means, biases, optimiser moments: small and nonzero, so a restore that dropped them
  # (init gives zeros) would be caught.
  return rng.normal(0, 0.1, shape).astype(leaf.dtype)


@pytest.fixture(scope='module')
def pretrain(tmp_path_factory, mesh):
  """(workdir, saved numpy {'params', 'batch_stats'}) of a saved tiny pretraining state."""
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  cfg = _pretrain_config()
  tx, _ = optim.make_optimizer(cfg.optim, 64, 10, 100)
  one = parallel.make_mesh(mesh.devices.flat[:1])
  # The exact tree pretraining saves, traced only: compiling a ResNet init on XLA:CPU takes
  # ~30 s under load, and the values need not come from the initialiser.
  abstract = jax.eval_shape(lambda: ts.init_state(
      simclr.from_config(cfg.model, 10), tx, jax.random.key(1), (8, 8, 3), one))
  rng = np.random.default_rng(0)
  state = jax.tree_util.tree_map_with_path(lambda p, x: _fill(p, x, rng), abstract)
  state = parallel.replicate(state.replace(step=np.int32(STEP)), mesh)
  mgr = checkpoint.manager(workdir, save_every_steps=1000, keep=3)
  assert checkpoint.save(mgr, state, force=True)
  checkpoint.close(mgr)
  checkpoint.write_config(workdir, cfg)
  saved = {'params': jax.tree.map(np.asarray, state.params),
           'batch_stats': jax.tree.map(np.asarray, state.batch_stats)}
  return workdir, saved


def _eval_config(pretrain_workdir, **probe):
  c = linear_eval.get_config()
  c.pretrain_workdir = pretrain_workdir
  c.eval_batch_size = 64  # 360 = 5 * 64 + 40: the last test batch is padded
  c.probe.epochs = 5
  c.probe.batch_size = 128
  c.probe.learning_rate = 0.5
  c.knn.k = 20
  c.probe.update(probe)
  return c


@pytest.fixture(scope='module')
def cached_results(pretrain, tmp_path_factory):
  """run() with the cached probe and the random-encoder baseline; (results, eval workdir)."""
  workdir = str(tmp_path_factory.mktemp('eval_cached'))
  config = _eval_config(pretrain[0])
  config.baseline = True
  return evaluate.run(config, workdir), workdir


def test_restores_exactly_the_saved_variables_on_the_mesh(pretrain, mesh):
  workdir, saved = pretrain
  _, _, step, variables = evaluate.restore_encoder(workdir, -1, mesh)
  assert step == STEP
  assert jax.tree.structure(variables) == jax.tree.structure(saved)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(variables),
                               jax.tree.leaves(saved)):
    assert got.sharding.is_equivalent_to(parallel.replicated(mesh), got.ndim), path
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(path))
  # An explicit step restores the same checkpoint.
  assert evaluate.restore_encoder(workdir, STEP, mesh)[2] == STEP


def test_run_writes_results_and_counts_every_test_example_once(cached_results, pretrain):
  results, workdir = cached_results
  with open(f'{workdir}/{evaluate.RESULTS_FILE}') as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(results))
  assert written['checkpoint_step'] == STEP
  assert written['pretrain_workdir'] == pretrain[0]
  assert written['num_test'] == DEMO_TEST and written['num_train'] == DEMO_TRAIN
  for r in (written, written['baseline']):
    for k in ('top1', 'top5', 'knn_top1'):
      assert 0.0 <= r[k] <= 1.0, (k, r[k])
    assert r['top5'] >= r['top1']
    assert r['num_test'] == DEMO_TEST
  # Random ResNet features of digits are far above chance (0.1) for both probe and kNN.
  assert written['top1'] > 0.5 and written['knn_top1'] > 0.5
  rows = metrics.read_metrics(workdir)
  assert rows[-1]['step'] == STEP
  assert rows[-1]['linear_eval/top1'] == pytest.approx(written['top1'])
  assert 'linear_eval/baseline_top1' in rows[-1]
  assert 'random-encoder baseline' in evaluate.summary_line(written)


def test_baseline_is_a_different_encoder(cached_results):
  results, _ = cached_results
  base_r = results['baseline']
  # A seeded fresh init, not the checkpoint: the figures come from different features.
  assert (base_r['top1'], base_r['knn_top1']) != (results['top1'], results['knn_top1'])


def test_augmented_path_without_augmentation_equals_cached(cached_results, pretrain, tmp_path):
  results, _ = cached_results
  # Whole-image crops, no flip: the per-epoch views are the eval views, so the augmented
  # path (features recomputed every epoch, the head trained epoch by epoch) must reproduce
  # the cached path's probe: same features, statistics, shuffles and optimiser.
  config = _eval_config(pretrain[0], mode='augmented', crop_area=(1.0, 1.0), flip=False)
  augmented = evaluate.run(config, str(tmp_path))
  assert augmented['probe_mode'] == 'augmented'
  assert augmented['top1'] == pytest.approx(results['top1'], abs=1.5 / DEMO_TEST)
  assert augmented['top5'] == pytest.approx(results['top5'], abs=1.5 / DEMO_TEST)


def test_augmented_probe_with_crop_and_flip_is_close_to_cached(cached_results, pretrain,
                                                               tmp_path):
  results, _ = cached_results
  config = _eval_config(pretrain[0], mode='augmented', crop_area=(0.64, 1.0), flip=True)
  augmented = evaluate.run(config, str(tmp_path))
  assert augmented['num_test'] == DEMO_TEST
  # Far above chance (0.1), and close to the cached probe. Not equal: at 8 px a crop drops
  # whole pixel rows and a flipped digit is another shape, so the probe trains on a shifted
  # distribution (this is a shift, not noise; the binomial s.e. on 360 is only ~0.026).
  assert augmented['top1'] > 0.3
  assert abs(augmented['top1'] - results['top1']) < 0.3
  # kNN uses the un-augmented features on both paths: identical.
  assert augmented['knn_top1'] == results['knn_top1']


def test_probe_train_views_cover_every_example_once_and_change_per_epoch():
  cfg = _pretrain_config()

  def epoch(e):
    batches = list(host_input.probe_train_iterator(cfg, 64, epoch=e, crop_area=(0.3, 1.0)))
    return {k: np.concatenate([b[k] for b in batches]) for k in ('image', 'label', 'mask')}

  first, again, second = epoch(0), epoch(0), epoch(1)
  eval_labels = np.concatenate([b['label'][b['mask']]
                                for b in host_input.eval_iterator(cfg, 'train', 64)])
  assert first['mask'].sum() == DEMO_TRAIN  # 1437 = 22 * 64 + 29: the last batch is padded
  np.testing.assert_array_equal(first['label'][first['mask']], eval_labels)
  np.testing.assert_array_equal(first['image'], again['image'])  # an epoch is reproducible
  assert not np.allclose(first['image'], second['image'])  # and the next one is new views
  assert first['image'].min() >= 0.0 and first['image'].max() <= 1.0


# --- errors ----------------------------------------------------------------------------------


def test_unset_pretrain_workdir_names_the_key(tmp_path):
  with pytest.raises(ValueError, match='config.pretrain_workdir'):
    evaluate.run(linear_eval.get_config(), str(tmp_path))


def test_workdir_without_checkpoint(tmp_path):
  pretrain_dir = tmp_path / 'pretrain'
  checkpoint.write_config(str(pretrain_dir), _pretrain_config())
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    evaluate.run(_eval_config(str(pretrain_dir)), str(tmp_path / 'eval'))


def test_checkpoint_not_matching_config_names_the_parameter(pretrain, tmp_path):
  copy = tmp_path / 'pretrain'
  shutil.copytree(pretrain[0], copy)
  cfg = _pretrain_config()
  cfg.model.proj_dim = 64  # the checkpoint's projection head outputs 128
  (copy / checkpoint.CONFIG_FILE).unlink()
  checkpoint.write_config(str(copy), cfg)
  # Paths are compared in sorted order: the first differing one is the head's last BN mean.
  with pytest.raises(ValueError, match=r'batch_stats/projection/bn1/mean is \(128,\) in the '
                                       r'checkpoint but \(64,\) in the model'):
    evaluate.run(_eval_config(str(copy)), str(tmp_path / 'eval'))


def test_data_without_labels(pretrain, tmp_path):
  config = _eval_config(pretrain[0])
  config.data.num_classes = 0
  with pytest.raises(ValueError, match='no labels'):
    evaluate.run(config, str(tmp_path))


def test_unlabelled_split_is_rejected():
  check_labels = evaluate._check_labels  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="split 'train' has no labels"):
    check_labels(np.full((5,), -1, np.int32), 10, 'train')


@pytest.mark.parametrize('key,value', [('feature', 'pooled'), ('probe.mode', 'online'),
                                       ('probe.epochs', 0), ('eval_batch_size', 0)])
def test_bad_config_values_name_the_key(key, value, tmp_path):
  config = _eval_config(str(tmp_path))
  if '.' in key:
    config[key.split('.')[0]][key.split('.')[1]] = value
  else:
    config[key] = value
  with pytest.raises(ValueError, match=f'config.{key}='):
    evaluate.check_config(config)


def test_features_match_the_saved_model_on_one_device(pretrain, mesh):
  _, model, _, variables = evaluate.restore_encoder(pretrain[0], -1, mesh)
  feats, labels = features.extract_features(
      evaluate.make_feature_fn(model, mesh, 'h'), variables,
      host_input.eval_iterator(_pretrain_config(), 'test', 64), mesh)
  assert feats.shape == (DEMO_TEST, 32) and labels.shape == (DEMO_TEST,)
  # Independent check: the first test batch through the model with the saved numpy variables.
  images = next(host_input.eval_iterator(_pretrain_config(), 'test', 64))['image']
  with jax.default_device(jax.devices()[0]):
    expected = jax.jit(lambda v, x: model.apply(v, x, train=False)['h'])(pretrain[1], images)
  np.testing.assert_allclose(feats[:64], expected, rtol=1e-4, atol=1e-4)
  # The projection output as feature: traced only (its compile would cost seconds).
  z = jax.eval_shape(evaluate.make_feature_fn(model, mesh, 'z'), variables, images)
  assert z.shape == (64, 128)
