"""The evaluator registry: one way to evaluate an encoder, during pretraining and after it.

An evaluator is built once from its config entry and the `EvalInput` it reads (`make(name,
entry, inputs)`), then `run(encoder)` returns its named figures for one `Encoder`: variables (a
live train state's or a restored checkpoint's) whose eval-view outputs are extracted once per
split and shared by every evaluator of that round. The pretraining loop runs the entries of
`config.evals` every so many steps (eval/during_pretraining.py); the evaluation job runs those
of `config.evaluators` once (eval/job.py).

  online_probe  top-1/top-5 of the online linear probe trained alongside pretraining
  knn           weighted kNN (InstDisc) on the feature, memory from the train split
  linear_probe  the official linear evaluation (eval/linear_probe.py); evaluation job only
  finetune      SimCLRv2 fine-tuning (eval/finetune.py); evaluation job only
"""
import dataclasses
import itertools
from typing import Any, Callable, Iterable, Protocol

import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from simclr_jax.errors import ConfigError
from simclr_jax.eval import features, knn, subsets

# (split, example ids or None for all) -> this process's padded eval batches {'image', 'label',
# 'index', 'mask'} (see parallel.num_padded_batches).
Batches = Callable[[str, np.ndarray | None], Iterable[dict[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class EvalInput:
  """What evaluators read: the splits, their padded batches and the one inference forward."""
  mesh: Mesh
  predict_fn: features.PredictFn  # (variables, images) -> {output name: [b, ...]}
  batches: Batches
  train_split: str
  eval_split: str
  num_classes: int
  seed: int
  feature: str = 'h'  # the output kNN and the linear probe read: 'h' or 'z'
  # (ids, labels) of a whole split, or None where that means reading a shuffled TFDS split.
  split_labels: Callable[[str], tuple[np.ndarray, np.ndarray] | None] = lambda split: None
  # True (evaluation job): a split without labels in [0, num_classes) is a ConfigError.
  # False (during pretraining): unlabelled rows are left out, e.g. STL-10's unlabelled part.
  strict_labels: bool = True
  class_names: list[str] | None = None  # a folder source's classes (labels are positions)
  # Evaluation job only: the config its host input reads (pretraining config + overrides), the
  # pretraining run's config and workdir, the resolved probe, and the forward's global batch.
  input_config: ml_collections.ConfigDict | None = None
  pretrain_config: ml_collections.ConfigDict | None = None
  pretrain_workdir: str = ''
  probe: ml_collections.ConfigDict | None = None
  eval_batch_size: int = 256


def check_labels(labels: np.ndarray, num_classes: int, split: str) -> None:
  """The probe and kNN need labels in [0, num_classes): a ConfigError for unlabelled data."""
  if not len(labels) or np.all(labels < 0):
    raise ConfigError(f'split {split!r} has no labels (every label is -1); the linear probe '
                      'and kNN need a labelled data set (set config.data.train_split / '
                      'config.data.eval_split to labelled splits).')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ConfigError(f'split {split!r} has labels in [{labels.min()}, {labels.max()}], outside '
                      f'[0, config.data.num_classes={num_classes}).')


@dataclasses.dataclass
class Encoder:
  """One encoder under evaluation; each (split, examples) is extracted once and shared."""
  name: str  # 'pretrained' | 'random' | 'step <n>'
  variables: Any  # {'params', 'batch_stats'} of the SimCLR model
  inputs: EvalInput
  _outputs: dict[Any, tuple[dict[str, np.ndarray], np.ndarray]] = dataclasses.field(
      default_factory=dict)

  def outputs(self, split: str, ids: np.ndarray | None = None, limit: int = 0
              ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({output: [n, ...]}, labels [n]) of `split`'s eval views: the examples `ids` (None: all),
    or with `limit` > 0 only the first `limit` rows (a TFDS split stored shuffled)."""
    key = (split, None if ids is None else np.asarray(ids).tobytes(), limit)
    if key not in self._outputs:
      inputs = self.inputs
      batches = inputs.batches(split, ids)
      if limit > 0:
        batches = itertools.islice(batches, -(-limit // inputs.eval_batch_size))
      out, labels = features.extract(inputs.predict_fn, self.variables, batches, inputs.mesh)
      if inputs.strict_labels:
        check_labels(labels, inputs.num_classes, split)
      self._outputs[key] = out, labels
    return self._outputs[key]

  def features(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs.feature [n, d], labels [n]) of every example of `split` (eval view, each once)."""
    out, labels = self.outputs(split)
    return out[self.inputs.feature], labels


class Evaluator(Protocol):
  """Built from its config entry and an EvalInput; `run` gives its figures for one encoder."""
  # The model outputs it reads ('feature': EvalInput.feature); the forward computes their union.
  OUTPUTS: tuple[str, ...]

  def run(self, encoder: Encoder) -> dict[str, Any]:
    ...


class OnlineProbe:
  """Top-1/top-5 of the online linear probe (trained alongside pretraining) on the eval split."""
  OUTPUTS = ('probe_logits',)

  def __init__(self, entry: ml_collections.ConfigDict, inputs: EvalInput):
    del entry  # nothing to set: the probe is part of the pretrained model
    if not inputs.num_classes:
      raise ConfigError('the online_probe evaluator needs the online probe, which is trained '
                        'only when config.data.num_classes > 0; remove online_probe from the '
                        'evaluators or pretrain with labels.')
    self._split = inputs.eval_split

  def run(self, encoder: Encoder) -> dict[str, Any]:
    out, labels = encoder.outputs(self._split)
    labelled = labels >= 0
    if not labelled.any():
      logging.warning('eval split %r has no labels: no online-probe figures.', self._split)
      return {}
    return features.topk_accuracy(out['probe_logits'][labelled], labels[labelled])


class Knn:
  """Weighted kNN top-1/top-5 on the eval split, with a train-split memory.

  Entry: k, temperature, max_train. max_train 0 takes every train example as memory (the
  evaluation job); max_train > 0 a fixed, seeded sample of that many labelled examples with each
  class in its share of the split (subsets.knn_memory), the same at every evaluation. Never
  "the first N": an image folder lists its files class by class. The one exception is a TFDS
  split stored in a shuffled order, whose labels would cost a read of the whole split and whose
  first examples already are a random sample of it.
  """
  OUTPUTS = ('feature',)

  def __init__(self, entry: ml_collections.ConfigDict, inputs: EvalInput):
    self.k, self.temperature = int(entry.k), float(entry.temperature)
    if self.k < 1 or not self.temperature > 0:
      raise ConfigError(f'kNN k={entry.k} and temperature={entry.temperature} must be > 0.')
    self._inputs, self._max = inputs, int(entry.get('max_train', 0))
    self.memory_ids, self._limit = None, 0
    if self._max > 0:
      known = inputs.split_labels(inputs.train_split)
      if known is None:
        self._limit = self._max
      else:
        self.memory_ids = subsets.knn_memory(*known, self._max, inputs.seed)
        logging.info('kNN memory: %d of the %d labelled %s examples (seeded, per class).',
                     len(self.memory_ids), int((known[1] >= 0).sum()), inputs.train_split)

  def run(self, encoder: Encoder) -> dict[str, Any]:
    inputs, name = self._inputs, self._inputs.feature
    test, test_labels = encoder.outputs(inputs.eval_split)
    labelled = test_labels >= 0
    if (self.memory_ids is not None and not len(self.memory_ids)) or not labelled.any():
      return {}
    memory, memory_labels = encoder.outputs(inputs.train_split, self.memory_ids, self._limit)
    keep = memory_labels >= 0  # e.g. the unlabelled part of STL-10's train+unlabelled
    if not keep.any():
      return {}
    num_classes = inputs.num_classes or int(max(test_labels.max(), memory_labels.max())) + 1
    acc = knn.knn_accuracy(memory[name][keep], memory_labels[keep], test[name][labelled],
                           test_labels[labelled], num_classes, k=self.k,
                           temperature=self.temperature)
    return {**acc, 'k': self.k, 'temperature': self.temperature,
            'memory_size': int(keep.sum())}


class LinearProbe:
  """The linear probe on frozen features (eval/linear_probe.py), with its protocol."""
  OUTPUTS = ('feature',)

  def __init__(self, entry: ml_collections.ConfigDict, inputs: EvalInput):
    if inputs.input_config is None:
      raise ConfigError('linear_probe runs in the evaluation job (configs/linear_eval.py), not '
                        'during pretraining; use online_probe or knn in config.evals.')
    del entry  # the job resolved config.probe into inputs.probe (presets, views)
    self._inputs = inputs

  def _augmented(self, encoder: Encoder, batch_size: int) -> Iterable[tuple[Any, Any]]:
    """Endless (features, labels) of fresh crop (+ flip) views through the frozen encoder."""
    from simclr_jax.data import host_input  # pylint: disable=g-import-not-at-top  (TensorFlow)
    inputs = self._inputs
    for batch in host_input.probe_train_iterator(inputs.input_config, batch_size,
                                                 crop_area=tuple(inputs.probe.crop_area),
                                                 flip=bool(inputs.probe.flip)):
      check_labels(batch['label'], inputs.num_classes, inputs.train_split)
      batch = {**batch, 'mask': np.ones(batch['label'].shape, bool)}
      out, labels = features.extract(inputs.predict_fn, encoder.variables, [batch], inputs.mesh)
      yield out[inputs.feature], labels

  def run(self, encoder: Encoder) -> dict[str, Any]:
    from simclr_jax.data import host_input  # pylint: disable=g-import-not-at-top  (TensorFlow)
    from simclr_jax.eval import linear_probe  # pylint: disable=g-import-not-at-top
    inputs = self._inputs
    test_feats, test_labels = encoder.features(inputs.eval_split)
    p = linear_probe.protocol(inputs.probe, host_input.num_examples(inputs.input_config))
    if p.mode == 'cached':
      train_feats, train_labels = encoder.features(inputs.train_split)
      params = linear_probe.train_cached(train_feats, train_labels, inputs.num_classes, p,
                                         inputs.seed)
    else:
      # Standardisation statistics, when asked for, are the eval-view train features'.
      stats = (linear_probe.standardisation(encoder.features(inputs.train_split)[0])
               if p.standardise else None)
      params = linear_probe.train_streamed(self._augmented(encoder, p.batch_size),
                                           test_feats.shape[1], inputs.num_classes, p, stats)
    logits = linear_probe.predict_linear_probe(params, test_feats)
    return {**features.topk_accuracy(logits, test_labels), 'protocol': p.as_dict(),
            'per_class_top1': features.per_class_accuracy(logits, test_labels,
                                                          inputs.class_names)}


class Finetune:
  """Top-1/top-5 after SimCLRv2 fine-tuning (config.finetune); the weights are not kept."""
  OUTPUTS = ()  # it trains its own network from the variables

  def __init__(self, entry: ml_collections.ConfigDict, inputs: EvalInput):
    if inputs.input_config is None:
      raise ConfigError('finetune runs in the evaluation job (configs/linear_eval.py), not '
                        'during pretraining; use online_probe or knn in config.evals.')
    self._entry, self._inputs = entry, inputs

  def run(self, encoder: Encoder) -> dict[str, Any]:
    from simclr_jax.eval import finetune  # pylint: disable=g-import-not-at-top  (TensorFlow)
    inputs = self._inputs
    results, _ = finetune.finetune(encoder.variables, inputs.pretrain_config,
                                   inputs.input_config, self._entry, inputs.mesh,
                                   inputs.eval_batch_size, inputs.pretrain_workdir)
    return results


REGISTRY: dict[str, Callable[[ml_collections.ConfigDict, EvalInput], Evaluator]] = {
    'online_probe': OnlineProbe, 'knn': Knn, 'linear_probe': LinearProbe, 'finetune': Finetune}
# What a pretraining run can evaluate on its live state: no second training inside the loop.
DURING_PRETRAINING = ('online_probe', 'knn')
# A random encoder is judged with the frozen-feature evaluators only.
BASELINE = ('linear_probe', 'knn')


def make(name: str, entry: ml_collections.ConfigDict, inputs: EvalInput) -> Evaluator:
  """The evaluator `name` of REGISTRY built from its config entry; a ConfigError if unknown."""
  if name not in REGISTRY:
    raise ConfigError(f'evaluator {name!r} is not one of {sorted(REGISTRY)}.')
  return REGISTRY[name](entry, inputs)


def output_names(names: Iterable[str], feature: str) -> tuple[str, ...]:
  """The model outputs the evaluators `names` read, for the one forward that serves them all."""
  wanted = set()
  for name in names:
    wanted.update(feature if o == 'feature' else o for o in REGISTRY[name].OUTPUTS)
  return tuple(sorted(wanted))
