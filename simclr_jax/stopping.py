"""Stopping a run on purpose: signals and failed saves become one stop step for every process.

- The first SIGTERM/SIGINT is a stop request; a second one ends the process at once (exit
  status 128 + the signal number: 143, 130), even while the main thread waits inside JAX or
  orbax, e.g. on a collective whose peer is gone. A watcher thread reads the signals from
  Python's wakeup fd, so nothing waits for the main thread to get back to Python.
- One process: the loop stops after the step it is at when it next checks.
- Several processes (jax.distributed): a request made on any process (a signal sent to it
  alone, a save that failed there) is posted to the coordination service. Each process's
  listener thread then publishes the last step its loop checked, waits for the others at a
  barrier and takes the largest + 1, so every process stops after that same step, however far
  apart their host loops are (asynchronous dispatch).
This is the protocol of JAX's preemption sync manager (`multihost_utils.
reached_preemption_sync_point`, which orbax's `CheckpointManager.reached_preemption` calls), run
on requests of our own, because that manager (XLA's tsl/distributed_runtime/preemption) cannot
meet four of the run's promises:
  - its only notice is its C++ SIGTERM notifier (`Initialize(agent)` uses "sigterm", and JAX's
    binding offers no other): Ctrl-C and a failed save have no way in;
  - that notifier's handler only sets a flag, so a second SIGTERM cannot end the process at once;
  - its call counters start at 0, and its sync point, max(counters) + 1, is reached only by an
    equal step: a notice before any process has checked a step (the start-up of a run resumed
    at step 500, say) sets it to 1, which the run never reaches, so it never stops (here a
    process stops at the first step at or after the agreed one);
  - when its barrier fails (a frozen peer) the sync point stays unset and the living processes
    train on; here they stop without saving, their checkpoints intact ('unagreed').
The loop's check costs a lock and a comparison; nothing is exchanged until a request is made.
"""
import dataclasses
import json
import os
import signal
import threading

import jax
from absl import logging

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_KEY = 'simclr_jax/stop'  # coordination-service keys and barrier of this protocol
_BARRIER_TIMEOUT_S = 60  # every process's listener runs from the start of the job
_POLL_MS = 1000  # how long one wait of a listener for a request lasts before it re-checks


@dataclasses.dataclass(frozen=True)
class Request:
  """Why the run stops: kind 'signal' (why: 'SIGTERM'), 'save' (why: the message) or 'unagreed'."""
  kind: str
  why: str
  process: int = 0

  def source(self) -> str:
    """'SIGTERM', or 'SIGTERM (received by process 1)' in a multi-process run."""
    if jax.process_count() == 1:
      return self.why
    return f'{self.why} (received by process {self.process})'


