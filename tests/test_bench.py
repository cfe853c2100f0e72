"""Benchmark sub-commands: each writes its JSON record with the expected keys.

Every benchmark runs in a subprocess: the sub-commands define absl flags (`--config`,
`--out_dir`, ...) that would clash with each other and with `simclr_jax.main` in one process.
`loss` and `input` run for real at tiny sizes. `step` and `end_to_end` compile a ResNet-18 train
step (twice for end_to_end), which takes minutes on a loaded 2-core CPU, so their real runs are
opt-in (SIMCLR_BENCH_SLOW=1); by default end_to_end runs its real CLI with the pretraining run
and the step benchmark replaced by fakes, which checks its arithmetic and record.
"""
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW = os.environ.get('SIMCLR_BENCH_SLOW') == '1'
RECORD_KEYS = {'benchmark', 'config', 'environment', 'figures'}
# A demo-sized recipe made tinier: ResNet-18 at width 1/16 on 8x8 digits.
TINY = ['--config=configs/demo.py', '--config.model.width=0.0625', '--config.data.image_size=8']


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env


def _run(args: list[str], out_dir: str, timeout: int = 300) -> dict:
  """Runs a command in the repo root; returns the single JSON record it wrote to out_dir."""
  proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  paths = glob.glob(os.path.join(out_dir, '*.json'))
  assert len(paths) == 1, (paths, proc.stdout[-2000:])
  with open(paths[0]) as f:
    record = json.load(f)
  assert RECORD_KEYS <= set(record)
  return record


def _bench(name: str, flags: list[str], out_dir: str, timeout: int = 300) -> dict:
  record = _run([sys.executable, '-m', 'simclr_jax.bench', name, f'--out_dir={out_dir}', *flags],
                out_dir, timeout)
  assert record['benchmark'] == name
  return record


def test_loss_memory_grows_with_local_times_global_rows(tmp_path):
  sizes, dim = [64, 128, 256], 16
  # max_time ~0: the first size is timed, the later ones get memory only (predicted too slow).
  record = _bench('loss', [f'--sizes={",".join(map(str, sizes))}', f'--dim={dim}',
                           '--devices=8', '--steps=2', '--warmup=1', '--max_time=1e-9'],
                  str(tmp_path))
  rows = record['figures']
  assert record['environment']['device_count'] == 8
  assert [r['global_batch'] for r in rows] == sizes
  for n, r in zip(sizes, rows):
    n_local = n // 8
    assert r['local_rows'] == 2 * n_local and r['global_rows'] == 2 * n
    assert r['logits_bytes_per_device'] == (2 * n_local) * (2 * n) * 4
    # The compiled program is one device's: its arguments are its shards of z1 and z2.
    assert r['argument_bytes_per_device'] == 2 * n_local * dim * 4
    # Temp holds at least this device's [2n_local, 2N] logits, not the [2N, 2N] matrix.
    assert r['logits_bytes_per_device'] <= r['temp_bytes_per_device']
    assert r['temp_bytes_per_device'] < (2 * n) ** 2 * 4
  temps = [r['temp_bytes_per_device'] for r in rows]
  assert temps == sorted(temps) and temps[0] < temps[-1], temps
  assert rows[0]['time_s_median'] > 0 and rows[0]['timing'].startswith('median')
  for r in rows[1:]:
    assert r['time_s_median'] is None and r['timing'].startswith('skipped'), r


def test_input_cifar_preset(tmp_path):
  # 'device' first: its CPU time is the whole process's, so it is measured before any other
  # mode's tf.data threads exist; 16 batches (256 images) amortise a stray GC pause or wake-up.
  record = _bench('input', ['--preset=cifar', '--augment_on=device,host,split', '--batch_size=16',
                            '--warmup_batches=1', '--batches=16'], str(tmp_path))
  rows = {r['augment_on']: r for r in record['figures']}
  assert sorted(rows) == ['device', 'host', 'split']
  for row in rows.values():
    assert row['preset'] == 'cifar' and row['batch'] == 16
    assert row['images_per_s'] > 0 and row['batch_ms'] > 0 and row['cpu_s_per_1000_images'] > 0
  # 'device' leaves the host only the index stream: far cheaper than tf.data making the views.
  # Measured 0.001-0.003 vs 0.37-0.57 CPU s per 1000 images (>= 100x): a factor 5 leaves >= 20x
  # for another machine, and lets >= 15 ms of stray CPU work land in the 'device' window. Other
  # processes' load does not count in this process's CPU time.
  assert rows['device']['cpu_s_per_1000_images'] < rows['host']['cpu_s_per_1000_images'] / 5


