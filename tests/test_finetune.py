"""Fine-tuning (official SimCLRv2 recipe) on the tiny pretraining workdir of test_eval_job."""
import json

import jax
import numpy as np
import pytest

import numerics
from configs import linear_eval
from simclr_jax import optim
from simclr_jax.data import host_input
from simclr_jax.errors import ConfigError
from simclr_jax.eval import encoder, evaluators, finetune
from simclr_jax.eval import job as evaluate
from simclr_jax.models import simclr
from test_eval_job import _eval_config, _pretrain_config, mesh, pretrain  # noqa: F401 (fixtures)

DEMO_TRAIN = 1797 - 360


def _ft_config(pretrain_workdir, **ft):
  c = _eval_config(pretrain_workdir)
  c.evaluators = 'finetune'
  c.finetune.epochs = 2.0
  c.finetune.batch_size = 64  # = eval_batch_size
  c.finetune.crop_area = (0.64, 1.0)
  c.finetune.update(ft)
  return c


def _data_cfg(config):
  return evaluate.input_config(config, _pretrain_config())


def test_defaults_are_the_official_semi_supervised_command():
  # README: --fine_tune_after_block=-1 --zero_init_logits_layer=True --global_bn=True
  # --optimizer=lars --learning_rate=0.005 --learning_rate_scaling=sqrt --weight_decay=0
  # --train_epochs=60 --train_batch_size=1024 --warmup_epochs=0 --ft_proj_selector=1
  ft = linear_eval.get_config().finetune
  assert (ft.from_block, ft.optimizer, ft.base_lr, ft.lr_scaling, ft.weight_decay) == (
      0, 'lars', 0.005, 'sqrt', 0.0)
  assert (ft.epochs, ft.batch_size, ft.warmup_epochs, ft.proj_selector) == (60.0, 1024, 0.0, 1)
  assert (ft.momentum, ft.trust_coefficient) == (0.9, 1e-3)  # official flag defaults
  # 0.005 * sqrt(1024) = 0.005 * 32: a power-of-two scaling, exact in binary.
  assert optim.scaled_learning_rate(ft.base_lr, ft.batch_size, ft.lr_scaling) == 0.16
  assert 'finetune' not in linear_eval.get_config().evaluators


def test_finetune_data_set_and_splits_override_the_pretraining_ones():
  cfg = _data_cfg(_eval_config('unused'))
  ft = linear_eval.get_config().finetune
  assert finetune.with_finetune_data(cfg, ft).data.to_dict() == cfg.data.to_dict()
  ft.dataset, ft.eval_split = 'imagenet2012_subset/1pct', 'validation'
  data = finetune.with_finetune_data(cfg, ft).data
  assert (data.source, data.name, data.train_split, data.eval_split) == (
      'tfds', 'imagenet2012_subset/1pct', 'train', 'validation')


