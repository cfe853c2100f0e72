"""Checkpoints of the TrainState with orbax, and what to do with a step that does not restore.

Thin wrappers over orbax's `CheckpointManager` (written against orbax-checkpoint 0.12.8): one
item, the whole `TrainState`, saved asynchronously to WORKDIR/checkpoints/<step>/. Orbax writes
each step into a temporary directory and renames it only once every process has finished, so
an interrupted save never replaces or damages an earlier checkpoint; steps still in a temporary
directory are invisible to `latest_step` and `restore_latest`.

A save that fails (disk full, no permission, a storage error) leaves only a temporary directory
behind (reclaimed by the next run's manager) and never deletes older steps: orbax removes the
steps beyond `keep` only once the new one is committed. Orbax reports an async failure late (at
the next save or wait); `failed_save` finds it as soon as the save has ended, without waiting
for one that runs, so the training loop can stop within a step or two.

A finished step can still be damaged afterwards (a file deleted or cut short on the storage).
`restore_latest` then resumes from the newest step that restores and moves the damaged ones to
WORKDIR/checkpoints/<step>.damaged (a name orbax ignores; nothing is deleted), with a warning
naming them; when no step restores it stops with a ConfigError naming them and the fix. The
rest of the workdir (config.json, the lock, the start-up checks) is `simclr_jax.workdir`.
"""
import os
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from simclr_jax.errors import ConfigError
from simclr_jax.workdir import CHECKPOINT_DIR

# Orbax's single-item layout: WORKDIR/checkpoints/<step>/default/.
_ITEM = 'default'
DAMAGED_SUFFIX = '.damaged'  # WORKDIR/checkpoints/<step>.damaged: not a step name to orbax
# The step of each manager's async save not yet known to have succeeded (see failed_save).
_unchecked: 'weakref.WeakKeyDictionary[ocp.CheckpointManager, int]' = weakref.WeakKeyDictionary()


class SaveError(ConfigError):
  """A checkpoint could not be saved: the message names the directory, the step and why."""


def checkpoint_dir(workdir: str) -> epath.Path:
  """WORKDIR/checkpoints, made absolute (orbax refuses relative paths; gs:// ones already are)."""
  workdir = str(workdir)
  return epath.Path(workdir if '://' in workdir else os.path.abspath(workdir)) / CHECKPOINT_DIR


def manager(workdir: str, *, save_every_steps: int, keep: int) -> ocp.CheckpointManager:
  """An async CheckpointManager in WORKDIR/checkpoints keeping the last `keep` steps."""
  # Steps that are multiples of the interval, but not orbax's default InitialSavePolicy: a
  # resumed run would otherwise save its first, arbitrary step. Nor its preemption policy: JAX's
  # preemption notice comes from a SIGTERM handler that the job's own replaces (see
  # simclr_jax.stopping), which forces the save at the step every process agreed on.
  save_policy = ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps)
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=save_policy, max_to_keep=keep, create=True,
      enable_async_checkpointing=True,
      # Tmp dirs left by a run killed mid-save are never valid checkpoints: reclaim the space.
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def is_finite(state: Any) -> bool:
  """True if every parameter of `state` is finite (call on every process: it is a reduction)."""
  return bool(_all_finite(state.params))


def save(mgr: ocp.CheckpointManager, state: Any, *, force: bool = False) -> bool:
  """Starts an async save of `state` at int(state.step); every process must call it.

  Returns whether a save was started: False off the save interval (unless `force`), when that
  step is already saved (e.g. the final save right after a periodic one), or when the
  parameters are not finite, so a diverged run never replaces good checkpoints with NaNs.
  Orbax copies the arrays to host before returning, so the state may be donated right after.
  A failure of this save, or of the previous async one, is a SaveError.
  """
  step = int(state.step)
  error = failed_save(mgr, wait=True)  # orbax's next save waits for the previous one anyway
  if error:
    raise error
  if step in mgr.all_steps():
    return False
  if not (force or mgr.should_save(step)):
    return False
  if not is_finite(state):
    logging.error('Not saving step %d: the parameters are not finite (NaN/inf).', step)
    return False
  try:
    started = mgr.save(step, args=ocp.args.StandardSave(state), force=force)
  except Exception as e:  # pylint: disable=broad-except  # disk full, permissions, storage
    raise save_error(mgr, step, e) from e
  if started:
    _unchecked[mgr] = step
  return started


def save_error(mgr: ocp.CheckpointManager, step: int, error: BaseException) -> SaveError:
  """The SaveError for the save of `step` that failed with `error`."""
  good = ocp.step.checkpoint_steps(mgr.directory)  # finished steps only; tmp dirs ignored
  kept = (f'the checkpoints already there are intact (latest: step {max(good)})' if good
          else 'no earlier checkpoint exists there')
  return SaveError(
      f'saving the checkpoint of step {step} in {mgr.directory} failed ({_why(error)}); '
      f'{kept}. Fix the storage (e.g. free disk space, check permissions), then rerun the '
      'same command to resume.')


