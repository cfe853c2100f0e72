"""The linear-evaluation job on a tiny pretraining workdir (demo digits, ResNet-18 width 1/16).

The 'pretraining run' is an initialised train state with perturbed BN statistics, saved through
the real checkpoint code: restoring it exactly does not depend on any training having happened.
"""
import json
import shutil

import jax
import numpy as np
import pytest

from sklearn import linear_model

import numerics
from configs import base, cifar10, demo, imagenet, linear_eval
from simclr_jax import checkpoint, metrics, optim, parallel
from simclr_jax import workdir as workdir_lib
from simclr_jax import train_step as ts
from simclr_jax.data import demo_digits, host_input
from simclr_jax.errors import ConfigError
from simclr_jax.eval import encoder, evaluators, features, finetune, linear_probe
from simclr_jax.eval import job as evaluate
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
  workdir_lib.write_config(workdir, cfg)
  with metrics.MetricWriter(workdir) as writer:  # what pretraining logs, for curves.png
    for step in range(1, STEP + 1):
      writer.write(step, {'loss': 9.0 - step, 'contrastive_acc': 0.1 * step,
                          **({'eval/knn_top1': 0.5} if step == STEP else {})})
  saved = {'params': jax.tree.map(np.asarray, state.params),
           'batch_stats': jax.tree.map(np.asarray, state.batch_stats)}
  return workdir, saved


def _eval_config(pretrain_workdir, **probe):
  """The official evaluation at CIFAR size, shortened: 3 epochs of 64 (68 steps), peak lr 0.5.

  The demo digits stand in for a data set here: preset 'cifar', not the demo's own ('auto').
  """
  c = linear_eval.get_config()
  c.pretrain_workdir = pretrain_workdir
  c.probe.preset = 'cifar'
  c.eval_batch_size = 64  # 360 = 5 * 64 + 40: the last test batch is padded
  c.probe.epochs = 3.0
  c.probe.batch_size = 64  # = eval_batch_size: the probe's forward reuses the eval compile
  c.probe.base_lr = 2.0
  c.knn.k = 20
  c.probe.update(probe)
  return c


@pytest.fixture(scope='module')
def results(pretrain, tmp_path_factory):
  """run() with the default (augmented) probe, kNN, the checkpoint's online probe and the
  baselines; (results, eval workdir)."""
  workdir = str(tmp_path_factory.mktemp('eval'))
  config = _eval_config(pretrain[0])
  config.evaluators = 'linear_probe,knn,online_probe'
  config.baseline = True
  return evaluate.run(config, workdir), workdir


def test_restores_exactly_the_saved_variables_on_the_mesh(pretrain, mesh):
  workdir, saved = pretrain
  _, _, step, variables = encoder.restore(workdir, -1, mesh)
  assert step == STEP
  assert jax.tree.structure(variables) == jax.tree.structure(saved)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(variables),
                               jax.tree.leaves(saved)):
    assert got.sharding.is_equivalent_to(parallel.replicated_sharding(mesh), got.ndim), path
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(path))
  # An explicit step restores the same checkpoint.
  assert encoder.restore(workdir, STEP, mesh)[2] == STEP


