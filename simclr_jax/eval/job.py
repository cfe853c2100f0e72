"""The evaluation job: restore a pretraining run's encoder, run the configured evaluators.

Read top to bottom: config → pretraining run (config.json + checkpoint) → mesh, model and the
one inference forward → each evaluator of config.evaluators (the registry of
eval/evaluators.py: linear probe, kNN, fine-tuning, the online probe) on the pretrained encoder
→ with config.baseline the frozen-feature ones on a random encoder, and the linear probe on raw
pixels → results.json, metrics and one summary line. The maths lives in `linear_probe`, `knn`
and `finetune`, inference in `features`.
"""
import json
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from simclr_jax import metrics, parallel
from simclr_jax import workdir as workdir_lib
from simclr_jax.data import host_input
from simclr_jax.errors import ConfigError
from simclr_jax.eval import encoder as encoder_lib
from simclr_jax.eval import evaluators, features, finetune, linear_probe, pictures

RESULTS_FILE = 'results.json'
EMBEDDING_FILE = 'embedding.png'  # t-SNE map of the eval split's features
CURVES_FILE = 'curves.png'  # the pretraining run's loss and accuracies against step
PROBE_MODES = ('augmented', 'cached')
LR_SCALINGS = ('linear', 'sqrt')
# The official code's CIFAR-size rule (tf2/data.py: `if FLAGS.image_size <= 32: test_crop =
# False`): probe.preset='auto' takes probe.presets.cifar at this size or below, else imagenet
# (and probe.presets.demo for the bundled digits: see configs/linear_eval.py).
CIFAR_MAX_SIZE = 32


# --- config ----------------------------------------------------------------------------------


def evaluator_names(config: ml_collections.ConfigDict) -> list[str]:
  """The names in config.evaluators, in order; a ConfigError for an unknown or repeated one."""
  names = [n.strip() for n in str(config.evaluators).split(',') if n.strip()]
  for name in names:
    if name not in evaluators.REGISTRY:
      raise ConfigError(f'config.evaluators={config.evaluators!r}: {name!r} is not one of '
                        f'{sorted(evaluators.REGISTRY)} (comma-separated, e.g. linear_probe,knn).')
  if not names or len(set(names)) != len(names):
    raise ConfigError(f'config.evaluators={config.evaluators!r} must name each evaluator once, '
                      'e.g. linear_probe,knn,finetune.')
  return names


def _positive(values: dict[str, Any]) -> None:
  """ConfigError naming the first key whose value is set and not > 0."""
  for key, value in values.items():
    if value is not None and not value > 0:
      raise ConfigError(f'config.{key}={value} must be > 0.')


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first bad key of the evaluation config."""
  encoder_lib.check_config(config)
  evaluator_names(config)
  choices = {'feature': (config.feature, features.FEATURES),
             'probe.mode': (config.probe.mode, PROBE_MODES),
             'probe.lr_scaling': (config.probe.lr_scaling, LR_SCALINGS),
             'finetune.lr_scaling': (config.finetune.lr_scaling, LR_SCALINGS),
             'finetune.optimizer': (config.finetune.optimizer, finetune.OPTIMIZERS)}
  for key, (value, allowed) in choices.items():
    if value not in allowed:
      raise ConfigError(f'config.{key}={value!r} is not one of {allowed}.')
  p, ft = config.probe, config.finetune
  _positive({'eval_batch_size': config.eval_batch_size, 'knn.k': config.knn.k,
             'knn.temperature': config.knn.temperature, 'probe.epochs': p.epochs,
             'probe.batch_size': p.batch_size, 'probe.base_lr': p.base_lr,
             'finetune.epochs': ft.epochs, 'finetune.batch_size': ft.batch_size,
             'finetune.base_lr': ft.base_lr, 'pixels.max_mb': config.pixels.max_mb})
  for key, value in {'probe.weight_decay': p.weight_decay,
                     'finetune.weight_decay': ft.weight_decay,
                     'finetune.warmup_epochs': ft.warmup_epochs}.items():
    if value is not None and value < 0:
      raise ConfigError(f'config.{key}={value} must be >= 0.')
  if not 0.0 < ft.label_fraction <= 1.0:
    raise ConfigError(f'config.finetune.label_fraction={ft.label_fraction} must be in (0, 1].')
  if not 0 <= ft.from_block <= finetune.NUM_STAGES:
    raise ConfigError(f'config.finetune.from_block={ft.from_block} must be in '
                      f'[0, {finetune.NUM_STAGES}] (0: whole network, k: stage k onward).')


def resolve_probe(probe: ml_collections.ConfigDict,
                  pretrain_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.probe with its unset keys (None) from probe.presets[preset] ('auto': 'demo' for the
  demo source, else by the pretraining image size) and its views from the pretraining run
  (linear_probe.resolve_views)."""
  name = probe.preset
  if name == 'auto':
    if pretrain_config.data.source == 'demo':
      name = 'demo'
    else:
      name = 'cifar' if pretrain_config.data.image_size <= CIFAR_MAX_SIZE else 'imagenet'
  if name not in probe.presets:
    raise ConfigError(f'config.probe.preset={probe.preset!r}: there is no config.probe.presets.'
                      f'{name}; use auto or one of {sorted(probe.presets)}.')
  resolved = linear_probe.resolve_views(probe, pretrain_config.augment)
  resolved.preset = name
  for key, value in probe.presets[name].items():
    if resolved[key] is None:
      resolved[key] = value
  return resolved


