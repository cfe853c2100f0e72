"""metrics.jsonl / TensorBoard writer, progress line and throughput arithmetic."""
import glob
import json
import os
import struct

import numpy as np
import pytest

from simclr_jax import metrics


def test_writer_writes_jsonl_and_tensorboard(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), enabled=True)
  w.write(100, {'loss': np.float32(5.25), 'acc': 0.5})
  w.write(200, {'loss': 4.0, 'acc': 0.75, 'images_per_sec': 1234})
  w.flush()
  w.close()
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  assert rows == [{'step': 100, 'loss': 5.25, 'acc': 0.5},
                  {'step': 200, 'loss': 4.0, 'acc': 0.75, 'images_per_sec': 1234.0}]
  assert all(isinstance(v, float) for r in rows for k, v in r.items() if k != 'step')
  events = glob.glob(str(tmp_path / 'events.out.tfevents*'))
  assert len(events) == 1 and os.path.getsize(events[0]) > 0
  assert metrics.read_metrics(str(tmp_path)) == rows


def _read_events(path):
  """Parses a TFRecord event file by hand (u64 length, u32 crc, payload, u32 crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data, events, i = open(path, 'rb').read(), [], 0
  while i < len(data):
    (n,) = struct.unpack('<Q', data[i:i + 8])
    events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return events


def test_tensorboard_events_hold_the_scalars(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), enabled=True)
  w.write(3, {'loss': 2.5, 'acc': 0.25})
  w.close()
  (path,) = glob.glob(str(tmp_path / 'events.out.tfevents*'))
  scalars = {(e.step, v.tag): v.simple_value
             for e in _read_events(path) for v in e.summary.value}
  assert scalars == {(3, 'loss'): 2.5, (3, 'acc'): 0.25}


def test_resumed_run_appends_and_read_metrics_keeps_last_row_per_step(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), enabled=True)
  for step in (100, 200, 300):
    w.write(step, {'loss': float(step)})
  w.close()
  w = metrics.MetricWriter(str(tmp_path), enabled=True)  # restart from a checkpoint at step 200
  w.write(300, {'loss': -1.0})
  w.close()
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 4
  assert [(r['step'], r['loss']) for r in metrics.read_metrics(str(tmp_path))] == [
      (100, 100.0), (200, 200.0), (300, -1.0)]


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / 'wd'
  w = metrics.MetricWriter(str(workdir), enabled=False)
  w.write(1, {'loss': 1.0})
  w.flush()
  w.close()
  assert not workdir.exists()


def test_default_enabled_follows_process_index(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics.jax, 'process_index', lambda: 1)
  w = metrics.MetricWriter(str(tmp_path / 'p1'))
  w.write(1, {'loss': 1.0})
  w.close()
  assert not (tmp_path / 'p1').exists()
  monkeypatch.setattr(metrics.jax, 'process_index', lambda: 0)
  w = metrics.MetricWriter(str(tmp_path / 'p0'))
  w.write(1, {'loss': 1.0})
  w.close()
  assert (tmp_path / 'p0' / 'metrics.jsonl').exists()


def test_progress_line():
  line = metrics.progress_line(1200, 39000, {'loss': 5.12344, 'acc': 0.412, 'probe_acc': 0.35},
                            1234.4, 3 * 3600 + 12 * 60 + 5)
  assert line == ('step 1200/39000 (3.1%)  loss 5.1234  acc 0.412  probe_acc 0.35  '
                  '1234 img/s  ETA 3h12m')
  assert metrics.progress_line(1, 10, {}, float('nan'), None) == 'step 1/10 (10.0%)  ETA ?'


@pytest.mark.parametrize('seconds, text', [
    (0, '0s'), (59.4, '59s'), (61, '1m01s'), (3599, '59m59s'), (3600, '1h00m'),
    (11525, '3h12m'), (2 * 86400 + 3 * 3600 + 59, '2d03h'), (None, '?'), (float('inf'), '?')])
def test_format_duration(seconds, text):
  assert metrics.format_duration(seconds) == text


def test_step_timer(monkeypatch):
  now, cpu = [1000.0], [7.0]
  monkeypatch.setattr(metrics.time, 'monotonic', lambda: now[0])
  monkeypatch.setattr(metrics.time, 'process_time', lambda: cpu[0])
  timer = metrics.StepTimer(global_batch=512, total_steps=1100, start_step=100)
  now[0] += 20.0  # 100 steps in 20 s, using 30 CPU seconds (two busy threads, say)
  cpu[0] += 30.0
  out = timer.update(200)
  # Differences and ratios of the faked clocks in float64: ~1e-16 off, approx's 1e-6 to spare.
  assert out['step_time'] == pytest.approx(0.2)
  assert out['images_per_sec'] == pytest.approx(512 / 0.2)  # source images, not views
  assert out['eta_seconds'] == pytest.approx(900 * 0.2)
  assert out['host_cpu_per_step'] == pytest.approx(0.3)
  now[0] += 5.0  # measured from the previous call, not from the start
  cpu[0] += 2.0
  out = timer.update(300)
  assert out['step_time'] == pytest.approx(0.05)
  assert out['host_cpu_per_step'] == pytest.approx(0.02)