def test_run_writes_results_with_the_protocol_of_each_figure(results, pretrain):
  results, workdir = results
  with open(f'{workdir}/{evaluate.RESULTS_FILE}') as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(results))
  assert written['checkpoint_step'] == STEP and written['pretrain_workdir'] == pretrain[0]
  assert written['num_test'] == DEMO_TEST and written['num_train'] == DEMO_TRAIN
  # The official protocol at CIFAR size (8 px <= 32): preset 'cifar' (wd 0), augmented views,
  # Nesterov, no standardisation, N * epochs // batch + 1 steps at 0.1-style linear scaling.
  assert written['linear_probe']['protocol'] == {
      'mode': 'augmented', 'epochs': 3.0, 'steps': DEMO_TRAIN * 3 // 64 + 1, 'batch_size': 64,
      'base_lr': 2.0, 'lr_scaling': 'linear', 'learning_rate': 2.0 * 64 / 256,
      'momentum': 0.9, 'nesterov': True, 'weight_decay': 0.0, 'standardise': False,
      'augmentation': 'random resized crop, area (0.08, 1.0) + horizontal flip',
      'views': {'crop_area': [0.08, 1.0], 'flip': True,
                'from': {'crop_area': 'pretraining augment.crop_area',
                         'flip': 'pretraining augment.flip'}}}
  assert written['knn'] == {**written['knn'], 'k': 20, 'temperature': 0.1}
  for r in (written['linear_probe'], written['knn'],
            *written['baseline']['random_encoder'].values(), written['baseline']['pixels']):
    assert 0.0 <= r['top1'] <= r['top5'] <= 1.0
  # Chance is 0.1 (s.e. 0.016 on 360 test digits). The probe (unstandardised features, 68
  # steps) measured 0.239: 0.15 is 3.2 s.e. above chance and 4 s.e. (0.022) below that.
  assert written['linear_probe']['top1'] > 0.15
  # kNN measured 0.667: 0.5 is 6.7 s.e. (0.025) below; it changes only at near-tie neighbours.
  assert written['knn']['top1'] > 0.5
  rows = metrics.read_metrics(workdir)
  assert rows[-1]['step'] == STEP
  # The same float through metrics.jsonl: JSON round-trips it exactly, inside approx's rel 1e-6.
  assert rows[-1]['linear_eval/linear_probe/top1'] == pytest.approx(
      written['linear_probe']['top1'])
  assert 'linear_eval/baseline/pixels/top1' in rows[-1]
  line = evaluate.summary_line(written)
  assert 'linear probe top-1' in line and '(augmented, 68 steps)' in line
  assert 'random encoder probe' in line and 'raw-pixel probe' in line
  assert f"online probe top-1 {written['online_probe']['top1']:.3f}" in line


def test_the_checkpoints_online_probe_is_an_evaluator_of_the_job(results, pretrain):
  """The registry's online_probe reads the probe head restored with the encoder; checked
  against the saved numpy variables through plain model.apply on one device."""
  results, _ = results
  model = simclr.from_config(_pretrain_config().model, 10)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)['probe_logits'])
  logits, labels = [], []
  with jax.default_device(jax.devices()[0]):
    for batch in host_input.eval_iterator(_pretrain_config(), 'test', 64):
      logits.append(np.asarray(apply(pretrain[1], batch['image']))[batch['mask']])
      labels.append(batch['label'][batch['mask']])
  want = features.topk_accuracy(np.concatenate(logits), np.concatenate(labels))
  # Two float32 programs (the mesh's and one device's): logits agree to numerics.FEATURE_RTOL,
  # so only a near-tie can flip one of the 360 predictions (1/360 each); a wrong head or split
  # would be far off.
  assert results['online_probe']['top1'] == pytest.approx(want['top1'], abs=1 / 360 + 1e-9)
  assert results['online_probe']['top5'] == pytest.approx(want['top5'], abs=1 / 360 + 1e-9)
  assert 'online_probe' not in results['baseline']['random_encoder']  # no probe was trained


def test_pictures_and_per_class_accuracy(results):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  results, workdir = results
  with Image.open(f'{workdir}/{evaluate.EMBEDDING_FILE}') as im:
    assert im.format == 'PNG' and im.size == (1280, 560)  # pretrained beside the random encoder
  with Image.open(f'{workdir}/{evaluate.CURVES_FILE}') as im:
    assert im.format == 'PNG' and im.size == (1280, 560)  # loss beside the accuracies
  per_class = results['linear_probe']['per_class_top1']
  assert sorted(per_class, key=int) == [str(c) for c in range(10)]
  # Weighted by each class's share of the test digits, the per-class figures give the top-1.
  _, labels, _ = demo_digits.load('test', 8)
  counts = np.bincount(labels, minlength=10)
  weighted = sum(per_class[str(c)] * counts[c] for c in range(10)) / counts.sum()
  # ~20 float64 roundings of the same counts (~1e-15), under pytest's default rel 1e-6.
  assert weighted == pytest.approx(results['linear_probe']['top1'])


