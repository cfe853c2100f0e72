"""`python -m simclr_jax.bench end_to_end`: a short real pretraining run against the step alone.

Runs `pretrain.run` (real input pipeline, device prefetch, logging, checkpoint at the end) for
--steps steps in a temporary workdir, logging every --log_every steps. Images/s comes from the
metrics.jsonl rows after the first log, so the first interval (compilation, pipeline start-up)
is excluded. Then the `step` benchmark (synthetic views already on the devices) runs on the same
config and batch; end_to_end / step is the fraction of the step's throughput the whole job keeps,
so input stalls and host overheads show as the gap below 1. host_cpu_s_per_1000_images is the
process's CPU time (every thread) over the same steady steps: on a CPU backend it includes the
computation, on an accelerator it is what the host spends on input and dispatch. The step benchmark blocks on every
step while the training loop syncs only at log steps, so with small steps (dispatch-bound, e.g.
emulated CPU devices) the ratio can exceed 1: compare it at realistic step times.

Flags shared with `step`: --config (default here configs/demo.py), --batch, --steps, --warmup,
--out_dir; `--config.key=value` overrides apply to both runs.
"""
import tempfile
from typing import Any

from absl import app, flags, logging

from simclr_jax import metrics
from simclr_jax import parallel, pretrain
from simclr_jax.bench import common, step

_LOG_EVERY = flags.DEFINE_integer('log_every', None, 'Log interval of the end-to-end run '
                                  '(default: steps // 3); at least two intervals are needed.')
FLAGS = flags.FLAGS


def steady_throughput(rows: list[dict[str, Any]], global_batch: int) -> dict[str, float]:
  """Images/s and step time over the logged intervals after the first one (compilation)."""
  if len(rows) < 2:
    raise ValueError(f'need at least two logged steps to exclude compilation, got {len(rows)}; '
                     'raise --steps or lower --log_every')
  steps = seconds = cpu_seconds = 0.0
  for prev, row in zip(rows, rows[1:]):
    n = row['step'] - prev['step']
    steps += n
    seconds += n * row['step_time']
    cpu_seconds += n * row['host_cpu_per_step']
  return {'steady_steps': int(steps), 'steady_seconds': seconds,
          'step_s_mean': seconds / steps, 'images_per_s': global_batch * steps / seconds,
          'host_cpu_s_per_1000_images': 1000 * cpu_seconds / (global_batch * steps),
          'first_interval_step_s': rows[0]['step_time']}


def benchmark(config, batch: int, steps: int, log_every: int, warmup: int) -> dict[str, Any]:
  """Runs the short pretraining and the step benchmark on `config`; returns both and the ratio."""
  config = config.copy_and_resolve_references()
  config.train.batch_size = batch
  config.train.steps = steps
  config.train.log_every_steps = log_every
  config.train.checkpoint_every_steps = steps + 1  # only the final save, after the loop
  with tempfile.TemporaryDirectory() as workdir:
    last = pretrain.run(config, workdir)
    rows = metrics.read_metrics(workdir)
  e2e = steady_throughput(rows, batch)
  alone = step.benchmark(config, batch, steps, warmup)
  return {
      'global_batch': batch, 'devices': alone['devices'], 'image_size': config.data.image_size,
      'depth': config.model.depth, 'width': config.model.width, 'source': config.data.source,
      'train_steps': steps, 'log_every': log_every,
      'augment_on': config.data.get('augment_on', 'host'),
      'end_to_end_images_per_s': e2e['images_per_s'], 'end_to_end_step_s': e2e['step_s_mean'],
      'host_cpu_s_per_1000_images': e2e['host_cpu_s_per_1000_images'],
      'end_to_end_steady_steps': e2e['steady_steps'],
      'end_to_end_first_interval_step_s': e2e['first_interval_step_s'],
      'step_images_per_s': alone['images_per_s'], 'step_s_median': alone['step_s_median'],
      'ratio_end_to_end_over_step': e2e['images_per_s'] / alone['images_per_s'],
      'final_loss': last.get('loss'), 'metrics_rows': rows, 'step_benchmark': alone,
  }


def _run(argv: list[str]) -> None:
  del argv
  config = FLAGS.config
  batch = FLAGS.batch or config.train.batch_size
  parallel.set_cpu_devices(batch, config.cpu_devices)  # as a CPU-only run of main.py
  steps = FLAGS.steps
  log_every = _LOG_EVERY.value or max(steps // 3, 1)
  if steps < 2 * log_every:
    raise app.UsageError(f'--steps={steps} gives fewer than two log intervals of {log_every}: '
                         'the first includes compilation.')
  logging.info('end_to_end: %d steps, log every %d, batch %d', steps, log_every, batch)
  figures = benchmark(config, batch, steps, log_every, FLAGS.warmup)
  common.print_table([{k: v for k, v in figures.items()
                       if k not in ('metrics_rows', 'step_benchmark')}])
  path = common.save('end_to_end', FLAGS.out_dir,
                     {'config': config.to_dict(), 'batch': batch, 'steps': steps,
                      'log_every': log_every, 'warmup': FLAGS.warmup}, figures)
  print(f'saved {path}')


def main(argv: list[str]) -> None:
  """Entry point used by simclr_jax.bench.__main__ (argv[0] is the program name)."""
  app.run(_run, argv=argv)
