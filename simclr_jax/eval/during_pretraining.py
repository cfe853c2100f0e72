"""Evaluation during pretraining: the entries of config.evals, run on the live train state.

config.evals maps an evaluator of the registry (eval/evaluators.py: online_probe and knn can
run inside the loop) to its entry: `every_steps` (0: never) and the evaluator's own keys. At a
step where any is due, and at the last step, the due evaluators run on the encoder as it is (BN
in inference mode) and share one forward over the eval split; kNN adds its memory of train
examples. Their top-1/top-5 go to metrics.jsonl as eval/probe_top1, eval/knn_top1, ... The
input comes from the pretraining input's seam, so eval views are made where the train views are.
"""
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from simclr_jax.errors import ConfigError
from simclr_jax.eval import evaluators, features

# Metric names of each evaluator's figures: eval/<name>_top1 (curves.png and the README use them).
METRIC_NAMES = {'online_probe': 'probe', 'knn': 'knn'}


def check_config(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """ConfigError naming the first config.evals entry (or eval_batch_size) that cannot run."""
  for name, entry in config.evals.items():
    if name not in evaluators.DURING_PRETRAINING:
      raise ConfigError(
          f'config.evals.{name}: only {list(evaluators.DURING_PRETRAINING)} run during '
          'pretraining; run the others with the evaluation job (configs/linear_eval.py).')
    if not isinstance(entry.get('every_steps'), int) or entry.every_steps < 0:
      raise ConfigError(f'config.evals.{name}.every_steps={entry.get("every_steps")!r} must be '
                        'an integer >= 0 (0: never).')
  batch = config.eval_batch_size
  if batch < 1 or batch % num_devices or batch % jax.process_count():
    raise ConfigError(f'config.eval_batch_size={batch} must be a positive multiple of the '
                      f'device count ({num_devices}).')


class DuringPretraining:
  """The evaluators of config.evals, built once; `due(step)` and `run(...)` in the loop."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, model: nn.Module,
               data: Any):
    check_config(config, mesh.size)
    entries = {name: entry for name, entry in config.evals.items() if entry.every_steps > 0}
    if not config.data.num_classes and 'online_probe' in entries:
      del entries['online_probe']  # no labels, so no probe was trained: nothing to read
    self._every = {name: int(entry.every_steps) for name, entry in entries.items()}
    batch = int(config.eval_batch_size)
    predict = features.outputs_fn(model, mesh, evaluators.output_names(entries, 'h'),
                                  data.eval_prepare)
    self._inputs = evaluators.EvalInput(
        mesh, predict, lambda split, ids: data.eval_batches(split, batch, ids),
        config.data.train_split, config.data.eval_split, int(config.data.num_classes),
        int(config.seed), feature='h', split_labels=data.split_labels, strict_labels=False,
        eval_batch_size=batch)
    self._evaluators = {name: evaluators.make(name, entry, self._inputs)
                        for name, entry in entries.items()}

  def due(self, step: int, num_steps: int) -> list[str]:
    """The evaluators to run after `step`: those whose interval divides it, all at the end."""
    return [name for name, every in self._every.items()
            if step % every == 0 or step == num_steps]

  def run(self, names: list[str], params: Any, batch_stats: Any) -> dict[str, float]:
    """{'eval/<metric>_top1': ..., ...} of evaluators `names` on these parameters."""
    encoder = evaluators.Encoder('live', {'params': params, 'batch_stats': batch_stats},
                                 self._inputs)
    figures = {}
    for name in names:
      results = self._evaluators[name].run(encoder)
      if not results:
        logging.warning('config.evals.%s gave no figures (no labelled eval examples or '
                        'memory).', name)
      figures.update({f'eval/{METRIC_NAMES[name]}_{k}': float(v) for k, v in results.items()
                      if k in ('top1', 'top5')})
    return figures


def summary(figures: dict[str, float]) -> str:
  """The figures for the progress line, e.g. 'eval: probe 0.812 kNN 0.790'."""
  names = {'eval/probe_top1': 'probe', 'eval/knn_top1': 'kNN'}
  return 'eval: ' + ' '.join(f'{name} {figures[k]:.3f}' for k, name in names.items()
                             if k in figures)