def test_random_encoder_baseline_is_a_different_encoder(results):
  results, _ = results
  rand = results['baseline']['random_encoder']
  assert set(rand) == {'linear_probe', 'knn'}
  # Measured 0.297 against 0.667: ~11 s.e. of their difference apart, not a rounding tie.
  assert rand['knn']['top1'] != results['knn']['top1']
  assert rand['linear_probe']['protocol'] == results['linear_probe']['protocol']


def test_pixel_baseline_matches_logistic_regression_on_the_same_pixels(results):
  results, _ = results
  pixels = results['baseline']['pixels']
  assert pixels['num_train'] == DEMO_TRAIN  # 1437 * 8 * 8 * 3 * 4 bytes: under the cap
  assert pixels['protocol']['mode'] == 'cached' and pixels['protocol']['standardise']
  # Independent: scikit-learn's logistic regression on the flattened eval views.
  cfg = _pretrain_config()
  data = {}
  for split in ('train', 'test'):
    batches = list(host_input.eval_iterator(cfg, split, 64))
    data[split] = (np.concatenate([b['image'][b['mask']] for b in batches]).reshape(-1, 192),
                   np.concatenate([b['label'][b['mask']] for b in batches]))
  reference = linear_model.LogisticRegression(max_iter=5000).fit(*data['train'])
  want = reference.score(*data['test'])  # ~0.96, as on the raw 8x8 digits
  # A fixed data order: the SGD probe measured 0.961 (a float64 numpy rerun agrees), sklearn's
  # LBFGS 0.958. Over 10 data orders SGD gives 0.947 ± 0.009: 0.03 (11 of 360 digits) covers
  # 2 s.d. of that spread, so only a broken probe or other pixels miss it.
  assert pixels['top1'] == pytest.approx(want, abs=0.03)


def test_pixel_baseline_caps_its_train_examples_by_memory(pretrain, mesh):
  config = _eval_config(pretrain[0])
  config.pixels.max_mb = 300 * 8 * 8 * 3 * 4 / 2**20  # room for 300 of the 1437 train digits
  cfg = evaluate.input_config(config, _pretrain_config())
  _, model, _, _ = encoder.restore(pretrain[0], -1, mesh)
  inputs = evaluate.eval_input(config, _pretrain_config(), model, mesh, [])
  capped = evaluate.pixel_baseline(inputs, config.pixels.max_mb)
  # A seeded class-balanced subset of ~300 (per class round(300 / 1437 * count)).
  ids, labels = finetune.label_subset(cfg, 300 / DEMO_TRAIN, cfg.seed)
  assert capped['num_train'] == len(ids) == pytest.approx(300, abs=5)  # 10 classes, each ±0.5
  assert np.bincount(labels).min() >= 25  # smallest class: 135 * 300 / 1437 rounds to 28
  assert capped['protocol']['steps'] == len(ids) * 3 // 64 + 1
  assert capped['top1'] > 0.8  # ~0.89 ± 0.016 over seeds: 0.8 is 5.6 s.e. below


def test_cached_probe_with_standardisation(pretrain, results, tmp_path):
  results, _ = results
  config = _eval_config(pretrain[0], mode='cached', standardise=True)
  config.evaluators = 'linear_probe'
  cached = evaluate.run(config, str(tmp_path))
  assert set(cached) & set(evaluators.REGISTRY) == {'linear_probe'}
  protocol = cached['linear_probe']['protocol']
  assert protocol['mode'] == 'cached' and protocol['standardise']
  assert protocol['augmentation'] == 'none (eval view)' and protocol['views'] == {}
  assert protocol['steps'] == results['linear_probe']['protocol']['steps']
  assert cached['linear_probe']['top1'] > 0.5  # measured 0.656: 6.2 s.e. (0.025) above 0.5


def _sized(image_size):
  cfg = _pretrain_config()
  cfg.data.source, cfg.data.image_size = 'tfds', image_size
  return cfg


