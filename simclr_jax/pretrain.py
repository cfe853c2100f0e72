"""The pretraining job, read top to bottom: mesh → input → model → state → step → checkpoint → loop.

Host syncs happen only on log steps (fetching metrics) and checkpoint steps; every other step is
dispatched asynchronously while the input pipeline prepares the next batch.
"""
import functools
import math
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from simclr_jax import checkpoint, optim, parallel, train_step
from simclr_jax.data import device_input
from simclr_jax import metrics
from simclr_jax.models import simclr

_CONSOLE_KEYS = ('loss', 'contrastive_acc', 'probe_acc')  # the rest is in metrics.jsonl
EXIT_PREEMPTED = 3  # exit status of a run stopped by SIGTERM/SIGINT after saving its checkpoint


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/inf; the message names the step and the last finite metrics."""


class Preempted(SystemExit):
  """SIGTERM/SIGINT arrived: the checkpoint at the current step is saved; rerun to resume."""

  def __init__(self, message: str):
    super().__init__(EXIT_PREEMPTED)
    self.message = message


def total_steps(train_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """config.train.steps if positive, else epochs × steps per epoch (at least 1)."""
  if train_cfg.steps > 0:
    return int(train_cfg.steps)
  return max(int(math.ceil(train_cfg.epochs * steps_per_epoch)), 1)


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag checked between steps, so a save can finish first."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _check_data_config(config: ml_collections.ConfigDict, source_classes: int) -> None:
  """The probe head is built from config.data.num_classes: it must fit the data's labels."""
  if source_classes and config.data.num_classes not in (0, source_classes):
    raise ValueError(
        f'config.data.num_classes={config.data.num_classes} but the training data has '
        f'{source_classes} classes; set --config.data.num_classes={source_classes} '
        '(or 0 to train without the online probe).')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Pretrains (or resumes) in `workdir`; returns the last logged metrics."""
  # --- mesh and checks that need no compilation -------------------------------------------------
  device_input.check_config(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh)
  checkpoint.ensure_writable(workdir)
  if checkpoint.latest_step(workdir) is not None:
    checkpoint.check_compatible(checkpoint.read_config(workdir), config)
  logging.info('process %d/%d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())

  # --- input: where the views are made (config.data.augment_on) -------------------------------
  # 'host' and 'split' read through tf.data; 'device' puts the uint8 train split on the mesh
  # (TensorFlow only to read a tfds/folder source once; none for the demo).
  augment_on = config.data.augment_on
  if augment_on == 'device':
    dataset = device_input.load(config, mesh)
    num_examples, num_classes = dataset.num_examples, dataset.num_classes
  else:
    from simclr_jax.data import host_input, sources  # TensorFlow loads only here.
    source = sources.load(config.data, config.data.train_split, process_index=0,
                          process_count=1)
    num_examples, num_classes = source.num_examples_total, source.num_classes
  _check_data_config(config, num_classes)
  steps_per_epoch = max(num_examples // config.train.batch_size, 1)
  num_steps = total_steps(config.train, steps_per_epoch)
  checkpoint.write_config(workdir, config)

  # --- model, optimiser, state -----------------------------------------------------------------
  model = simclr.from_config(config.model, config.data.num_classes)
  tx, learning_rate = optim.make_optimizer(config.optim, config.train.batch_size, steps_per_epoch,
                                           num_steps)
  size = config.data.image_size
  state = train_step.init_state(model, tx, jax.random.key(config.seed), (size, size, 3), mesh)

  # --- checkpoint: resume if the workdir has one -----------------------------------------------
  ckpt = checkpoint.manager(workdir, save_every_steps=config.train.checkpoint_every_steps,
                            keep=config.train.keep_checkpoints)
  restored = checkpoint.restore_latest(ckpt, state)
  if restored is not None:
    state = restored
  start_step = int(state.step)
  if start_step:
    logging.info('Resuming from the checkpoint at step %d of %d.', start_step, num_steps)

  # --- step and input stream -------------------------------------------------------------------
  make_step = functools.partial(train_step.make_train_step, model, tx, learning_rate,
                                config.loss.temperature, mesh)
  if augment_on == 'device':  # host → indices; the step gathers and makes both views
    device_step = make_step(prepare=device_input.device_prepare(config, mesh, dataset.layout),
                            data_sharding=dataset.sharding)
    step_fn = lambda state, batch: device_step(state, batch, dataset.arrays)  # noqa: E731
    host_batches = device_input.index_stream(dataset.layout, config, mesh, start_step=start_step)
  elif augment_on == 'split':  # host → cropped, flipped views; the step adds colour and blur
    split_step = make_step(prepare=device_input.split_prepare(config))
    step_fn = lambda state, batch: split_step(state, batch, None)  # noqa: E731
    host_batches = host_input.train_iterator(config, start_step=start_step)
  else:  # host → finished views
    step_fn = make_step()
    host_batches = host_input.train_iterator(config, start_step=start_step)
  batches = parallel.device_prefetch(host_batches, mesh)
  writer = metrics.MetricWriter(workdir)
  timer = metrics.StepTimer(config.train.batch_size, num_steps, start_step)
  last_finite: dict[str, float] = {}
  started = time.monotonic()

  # --- loop ------------------------------------------------------------------------------------
  with _StopRequest() as stop:
    for step in range(start_step + 1, num_steps + 1):
      state, step_metrics = step_fn(state, next(batches))
      if step % config.train.log_every_steps == 0 or step == num_steps:
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not all(map(math.isfinite, scalars.values())):
          checkpoint.close(ckpt)
          raise NonFiniteLossError(
              f'Non-finite metrics at step {step} ({scalars}); last finite metrics: '
              f'{last_finite or "none logged yet"}. The checkpoints in {workdir}/checkpoints are '
              'untouched; lower config.optim.base_lr or raise config.optim.warmup_epochs.')
        scalars.update(timer.update(step))
        last_finite = dict(scalars, step=step)
        writer.write(step, scalars)
        if jax.process_index() == 0:
          shown = {k: scalars[k] for k in _CONSOLE_KEYS if k in scalars}
          logging.info('%s', metrics.progress_line(
              step, num_steps, shown, scalars['images_per_sec'], scalars['eta_seconds']))
      # Only on interval steps: save() reads state.step, a host sync that would stall dispatch.
      if step % config.train.checkpoint_every_steps == 0:
        checkpoint.save(ckpt, state)
      if stop.signal:
        checkpoint.save(ckpt, state, force=True)
        checkpoint.close(ckpt)
        writer.close()
        raise Preempted(f'{stop.signal} at step {step}: checkpoint saved in {workdir}/checkpoints. '
                        'Rerun the same command to resume.')

  checkpoint.save(ckpt, state, force=True)
  checkpoint.close(ckpt)
  writer.close()
  elapsed = time.monotonic() - started
  if jax.process_index() == 0:
    logging.info('Done: %d steps in %s, final loss %.4f, contrastive acc %.3f%s. Workdir: %s',
                 num_steps - start_step, metrics.format_duration(elapsed),
                 last_finite.get('loss', float('nan')), last_finite.get('contrastive_acc', 0.0),
                 (f", probe acc {last_finite['probe_acc']:.3f}" if 'probe_acc' in last_finite
                  else ''), workdir)
  return last_finite
