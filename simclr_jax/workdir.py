"""The run's directory, apart from the orbax checkpoints: checks, lock, config and its history.

- `ensure_writable`: the start-up check of WORKDIR (and of an existing checkpoints/).
- `lock`: one run per workdir. WORKDIR/run.lock names the holder (host, pid, start time,
  command) and carries a heartbeat its holder refreshes; a second run refuses at once, naming
  it. A lock whose process is gone (same host) or whose heartbeat stopped (any host, shared
  storage) is stale and is taken over with a warning.
- `start_segment`: each start or resume of a run writes WORKDIR/config.json (the latest
  resolved config, what the evaluation reads) and appends one line to config_history.jsonl
  with the step it starts from and the full resolved config, so the settings every checkpoint
  was trained with stay on record when a resume changes some (e.g. optim.base_lr after a NaN).
- `read_config`, `check_compatible`: a resumed run's config against the saved one.

Only process 0 writes these files; every process calls the functions (the lock's outcome is
shared with the other processes of a multi-process run).
"""
import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from simclr_jax.errors import ConfigError

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
HISTORY_FILE = 'config_history.jsonl'
LOCK_FILE = 'run.lock'
HEARTBEAT_SECONDS = 60.0  # how often the lock holder refreshes its heartbeat
STALE_AFTER_SECONDS = 600.0  # a lock whose heartbeat is older than this is taken over
# Keys that define the model or the batch: a restart that changes them cannot resume.
_INCOMPATIBLE_PREFIXES = ('model.',)
_INCOMPATIBLE_KEYS = ('train.batch_size', 'data.image_size', 'data.num_classes', 'data.classes')
# Model keys that change how the same network computes, never its parameters: free on resume.
_RESUMABLE_MODEL_KEYS = ('model.conv_impl', 'model.remat')


def _path(workdir: str) -> epath.Path:
  """WORKDIR as a path (local, or gs:// and other remote file systems through epath)."""
  return epath.Path(str(workdir))


# --- start-up check ------------------------------------------------------------------------------


def ensure_writable(workdir: str, *, checkpoints: bool = False) -> None:
  """Creates WORKDIR and checks that it (and WORKDIR/checkpoints with `checkpoints`) is writable.

  Raises a ConfigError naming --workdir and the directory that fails, before anything compiles.
  A missing checkpoints/ is left to the checkpoint manager (a writable WORKDIR can hold it), so
  a run that fails before its first save leaves no checkpoint directory behind.
  """
  paths = [_path(workdir)]
  if checkpoints and (_path(workdir) / CHECKPOINT_DIR).exists():
    paths.append(_path(workdir) / CHECKPOINT_DIR)
  for path in paths:
    probe = path / f'.write_test.{jax.process_index()}.{os.getpid()}'
    try:
      path.mkdir(parents=True, exist_ok=True)
      probe.write_text('ok')
      probe.unlink()
    except OSError as e:
      raise ConfigError(f'--workdir={workdir}: cannot write in {path} ({e}); pass a --workdir '
                        'you can write to, or fix that directory.') from e


# --- lock ----------------------------------------------------------------------------------------


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _describe(holder: dict[str, Any]) -> str:
  """'host H, pid P, started T (command: C)' of a lock record (the command cut at 200 chars)."""
  command = str(holder.get('command', '?'))
  command = command if len(command) <= 200 else command[:200] + '...'
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
          f"{holder.get('started', '?')} (command: {command})")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process: alive.
    return True
  return True


def _stale_reason(holder: dict[str, Any], stale_after_s: float) -> str:
  """Why the lock `holder` is stale ('' if its run may still be running)."""
  pid = holder.get('pid')
  if holder.get('host') == socket.gethostname() and isinstance(pid, int) and pid > 0:
    if pid == os.getpid():  # A container restarted: its new run got the same process id.
      return f'its process id {pid} is this process'
    if not _pid_alive(pid):
      return f'its process {pid} is no longer running on this host'
  age = time.time() - float(holder.get('heartbeat', 0.0))
  if age > stale_after_s:
    return f'its last heartbeat was {age:.0f} s ago (stale after {stale_after_s:.0f} s)'
  return ''