def test_presets_follow_the_pretraining_image_size_and_the_demo_has_its_own():
  probe = linear_eval.get_config().probe
  assert probe.mode == 'augmented' and probe.standardise is None and probe.base_lr == 0.1
  small = evaluate.resolve_probe(probe, _sized(32))
  large = evaluate.resolve_probe(probe, _sized(224))
  assert (small.preset, small.epochs, small.batch_size, small.weight_decay,
          small.standardise) == ('cifar', 100.0, 512, 0.0, False)
  assert (large.preset, large.epochs, large.batch_size, large.weight_decay,
          large.standardise) == ('imagenet', 90.0, 4096, 1e-6, False)
  # The bundled digits at 16 px: not the CIFAR preset but the demo's.
  digits = evaluate.resolve_probe(probe, demo.get_config())
  assert (digits.preset, digits.epochs, digits.batch_size, digits.weight_decay,
          digits.standardise) == ('demo', 200.0, 128, 0.0, True)
  probe.batch_size, probe.preset = 256, 'imagenet'  # explicit values win over the preset
  chosen = evaluate.resolve_probe(probe, _sized(32))
  assert (chosen.preset, chosen.epochs, chosen.batch_size) == ('imagenet', 90.0, 256)
  probe.preset = 'tiny'
  with pytest.raises(ConfigError, match='config.probe.preset'):
    evaluate.resolve_probe(probe, _sized(32))


def test_probe_views_follow_the_pretraining_recipe():
  probe = linear_eval.get_config().probe
  # The official recipes pretrain with the official crop + flip: the official probe views.
  for recipe in (cifar10.get_config(), imagenet.get_config()):
    official = evaluate.resolve_probe(probe, recipe)
    assert (official.crop_area, official.flip) == ((0.08, 1.0), True)
  # The demo pretrains without flips, on crops of at least half the image: so is it probed.
  views = evaluate.resolve_probe(probe, demo.get_config())
  assert (views.crop_area, views.flip) == ((0.5, 1.0), False)
  assert linear_probe.protocol(views, 100).views == {
      'crop_area': [0.5, 1.0], 'flip': False,
      'from': {'crop_area': 'pretraining augment.crop_area', 'flip': 'pretraining augment.flip'}}
  probe.crop_area = (0.75, 1.0)  # a value in the evaluation config wins
  views = evaluate.resolve_probe(probe, demo.get_config())
  assert (views.crop_area, views.flip) == ((0.75, 1.0), False)
  assert views.views_from.to_dict() == {'crop_area': 'evaluation config',
                                        'flip': 'pretraining augment.flip'}
  assert linear_probe.protocol(views, 100).augmentation == (
      'random resized crop, area (0.75, 1.0)')


def test_augmented_stream_draws_the_pretraining_views(pretrain, mesh):
  """Pretrained on whole images without flips, the probe's 'augmented' views are the eval view
  itself: every row of the stream is some train example's eval-view feature. With the
  evaluation config's old fixed views (area (0.08, 1), flips) almost no row would be."""
  whole = _pretrain_config()
  whole.augment.crop_area, whole.augment.flip = (1.0, 1.0), False
  config = _eval_config(pretrain[0])
  _, model, _, variables = encoder.restore(pretrain[0], -1, mesh)
  inputs = evaluate.eval_input(config, whole, model, mesh, ['linear_probe'])
  enc = evaluators.Encoder('pretrained', variables, inputs)
  eval_feats, eval_labels = enc.features('train')
  p = linear_probe.protocol(inputs.probe, DEMO_TRAIN)
  probe = evaluators.make('linear_probe', config.probe, inputs)
  feats, labels = next(probe._augmented(enc, p.batch_size))  # pylint: disable=protected-access
  dist = np.linalg.norm(feats[:, None, :] - eval_feats[None, :, :], axis=-1)
  nearest = dist.argmin(1)
  # The same image through the same inference program; only the batch it sits in differs,
  # which may change XLA's float32 summation order: within numerics.FEATURE_RTOL of the
  # feature's norm (≥ 10x ~20 layers' rounding); another image's feature is O(|h|) away.
  scale = np.linalg.norm(feats, axis=-1)
  np.testing.assert_array_less(dist.min(1), numerics.FEATURE_RTOL * scale)
  np.testing.assert_array_equal(labels, eval_labels[nearest])


