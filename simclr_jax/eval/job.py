"""The linear-evaluation job: linear probe + kNN on the frozen encoder of a pretraining run.

Read top to bottom: config → pretraining run (config.json + checkpoint) → mesh and model →
features → probe (cached or augmented) and kNN → the same on a random encoder → outputs.
The maths lives in `features`, `linear_probe`, `knn` and `finetune`; this module wires it to
checkpoints, data and outputs.
"""
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from simclr_jax import checkpoint, parallel
from simclr_jax.eval import features, finetune, knn, linear_probe
from simclr_jax import metrics
from simclr_jax.data import host_input
from simclr_jax.models import simclr

RESULTS_FILE = 'results.json'
FEATURES = ('h', 'z')
PROBE_MODES = ('cached', 'augmented')


# --- config ----------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first bad key of the linear-eval config."""
  if not config.pretrain_workdir:
    raise ValueError('config.pretrain_workdir is not set; pass '
                     '--config.pretrain_workdir=DIR, the --workdir of the pretraining run.')
  if config.feature not in FEATURES:
    raise ValueError(f'config.feature={config.feature!r} is not one of {FEATURES}.')
  if config.probe.mode not in PROBE_MODES:
    raise ValueError(f'config.probe.mode={config.probe.mode!r} is not one of {PROBE_MODES}.')
  positive = {'probe.epochs': config.probe.epochs, 'probe.batch_size': config.probe.batch_size,
              'eval_batch_size': config.eval_batch_size, 'knn.k': config.knn.k}
  for key, value in positive.items():
    if value < 1:
      raise ValueError(f'config.{key}={value} must be >= 1.')
  ft = config.get('finetune')
  if ft is not None and ft.enabled:
    if not 0.0 < ft.label_fraction <= 1.0:
      raise ValueError(f'config.finetune.label_fraction={ft.label_fraction} must be in (0, 1].')
    if not 0 <= ft.from_block <= finetune.NUM_STAGES:
      raise ValueError(f'config.finetune.from_block={ft.from_block} must be in '
                       f'[0, {finetune.NUM_STAGES}] (0: whole network, k: stage k onward).')
    for key in ('epochs', 'batch_size'):
      if ft[key] < 1:
        raise ValueError(f'config.finetune.{key}={ft[key]} must be >= 1.')


def data_config(config: ml_collections.ConfigDict,
                pretrain_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The pretraining config with the eval job's seed and its non-None data overrides applied."""
  merged = ml_collections.ConfigDict(pretrain_config.to_dict())
  merged.seed = config.seed
  for key, value in config.data.items():
    if value is not None:
      merged.data[key] = value
  return merged


# --- pretrained encoder ----------------------------------------------------------------------


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/encoder/conv/kernel': shape, ...} of a pytree of arrays or ShapeDtypeStructs."""
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_variables_match(restored: Any, expected: Any, pretrain_workdir: str) -> None:
  """Raises a ValueError naming the first parameter path whose presence or shape differs."""
  got, want = _flat_shapes(restored), _flat_shapes(expected)
  for path in sorted(set(got) | set(want)):
    if got.get(path) != want.get(path):
      show = lambda s: 'absent' if s is None else str(s)  # noqa: E731
      raise ValueError(
          f'the checkpoint in {pretrain_workdir} does not match the model rebuilt from its '
          f'{checkpoint.CONFIG_FILE}: {path} is {show(got.get(path))} in the checkpoint but '
          f'{show(want.get(path))} in the model (was config.json edited, or the checkpoint '
          'copied from another run?).')


def build_model(pretrain_config: ml_collections.ConfigDict) -> simclr.SimCLR:
  """The pretraining model exactly (incl. its online probe head, so the checkpoint tree matches)."""
  return simclr.from_config(pretrain_config.model, pretrain_config.data.num_classes)


def _input_shape(pretrain_config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """[H, W, C] of the model input (init only; the encoder pools, so any size runs)."""
  size = pretrain_config.data.image_size
  return (size, size, 3)


def restore_encoder(pretrain_workdir: str, checkpoint_step: int, mesh: Mesh
                    ) -> tuple[ml_collections.ConfigDict, simclr.SimCLR, int, Any]:
  """(pretraining config, model, step, {'params', 'batch_stats'} replicated on `mesh`)."""
  pretrain_config = checkpoint.read_config(pretrain_workdir)
  model = build_model(pretrain_config)
  step, variables = checkpoint.restore_variables(
      pretrain_workdir, None if checkpoint_step < 0 else checkpoint_step)
  # eval_shape: the expected tree without running (or compiling) the initialiser.
  expected = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *_input_shape(pretrain_config))), train=False))
  check_variables_match(variables, expected, pretrain_workdir)
  return pretrain_config, model, step, parallel.replicate(variables, mesh)