def input_config(config: ml_collections.ConfigDict,
                 pretrain_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What the evaluation's input reads: the pretraining config with the eval job's seed and its
  non-None data overrides applied."""
  merged = ml_collections.ConfigDict(pretrain_config.to_dict())
  merged.seed = config.seed
  for key, value in config.data.items():
    if value is not None:
      merged.data[key] = value
  return merged


def entry(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config entry of evaluator `name` in the evaluation config (probe, knn, finetune)."""
  sections = {'linear_probe': 'probe', 'knn': 'knn', 'finetune': 'finetune'}
  return config[sections[name]] if name in sections else ml_collections.ConfigDict()


def eval_input(config: ml_collections.ConfigDict, pretrain_config: ml_collections.ConfigDict,
               model: Any, mesh: Mesh, names: list[str]) -> evaluators.EvalInput:
  """What the job's evaluators read: the host input's padded eval views of the pretraining data
  (with the job's overrides) and the one forward computing what `names` read."""
  cfg = input_config(config, pretrain_config)
  batch = int(config.eval_batch_size)
  # The feature always: the pictures read it whatever the evaluators are.
  outputs = tuple(sorted({config.feature, *evaluators.output_names(names, config.feature)}))
  predict = features.outputs_fn(model, mesh, outputs)
  return evaluators.EvalInput(
      mesh, predict, lambda split, ids: host_input.eval_iterator(cfg, split, batch, indices=ids),
      cfg.data.train_split, cfg.data.eval_split, int(cfg.data.num_classes), int(config.seed),
      feature=config.feature, strict_labels=True,
      split_labels=lambda split: host_input.split_labels(cfg, split, read=False),
      class_names=list(cfg.data.get('classes', ())) or None, input_config=cfg,
      pretrain_config=pretrain_config, pretrain_workdir=str(config.pretrain_workdir),
      probe=resolve_probe(config.probe, pretrain_config), eval_batch_size=batch)


def pixel_baseline(inputs: evaluators.EvalInput, max_mb: float) -> dict[str, Any]:
  """The linear probe (cached, standardised) on flattened eval-view pixels.

  The train examples are capped by `max_mb` (config.pixels.max_mb) of float32 pixels: beyond
  that, a seeded class-balanced subset of the train split; the test split is streamed whole.
  """
  cfg, mesh = inputs.input_config, inputs.mesh
  size = cfg.data.image_size
  n = host_input.num_examples(cfg)
  cap = max(1, int(max_mb * 2**20 // (size * size * 3 * 4)))
  ids = finetune.label_subset(cfg, cap / n, cfg.seed)[0] if n > cap else None
  flat = features.make_predict_fn(lambda _, x: x.reshape(x.shape[0], -1), mesh)
  pixels, labels = features.extract(flat, {}, inputs.batches(inputs.train_split, ids), mesh)
  evaluators.check_labels(labels, inputs.num_classes, inputs.train_split)
  probe = ml_collections.ConfigDict(inputs.probe.to_dict())
  probe.standardise = True  # raw pixels are not centred; the textbook baseline standardises
  p = linear_probe.protocol(probe, len(labels), mode='cached')
  params = linear_probe.train_cached(pixels, labels, inputs.num_classes, p, cfg.seed)
  logits_fn = features.make_predict_fn(
      lambda v, x: linear_probe.predict_linear_probe(v, x.reshape(x.shape[0], -1)), mesh)
  logits, test_labels = features.extract(logits_fn, params,
                                         inputs.batches(inputs.eval_split, None), mesh)
  return {**features.topk_accuracy(logits, test_labels), 'num_train': int(len(labels)),
          'protocol': p.as_dict()}


# --- the job -------------------------------------------------------------------------------------


def _pictures(workdir: str, config: ml_collections.ConfigDict, pretrained: evaluators.Encoder,
              rand: evaluators.Encoder | None) -> None:
  """EVAL_WORKDIR/embedding.png (t-SNE of eval-split features, the random encoder's beside it)
  and curves.png (the pretraining run's metrics.jsonl); a missing metrics file is a warning."""
  inputs = pretrained.inputs
  feats, labels = pretrained.features(inputs.eval_split)
  baseline = rand.features(inputs.eval_split)[0] if rand is not None else None
  out = epath.Path(workdir)
  pictures.embedding_map(str(out / EMBEDDING_FILE), feats, labels, inputs.class_names, baseline,
                         seed=config.seed)
  try:
    rows = metrics.read_metrics(config.pretrain_workdir)
  except FileNotFoundError:
    rows = []
  if rows:
    pictures.training_curves(str(out / CURVES_FILE), rows)
  else:
    logging.warning('No %s in %s: no %s.', metrics.METRICS_FILE, config.pretrain_workdir,
                    CURVES_FILE)
  logging.info('Pictures: %s', ', '.join(str(out / f) for f in (EMBEDDING_FILE, CURVES_FILE)
                                        if (out / f).exists()))


def summary_line(results: dict[str, Any]) -> str:
  """One console line, e.g. 'linear probe top-1 0.912 top-5 0.998 (augmented, ...) | kNN ...'."""
  parts = []
  if 'linear_probe' in results:
    r = results['linear_probe']
    parts.append(f"linear probe top-1 {r['top1']:.3f} top-5 {r['top5']:.3f} "
                 f"({r['protocol']['mode']}, {r['protocol']['steps']} steps)")
  if 'knn' in results:
    parts.append(f"kNN top-1 {results['knn']['top1']:.3f}")
  if 'online_probe' in results:
    parts.append(f"online probe top-1 {results['online_probe']['top1']:.3f}")
  if 'finetune' in results:
    r = results['finetune']
    parts.append(f"fine-tune ({r['label_fraction'] * 100:g}% of {r['data']['dataset']}) "
                 f"top-1 {r['top1']:.3f}")
  if 'baseline' in results:
    rand, pixels = results['baseline']['random_encoder'], results['baseline']['pixels']
    names = {'linear_probe': 'probe', 'knn': 'kNN'}
    random_part = ' '.join(f'{names[k]} {rand[k]["top1"]:.3f}' for k in names if k in rand)
    parts.append(f'baselines: random encoder {random_part}, raw-pixel probe '
                 f"{pixels['top1']:.3f}")
  return ' | '.join(parts)


def scalars(results: dict[str, Any], prefix: str = 'linear_eval') -> dict[str, float]:
  """Every top-k figure of `results` as {'linear_eval/<evaluator>/top1': value, ...}."""
  out = {}
  for key, value in results.items():
    if isinstance(value, dict) and key not in ('protocol', 'data'):
      out.update(scalars(value, f'{prefix}/{key}'))
    elif key.startswith('top') and isinstance(value, float):
      out[f'{prefix}/{key}'] = value
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the pretraining run config.pretrain_workdir; writes WORKDIR/results.json."""
  check_config(config)
  names = evaluator_names(config)
  workdir_lib.ensure_writable(workdir)
  start = time.time()
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')

  # Checked before any restore or compile: unlabelled data is a config error, found fast.
  pretrain_config = workdir_lib.read_config(config.pretrain_workdir)
  cfg = input_config(config, pretrain_config)
  if not cfg.data.num_classes or cfg.data.num_classes < 1:
    raise ConfigError(
        f'config.data.num_classes={cfg.data.num_classes}: the data set has no labels, so there '
        'is nothing for the linear probe to predict; evaluate on a labelled data set or set '
        'config.data.num_classes.')
  probe = resolve_probe(config.probe, pretrain_config)
  if 'linear_probe' in names and probe.mode == 'augmented':
    parallel.check_batch_size(probe.batch_size, mesh, 'probe.batch_size')
  if 'finetune' in names:
    parallel.check_batch_size(config.finetune.batch_size, mesh, 'finetune.batch_size')

  _, model, step, variables = encoder_lib.restore(config.pretrain_workdir,
                                                  config.checkpoint_step, mesh)
  logging.info('Evaluating %s at step %d: %s (feature %s).', config.pretrain_workdir, step,
               ', '.join(names), config.feature)
  # One jitted forward for every evaluator and encoder: the random baseline reuses it.
  inputs = eval_input(config, pretrain_config, model, mesh, names)
  built = {name: evaluators.make(name, entry(config, name), inputs) for name in names}

  pretrained = evaluators.Encoder('pretrained', variables, inputs)
  results = {name: built[name].run(pretrained) for name in names}
  if config.baseline:
    rand = evaluators.Encoder(
        'random', encoder_lib.random_init(model, pretrain_config, config.seed, mesh), inputs)
    results['baseline'] = {
        'random_encoder': {name: built[name].run(rand)
                           for name in names if name in evaluators.BASELINE},
        'pixels': pixel_baseline(inputs, config.pixels.max_mb)}
  train_split, eval_split = cfg.data.train_split, cfg.data.eval_split
  results.update(
      checkpoint_step=int(step), pretrain_workdir=str(config.pretrain_workdir),
      feature=config.feature, train_split=train_split, eval_split=eval_split,
      num_train=host_input.num_examples(cfg), num_test=host_input.num_examples(cfg, eval_split),
      seconds=time.time() - start)

  if jax.process_index() == 0:
    path = epath.Path(workdir) / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + '\n')
    if config.pictures:
      _pictures(workdir, config, pretrained, rand if config.baseline else None)
  writer = metrics.MetricWriter(workdir)
  writer.write(step, scalars(results))
  writer.close()
  if jax.process_index() == 0:
    logging.info('%s (%d train / %d test examples, step %d; %s)', summary_line(results),
                 results['num_train'], results['num_test'], step,
                 epath.Path(workdir) / RESULTS_FILE)
  return results
