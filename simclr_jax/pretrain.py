"""The pretraining job, read top to bottom: checks → mesh → input → build → state → resume → loop.

Host syncs happen only on log, evaluation and checkpoint steps; every other step is
dispatched asynchronously while the input prepares the next batch. One ExitStack owns the stop
requests (signals, failed saves: `stopping`), the checkpoint manager and the metric writer, so
every exit path (done, preempted, a failed save, non-finite loss, an error) waits for pending
saves and closes the outputs. Every process stops after the same step.
"""
import contextlib
import math
import time

import jax
import ml_collections
from absl import logging

from simclr_jax import build, checkpoint, metrics, parallel, stopping, train_step
from simclr_jax import workdir as workdir_lib
from simclr_jax.data import train_input
from simclr_jax.errors import ConfigError
from simclr_jax.eval import during_pretraining

_CONSOLE_KEYS = ('loss', 'contrastive_acc', 'probe_acc')  # the rest is in metrics.jsonl
EXIT_PREEMPTED = 3  # exit status of a run stopped by SIGTERM/SIGINT after saving its checkpoint


class NonFiniteLossError(ConfigError):
  """The loss became NaN/inf: the message names the step, the last finite metrics and the fix."""


class Preempted(SystemExit):
  """SIGTERM/SIGINT arrived: the checkpoint at the current step is saved; rerun to resume."""

  def __init__(self, message: str):
    super().__init__(EXIT_PREEMPTED)
    self.message = message


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first key that cannot run, before anything is read or compiled."""
  t = config.train
  if t.steps <= 0 and not t.epochs > 0:
    raise ConfigError(f'config.train.epochs={t.epochs} and config.train.steps={t.steps}: set '
                      'config.train.epochs > 0 (or config.train.steps > 0) to train at all.')
  for key in ('batch_size', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    if t[key] < 1:
      raise ConfigError(f'config.train.{key}={t[key]} must be >= 1.')
  during_pretraining.check_config(config)
  if config.data.num_classes < 0:
    raise ConfigError(f'config.data.num_classes={config.data.num_classes} must be >= 0 '
                      '(0: no online probe).')


def _check_num_classes(config: ml_collections.ConfigDict, source_classes: int) -> None:
  """The probe head is built from config.data.num_classes: it must fit the data's labels."""
  if source_classes and config.data.num_classes not in (0, source_classes):
    raise ConfigError(
        f'config.data.num_classes={config.data.num_classes} but the training data has '
        f'{source_classes} classes; set --config.data.num_classes={source_classes} '
        '(or 0 to train without the online probe).')


def _stop_before_training(request: stopping.Request | None, workdir: str) -> None:
  """Leaves start-up cleanly when a stop arrived before the first step (nothing was saved)."""
  if request:
    raise Preempted(f'{request.source()} during start-up, before the first step: nothing was '
                    f'trained or saved in {workdir} this time. Rerun the same command to start '
                    '(or resume).')