def failed_save(mgr: ocp.CheckpointManager, *, wait: bool = False) -> SaveError | None:
  """The SaveError of the last async save once it has ended, else None; reports each once.

  Never blocks on a running save unless `wait`: orbax's `is_saving_in_progress` is a flag, and
  only a save that has ended is joined, so the training loop may call it every step.
  """
  step = _unchecked.get(mgr)
  if step is None or (not wait and mgr.is_saving_in_progress()):
    return None
  del _unchecked[mgr]
  try:
    mgr.wait_until_finished()  # returns at once (or waits with `wait`); raises its failure
  except Exception as e:  # pylint: disable=broad-except  # disk full, permissions, storage
    return save_error(mgr, step, e)
  return None


def restore(mgr: ocp.CheckpointManager, step: int, target_state: Any) -> Any:
  """Restores `step` with the structure, dtypes and shardings of `target_state`.

  `target_state` may hold real arrays or `jax.ShapeDtypeStruct`s with shardings; the arrays are
  read directly into those shardings, so the mesh may differ from the one used at save time.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  return mgr.restore(step, args=ocp.args.StandardRestore(abstract))


def _why(error: Exception) -> str:
  """A one-line reason from an orbax/tensorstore exception (their messages run long)."""
  first = (str(error).strip().splitlines() or [''])[0]
  return f'{type(error).__name__}: {first[:300]}'


def _saved_tree(step_dir: epath.Path) -> Any:
  """The tree metadata of a step's item: a missing or cut _METADATA file fails here, clearly."""
  return ocp.PyTreeCheckpointHandler().metadata(step_dir / _ITEM).tree


def _read_numpy(step_dir: epath.Path, keys: tuple[str, ...] | None = None) -> Any:
  """The saved tree of one step (or its top-level `keys`) as host numpy arrays.

  By this process alone (no barrier with the others), from the tree's own metadata: needs
  neither a target structure nor a mesh.
  """
  me = jax.process_index()
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(),
                        multiprocessing_options=ocp.options.MultiprocessingOptions(
                            primary_host=me, active_processes={me})) as ckptr:
    saved = _saved_tree(step_dir)
    wanted = saved if keys is None else {k: saved[k] for k in keys}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    return ckptr.restore(step_dir / _ITEM, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=keys is not None))


def _check_layout(step_dir: epath.Path, target_state: Any) -> None:
  """ConfigError when a step holds a train state of another layout than `target_state`.

  Not damage: a checkpoint written by an older simclr_jax (e.g. with an RNG in the state, or
  another optimiser state) reads fine but cannot be resumed. It is never moved aside.
  """
  saved = set(ocp.tree.to_flat_dict(_saved_tree(step_dir)))
  wanted = set(ocp.tree.to_flat_dict(target_state))
  if saved != wanted:
    show = lambda keys: sorted('/'.join(map(str, k)) for k in keys)[:3]  # noqa: E731
    raise _LayoutError(
        f'checkpoint {step_dir} holds a train state of another layout than this version '
        f'trains (only in the checkpoint: {show(saved - wanted)}; only in this version: '
        f'{show(wanted - saved)}): it was written by an earlier simclr_jax. It cannot be '
        'resumed; start again with a new --workdir. The evaluation and export jobs still read '
        'its encoder (--config.pretrain_workdir).')


class _LayoutError(ConfigError):
  """A checkpoint of another train-state layout: a stop, never treated as damage."""


def _newest_readable(steps: list[int], read: Callable[[int], Any]
                     ) -> tuple[int | None, Any, dict[int, str]]:
  """(newest of `steps` that `read` reads, what it returned, {newer step: why it did not}).

  One process decides (process 0; the steps are on storage every process sees) and the others
  get its choice, so all restore the same step. They get None for the value and no reasons.
  A step of another layout (_LayoutError) stops every process.
  """
  chosen, value, problems, layout = None, None, {}, None
  if jax.process_index() == 0:
    for step in steps:
      try:
        value = read(step)
      except _LayoutError as e:
        layout = e
        break
      except Exception as e:  # pylint: disable=broad-except  # any failure = this step is bad
        problems[step] = _why(e)
        continue
      chosen = step
      break
  code = -2 if layout is not None else (-1 if chosen is None else chosen)
  if jax.process_count() > 1:
    code = int(multihost_utils.broadcast_one_to_all(np.int64(code)))
  if code == -2:
    raise layout or _LayoutError('the latest checkpoint holds a train state of another layout '
                                 "than this version trains: see process 0's log.")
  chosen = None if code < 0 else code
  damaged = {s: problems.get(s, "see process 0's log") for s in steps
             if chosen is None or s > chosen}
  return chosen, value, damaged