_FAKE_END_TO_END = textwrap.dedent('''
    import sys
    from simclr_jax import metrics
    from simclr_jax.bench import end_to_end

    def fake_run(config, workdir):
      # Logged every 4 steps: the first interval (compilation) is slow, then 0.5 s and 0.25 s.
      writer = metrics.MetricWriter(workdir, enabled=True)
      for step, step_time, cpu in ((4, 10.0, 9.0), (8, 0.5, 0.8), (12, 0.25, 0.4)):
        writer.write(step, {'loss': 1.0, 'step_time': step_time, 'host_cpu_per_step': cpu,
                            'images_per_sec': config.train.batch_size / step_time})
      writer.close()
      assert config.train.steps == 12 and config.train.log_every_steps == 4
      return {'loss': 1.0}

    def fake_step(config, batch, steps, warmup):
      return {'images_per_s': 100.0, 'step_s_median': batch / 100.0, 'devices': 8}

    end_to_end.pretrain.run = fake_run
    end_to_end.step.benchmark = fake_step
    from simclr_jax.bench import __main__ as bench
    bench.main([sys.argv[0], 'end_to_end'] + sys.argv[1:])
''')


def test_end_to_end_excludes_first_interval(tmp_path):
  record = _run([sys.executable, '-c', _FAKE_END_TO_END, f'--out_dir={tmp_path}', '--steps=12',
                 '--log_every=4', '--batch=32'], str(tmp_path), timeout=300)
  figures = record['figures']
  # Sums and ratios of the fake figures in float64: exact to ~1e-16, approx's 1e-6 to spare.
  # 8 steady steps in 4*0.5 + 4*0.25 = 3 s of 32 images each; step alone: 100 images/s.
  assert figures['end_to_end_images_per_s'] == pytest.approx(8 * 32 / 3.0)
  assert figures['ratio_end_to_end_over_step'] == pytest.approx(8 * 32 / 3.0 / 100.0)
  assert figures['end_to_end_steady_steps'] == 8
  # CPU seconds over the same 8 steps: 4*0.8 + 4*0.4 = 4.8 s for 256 images.
  assert figures['host_cpu_s_per_1000_images'] == pytest.approx(1000 * 4.8 / 256)
  assert record['config']['config']['data']['source'] == 'demo'  # the default recipe