def test_label_subset_is_class_balanced_and_what_the_stream_yields(pretrain):
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
  # The fine-tuning stream restricted to the subset: exactly those examples in every epoch.
  it = host_input.probe_train_iterator(cfg, 16, indices=ids, process_index=0, process_count=1)
  rows = np.concatenate([next(it)['index'] for _ in range(-(-2 * len(ids) // 16))])
  for e in range(2):
    np.testing.assert_array_equal(np.sort(rows[e * len(ids):(e + 1) * len(ids)]), ids)


def test_projection_head_upto_returns_layer_k_with_the_same_names():
  head = simclr.ProjectionHead(num_layers=3, hidden_dim=6, out_dim=4)
  rng = np.random.default_rng(0)
  h = rng.normal(size=(5, 6)).astype(np.float32)

  def fill(path, leaf):
    # Away from init (BN mean 0, var 1, scale 1, bias 0), where a missing BN would change the
    # output by 5e-6 relative; He-normal kernels keep the dense output O(1).
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(0, np.sqrt(2 / leaf.shape[0]), leaf.shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.5, leaf.shape).astype(np.float32)  # BN bias and mean

  full = jax.tree_util.tree_map_with_path(fill, head.init(jax.random.key(0), h, train=False))
  one = jax.eval_shape(lambda: head.init(jax.random.key(0), h, train=False, upto=1))
  assert set(one['params']) == {'dense0', 'bn0'} and set(one['batch_stats']) == {'bn0'}
  sub = {c: {k: full[c][k] for k in one[c]} for c in ('params', 'batch_stats')}
  got = np.asarray(head.apply(sub, h, train=False, upto=1), np.float64)
  # Official hiddens_list[1]: dense (no bias) → BN (inference) → ReLU, in float64.
  p, s = numerics.to_float64(full['params']), numerics.to_float64(full['batch_stats'])
  kernel, mean, bias = p['dense0']['kernel'], s['bn0']['mean'], p['bn0']['bias']
  mul = p['bn0']['scale'] / np.sqrt(s['bn0']['var'] + 1e-5)
  want = np.maximum((h.astype(np.float64) @ kernel - mean) * mul + bias, 0)
  # float32 against float64, element by element: the 6-term dense is within 3 eps of |h|·|W|,
  # BN adds ≤ 5 roundings; ≤ 6 eps in all of the magnitudes it combines. A missing or misread
  # BN statistic moves the output by O(1).
  size = np.abs(mul) * (np.abs(h) @ np.abs(kernel) + np.abs(mean)) + np.abs(bias)
  np.testing.assert_array_less(np.abs(got - want), 8 * numerics.EPS32 * size)
  # The same ops on the same inputs: bit for bit.
  np.testing.assert_array_equal(head.apply(full, h, train=False, upto=0), h)
  np.testing.assert_array_equal(head.apply(full, h, train=False, upto=3),
                                head.apply(full, h, train=False))
  with pytest.raises(ValueError, match='upto=4'):
    head.apply(full, h, train=False, upto=4)


def test_proj_selector_range_names_the_key():
  model = _pretrain_config().model
  assert model.num_proj_layers == 3
  ft = linear_eval.get_config().finetune
  for value, want in ((0, 0), (3, 3), (-1, 3)):
    ft.proj_selector = value
    assert finetune.proj_selector(ft, model) == want
  ft.proj_selector = 4
  with pytest.raises(ConfigError, match='config.finetune.proj_selector=4'):
    finetune.proj_selector(ft, model)


def _lars_reference(params, grads, lrs, wd, momentum=0.9, eeta=1e-3):
  """Official tf2/lars_optimizer.py (classic momentum) with build_optimizer's exclusions.

  exclude_from_weight_decay=['batch_normalization', 'bias', 'head_supervised'] also excludes
  those from the trust ratio; add_weight_decay puts wd * l2_loss of the head's kernel into the
  loss. Names here: 'scale'/'bias' leaves are BN or bias, the top-level 'probe' is the head.
  """
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  accum = {k: np.zeros_like(v) for k, v in params.items()}
  for g, lr in zip(grads, lrs):
    for name, w in params.items():
      grad = np.asarray(g[name], np.float64)
      head, leaf = name.startswith('probe/'), name.split('/')[-1]
      excluded = head or leaf in ('scale', 'bias')
      if head and leaf == 'kernel':
        grad = grad + wd * w  # add_weight_decay's LARS branch
      trust = 1.0
      if not excluded:
        grad = grad + wd * w
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(grad)
        trust = eeta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
      accum[name] = momentum * accum[name] + lr * trust * grad
      params[name] = w - accum[name]
  return params


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _unflat(flat):
  tree = {}
  for name, leaf in flat.items():
    *parents, last = name.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return tree


def test_lars_setting_is_optims_lars_as_official():
  ft = linear_eval.get_config().finetune
  # wd 0.1 exercises every mask: LARS's decay of the kernels then moves them 19x the bound below.
  ft.weight_decay, ft.batch_size, ft.warmup_epochs = 0.1, 256, 1.0
  rng = np.random.default_rng(0)
  flat = {'encoder/stem_conv/kernel': rng.normal(size=(3, 3, 3, 4)),
          'encoder/stem_bn/scale': rng.normal(size=(4,)),
          'encoder/stem_bn/bias': rng.normal(size=(4,)),
          'projection/dense0/kernel': rng.normal(size=(4, 4)),
          'projection/bn0/scale': rng.normal(size=(4,)),
          'probe/kernel': rng.normal(size=(4, 3)), 'probe/bias': rng.normal(size=(3,))}
  flat = {k: v.astype(np.float32) for k, v in flat.items()}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in flat.items()}
           for _ in range(4)]
  tx, schedule = finetune.make_optimizer(ft, num_examples=1024, num_steps=10)
  params, state = _unflat(flat), tx.init(_unflat(flat))
  for g in grads:
    updates, state = tx.update(_unflat(g), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  # lr: sqrt scaling 0.005 * sqrt(256) = 0.08, a 4-step warm-up (1 epoch of 1024 / 256), cosine.
  lrs = [float(schedule(t)) for t in range(4)]
  # Step 0 of the warm-up is exactly 0; step 2 is a few float32 roundings (≤ 3 eps) from 0.04,
  # under pytest's default rel 1e-6.
  assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.08 * 2 / 4)
  want = _lars_reference(flat, grads, lrs, wd=0.1)
  for name, value in _flat(params).items():
    # float32 against float64: 4 steps of ≤ 2 roundings of O(|w|) values (the trust ratio's
    # own error scales an update 1e-3 of |w|); dropping LARS's decay moves a kernel 19-21x this.
    scale = max(np.abs(flat[name]).max(), np.abs(want[name]).max())
    np.testing.assert_allclose(value, want[name], rtol=0, atol=8 * numerics.EPS32 * scale,
                               err_msg=name)


def test_momentum_setting_decays_every_non_bn_variable():
  ft = linear_eval.get_config().finetune
  ft.optimizer, ft.weight_decay, ft.base_lr, ft.lr_scaling = 'momentum', 0.1, 0.5, 'linear'
  params = _unflat({'encoder/conv/kernel': np.ones((2, 2), np.float32),
                    'encoder/bn/scale': np.ones((2,), np.float32),
                    'probe/kernel': np.ones((2, 3), np.float32),
                    'probe/bias': np.ones((3,), np.float32)})
  tx, _ = finetune.make_optimizer(ft, num_examples=1024, num_steps=10)
  zero = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # First Keras Nesterov step on grad = wd * w: -(1 + m) * lr * wd * w, lr = 0.5 * 1024 / 256.
  step = -(1 + 0.9) * 2.0 * 0.1
  got = _flat(updates)
  for name in ('encoder/conv/kernel', 'probe/kernel', 'probe/bias'):
    # ≤ 4 float32 roundings of O(1) numbers: ≤ 2 eps = 2.4e-7 relative.
    np.testing.assert_allclose(got[name], step, rtol=1e-6, err_msg=name)
  np.testing.assert_array_equal(got['encoder/bn/scale'], 0.0)  # no decay: a zero gradient


@pytest.fixture(scope='module')
def tuned(pretrain, mesh):  # noqa: F811
  """finetune() from stage 3 through projection layer 1 on 10% of the labels."""
  workdir = pretrain[0]
  config = _ft_config(workdir, from_block=3, proj_selector=1, label_fraction=0.1)
  cfg = _data_cfg(config)
  _, _, _, variables = encoder.restore(workdir, -1, mesh)
  return finetune.finetune(variables, _pretrain_config(), cfg, config.finetune, mesh, 64,
                           workdir)


def test_from_block_3_and_proj_selector_1_train_exactly_what_they_say(tuned, pretrain):
  results, tuned = tuned
  saved = pretrain[1]
  params, stats = tuned['params'], tuned['batch_stats']
  assert set(params) == {'encoder', 'projection', finetune.HEAD}
  # Projection layer 1 only, restored under its pretraining names, then trained.
  assert set(params['projection']) == {'dense0', 'bn0'} and set(stats['projection']) == {'bn0'}
  before = {'params': {'encoder': saved['params']['encoder'],
                       'projection': saved['params']['projection']},
            'batch_stats': {'encoder': saved['batch_stats']['encoder'],
                            'projection': saved['batch_stats']['projection']}}
  for col in ('params', 'batch_stats'):
    assert set(tuned[col]['encoder']) == set(before[col]['encoder'])
    for module in ('encoder', 'projection'):
      for part, value in tuned[col][module].items():
        same = jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b),
                                            value, before[col][module][part]))
        if module == 'encoder' and part.startswith(('stem', 'stage1', 'stage2')):
          assert all(same), (col, part)  # frozen: bit-identical
        else:
          assert not any(same), (col, module, part)  # trained: every leaf moved
  assert np.any(np.asarray(params[finetune.HEAD]['kernel']) != 0)  # from zero
  n = len(finetune.label_subset(_data_cfg(_eval_config('unused')), 0.1, 0)[0])
  assert results['num_train_examples'] == n and results['label_fraction'] == 0.1
  assert results['num_test'] == 360 and 0.0 <= results['top1'] <= results['top5'] <= 1.0
  # learning_rate: 0.005 * sqrt(64) = 0.005 * 8 in float64 on both sides (approx's rel 1e-6).
  assert results['protocol'] == {
      **results['protocol'], 'optimizer': 'lars', 'steps': n * 2 // 64 + 1,
      'learning_rate': pytest.approx(0.005 * 8), 'from_block': 3, 'proj_selector': 1,
      'batch_size': 64, 'weight_decay': 0.0, 'warmup_epochs': 0.0,
      # The crop area is the evaluation config's; the flip, left unset, the pretraining run's.
      'views': {'crop_area': [0.64, 1.0], 'flip': True,
                'from': {'crop_area': 'evaluation config', 'flip': 'pretraining augment.flip'}}}


def test_run_fine_tunes_the_whole_network_on_all_labels(pretrain, tmp_path):
  config = _ft_config(pretrain[0], from_block=0, proj_selector=0, optimizer='momentum',
                      base_lr=0.8, lr_scaling='linear', epochs=3.0)
  results = evaluate.run(config, str(tmp_path))
  with open(tmp_path / evaluate.RESULTS_FILE) as f:
    ft = json.load(f)['finetune']
  assert set(results) & set(evaluators.REGISTRY) == {'finetune'}
  assert ft['num_train_examples'] == DEMO_TRAIN and ft['label_fraction'] == 1.0
  assert ft['data'] == {'dataset': 'demo', 'train_split': 'train', 'eval_split': 'test'}
  assert ft['protocol']['steps'] == DEMO_TRAIN * 3 // 64 + 1
  # Measured 0.703; chance is 0.1 (s.e. 0.016 on 360 test digits). 0.4 is 12 s.e. (0.024)
  # below the measured figure and 19 s.e. above chance.
  assert ft['top1'] > 0.4 and ft['top5'] >= ft['top1']
  assert 'fine-tune (100% of demo) top-1' in evaluate.summary_line(results)