def random_encoder(model: simclr.SimCLR, pretrain_config: ml_collections.ConfigDict, seed: int,
                   mesh: Mesh) -> Any:
  """Seeded random initialisation of the same architecture (BN statistics at their init 0/1)."""
  # Initialised on one device (compiles far faster than SPMD over the mesh), then replicated.
  # An 'rbg' key: same initialiser distributions, but XLA:CPU compiles the init ~5x faster
  # than with threefry (seconds instead of half a minute for a ResNet-18).
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, *_input_shape(pretrain_config))),
                                        train=False))
  variables = init(jax.random.key(seed, impl='rbg'))
  # Via host numpy, as the restored variables: a committed single-device array cannot be
  # placed on a multi-process mesh, and every process computes the same seeded values.
  return parallel.replicate(jax.tree.map(np.asarray, variables), mesh)


# --- features ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def make_feature_fn(model: simclr.SimCLR, mesh: Mesh, feature: str) -> features.FeatureFn:
  """Jitted inference-mode forward returning `feature` ('h' or 'z'), batch sharded on "data"."""
  if feature == 'h':
    return features.make_feature_fn(model, mesh)

  def forward(variables: Any, images: jax.Array) -> jax.Array:
    return model.apply(variables, images, train=False)[feature].astype(jnp.float32)

  return jax.jit(forward,
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.batch_sharded(mesh))


def _check_labels(labels: np.ndarray, num_classes: int, split: str) -> None:
  """The probe needs labels in [0, num_classes): a clear error for unlabelled data."""
  if not len(labels) or np.all(labels < 0):
    raise ValueError(f'split {split!r} has no labels (every label is -1); the linear probe '
                     'and kNN need a labelled data set (set config.data.train_split / '
                     'config.data.eval_split to labelled splits).')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'split {split!r} has labels in [{labels.min()}, {labels.max()}], outside '
                     f'[0, config.data.num_classes={num_classes}).')


# --- linear probe ------------------------------------------------------------------------------


def _train_probe_augmented(feature_fn: features.FeatureFn, variables: Any,
                           cfg: ml_collections.ConfigDict, probe: ml_collections.ConfigDict,
                           num_classes: int, mesh: Mesh, eval_batch_size: int
                           ) -> dict[str, jax.Array]:
  """The official path: each epoch, features of fresh crop+flip views, then one probe epoch.

  Same optimiser, schedule, shuffles and zero-initialised head as `train_linear_probe`; the
  standardisation statistics are those of epoch 0's features, fixed afterwards so the head
  sees one input scale for the whole schedule.
  """
  trainable = stats = opt_state = epoch_fn = None
  key = jax.random.key(cfg.seed)
  for e in range(probe.epochs):
    feats, labels = features.extract_features(
        feature_fn, variables,
        host_input.probe_train_iterator(cfg, eval_batch_size, epoch=e,
                                      crop_area=tuple(probe.crop_area), flip=probe.flip),
        mesh)
    if epoch_fn is None:
      _check_labels(labels, num_classes, cfg.data.train_split)
      n, dim = feats.shape
      batch_size = min(probe.batch_size, n)
      # linear_probe's cached epoch function: the same jitted epoch as the cached path.
      epoch_fn, tx = linear_probe.probe_epoch_fn(
          n // batch_size, batch_size, probe.epochs, float(probe.learning_rate),
          float(probe.momentum), bool(probe.nesterov), float(probe.weight_decay))
      stats = {'mean': jnp.mean(feats, axis=0), 'var': jnp.var(feats, axis=0)}
      trainable = {'kernel': jnp.zeros((dim, num_classes), jnp.float32),
                   'bias': jnp.zeros((num_classes,), jnp.float32)}
      opt_state = tx.init(trainable)
    trainable, opt_state = epoch_fn(trainable, opt_state, stats, jnp.asarray(feats),
                                    jnp.asarray(labels), jax.random.fold_in(key, e))
  return {**stats, **trainable}