# --- errors ----------------------------------------------------------------------------------


def test_unset_pretrain_workdir_names_the_key(tmp_path):
  with pytest.raises(ConfigError, match='config.pretrain_workdir'):
    evaluate.run(linear_eval.get_config(), str(tmp_path))


def test_workdir_without_checkpoint(tmp_path):
  pretrain_dir = tmp_path / 'pretrain'
  workdir_lib.write_config(str(pretrain_dir), _pretrain_config())
  with pytest.raises(ConfigError, match='no checkpoint.*config.pretrain_workdir'):
    evaluate.run(_eval_config(str(pretrain_dir)), str(tmp_path / 'eval'))


def test_checkpoint_not_matching_config_names_the_parameter(pretrain, tmp_path):
  copy = tmp_path / 'pretrain'
  shutil.copytree(pretrain[0], copy)
  cfg = _pretrain_config()
  cfg.model.proj_dim = 64  # the checkpoint's projection head outputs 128
  (copy / workdir_lib.CONFIG_FILE).unlink()
  workdir_lib.write_config(str(copy), cfg)
  # Paths are compared in sorted order: the first differing one is the head's last BN mean.
  with pytest.raises(ValueError, match=r'batch_stats/projection/bn2/mean is \(128,\) in the '
                                       r'checkpoint but \(64,\) in the model'):
    evaluate.run(_eval_config(str(copy)), str(tmp_path / 'eval'))


def test_data_without_labels(pretrain, tmp_path):
  config = _eval_config(pretrain[0])
  config.data.num_classes = 0
  with pytest.raises(ConfigError, match='no labels'):
    evaluate.run(config, str(tmp_path))


def test_unlabelled_split_is_rejected():
  with pytest.raises(ConfigError, match="split 'train' has no labels"):
    evaluators.check_labels(np.full((5,), -1, np.int32), 10, 'train')


@pytest.mark.parametrize('key,value', [
    ('feature', 'pooled'), ('probe.mode', 'online'), ('probe.epochs', 0),
    ('eval_batch_size', 0), ('evaluators', 'linear_probe,svm'), ('evaluators', 'knn,knn'),
    ('probe.lr_scaling', 'log'), ('finetune.optimizer', 'adam'), ('pixels.max_mb', 0.0),
    ('finetune.label_fraction', 0.0), ('finetune.from_block', 5)])
def test_bad_config_values_name_the_key(key, value, tmp_path):
  config = _eval_config(str(tmp_path))
  if '.' in key:
    config[key.split('.')[0]][key.split('.')[1]] = value
  else:
    config[key] = value
  with pytest.raises(ConfigError, match=f'config.{key}='):
    evaluate.check_config(config)


def test_features_match_the_saved_model_on_one_device(pretrain, mesh):
  _, model, _, variables = encoder.restore(pretrain[0], -1, mesh)
  outputs, labels = features.extract(
      features.outputs_fn(model, mesh, ('h',)), variables,
      host_input.eval_iterator(_pretrain_config(), 'test', 64), mesh)
  feats = outputs['h']
  assert feats.shape == (DEMO_TEST, 32) and labels.shape == (DEMO_TEST,)
  # Independent check: the first test batch through the model with the saved numpy variables.
  images = next(host_input.eval_iterator(_pretrain_config(), 'test', 64))['image']
  with jax.default_device(jax.devices()[0]):
    expected = jax.jit(lambda v, x: model.apply(v, x, train=False)['h'])(pretrain[1], images)
  # The mesh's program against a one-device jit: other float32 programs, so each row within
  # numerics.FEATURE_RTOL of its own; a row out of place or padding would be O(1) off.
  assert max(numerics.rel_err(a, b) for a, b in zip(feats[:64], expected)) <= (
      numerics.FEATURE_RTOL)
  # The projection output as feature: traced only (its compile would cost seconds).
  z = jax.eval_shape(features.outputs_fn(model, mesh, ('z',)), variables, images)
  assert z['z'].shape == (64, 128)
