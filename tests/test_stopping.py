"""Stop requests: signals and failed saves stop every process after the same step.

The agreement is tested on real jax.distributed processes (localhost, gloo) running a loop of
cross-process collectives, which is what ties the processes of a training run together; the
pretraining job itself is tested in test_multihost.py (SIGTERM to one process) and
test_pretrain.py (a failed save).
"""
import os
import signal
import subprocess
import sys
import time

import pytest

import processes
from simclr_jax import stopping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process of a 2-process job: a collective per step (as a train step has), `stop.at(step)`
# after each, like the pretraining loop. MODE 'save': process 1 asks to stop at its step 5.
_LOOP = '''
import sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import numpy as np
from jax.experimental import multihost_utils
from simclr_jax import stopping
with stopping.StopRequests() as stop:
  print('READY', flush=True)
  step = 0
  while True:
    step += 1
    multihost_utils.process_allgather(np.int32(step))
    if sys.argv[3] == 'save' and step == 5 and jax.process_index() == 1:
      stop.request('save', 'disk full')
    request = stop.at(step)
    if request:
      print('STOP', step, request.kind, request.why, request.process, flush=True)
      break
'''


def _start_two(mode):
  port, env = processes.free_port(), processes.cpu_env(1)
  # stdout apart from stderr: gloo writes to stderr from its own threads, in pieces, so in a
  # merged stream its text can land inside the lines this test reads.
  procs = [subprocess.Popen([sys.executable, '-c', _LOOP, f'localhost:{port}', str(i), mode],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:  # both are in the loop (or about to be) once they print READY
    lines = []
    while not lines or lines[-1] != 'READY\n':
      lines.append(p.stdout.readline())
      assert lines[-1], (''.join(lines) + p.communicate()[1])[-3000:]
  time.sleep(1)  # a few steps of the loop
  return procs


def _finish(procs, timeout):
  """Each process's (stdout, stderr) once it has exited; kills what still runs after `timeout`."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def _stops(procs, outs):
  stops = []
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, (out + err)[-3000:]
    stops.append(next(line.split()[1:] for line in out.splitlines() if line.startswith('STOP')))
  return stops


def test_ctrl_c_stops_both_processes_after_the_same_step():
  procs = _start_two('loop')
  for p in procs:  # Ctrl-C in a terminal signals every process of the foreground group
    p.send_signal(signal.SIGINT)
  outs = _finish(procs, 60)
  stops = _stops(procs, outs)
  assert stops[0] == stops[1], stops
  assert stops[0][1:3] == ['signal', 'SIGINT'], stops


def test_a_failed_save_on_one_process_stops_both_after_the_same_step():
  procs = _start_two('save')
  stops = _stops(procs, _finish(procs, 60))
  assert stops[0] == stops[1], stops
  assert int(stops[0][0]) >= 5 and stops[0][1:] == ['save', 'disk', 'full', '1'], stops


def test_second_signal_ends_a_process_at_once_while_its_peer_hangs():
  procs = _start_two('loop')
  try:
    procs[0].send_signal(signal.SIGSTOP)  # a hung peer: no collective, no agreement
    procs[1].send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):  # process 1 cannot stop cleanly alone
      procs[1].wait(timeout=3)
    procs[1].send_signal(signal.SIGINT)  # a second Ctrl-C does not wait for any of that
    out, err = procs[1].communicate(timeout=30)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  assert procs[1].returncode == 128 + signal.SIGINT, (out + err)[-3000:]
  assert 'SIGINT received again: exiting at once, without saving (exit status 130).' in err


def test_one_process_stops_at_the_first_signal_and_exits_at_the_second(tmp_path):
  with stopping.StopRequests() as stop:
    assert stop.at(0) is None
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while stop.at(1) is None and time.monotonic() < deadline:
      time.sleep(0.01)
    assert stop.at(1) == stopping.Request('signal', 'SIGTERM', 0)
  # The second signal, in a process of its own: it ends that process.
  script = ('import os, signal, time\nfrom simclr_jax import stopping\n'
            'with stopping.StopRequests() as stop:\n'
            '  print("READY", flush=True)\n'
            '  while True:\n    time.sleep(0.01)\n')
  proc = subprocess.Popen([sys.executable, '-c', script], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert proc.stdout.readline() == 'READY\n'
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  assert proc.poll() is None  # the first only asks to stop
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=30)[0]
  assert proc.returncode == 128 + signal.SIGTERM, out
  assert 'SIGTERM received again: exiting at once, without saving (exit status 143).' in out