def evaluate_encoder(feature_fn: features.FeatureFn, variables: Any,
                     cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                     mesh: Mesh) -> dict[str, Any]:
  """Probe top-1/top-5 and kNN top-1/top-5 of one encoder on cfg.data.eval_split."""
  num_classes = cfg.data.num_classes
  data = cfg.data
  train_feats, train_labels = features.extract_features(
      feature_fn, variables, host_input.eval_iterator(cfg, data.train_split,
                                                    config.eval_batch_size), mesh)
  test_feats, test_labels = features.extract_features(
      feature_fn, variables, host_input.eval_iterator(cfg, data.eval_split,
                                                    config.eval_batch_size), mesh)
  _check_labels(train_labels, num_classes, data.train_split)
  _check_labels(test_labels, num_classes, data.eval_split)
  p = config.probe
  if p.mode == 'cached':
    params = linear_probe.train_linear_probe(
        train_feats, train_labels, num_classes, epochs=p.epochs, batch_size=p.batch_size,
        learning_rate=p.learning_rate, momentum=p.momentum, nesterov=p.nesterov,
        weight_decay=p.weight_decay, seed=config.seed)
  else:
    params = _train_probe_augmented(feature_fn, variables, cfg, p, num_classes, mesh,
                                    config.eval_batch_size)
  probe = features.topk_accuracy(linear_probe.predict_linear_probe(params, test_feats),
                                 test_labels)
  knn = knn.knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes,
                              k=config.knn.k, temperature=config.knn.temperature)
  return {'top1': probe['top1'], 'top5': probe['top5'], 'knn_top1': knn['top1'],
          'knn_top5': knn['top5'], 'num_train': int(len(train_labels)),
          'num_test': int(len(test_labels))}


# --- the job -------------------------------------------------------------------------------------


def summary_line(results: dict[str, Any]) -> str:
  """The one-line console summary, e.g. 'linear probe top-1 0.912 top-5 0.998 | kNN top-1 0.89'."""
  line = (f"linear probe top-1 {results['top1']:.3f} top-5 {results['top5']:.3f} | "
          f"kNN top-1 {results['knn_top1']:.3f}")
  if 'baseline' in results:
    b = results['baseline']
    line += f" | random-encoder baseline: probe {b['top1']:.3f} kNN {b['knn_top1']:.3f}"
  if 'finetune' in results:
    f = results['finetune']
    line += f" | fine-tune ({f['label_fraction'] * 100:g}%) top-1 {f['top1']:.3f}"
  return line


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the pretraining run config.pretrain_workdir; writes WORKDIR/results.json."""
  check_config(config)
  checkpoint.ensure_writable(workdir)
  start = time.time()
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  if config.finetune.enabled:
    parallel.check_batch_size(config.finetune.batch_size, mesh, 'finetune.batch_size')

  # Checked before any restore or compile: unlabelled data is a config error, found fast.
  pretrain_config = checkpoint.read_config(config.pretrain_workdir)
  cfg = data_config(config, pretrain_config)
  if not cfg.data.num_classes or cfg.data.num_classes < 1:
    raise ValueError(
        f'config.data.num_classes={cfg.data.num_classes}: the data set has no labels, so there '
        'is nothing for the linear probe to predict; evaluate on a labelled data set or set '
        'config.data.num_classes.')

  _, model, step, variables = restore_encoder(config.pretrain_workdir, config.checkpoint_step,
                                              mesh)
  logging.info('Evaluating %s at step %d (feature %s, probe %s).', config.pretrain_workdir,
               step, config.feature, config.probe.mode)
  # One jitted forward for both encoders: the baseline reuses its compilation.
  feature_fn = make_feature_fn(model, mesh, config.feature)
  results = {**evaluate_encoder(feature_fn, variables, cfg, config, mesh),
             'checkpoint_step': int(step), 'pretrain_workdir': str(config.pretrain_workdir),
             'feature': config.feature, 'probe_mode': config.probe.mode}
  if config.baseline:
    baseline = random_encoder(model, pretrain_config, config.seed, mesh)
    results['baseline'] = evaluate_encoder(feature_fn, baseline, cfg, config, mesh)
  if config.finetune.enabled:
    results['finetune'], _ = finetune.finetune(variables, pretrain_config.model, cfg,
                                               config.finetune, mesh, config.eval_batch_size)
  results['seconds'] = time.time() - start

  if jax.process_index() == 0:
    path = epath.Path(workdir) / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + '\n')
  writer = metrics.MetricWriter(workdir)
  scalars = {f'linear_eval/{k}': results[k] for k in ('top1', 'top5', 'knn_top1', 'knn_top5')}
  if 'baseline' in results:
    scalars.update({f'linear_eval/baseline_{k}': results['baseline'][k]
                    for k in ('top1', 'top5', 'knn_top1', 'knn_top5')})
  if 'finetune' in results:
    scalars.update({f'linear_eval/finetune_{k}': results['finetune'][k] for k in ('top1', 'top5')})
  writer.write(step, scalars)
  writer.close()
  if jax.process_index() == 0:
    logging.info('%s (%d train / %d test examples, step %d; %s)', summary_line(results),
                 results['num_train'], results['num_test'], step,
                 epath.Path(workdir) / RESULTS_FILE)
  return results
