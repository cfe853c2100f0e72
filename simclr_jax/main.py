"""Entry point: `python -m simclr_jax.main --config=configs/<recipe>.py --workdir=DIR`.

The config file picks the job (`config.job`: 'pretrain' or 'linear_eval'); any config field can
be overridden as `--config.key=value`, and a misspelt key is an error (locked config).
"""
import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from simclr_jax import parallel

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py recipe.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, config.json, metrics.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 for multi-process runs; unset on Cloud TPU VMs and SLURM, where '
    'jax.distributed detects it (or set JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index (multi-host).')
flags.mark_flags_as_required(['config', 'workdir'])


class _LibraryInfoFilter(py_logging.Filter):
  """Drops INFO lines from orbax (dozens per save) so the progress line stays readable."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def _start_distributed() -> None:
  """jax.distributed.initialize() before any other JAX call, when several processes are expected."""
  import jax  # pylint: disable=g-import-not-at-top
  explicit = _COORDINATOR.value is not None or (_NUM_PROCESSES.value or 1) > 1
  detected = any(k in os.environ for k in ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS',
                                             'TPU_WORKER_HOSTNAMES', 'CLOUD_TPU_TASK_ID'))
  if explicit or detected:
    if 'SLURM_NTASKS' in os.environ and int(os.environ['SLURM_NTASKS']) <= 1 and not explicit:
      return  # a single SLURM task needs no coordinator
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info('JAX process %d of %d: %d local devices, %d global devices (%s).',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())


def main(argv: list[str]) -> None:
  del argv
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  config = _CONFIG.value
  # Before anything starts JAX's backends (jax.distributed too). The batch the devices split:
  batch = config.eval_batch_size if config.job == 'linear_eval' else config.train.batch_size
  parallel.set_cpu_devices(batch, config.cpu_devices)
  _start_distributed()
  if config.job == 'pretrain':
    from simclr_jax import pretrain  # pylint: disable=g-import-not-at-top
    try:
      pretrain.run(config, _WORKDIR.value)
    except pretrain.Preempted as e:
      logging.warning('%s', e.message)
      logging.flush()
      raise
    except (pretrain.NonFiniteLossError, ValueError, FileNotFoundError, PermissionError) as e:
      logging.error('%s', e)
      sys.exit(f'error: {e}')
  elif config.job == 'linear_eval':
    from simclr_jax.eval import job as eval_job  # pylint: disable=g-import-not-at-top
    try:
      eval_job.run(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError, PermissionError) as e:
      logging.error('%s', e)
      sys.exit(f'error: {e}')
  else:
    sys.exit(f"error: config.job={config.job!r} must be 'pretrain' or 'linear_eval'.")


if __name__ == '__main__':
  app.run(main)
