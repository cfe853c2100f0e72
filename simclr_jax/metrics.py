"""Metrics output: WORKDIR/metrics.jsonl, TensorBoard events, the console progress line.

Only process 0 writes; on other processes `MetricWriter` is a no-op, so callers need no `if`.
TensorBoard events come from tensorboardX, which keeps TensorFlow out of the training process.
"""
import json
import math
import os
import time
from typing import Any, Mapping

import jax

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Appends scalars to WORKDIR/metrics.jsonl and TensorBoard events in WORKDIR (process 0)."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    # Default decided at construction, not import, so JAX's distributed setup has happened.
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      # Append: a resumed run continues the same file (read_metrics keeps the last row per step).
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a', encoding='utf-8')
      self._tb = SummaryWriter(logdir=workdir)

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes one row {step, **scalars} (values converted to float) to both outputs."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    # Flushed per row: rows are rare and a killed job should leave every logged step readable.
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, v, global_step=int(step))

  def flush(self) -> None:
    """Flushes both outputs to disk."""
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes both outputs; later writes are errors."""
    if self.enabled and self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Rows of WORKDIR/metrics.jsonl sorted by step; for a step logged twice (resume) the last."""
  path = os.path.join(workdir, METRICS_FILE)
  rows = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows[row['step']] = row
  return [rows[s] for s in sorted(rows)]


def format_duration(seconds: float | None) -> str:
  """Compact duration: '45s', '12m05s', '3h12m', '2d03h'; '?' when unknown."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return '?'
  s = int(round(seconds))
  if s < 60:
    return f'{s}s'
  if s < 3600:
    return f'{s // 60}m{s % 60:02d}s'
  if s < 86400:
    return f'{s // 3600}h{s % 3600 // 60:02d}m'
  return f'{s // 86400}d{s % 86400 // 3600:02d}h'


def progress_line(step: int, total_steps: int, scalars: Mapping[str, Any],
                  images_per_sec: float | None, eta_seconds: float | None) -> str:
  """'step 1200/39000 (3.1%)  loss 5.1234  acc 0.412  1234 img/s  ETA 3h12m'."""
  parts = [f'step {step}/{total_steps} ({100.0 * step / max(total_steps, 1):.1f}%)']
  for k, v in scalars.items():
    v = float(v)
    parts.append(f'{k} {v:.4f}' if k == 'loss' else f'{k} {v:.4g}')
  if images_per_sec is not None and math.isfinite(images_per_sec):
    parts.append(f'{images_per_sec:.0f} img/s')
  parts.append(f'ETA {format_duration(eta_seconds)}')
  return '  '.join(parts)


class StepTimer:
  """Throughput between log points: step time, images/s and ETA.

  images/s counts source images, i.e. global batch / step time; each image yields two views,
  so the encoder processes twice as many. Call `update` after a host sync (e.g. after fetching
  the metrics), otherwise JAX's async dispatch makes the times meaningless. The first interval
  includes compilation.
  """

  def __init__(self, global_batch: int, total_steps: int, start_step: int = 0):
    self.global_batch, self.total_steps = global_batch, total_steps
    self._step, self._time, self._cpu = start_step, time.monotonic(), time.process_time()

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` spent since the last update (e.g. an evaluation) out of the next one."""
    self._time += seconds

  def update(self, step: int) -> dict[str, float]:
    """{'step_time', 'images_per_sec', 'eta_seconds', 'host_cpu_per_step'} since the last call.

    host_cpu_per_step is this process's CPU seconds (all threads: input pipeline, dispatch,
    and on a CPU backend the computation itself) per step: what the host spends to feed a step.
    """
    now, cpu = time.monotonic(), time.process_time()
    steps, elapsed = step - self._step, now - self._time
    cpu_per_step = (cpu - self._cpu) / steps if steps > 0 else float('nan')
    self._step, self._time, self._cpu = step, now, cpu
    step_time = elapsed / steps if steps > 0 else float('nan')
    return {'step_time': step_time,
            'images_per_sec': self.global_batch / step_time if step_time > 0 else float('nan'),
            'eta_seconds': max(self.total_steps - step, 0) * step_time,
            'host_cpu_per_step': cpu_per_step}