def _move_aside(mgr: ocp.CheckpointManager, damaged: dict[int, str], resumed: int) -> None:
  """Renames the damaged steps to <step>.damaged (process 0), then every manager re-lists."""
  if jax.process_index() == 0:
    for step, why in sorted(damaged.items()):
      src = epath.Path(mgr.directory) / str(step)
      dst = src.parent / f'{step}{DAMAGED_SUFFIX}'
      n = 0
      while dst.exists():
        n += 1
        dst = src.parent / f'{step}{DAMAGED_SUFFIX}.{n}'
      try:
        src.rename(dst)
      except OSError as e:
        raise ConfigError(
            f'checkpoint step {step} in {src.parent} does not restore ({why}) and could not be '
            f'moved aside ({e}); move {src} out of the way yourself, then rerun.') from e
      logging.warning('Checkpoint step %d in %s does not restore (%s): moved it to %s (kept, '
                      'nothing deleted); resuming from step %d.', step, src.parent, why, dst,
                      resumed)
  if jax.process_count() > 1:  # The others re-list only once the renames are done.
    multihost_utils.sync_global_devices('simclr_jax checkpoint: damaged steps moved aside')
  mgr.reload()


def restore_latest(mgr: ocp.CheckpointManager, target_state: Any) -> Any | None:
  """Restores the newest step that restores into `target_state`'s layout; None if none saved.

  Newer steps that do not restore are moved aside to <step>.damaged with a warning; if no step
  restores, a ConfigError names them and the fix. Every process takes the same decision: in a
  multi-process run process 0 reads candidate steps into host memory first and tells the
  others which one to restore, since orbax's collective restore cannot be retried after it
  failed on some processes only.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    return None
  single = jax.process_count() == 1
  def read(step: int) -> Any:
    step_dir = epath.Path(mgr.directory) / str(step)
    _check_layout(step_dir, target_state)  # also the clearer first check of _METADATA
    # One process: the restore itself tells whether a step restores. Several: process 0 reads
    # into host memory first (orbax's collective restore cannot be retried after a failure).
    return restore(mgr, step, target_state) if single else _read_numpy(step_dir)
  step, restored, damaged = _newest_readable(steps, read)
  if step is None:
    reasons = '; '.join(f'step {s}: {why}' for s, why in damaged.items())
    raise ConfigError(
        f'No checkpoint in {mgr.directory} restores ({reasons}). They are left as they are. '
        f'To start this run again from step 0, move them out of the way (e.g. `mv '
        f'{mgr.directory}/{steps[0]} {mgr.directory}/{steps[0]}{DAMAGED_SUFFIX}`: orbax ignores '
        'that name), or pass a new --workdir.')
  if not single:
    restored = restore(mgr, step, target_state)
  if damaged:
    _move_aside(mgr, damaged, step)
  return restored


def latest_step(workdir: str) -> int | None:
  """The latest finished checkpoint step in WORKDIR/checkpoints (tmp dirs ignored), or None."""
  steps = ocp.step.checkpoint_steps(checkpoint_dir(workdir))
  return max(steps) if steps else None


def wait(mgr: ocp.CheckpointManager) -> None:
  """Blocks until the pending async save is committed; its failure is a SaveError."""
  error = failed_save(mgr, wait=True)
  if error:
    raise error


def close(mgr: ocp.CheckpointManager) -> None:
  """Waits for pending saves and releases the manager's resources; a failure is a SaveError."""
  error = failed_save(mgr, wait=True)
  mgr.close()
  if error:
    raise error


def restore_variables(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """Reads only params and batch_stats of a pretraining checkpoint, as host numpy arrays.

  Needs neither the optimiser nor a mesh: a partial restore by the saved tree's own metadata,
  so the evaluation job can load any pretraining checkpoint. Returns (step, variables). With
  `step` None it is the newest step that restores (a warning names newer ones that do not;
  the pretraining run moves those aside when it resumes); a `step` that does not restore is a
  ConfigError.
  """
  ckpt_dir = checkpoint_dir(workdir)
  steps = sorted(ocp.step.checkpoint_steps(ckpt_dir), reverse=True)
  if not steps:
    raise ConfigError(
        f'no checkpoint in {ckpt_dir}; run pretraining first or check config.pretrain_workdir')
  if step is not None:
    if step not in steps:
      raise ConfigError(f'no checkpoint for step {step} in {ckpt_dir} (available: '
                        f'{sorted(steps)}); set config.checkpoint_step to one of them (-1: latest)')
    steps = [step]
  read = lambda s: _read_numpy(ckpt_dir / str(s), ('params', 'batch_stats'))  # noqa: E731
  chosen, variables, damaged = _newest_readable(steps, read)
  if chosen is None:
    reasons = '; '.join(f'step {s}: {why}' for s, why in damaged.items())
    if step is not None:
      raise ConfigError(f'checkpoint step {step} in {ckpt_dir} does not restore ({reasons}); '
                        'pass another --config.checkpoint_step (or -1: the newest that '
                        'restores).')
    raise ConfigError(f'no checkpoint in {ckpt_dir} restores ({reasons}); pretrain again (in '
                      'a new --workdir, or after moving these steps aside) before evaluating.')
  for s, why in damaged.items():
    logging.warning('Checkpoint step %d in %s does not restore (%s); using step %d instead.',
                    s, ckpt_dir, why, chosen)
  if variables is None:  # Another process chose it.
    variables = read(chosen)
  return chosen, variables