class StopRequests:
  """Context manager owning the SIGTERM/SIGINT handlers and, with several processes, the agreement.

  `request(kind, why)` may be called from any thread; the loop calls `at(step)` after every
  step (and once before the first with the start step): it returns the Request once every
  process must stop after `step`, the same step on every process.
  """

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._local: Request | None = None
    self._local_lock = threading.Lock()
    self._lock = threading.Lock()  # held by the agreement; `at` waits for its outcome
    self._checked = -1  # the last step `at` was called with (-1: none yet)
    self._agreed: tuple[int, Request] | None = None
    self._signals = 0
    self._closing = threading.Event()
    self._previous = {}
    self._threads = []

  # --- signals -------------------------------------------------------------------------------

  def __enter__(self) -> 'StopRequests':
    self._read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # Python's C-level handler must never block on it
    self._write_fd = write_fd
    self._previous_fd = signal.set_wakeup_fd(write_fd)  # before the handlers: none goes unheard
    for sig in _SIGNALS:
      # The Python-level handler does nothing: it only makes Python's C-level handler write
      # the signal number to the wakeup fd, which the watcher reads at once.
      self._previous[sig] = signal.signal(sig, lambda *_: None)
    self._start(self._watch, 'simclr_jax stop: signals')
    if self._multi:
      self._client = _distributed_client()
      self._start(self._listen, 'simclr_jax stop: listener')
    return self

  def _start(self, target, name: str) -> None:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    self._threads.append(thread)

  def _watch(self) -> None:
    while True:
      for signum in os.read(self._read_fd, 64):
        if signum == 0:  # __exit__'s sentinel
          return
        name = signal.Signals(signum).name
        self._signals += 1
        if self._signals > 1:
          # Straight to stderr: a logging lock held by a blocked thread must not delay the exit.
          os.write(2, f'{name} received again: exiting at once, without saving (exit status '
                      f'{128 + signum}).\n'.encode())
          os._exit(128 + signum)  # pylint: disable=protected-access
        logging.warning('%s received: stopping%s at the next step boundary, after saving (send '
                        'it again to stop at once, without saving).', name,
                        ' every process' if self._multi else '')
        self.request('signal', name)

  def __exit__(self, *exc) -> None:
    self._closing.set()
    for sig, handler in self._previous.items():  # first: a later signal has its usual effect
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    signal.set_wakeup_fd(self._previous_fd)
    os.write(self._write_fd, b'\0')
    for thread in self._threads:
      thread.join(timeout=_POLL_MS / 1000 + 1)  # an agreement still waiting is left behind
    os.close(self._read_fd)
    os.close(self._write_fd)

  # --- requests and the step to stop at ------------------------------------------------------

  def request(self, kind: str, why: str) -> None:
    """Asks every process to stop (the first request wins); returns without waiting."""
    with self._local_lock:
      if self._local is not None:
        return
      self._local = Request(kind, why, jax.process_index())
    if self._multi:  # In a thread: the coordination service may not answer (a frozen peer).
      threading.Thread(target=self._post, args=(self._local,), daemon=True).start()

  def at(self, step: int) -> Request | None:
    """The request to stop after `step`, the same on every process; None to go on."""
    if not self._multi:
      return self._local
    with self._lock:
      self._checked = step
      if self._agreed is not None and step >= self._agreed[0]:
        return self._agreed[1]
    return None

  def _post(self, request: Request) -> None:
    try:
      self._client.key_value_set(f'{_KEY}/request', json.dumps(dataclasses.asdict(request)))
    except Exception as e:  # pylint: disable=broad-except
      if 'ALREADY_EXISTS' not in str(e):  # another process asked first: that request stands
        logging.error('Could not tell the other processes to stop (%s).', e)

  def _listen(self) -> None:
    while not self._closing.is_set():
      try:
        posted = self._client.blocking_key_value_get(f'{_KEY}/request', _POLL_MS)
      except Exception as e:  # pylint: disable=broad-except
        if 'DEADLINE_EXCEEDED' in str(e):  # no request yet
          continue
        logging.error('Stop requests of other processes can no longer be heard (%s).', e)
        return
      self._agree(Request(**json.loads(posted)))
      return

  def _agree(self, request: Request) -> None:
    """Every process publishes its last checked step; all stop after the largest + 1."""
    me = jax.process_index()
    with self._lock:
      try:
        self._client.key_value_set(f'{_KEY}/checked/{me}', str(self._checked))
        self._client.wait_at_barrier(f'{_KEY}/barrier', _BARRIER_TIMEOUT_S * 1000)
        checked = [int(v) for _, v in self._client.key_value_dir_get(f'{_KEY}/checked/')]
      except Exception as e:  # pylint: disable=broad-except
        # A process that does not answer (dead, frozen) cannot take part in a save either.
        logging.error('The processes could not agree on a step to stop at: %s', e)
        self._agreed = (-1, Request('unagreed', f'{request.source()}: the processes could '
                                    f'not agree on a step to stop at within '
                                    f'{_BARRIER_TIMEOUT_S} s ({str(e).splitlines()[0]})',
                                    request.process))
        return
      self._agreed = (max(checked) + 1, request)
    logging.info('Stop requested by process %d (%s): every process stops after step %d.',
                 request.process, request.kind, max(checked) + 1)


def _distributed_client():
  """The jax.distributed client (no public accessor; orbax reads the same attribute)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError('several JAX processes but no jax.distributed client: start the job '
                       'through simclr_jax.main, which calls jax.distributed.initialize().')
  return client