def test_end_to_end_refuses_a_single_log_interval(tmp_path):
  # With a config override and no --config: the default recipe's overrides must parse first.
  proc = subprocess.run([sys.executable, '-m', 'simclr_jax.bench', 'end_to_end', '--steps=4',
                         '--log_every=4', f'--out_dir={tmp_path}', '--config.model.width=0.25'],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and 'two log intervals' in proc.stderr + proc.stdout, proc.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.skipif(not SLOW, reason='compiles a ResNet-18 step (minutes on a loaded 2-core '
                    'CPU); set SIMCLR_BENCH_SLOW=1')
def test_step_real(tmp_path):
  record = _bench('step', TINY + ['--batch=32', '--steps=2', '--warmup=1'], str(tmp_path))
  figures = record['figures']
  assert figures['global_batch'] == 32 and figures['devices'] == 8
  assert figures['step_s_median'] > 0 and figures['gflops_per_step'] > 0


@pytest.mark.skipif(not SLOW, reason='compiles a ResNet-18 step twice (minutes on a loaded 2-core '
                    'CPU); set SIMCLR_BENCH_SLOW=1')
def test_step_chunks_real(tmp_path):
  runs = {}
  for chunks in (1, 2):
    out = str(tmp_path / str(chunks))
    runs[chunks] = _bench('step', TINY + ['--batch=32', '--steps=1', '--warmup=1',
                                          f'--config.train.chunks={chunks}'], out)['figures']
  assert runs[2]['chunks'] == 2 and runs[2]['compiled_temp_bytes'] > 0
  assert runs[2]['compiled_temp_bytes'] < runs[1]['compiled_temp_bytes']
  # Model FLOPs of the step, whatever the chunking (XLA counts a loop body once); integer counts
  # held as floats, so approx's 1e-6 only absorbs their sums' rounding.
  assert runs[2]['gflops_per_step'] == pytest.approx(runs[1]['gflops_per_step'])


@pytest.mark.skipif(not SLOW, reason='a real pretraining run plus the step benchmark (minutes on '
                    'a loaded 2-core CPU); set SIMCLR_BENCH_SLOW=1')
def test_end_to_end_real(tmp_path):
  record = _bench('end_to_end', TINY + ['--batch=32', '--steps=6', '--log_every=2',
                                        '--warmup=1'], str(tmp_path), timeout=600)
  figures = record['figures']
  assert [r['step'] for r in figures['metrics_rows']] == [2, 4, 6]
  assert figures['end_to_end_steady_steps'] == 4
  assert figures['end_to_end_images_per_s'] > 0 and figures['step_images_per_s'] > 0
  # The record's ratio of its own two figures: one float64 rounding, approx's 1e-6 to spare.
  assert figures['ratio_end_to_end_over_step'] == pytest.approx(
      figures['end_to_end_images_per_s'] / figures['step_images_per_s'])


def test_program_flops_counts_the_global_step(devices, monkeypatch):
  # Independent count: a [m,k]x[k,n] matmul is 2mkn FLOPs, plus one add per output element,
  # whatever the number of devices it is sharded over (rows of `a` on the 8 devices).
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from simclr_jax import parallel
  from simclr_jax.bench import common  # no absl flags: safe to import in the test process
  m, k, n = 16, 32, 8
  a = jax.device_put(jnp.ones((m, k)), NamedSharding(parallel.make_mesh(devices), P('data')))
  lowered = jax.jit(lambda a, b: a @ b + 1.0).lower(a, jnp.ones((k, n)))
  # Integer counts (8320) held as floats: exact, approx's 1e-6 to spare.
  assert common.program_flops(lowered) == pytest.approx(2 * m * k * n + m * n)
  # Backends that cannot analyse unoptimised HLO (GPU plugins): the CPU client's count.
  def unimplemented():
    raise NotImplementedError
  monkeypatch.setattr(lowered, 'cost_analysis', unimplemented)
  assert common.program_flops(lowered) == pytest.approx(2 * m * k * n + m * n)


def test_device_bytes_limit_from_memory_stats():
  from simclr_jax.bench import common

  class Device:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      if isinstance(self.stats, Exception):
        raise self.stats
      return self.stats

  assert common.device_bytes_limit(Device({'bytes_limit': 80 * 2**30})) == 80 * 2**30
  assert common.device_bytes_limit(Device(None)) == float('inf')  # CPU: no stats
  assert common.device_bytes_limit(Device(RuntimeError('unsupported'))) == float('inf')


def test_convs_finds_every_convolution_of_resnet18(tmp_path):
  """ResNet-18 as the official tf2/resnet.py has 21 convolutions: the stem, 16 3x3 in 8 basic
  blocks, and a 1x1 projection shortcut on the first block of each of the 4 stages."""
  record = _bench('convs', [*TINY, '--batch=16', '--config.cpu_devices=2', '--repeats=1'],
                  str(tmp_path))
  figures = record['figures']
  rows = 2 * 16 // 2  # two views of each of 16 images, over 2 CPU devices
  assert figures['rows_per_device'] == rows and figures['devices'] == 2
  table = figures['table']
  assert sum(r['count'] for r in table) == 21
  # The stem (width 64 / 16 = 4 filters, 3x3 over RGB, stride 1 on 8x8 images) by hand.
  stem = table[0]
  assert (stem['input'], stem['kernel'], stem['stride']) == (f'{rows}x8x8x3', '3x3x3x4', '1x1')
  assert stem['gflop'] == pytest.approx(2 * rows * 8 * 8 * 4 * 3 * 3 * 3 / 1e9, rel=1e-12)
  # Totals: every call of a step, on every device; the images need no input gradient.
  total = {name: 2 * sum(r['count'] * r[f'{name}_cpu_ms'] for r in table
                         if not (name == 'input_grad' and r is stem)) / 1e3
           for name in ('forward', 'input_grad', 'kernel_grad')}
  for name, value in total.items():
    assert figures['step_conv_cpu_s'][name] == pytest.approx(value, rel=1e-9)


# --- vs_tf: the official TF2 step beside this project's ------------------------------------------

def test_vs_tf_without_the_official_code_names_the_flag(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'simclr_jax.bench', 'vs_tf',
                         f'--official={tmp_path}', f'--out_dir={tmp_path}'], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert f"--official='{tmp_path}' has no model.py" in proc.stderr
  assert 'google-research/simclr' in proc.stderr and not os.listdir(tmp_path)


_OFFICIAL_FLAGS = textwrap.dedent("""
    import json, sys
    from configs import cifar10
    from simclr_jax.bench import vs_tf
    config = cifar10.get_config()
    print(json.dumps(vs_tf.official_flags(config, config.train.batch_size)))
    config.model.width = 0.25
    vs_tf.official_flags(config, 128)
""")


def test_vs_tf_sets_the_official_flags_of_the_readme_cifar10_command():
  """The official README's CIFAR-10 command, flag by flag (independent text): `python run.py
  --train_mode=pretrain --train_batch_size=512 --train_epochs=1000 --learning_rate=1.0
  --weight_decay=1e-4 --temperature=0.5 --dataset=cifar10 --image_size=32 --eval_split=test
  --resnet_depth=18 --use_blur=False --color_jitter_strength=0.5 ...`. In a subprocess: vs_tf
  defines absl flags that other benchmark modules define too."""
  proc = subprocess.run([sys.executable, '-c', _OFFICIAL_FLAGS], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  settings = json.loads(proc.stdout.splitlines()[0])
  readme = {'train_mode': 'pretrain', 'train_batch_size': 512, 'train_epochs': 1000,
            'learning_rate': 1.0, 'weight_decay': 1e-4, 'temperature': 0.5, 'image_size': 32,
            'resnet_depth': 18}
  assert {k: settings[k] for k in readme} == readme
  # Both sides build the same network: width 1, LARS, the recipe's own projection head.
  assert settings['width_multiplier'] == 1 and settings['optimizer'] == 'lars'
  assert settings['num_proj_layers'] == 3 and settings['proj_out_dim'] == 128
  # Width 1/4 has no official twin (the official flag is an integer): refused, with the reason.
  assert proc.returncode != 0 and 'integer --width_multiplier' in proc.stderr


_ONEDNN_ON = ('import sys; sys.path.insert(0, sys.argv[1]); from simclr_jax.bench import vs_tf; '
              'import os, subprocess; '
              'env = vs_tf.official_env(sys.argv[2], dict(os.environ)); '
              'code = "import tensorflow; from tensorflow.python.util import _pywrap_util_port '
              'as p; print(p.IsMklEnabled())"; '
              'print(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, '
              'text=True).stdout.strip())')


@pytest.mark.parametrize('setting,expected', [('on', 'True'), ('off', 'False')])
def test_vs_tf_official_onednn_setting_is_what_tensorflow_runs(setting, expected):
  """TensorFlow's own answer (IsMklEnabled) in the environment the official child gets: 'on'
  turns oneDNN on even where TensorFlow's CPU policy leaves it off (CPUs without AVX512_VNNI,
  AVX512_BF16, AVX_VNNI or AMX), 'off' turns it off where the policy turns it on, whatever the
  caller's own TF_ENABLE_ONEDNN_OPTS."""
  env = _env()
  env['TF_ENABLE_ONEDNN_OPTS'] = {'on': '0', 'off': '1'}[setting]  # the opposite, overridden
  proc = subprocess.run([sys.executable, '-c', _ONEDNN_ON, ROOT, setting], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == expected


@pytest.mark.skipif(not os.environ.get('SIMCLR_OFFICIAL_TF2'),
                    reason='set SIMCLR_OFFICIAL_TF2=PATH/simclr/tf2 (and install tf_keras) to '
                           'time the official step beside this one')
def test_vs_tf_real(tmp_path):
  record = _bench('vs_tf', [f'--official={os.environ["SIMCLR_OFFICIAL_TF2"]}', '--batch=8',
                            '--steps=1', '--warmup=0', '--rounds=1'], str(tmp_path),
                  timeout=1200)
  figures = record['figures']
  assert len(figures['rounds']) == 1 and figures['official_s_median'] > 0
  # The record's ratio of its own two medians: one float64 division.
  assert figures['ratio_median'] == pytest.approx(
      figures['official_s_median'] / figures['ours_s_median'])
  # The default times the official step at its fastest: with oneDNN, as TensorFlow reports it.
  assert figures['official_onednn'] == 'on' and figures['rounds'][0]['official_onednn'] is True
