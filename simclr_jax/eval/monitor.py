"""Evaluation during pretraining: the curve that says a run is learning.

Every `config.train.eval_every_steps` steps and at the end, the pretraining job asks `Monitor`
for two figures on the eval split, both on the encoder as it is (BN in inference mode):
  eval/probe_top1  the online linear probe (trained alongside, on stop_gradient(h)),
  eval/knn_top1    weighted kNN (k, temperature of config.monitor) on h; its memory is a fixed,
                   seeded sample of config.monitor.knn_max_train labelled train examples
                   whose class histogram follows the split's (subsets.knn_memory; all of them
                   when they fit), the same at every evaluation. Not "the first N": an image
                   folder lists its files class by class. The one exception is a TFDS split
                   stored in a shuffled order (TFDS shuffles when it writes a data set), where
                   the labels would cost a read of the whole split and the first examples
                   already are a random sample of it.
It reuses the evaluation package's one inference forward (features) and kNN (knn); the input
comes from the pretraining input's seam, so views are made where the train views are.
"""
import itertools
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from simclr_jax.data import train_input
from simclr_jax.errors import ConfigError
from simclr_jax.eval import features, knn, subsets


class Monitor:
  """Computes {'eval/probe_top1', 'eval/knn_top1', ...} of a train state on the eval split."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, model: nn.Module,
               data: train_input.TrainInput):
    self._cfg, self._mesh, self._data = config.monitor, mesh, data
    self._splits = config.data.train_split, config.data.eval_split
    self._probe = bool(config.data.num_classes)
    self._num_classes = config.data.num_classes
    outputs = features.model_outputs(model, ('h', 'probe_logits') if self._probe else ('h',))
    prepare = data.eval_prepare
    self._predict = features.make_predict_fn(
        lambda v, x: outputs(v, x if prepare is None else prepare(x)), mesh)
    self._batch = int(config.monitor.batch_size)
    if self._batch % jax.process_count() or self._batch % mesh.size:
      raise ConfigError(f'config.monitor.batch_size={self._batch} must be a multiple of the '
                        f'device count ({mesh.size}).')
    self._max = int(config.monitor.knn_max_train)
    known = data.split_labels(self._splits[0])
    # None: a TFDS split stored in a shuffled order (its first examples are a random sample),
    # whose labels would cost a read of the whole split.
    self.memory_ids = (None if known is None else
                       subsets.knn_memory(*known, self._max, int(config.seed)))
    if self.memory_ids is not None:
      logging.info('kNN monitor memory: %d of the %d labelled %s examples (seeded, per class).',
                   len(self.memory_ids), int((known[1] >= 0).sum()), self._splits[0])

  def _extract(self, variables: Any, split: str, ids: Any = None, max_examples: int = 0
               ) -> tuple[Any, Any]:
    batches = self._data.eval_batches(split, self._batch, ids)
    if max_examples > 0:  # the first rows of a split stored in a shuffled order
      batches = itertools.islice(batches, -(-max_examples // self._batch))
    return features.extract(self._predict, variables, batches, self._mesh)

  def run(self, params: Any, batch_stats: Any) -> dict[str, float]:
    """The figures of the encoder (and online probe) with these parameters and BN statistics."""
    variables = {'params': params, 'batch_stats': batch_stats}
    train_split, eval_split = self._splits
    test, test_labels = self._extract(variables, eval_split)
    figures = {}
    labelled = test_labels >= 0
    if not labelled.any():
      logging.warning('config.data.eval_split=%r has no labels: no evaluation figures.',
                      eval_split)
      return figures
    if self._probe:
      acc = features.topk_accuracy(test['probe_logits'][labelled], test_labels[labelled])
      figures['eval/probe_top1'] = acc['top1']
    if self.memory_ids is None or len(self.memory_ids):
      memory, memory_labels = self._extract(
          variables, train_split, self.memory_ids,
          self._max if self.memory_ids is None else 0)
      keep = memory_labels >= 0  # e.g. the unlabelled part of STL-10's train+unlabelled
      if keep.any():
        num_classes = self._num_classes or int(max(test_labels.max(),
                                                   memory_labels.max())) + 1
        acc = knn.knn_accuracy(memory['h'][keep], memory_labels[keep], test['h'][labelled],
                               test_labels[labelled], num_classes, k=self._cfg.knn_k,
                               temperature=self._cfg.knn_temperature)
        figures['eval/knn_top1'] = acc['top1']
    return {k: float(v) for k, v in figures.items()}


def summary(figures: dict[str, float]) -> str:
  """The figures for the progress line, e.g. 'eval: probe 0.812 kNN 0.790'."""
  names = {'eval/probe_top1': 'probe', 'eval/knn_top1': 'kNN'}
  return 'eval: ' + ' '.join(f'{names[k]} {v:.3f}' for k, v in figures.items() if k in names)