def _read_json(path: epath.Path) -> dict[str, Any] | None:
  """The JSON object in `path`, or None if it is gone or not (yet) valid JSON."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _write_atomically(path: epath.Path, text: str) -> None:
  """Replaces `path` so that a reader sees the old or the new text, never a part."""
  if '://' in str(path):
    path.write_text(text)  # Object stores replace whole objects.
    return
  tmp = path.parent / f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex}'
  tmp.write_text(text)
  os.replace(tmp, path)


def _create_exclusive(path: epath.Path, record: dict[str, Any]) -> bool:
  """Writes `record` to `path` unless the file exists; True if this call created it."""
  text = json.dumps(record, indent=2) + '\n'
  if '://' not in str(path):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True
  # Object stores have no exclusive create here: write if absent, then read back; of two runs
  # racing within the same second, the one whose record is read back holds the lock.
  if path.exists():
    return False
  path.write_text(text)
  time.sleep(1.0)
  return (_read_json(path) or {}).get('token') == record['token']


class _Held:
  """A lock this process holds: refreshes its heartbeat until released."""

  def __init__(self, path: epath.Path, record: dict[str, Any], heartbeat_s: float):
    self._path, self._record = path, record
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                    name='simclr_jax-workdir-lock')
    self._thread.start()

  def _ours(self) -> bool:
    return (_read_json(self._path) or {}).get('token') == self._record['token']

  def _beat(self, every_s: float) -> None:
    while not self._stop.wait(every_s):
      if not self._ours():
        logging.error('The lock %s no longer names this run (another run took it over); '
                      'stop one of the two runs.', self._path)
        return
      self._record['heartbeat'] = time.time()
      try:
        _write_atomically(self._path, json.dumps(self._record, indent=2) + '\n')
      except OSError as e:  # A transient storage error: try again at the next beat.
        logging.warning('Could not refresh the heartbeat of %s: %s', self._path, e)

  def release(self) -> None:
    self._stop.set()
    self._thread.join()
    if self._ours():
      self._path.unlink()


def _acquire(workdir: str, heartbeat_s: float, stale_after_s: float) -> _Held:
  """Takes WORKDIR/run.lock for this process, or raises a ConfigError naming its holder."""
  path = _path(workdir) / LOCK_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  record = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': _now(),
            'heartbeat': time.time(), 'command': ' '.join(sys.argv),
            'token': uuid.uuid4().hex}
  for _ in range(3):
    if _create_exclusive(path, record):
      return _Held(path, record, heartbeat_s)
    holder = _read_json(path)
    if holder is None:  # Being written by a run starting right now, or just released.
      time.sleep(0.5)
      holder = _read_json(path)
      if holder is None:
        continue
    stale = _stale_reason(holder, stale_after_s)
    if not stale:
      raise ConfigError(
          f'--workdir={workdir} is in use by another run: {_describe(holder)}; lock file '
          f'{path}. Wait for that run to end or stop it, or pass another --workdir. (A run '
          'that died leaves the lock behind; the next run takes it over once its process is '
          f'gone or its heartbeat is older than {stale_after_s:.0f} s.)')
    logging.warning('Taking over the lock %s of a run that is gone (%s): %s.', path,
                    _describe(holder), stale)
    if _read_json(path) == holder:  # Not taken over by another run meanwhile.
      path.unlink(missing_ok=True)
  raise ConfigError(f'--workdir={workdir}: could not take the lock {path} (other runs keep '
                    'taking it); make sure only one run uses this --workdir.')


@contextlib.contextmanager
def lock(workdir: str, *, heartbeat_s: float = HEARTBEAT_SECONDS,
         stale_after_s: float = STALE_AFTER_SECONDS) -> Iterator[None]:
  """Holds WORKDIR/run.lock for the duration of the block (released on every exit path).

  Process 0 holds it for the whole run (the other processes are part of the same run); in a
  multi-process run all processes learn whether it got it, so all stop together when not.
  """
  held, error = None, None
  if jax.process_index() == 0:
    try:
      held = _acquire(workdir, heartbeat_s, stale_after_s)
    except Exception as e:  # pylint: disable=broad-except  # raised below, after the others know
      error = e
  if jax.process_count() > 1:
    locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not locked and error is None:
      error = ConfigError(f'--workdir={workdir} is in use by another run (process 0 found its '
                          f'lock {_path(workdir) / LOCK_FILE}; its log names the run).')
  if error is not None:
    raise error
  try:
    yield
  finally:
    if held is not None:
      held.release()


# --- config and its history ----------------------------------------------------------------------


def _as_json(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """The config as plain JSON values, so a saved config and a new one compare like for like."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/config.json (sorted, indented), on process 0 only."""
  if jax.process_index() != 0:
    return
  path = _path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_atomically(path, config.to_json_best_effort(sort_keys=True, indent=2) + '\n')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads WORKDIR/config.json back into a ConfigDict (tuples come back as lists)."""
  path = _path(workdir) / CONFIG_FILE
  if not path.exists():
    raise ConfigError(f'no {CONFIG_FILE} in {workdir}: not a simclr_jax pretraining workdir '
                      '(check config.pretrain_workdir).')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def read_history(workdir: str) -> list[dict[str, Any]]:
  """The lines of WORKDIR/config_history.jsonl, oldest first ([] if there is none)."""
  path = _path(workdir) / HISTORY_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_segment(workdir: str, config: ml_collections.ConfigDict, start_step: int) -> None:
  """Records a start (or resume) of the run at `start_step`, on process 0 only.

  WORKDIR/config.json becomes `config`; config_history.jsonl gets a line with the start step,
  time, host, pid, process count, the full resolved config and the keys that changed since
  the previous segment. Full configs rather than diffs: each line stands alone (no replay from
  the first, a lost line loses nothing else) and costs a few KB per resume.
  """
  if jax.process_index() != 0:
    return
  history = read_history(workdir)
  new = _as_json(config)
  old = _flatten(history[-1]['config']) if history else {}
  changed = {k: [old.get(k), v] for k, v in _flatten(new).items()
             if history and old.get(k) != v}
  line = {'start_step': int(start_step), 'time': _now(), 'host': socket.gethostname(),
          'pid': os.getpid(), 'process_count': jax.process_count(), 'changed': changed,
          'config': new}
  path = _path(workdir) / HISTORY_FILE
  previous = path.read_text() if path.exists() else ''
  # Rewritten whole rather than appended: object stores (gs://) cannot append.
  _write_atomically(path, previous + json.dumps(line, sort_keys=True) + '\n')
  write_config(workdir, config)


def check_compatible(saved: ml_collections.ConfigDict | dict,
                     new: ml_collections.ConfigDict | dict) -> None:
  """Raises a ConfigError listing the model/batch keys a restart changed (others may change).

  A key the saved config lacks is not a change: it comes from a newer version of this code,
  whose default keeps what the saved run did.
  """
  old_flat, new_flat = _flatten(_as_json(saved)), _flatten(_as_json(new))
  keys = sorted(k for k in old_flat
                if (k.startswith(_INCOMPATIBLE_PREFIXES) or k in _INCOMPATIBLE_KEYS)
                and k not in _RESUMABLE_MODEL_KEYS)
  missing = object()
  diffs = [(k, old_flat[k], new_flat.get(k, missing)) for k in keys
           if old_flat[k] != new_flat.get(k, missing)]
  if diffs:
    show = lambda v: '<absent>' if v is missing else repr(v)  # noqa: E731
    lines = '\n'.join(f'  {k}: {show(a)} -> {show(b)}' for k, a, b in diffs)
    raise ConfigError(
        'This workdir holds a run whose model or batch differs from the new config, so its '
        f'checkpoints cannot be resumed:\n{lines}\n'
        'Use a new --workdir or restore the old values.')
