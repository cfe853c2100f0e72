"""The run's directory: start-up check, lock (two real processes), config.json and its history."""
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from configs import base
from simclr_jax import workdir
from simclr_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A process that holds the lock of argv[1] until its stdin closes (heartbeat every 0.2 s).
_HOLDER = '''
import sys
from simclr_jax import workdir
with workdir.lock(sys.argv[1], heartbeat_s=0.2):
  print('locked', flush=True)
  sys.stdin.read()
'''


def _config():
  cfg = base.get_config()
  cfg.model.width = 0.0625
  return cfg


def _holder(path):
  """A subprocess holding the lock of `path` (returned once it holds it)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, '-c', _HOLDER, str(path)], cwd=ROOT, env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'locked'
  return proc


def _dead_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def _write_lock(path, **record):
  path.mkdir(parents=True, exist_ok=True)
  (path / workdir.LOCK_FILE).write_text(json.dumps(record))


# --- start-up check --------------------------------------------------------------------------


def test_ensure_writable_creates_workdir_but_not_checkpoints(tmp_path):
  # checkpoints/ appears with the first save, so a run that fails before one leaves none behind.
  workdir.ensure_writable(str(tmp_path / 'new' / 'dir'), checkpoints=True)
  assert os.listdir(tmp_path / 'new' / 'dir') == []
  workdir.ensure_writable(str(tmp_path / 'output'))  # a job's output folder: no checkpoints/
  assert os.listdir(tmp_path / 'output') == []


def test_ensure_writable_covers_checkpoints(tmp_path):
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(ConfigError, match=r'--workdir=.*a_file/sub'):
    workdir.ensure_writable(str(tmp_path / 'a_file' / 'sub'))
  # Writable top directory, but checkpoints/ cannot be made (a file is in the way). Root ignores
  # permission bits, so this is the unwritable checkpoints/ every user can reproduce.
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'checkpoints').write_text('not a directory')
  with pytest.raises(ConfigError, match=r'--workdir=.*run: cannot write in .*run/checkpoints'):
    workdir.ensure_writable(str(tmp_path / 'run'), checkpoints=True)


@pytest.mark.skipif(os.geteuid() == 0, reason='root ignores permission bits')
def test_ensure_writable_read_only_checkpoints(tmp_path):
  (tmp_path / 'checkpoints').mkdir()
  os.chmod(tmp_path / 'checkpoints', 0o555)
  try:
    with pytest.raises(ConfigError, match=r'cannot write in .*checkpoints'):
      workdir.ensure_writable(str(tmp_path), checkpoints=True)
  finally:
    os.chmod(tmp_path / 'checkpoints', 0o755)


# --- lock ------------------------------------------------------------------------------------


def test_second_run_refuses_naming_the_running_one(tmp_path):
  holder = _holder(tmp_path)
  try:
    record = json.loads((tmp_path / workdir.LOCK_FILE).read_text())
    assert record['pid'] == holder.pid and record['host'] == socket.gethostname()
    waits = []
    with pytest.MonkeyPatch.context() as patch, pytest.raises(ConfigError) as e:
      patch.setattr(workdir.time, 'sleep', waits.append)
      with workdir.lock(str(tmp_path)):
        pass
    assert not waits  # refused at once, not after waiting for the holder
    msg = str(e.value)
    assert f'host {socket.gethostname()}, pid {holder.pid}, started {record["started"]}' in msg
    assert f'--workdir={tmp_path} is in use by another run' in msg
    # The heartbeat moves on while the holder runs (every 0.2 s; a loaded machine may delay it,
    # so wait for the change rather than a fixed time).
    deadline = time.monotonic() + 120
    while (json.loads((tmp_path / workdir.LOCK_FILE).read_text())['heartbeat'] ==
           record['heartbeat'] and time.monotonic() < deadline):
      time.sleep(0.05)
    assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())['heartbeat'] > record['heartbeat']
  finally:
    holder.communicate('')
  assert holder.returncode == 0
  assert not (tmp_path / workdir.LOCK_FILE).exists()  # released on exit
  with workdir.lock(str(tmp_path)):  # and free for the next run
    assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())['pid'] == os.getpid()


def test_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  holder = _holder(tmp_path)
  holder.kill()  # SIGKILL: no clean-up, the lock stays behind
  holder.wait()
  assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())['pid'] == holder.pid
  with caplog.at_level(logging.WARNING):
    with workdir.lock(str(tmp_path)):
      assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())['pid'] == os.getpid()
  assert f'pid {holder.pid}' in caplog.text and 'is no longer running on this host' in caplog.text


def test_stale_and_fresh_locks(tmp_path, caplog):
  now = time.time()
  # This host, a process id that no longer exists, recent heartbeat: stale.
  _write_lock(tmp_path, host=socket.gethostname(), pid=_dead_pid(), started='t0', heartbeat=now)
  with workdir.lock(str(tmp_path)):
    pass
  assert not (tmp_path / workdir.LOCK_FILE).exists()
  # Another host (shared storage): its heartbeat decides.
  _write_lock(tmp_path, host='other-host', pid=1, started='t1', heartbeat=now - 5)
  with pytest.raises(ConfigError, match='host other-host, pid 1, started t1'):
    with workdir.lock(str(tmp_path), stale_after_s=60):
      pass
  _write_lock(tmp_path, host='other-host', pid=1, started='t1', heartbeat=now - 120)
  with caplog.at_level(logging.WARNING):
    with workdir.lock(str(tmp_path), stale_after_s=60):
      pass
  # The age is read when the lock is taken: at least 120 s, more on a busy machine.
  age = re.search(r'last heartbeat was (\d+) s ago', caplog.text)
  assert age and int(age.group(1)) >= 120, caplog.text


def test_lock_released_when_the_run_fails(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir.lock(str(tmp_path)):
      assert (tmp_path / workdir.LOCK_FILE).exists()
      raise RuntimeError('the run failed')
  assert not (tmp_path / workdir.LOCK_FILE).exists()


# --- config.json and its history -------------------------------------------------------------


def test_config_round_trip_and_compatibility(tmp_path):
  cfg = _config()
  workdir.write_config(str(tmp_path), cfg)
  text = (tmp_path / 'config.json').read_text()
  assert json.loads(text)['model']['width'] == 0.0625
  assert text.index('"augment"') < text.index('"data"')  # sorted
  saved = workdir.read_config(str(tmp_path))
  assert saved.train.batch_size == cfg.train.batch_size
  workdir.check_compatible(saved, cfg)  # tuples read back as lists still compare equal

  cfg.train.log_every_steps = 7
  cfg.train.checkpoint_every_steps = 3
  cfg.optim.base_lr = 0.3
  cfg.model.conv_impl, cfg.model.remat = 'im2col', True  # how it computes, not what: resumable
  workdir.check_compatible(saved, cfg)

  cfg.model.width = 0.5
  cfg.train.batch_size = 256
  cfg.data.classes = ('cat', 'dog')
  with pytest.raises(ConfigError) as e:
    workdir.check_compatible(saved, cfg)
  msg = str(e.value)
  assert 'model.width: 0.0625 -> 0.5' in msg and 'train.batch_size: 512 -> 256' in msg
  assert "data.classes: [] -> ['cat', 'dog']" in msg
  assert 'log_every_steps' not in msg and 'base_lr' not in msg
  assert 'use a new --workdir or restore the old values' in msg.lower()


def test_key_missing_from_an_older_config_is_not_a_change():
  saved = _config().to_dict()
  del saved['data']['classes']  # a config.json written before the key existed
  cfg = _config()
  cfg.data.classes = ('cat', 'dog')
  workdir.check_compatible(saved, cfg)


def test_read_config_missing(tmp_path):
  with pytest.raises(ConfigError, match='config.json'):
    workdir.read_config(str(tmp_path))


def test_resume_with_another_base_lr_keeps_both(tmp_path):
  cfg = _config()
  workdir.start_segment(str(tmp_path), cfg, 0)
  cfg.optim.base_lr = 0.25  # e.g. after a NaN at step ~6000
  workdir.start_segment(str(tmp_path), cfg, 6000)
  lines = [json.loads(x) for x in (tmp_path / workdir.HISTORY_FILE).read_text().splitlines()]
  assert [x['start_step'] for x in lines] == [0, 6000]
  assert [x['config']['optim']['base_lr'] for x in lines] == [1.0, 0.25]
  assert lines[0]['changed'] == {} and lines[1]['changed'] == {'optim.base_lr': [1.0, 0.25]}
  assert all(x['host'] == socket.gethostname() and x['pid'] == os.getpid() for x in lines)
  assert workdir.read_history(str(tmp_path)) == lines
  # config.json is the latest segment's config, complete.
  assert json.loads((tmp_path / 'config.json').read_text()) == lines[1]['config']
  assert workdir.read_config(str(tmp_path)).optim.base_lr == 0.25
