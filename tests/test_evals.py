"""config.evals: the evaluator registry run on the live train state during pretraining.

The figures are checked against an independent computation: the model applied with plain
`model.apply` to the eval views (views_jax.eval_views) of the examples the evaluation reads,
then numpy accuracies and kNN; the schedule against the intervals the config names.
"""
import jax
import numpy as np
import pytest

from configs import demo
from simclr_jax import parallel
from simclr_jax.data import train_input, views_jax
from simclr_jax.errors import ConfigError
from simclr_jax.eval import during_pretraining, features, knn
from simclr_jax.models import simclr


def _config(**evals):
  c = demo.get_config()
  c.data.augment_on = 'device'  # the demo on the mesh: no TensorFlow
  c.model.width = 1 / 16
  c.eval_batch_size = 128
  c.evals.knn.max_train = 200  # a sample of the 1,437 train digits, each class its share
  c.evals.knn.k = 20
  for key, value in evals.items():
    name, field = key.split('__')
    c.evals[name][field] = value
  return c


@pytest.fixture(scope='module')
def live(devices):
  """(config, DuringPretraining, model, variables, data) on one device, random-initialised."""
  config = _config()
  mesh = parallel.make_mesh(devices[:1])
  data = train_input.make(config, mesh)
  model = simclr.from_config(config.model, config.data.num_classes)
  size = config.data.image_size
  variables = jax.jit(lambda k: model.init(k, np.zeros((2, size, size, 3), np.float32),
                                           train=False))(jax.random.key(0, impl='rbg'))
  return (config, during_pretraining.DuringPretraining(config, mesh, model, data), model,
          variables, data)


def test_each_evaluator_runs_at_its_own_interval_and_at_the_end(live):
  config, _, model, _, data = live
  config = _config(knn__every_steps=3, online_probe__every_steps=2)
  mesh = parallel.make_mesh(jax.devices()[:1])
  evals = during_pretraining.DuringPretraining(config, mesh, model, data)
  due = {step: sorted(evals.due(step, 7)) for step in range(1, 8)}
  assert due == {1: [], 2: ['online_probe'], 3: ['knn'], 4: ['online_probe'], 5: [],
                 6: ['knn', 'online_probe'], 7: ['knn', 'online_probe']}
  never = during_pretraining.DuringPretraining(_config(knn__every_steps=0), mesh, model, data)
  assert never.due(1000, 1000) == ['online_probe']  # knn every 0 steps: never


def test_figures_equal_an_independent_computation(live):
  config, evals, model, variables, data = live
  figures = evals.run(['online_probe', 'knn'], variables['params'], variables['batch_stats'])
  assert set(figures) == {'eval/probe_top1', 'eval/probe_top5', 'eval/knn_top1',
                          'eval/knn_top5'}
  # The same encoder through plain model.apply, one batch, on the eval views of the split.
  def h_and_logits(split, ids=None):
    arrays = data._read(split)  # pylint: disable=protected-access  (the split's uint8 images)
    rows = np.arange(len(arrays.ids)) if ids is None else np.searchsorted(arrays.ids, ids)
    views = views_jax.eval_views(arrays.images[rows], config.data.image_size)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, views)
    return np.asarray(out['h']), np.asarray(out['probe_logits']), arrays.labels[rows]
  test_h, test_logits, test_labels = h_and_logits(config.data.eval_split)
  memory_ids = evals._evaluators['knn'].memory_ids  # pylint: disable=protected-access
  memory_h, _, memory_labels = h_and_logits(config.data.train_split, memory_ids)
  assert len(memory_ids) == pytest.approx(200, abs=5)  # 10 classes, each rounded
  # Two float32 programs (a batch of 128 on the mesh, all 360 at once here): features agree to
  # numerics' FEATURE_RTOL, so a prediction can flip only where two classes tie that closely.
  # One digit in 360 (0.003) allows such a tie; a wrong split, memory or padding row is far more.
  probe = features.topk_accuracy(test_logits, test_labels)
  vote = knn.knn_accuracy(memory_h, memory_labels, test_h, test_labels, 10, k=20,
                          temperature=config.evals.knn.temperature)
  for key, want in [('eval/probe_top1', probe['top1']), ('eval/probe_top5', probe['top5']),
                    ('eval/knn_top1', vote['top1']), ('eval/knn_top5', vote['top5'])]:
    assert figures[key] == pytest.approx(want, abs=1 / 360 + 1e-9), key


@pytest.mark.parametrize('key,value,match', [
    ('linear_probe', {'every_steps': 10}, r'config\.evals\.linear_probe: only'),
    ('knn', {'every_steps': -1}, r'config\.evals\.knn\.every_steps=-1'),
    ('knn', {'every_steps': 2.5}, r'config\.evals\.knn\.every_steps=2\.5')])
def test_bad_entries_name_the_key(key, value, match):
  config = _config()
  config.evals[key] = value
  with pytest.raises(ConfigError, match=match):
    during_pretraining.check_config(config)


def test_eval_batch_size_must_split_over_the_devices():
  config = _config()
  config.eval_batch_size = 12
  with pytest.raises(ConfigError, match=r'config\.eval_batch_size=12'):
    during_pretraining.check_config(config, num_devices=8)
