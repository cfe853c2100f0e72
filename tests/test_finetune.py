"""Fine-tuning in the evaluation job, on the tiny pretraining workdir of test_evaluate."""
import json

import jax
import numpy as np
import pytest

from configs import linear_eval
from simclr_jax.eval import finetune
from simclr_jax.eval import job as evaluate
from simclr_jax.data import host_input
from test_evaluate import _eval_config, _pretrain_config, mesh, pretrain  # noqa: F401 (fixtures)

DEMO_TRAIN = 1797 - 360


def _ft_config(pretrain_workdir, **ft):
  c = _eval_config(pretrain_workdir)
  c.finetune.enabled = True
  c.finetune.epochs = 3
  c.finetune.batch_size = 128
  c.finetune.learning_rate = 0.2
  c.finetune.crop_area = (0.64, 1.0)
  c.finetune.update(ft)
  return c


def _data_cfg(config):
  return evaluate.data_config(config, _pretrain_config())


def test_label_subset_is_class_balanced_and_what_the_pipeline_yields(pretrain):
  cfg = _data_cfg(_ft_config(pretrain[0]))
  ids, labels = finetune.label_subset(cfg, 0.1, seed=0)
  # Independent count: train labels from the eval pipeline, per class round-half-up(0.1 n), >= 1.
  all_labels = np.concatenate([b['label'][b['mask']]
                               for b in host_input.eval_iterator(cfg, 'train', 64)])
  counts = np.bincount(all_labels, minlength=10)
  expected = np.maximum(1, np.floor(0.1 * counts + 0.5)).astype(int)
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), expected)
  assert len(np.unique(ids)) == len(ids) == expected.sum()
  np.testing.assert_array_equal(finetune.label_subset(cfg, 0.1, seed=0)[0], ids)  # fixed
  assert not np.array_equal(finetune.label_subset(cfg, 0.1, seed=1)[0], ids)  # seeded
  # The fine-tune pipeline restricted to the subset yields exactly those examples, once each.
  batches = list(host_input.probe_train_iterator(cfg, 64, epoch=0, indices=ids, shuffle=True))
  assert len(batches) == -(-len(ids) // 64)
  got = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(np.bincount(got, minlength=10), expected)


def test_from_block_3_freezes_stem_stage1_stage2_bit_exactly(pretrain, mesh):  # noqa: F811
  workdir, saved = pretrain
  config = _ft_config(workdir, from_block=3, label_fraction=0.1, epochs=2)
  cfg = _data_cfg(config)
  _, _, _, variables = evaluate.restore_encoder(workdir, -1, mesh)
  results, tuned = finetune.finetune(variables, cfg.model, cfg, config.finetune, mesh, 64)
  assert results['from_block'] == 3 and results['label_fraction'] == 0.1
  assert results['num_train_examples'] == len(finetune.label_subset(cfg, 0.1, 0)[0])
  before = {'params': saved['params']['encoder'], 'batch_stats': saved['batch_stats']['encoder']}
  for col in ('params', 'batch_stats'):
    assert set(tuned[col]) == set(before[col])
    for part in before[col]:
      same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b),
                          tuned[col][part], before[col][part])
      if part.startswith(('stem', 'stage1', 'stage2')):
        assert all(jax.tree.leaves(same)), (col, part)  # frozen: bit-identical
      else:
        assert not any(jax.tree.leaves(same)), (col, part)  # trained: every leaf moved
  assert np.any(np.asarray(tuned[finetune.HEAD]['kernel']) != 0)


def test_run_fine_tunes_the_whole_network_on_all_labels(pretrain, tmp_path):
  config = _ft_config(pretrain[0], from_block=0, label_fraction=1.0, epochs=3)
  config.probe.epochs = 1
  config.knn.k = 5
  results = evaluate.run(config, str(tmp_path))
  with open(tmp_path / evaluate.RESULTS_FILE) as f:
    ft = json.load(f)['finetune']
  assert set(ft) == {'top1', 'top5', 'label_fraction', 'num_train_examples', 'from_block'}
  assert ft['num_train_examples'] == DEMO_TRAIN and ft['from_block'] == 0
  assert ft['label_fraction'] == 1.0
  # Chance is 0.1 (s.e. 0.016 on 360 test digits); 3 epochs reach ~0.59.
  assert ft['top1'] > 0.4 and ft['top5'] >= ft['top1']
  assert 'fine-tune (100%) top-1' in evaluate.summary_line(results)


def test_disabled_by_default_and_bad_values_name_the_key(tmp_path):
  config = _ft_config(str(tmp_path))
  assert not linear_eval.get_config().finetune.enabled
  for key, value in (('label_fraction', 0.0), ('from_block', 5), ('epochs', 0)):
    bad = _ft_config(str(tmp_path), **{key: value})
    with pytest.raises(ValueError, match=f'config.finetune.{key}='):
      evaluate.check_config(bad)
  evaluate.check_config(config)
