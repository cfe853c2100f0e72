"""Entry point: `python -m simclr_jax.main --config=configs/<recipe>.py --workdir=DIR`.

The config file picks the job (`config.job`, a key of JOBS); any config field can be overridden
as `--config.key=value`, and a misspelt key is an error (locked config). A problem the user fixes
(errors.ConfigError) ends the job with one line naming the key and the fix; anything else keeps
its traceback.
"""
import importlib
import logging as py_logging
import os
import sys
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from simclr_jax import parallel
from simclr_jax.errors import ConfigError

# config.job -> (module whose run(config, workdir) is the job, the global batch its devices
# split: on a CPU-only host it picks the device count, before JAX starts).
JOBS: dict[str, tuple[str, Callable[[Any], int]]] = {
    'pretrain': ('simclr_jax.pretrain', lambda c: c.train.batch_size),
    'linear_eval': ('simclr_jax.eval.job', lambda c: c.eval_batch_size),
    'extract': ('simclr_jax.eval.extract', lambda c: c.eval_batch_size),
    'export': ('simclr_jax.export.job', lambda c: 1),
    'import_official': ('simclr_jax.import_official', lambda c: 1),
    'distill': ('simclr_jax.distill', lambda c: c.distill.batch_size),
}

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
    # simclr_jax.stopping handles SIGTERM/SIGINT itself and agrees on a stop step through the
    # coordination service (its docstring says why JAX's preemption sync manager cannot);
    # JAX's preemption notifier (a C++ SIGTERM handler that only sets a flag) would otherwise
    # swallow a SIGTERM sent before the job installs its handler, or in jobs that install none.
    jax.config.update('jax_enable_preemption_service', False)
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info('JAX process %d of %d: %d local devices, %d global devices (%s).',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())


def _job(config: Any) -> tuple[str, Callable[[Any], int]]:
  """(module, global batch) of config.job; a ConfigError naming the choices otherwise."""
  if config.job not in JOBS:
    raise ConfigError(f'config.job={config.job!r} is not one of {sorted(JOBS)}; use one of the '
                      'configs/*.py files.')
  return JOBS[config.job]


def main(argv: list[str]) -> None:
  del argv
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  config = _CONFIG.value
  try:
    module, global_batch = _job(config)
    parallel.set_cpu_devices(global_batch(config), config.get('cpu_devices', 0))
    _start_distributed()
    importlib.import_module(module).run(config, _WORKDIR.value)
  except ConfigError as e:
    logging.error('%s', e)
    logging.flush()
    sys.exit(f'error: {e}')
  except SystemExit as e:  # a preempted run: it saved its checkpoint and says how to resume
    if getattr(e, 'message', None):
      logging.warning('%s', e.message)
      logging.flush()
    raise


def run_cli() -> None:
  """The `simclr-jax` console script of an installed package: same flags as `-m simclr_jax.main`."""
  app.run(main)


if __name__ == '__main__':
  run_cli()