def _stop(request: stopping.Request, step: int, ckpt, state: train_step.TrainState,
          workdir: str) -> None:
  """Ends the run after `step` as every process does: saves and raises Preempted, or raises."""
  if request.kind == 'save':
    who = f'process {request.process}: ' if jax.process_count() > 1 else ''
    raise checkpoint.SaveError(f'training stopped after step {step}: {who}{request.why}')
  if request.kind == 'unagreed':
    raise Preempted(f'{request.why}; stopped after step {step} without saving. The '
                    f'checkpoints in {workdir}/checkpoints are intact: rerun the same command '
                    'to resume from the latest.')
  checkpoint.save(ckpt, state, force=True)
  raise Preempted(f'{request.source()} at step {step}: checkpoint saved in {workdir}/checkpoints.'
                  ' Rerun the same command to resume.')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Pretrains (or resumes) in `workdir`; returns the last logged metrics."""
  check_config(config)
  with contextlib.ExitStack() as stack:
    stop = stack.enter_context(stopping.StopRequests())

    # --- mesh and checks that need no compilation ---------------------------------------------
    mesh = parallel.make_mesh()
    build.check(config, mesh)
    workdir_lib.ensure_writable(workdir, checkpoints=True)
    stack.enter_context(workdir_lib.lock(workdir))  # one run per workdir, released on any exit
    saved = (workdir_lib.read_config(workdir) if checkpoint.latest_step(workdir) is not None
             else None)
    if config.data.source == 'folder':  # one class list for the whole run, in every split
      if saved is not None and not config.data.classes:
        config.data.classes = tuple(saved.data.get('classes', ()))
      from simclr_jax.data import sources  # pylint: disable=g-import-not-at-top  (TensorFlow)
      config.data.classes = sources.folder_classes(config.data)
    if saved is not None:
      workdir_lib.check_compatible(saved, config)

    # --- input: counts, the host stream and the in-step half of the views ---------------------
    data = train_input.make(config, mesh)
    _check_num_classes(config, data.num_classes)

    # --- model, optimiser, state and step; resume if the workdir has a checkpoint ---------------
    training = build.training(config, mesh, data.num_examples, prepare=data.prepare,
                              data_sharding=data.data_sharding)
    num_steps = training.num_steps
    state = training.init_state()
    ckpt = checkpoint.manager(workdir, save_every_steps=config.train.checkpoint_every_steps,
                              keep=config.train.keep_checkpoints)
    stack.callback(checkpoint.close, ckpt)  # waits for a pending save on every exit path
    restored = checkpoint.restore_latest(ckpt, state)
    state = state if restored is None else restored
    start_step = int(state.step)
    if start_step:
      logging.info('Resuming from the checkpoint at step %d of %d.', start_step, num_steps)
    _stop_before_training(stop.at(start_step), workdir)
    workdir_lib.start_segment(workdir, config, start_step)  # config.json + config_history.jsonl

    # --- input stream and evaluation ---------------------------------------------------------
    batches = parallel.device_prefetch(data.host_batches(start_step), mesh)
    evals = during_pretraining.DuringPretraining(config, mesh, training.model, data)
    writer = stack.enter_context(metrics.MetricWriter(workdir))
    timer = metrics.StepTimer(config.train.batch_size, num_steps, start_step)
    last_finite: dict[str, float] = {}
    started = time.monotonic()

    # --- loop --------------------------------------------------------------------------------
    for step in range(start_step + 1, num_steps + 1):
      state, step_metrics = training.step(state, next(batches), data.device_arrays)
      evaluate = evals.due(step, num_steps)
      if step % config.train.log_every_steps == 0 or step == num_steps or evaluate:
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not all(map(math.isfinite, scalars.values())):
          raise NonFiniteLossError(
              f'Non-finite metrics at step {step} ({scalars}); last finite metrics: '
              f'{last_finite or "none logged yet"}. The checkpoints in {workdir}/checkpoints '
              'are untouched; lower config.optim.base_lr or raise config.optim.warmup_epochs.')
        scalars.update(timer.update(step))
        if evaluate:
          eval_started = time.monotonic()
          scalars.update(evals.run(evaluate, state.params, state.batch_stats))
          scalars['eval_seconds'] = time.monotonic() - eval_started
          timer.exclude(scalars['eval_seconds'])  # images/s and ETA count training only
        last_finite = dict(scalars, step=step)
        writer.write(step, scalars)
        if jax.process_index() == 0:
          shown = {k: scalars[k] for k in _CONSOLE_KEYS if k in scalars}
          line = metrics.progress_line(step, num_steps, shown, scalars['images_per_sec'],
                                       scalars['eta_seconds'])
          logging.info('%s%s', line, f'  {during_pretraining.summary(scalars)}' if evaluate else '')
      # Only on interval steps: save() reads state.step, a host sync that would stall dispatch.
      if step % config.train.checkpoint_every_steps == 0:
        checkpoint.save(ckpt, state)
      # Both checks read flags only (no host sync): a failed save stops the run a step or two
      # after it ended, and a signal after the step every process agrees on.
      error = checkpoint.failed_save(ckpt)
      if error:
        stop.request('save', str(error))
      request = stop.at(step)
      if request:
        _stop(request, step, ckpt, state, workdir)
    checkpoint.save(ckpt, state, force=True)

  if jax.process_index() == 0:
    logging.info('Done: %d steps in %s, final loss %.4f, contrastive acc %.3f%s. Workdir: %s',
                 num_steps - start_step, metrics.format_duration(time.monotonic() - started),
                 last_finite.get('loss', float('nan')), last_finite.get('contrastive_acc', 0.0),
                 (f", probe acc {last_finite['probe_acc']:.3f}" if 'probe_acc' in last_finite
                  else ''), workdir)
  return last_finite
