"""Checkpoints, the run's config.json and workdir checks (DESIGN.md "Checkpoints and resume").

Thin wrappers over orbax's `CheckpointManager` (written against orbax-checkpoint 0.12.8): one
item, the whole `TrainState`, saved asynchronously to WORKDIR/checkpoints/<step>/. Orbax writes
each step into a temporary directory and renames it only once every process has finished, so
an interrupted save never replaces or damages an earlier checkpoint; steps still in a temporary
directory are invisible to `latest_step` and `restore_latest`.
"""
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
# Orbax's single-item layout: WORKDIR/checkpoints/<step>/default/.
_ITEM = 'default'
# Keys that define the model or the batch: a restart that changes them cannot resume.
_INCOMPATIBLE_PREFIXES = ('model.',)
_INCOMPATIBLE_KEYS = ('train.batch_size', 'data.image_size', 'data.num_classes')


def checkpoint_dir(workdir: str) -> epath.Path:
  """WORKDIR/checkpoints, made absolute (orbax refuses relative paths; gs:// ones already are)."""
  workdir = str(workdir)
  return epath.Path(workdir if '://' in workdir else os.path.abspath(workdir)) / CHECKPOINT_DIR


def manager(workdir: str, *, save_every_steps: int, keep: int) -> ocp.CheckpointManager:
  """An async CheckpointManager in WORKDIR/checkpoints keeping the last `keep` steps."""
  policies = ocp.checkpoint_managers
  # Steps that are multiples of the interval (plus orbax's preemption signal), but not orbax's
  # default InitialSavePolicy: a resumed run would otherwise save its first, arbitrary step.
  save_policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every_steps),
                                        policies.PreemptionCheckpointingPolicy()])
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
  """
  step = int(state.step)
  if step in mgr.all_steps():
    return False
  if not (force or mgr.should_save(step)):
    return False
  if not is_finite(state):
    logging.error('Not saving step %d: the parameters are not finite (NaN/inf).', step)
    return False
  return mgr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(mgr: ocp.CheckpointManager, step: int, target_state: Any) -> Any:
  """Restores `step` with the structure, dtypes and shardings of `target_state`.

  `target_state` may hold real arrays or `jax.ShapeDtypeStruct`s with shardings; the arrays are
  read directly into those shardings, so the mesh may differ from the one used at save time.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  return mgr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_latest(mgr: ocp.CheckpointManager, target_state: Any) -> Any | None:
  """Restores the latest finished step into `target_state`'s layout, or None if there is none."""
  step = mgr.latest_step()
  return None if step is None else restore(mgr, step, target_state)


def latest_step(workdir: str) -> int | None:
  """The latest finished checkpoint step in WORKDIR/checkpoints (tmp dirs ignored), or None."""
  steps = ocp.step.checkpoint_steps(checkpoint_dir(workdir))
  return max(steps) if steps else None


def wait(mgr: ocp.CheckpointManager) -> None:
  """Blocks until the pending async save is committed (before exit or before reading it)."""
  mgr.wait_until_finished()


def close(mgr: ocp.CheckpointManager) -> None:
  """Waits for pending saves and releases the manager's resources."""
  mgr.close()


def restore_variables(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """Reads only params and batch_stats of a pretraining checkpoint, as host numpy arrays.

  Needs neither the optimiser nor a mesh: a partial restore by the saved tree's own metadata,
  so the evaluation job can load any pretraining checkpoint. Returns (step, variables).
  """
  if step is None:
    step = latest_step(workdir)
  if step is None:
    raise FileNotFoundError(
        f'no checkpoint in {checkpoint_dir(workdir)}; run pretraining first or check '
        'config.pretrain_workdir')
  path = checkpoint_dir(workdir) / str(step) / _ITEM
  if not path.exists():
    raise FileNotFoundError(f'no checkpoint for step {step} in {checkpoint_dir(workdir)} '
                            f'(available: {ocp.step.checkpoint_steps(checkpoint_dir(workdir))})')
  ckptr = ocp.PyTreeCheckpointer()
  saved = ckptr.metadata(path).item_metadata.tree
  wanted = {k: saved[k] for k in ('params', 'batch_stats')}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  variables = ckptr.restore(path, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=restore_args, partial_restore=True))
  return step, variables


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/config.json (sorted, indented), on process 0 only."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(config.to_json_best_effort(sort_keys=True, indent=2) + '\n')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads WORKDIR/config.json back into a ConfigDict (tuples come back as lists)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'no {CONFIG_FILE} in {workdir}; is it a simclr_jax workdir?')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _as_json(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """The config as plain JSON values, so a saved config and a new one compare like for like."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def check_compatible(saved: ml_collections.ConfigDict | dict,
                     new: ml_collections.ConfigDict | dict) -> None:
  """Raises ValueError listing the model/batch keys a restart changed (others may change)."""
  old_flat, new_flat = _flatten(_as_json(saved)), _flatten(_as_json(new))
  keys = sorted(k for k in set(old_flat) | set(new_flat)
                if k.startswith(_INCOMPATIBLE_PREFIXES) or k in _INCOMPATIBLE_KEYS)
  missing = object()
  diffs = [(k, old_flat.get(k, missing), new_flat.get(k, missing)) for k in keys
           if old_flat.get(k, missing) != new_flat.get(k, missing)]
  if diffs:
    show = lambda v: '<absent>' if v is missing else repr(v)  # noqa: E731
    lines = '\n'.join(f'  {k}: {show(a)} -> {show(b)}' for k, a, b in diffs)
    raise ValueError(
        'This workdir holds a run whose model or batch differs from the new config, so its '
        f'checkpoints cannot be resumed:\n{lines}\n'
        'Use a new --workdir or restore the old values.')


def ensure_writable(workdir: str) -> None:
  """Creates `workdir` if needed and checks it is writable, with an error naming --workdir."""
  path = epath.Path(workdir)
  probe = path / f'.write_test.{jax.process_index()}.{os.getpid()}'
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise PermissionError(
        f'--workdir={workdir} is not writable ({e}); pass a directory you can write to.') from e
