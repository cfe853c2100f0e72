"""`python -m simclr_jax.bench vs_tf --official=PATH`: this project's step beside the official one.

Times the official TF2 SimCLR pretraining step and this project's (`bench step`) on the same
recipe and shapes, each in a process of its own, in alternation (official, ours, official,
ours, ...), and prints every round's median step time and the ratio official / ours (above 1:
this project is faster) with its min, median and max over the rounds:

  PYTHONPATH=/path/to/tf_keras python -m simclr_jax.bench vs_tf \\
      --official=/path/to/simclr/tf2 --config=configs/cifar10.py --batch=128

PATH is the tf2/ folder of a local copy of google-research/simclr; nothing of it is copied here.
Its step is its run.py's `single_step` as a `tf.function`, built from its own pieces:
`model.Model` (ResNet, projection head, supervised head on the stopped h), `objective.
add_contrastive_loss`, `objective.add_supervised_loss`, `model.add_weight_decay` and
`model.build_optimizer` (LARS) over `model.WarmUpAndCosineDecay`, its flags set from the
recipe. The official code needs Keras 2: `pip install 'tf_keras==2.21.*'` (the child process
sets TF_USE_LEGACY_KERAS=1). Both sides take random views of the recipe's size: the input
pipeline is not timed.

TensorFlow's convolutions run on oneDNN only where it is on. Its default on Linux
(tensorflow/core/util/port.cc, `DefaultOneDnnPolicy`) is on for CPUs with "neural network
features" and off otherwise: `TestCPUFeature(AVX512_VNNI) || TestCPUFeature(AVX512_BF16) ||
TestCPUFeature(AVX_VNNI) || TestCPUFeature(AMX_TILE) || ...`, read once from
TF_ENABLE_ONEDNN_OPTS. On an AVX2-only CPU, turning it on nearly halved the official step
(README "Performance"). `--official_onednn=on` (the default)
times the official step at its fastest (TF_ENABLE_ONEDNN_OPTS=1), `off` without oneDNN, and
`default` as TensorFlow decides for this CPU; every round records whether oneDNN was on.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar10.py', 'Recipe to compare.',
                                          lock_config=True)
_OFFICIAL = flags.DEFINE_string('official', None, 'tf2/ folder of google-research/simclr.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Global batch of both steps.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per process.', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternations (one official, one ours each).')
_OUT = flags.DEFINE_string('out_dir', 'bench_results', 'Where the JSON goes.')
_ONEDNN = flags.DEFINE_enum(
    'official_onednn', 'on', ['on', 'off', 'default'],
    "TensorFlow's oneDNN kernels for the official step: on (TF_ENABLE_ONEDNN_OPTS=1, its fastest "
    'CPU path), off, or default (TensorFlow decides from the CPU: on with AVX512_VNNI, '
    'AVX512_BF16, AVX_VNNI or AMX).')
_ROLE = flags.DEFINE_enum('role', 'driver', ['driver', 'official'],
                          'Internal: the child process that times the official step.')
_OFFICIAL_FILES = ('model.py', 'resnet.py', 'objective.py', 'lars_optimizer.py', 'run.py')


def check_official(path: str | None) -> str:
  """`path` if it is the official tf2/ folder, else SystemExit naming the flag and the fix."""
  missing = [f for f in _OFFICIAL_FILES if not path or not os.path.exists(os.path.join(path, f))]
  if missing:
    sys.exit(f'error: --official={path!r} has no {", ".join(missing)}; pass the tf2/ folder of '
             'a local copy of google-research/simclr (git clone '
             'https://github.com/google-research/simclr).')
  return path


def official_flags(config: Any, batch: int) -> dict[str, Any]:
  """The official run.py flags that describe the recipe's pretraining step."""
  width = config.model.width
  if width != int(width) or config.model.dtype != 'float32':
    sys.exit(f'error: config.model.width={width} and config.model.dtype={config.model.dtype!r}: '
             'the official code takes an integer --width_multiplier and float32.')
  if config.model.cifar_stem != (config.data.image_size <= 32):
    sys.exit('error: the official code takes the CIFAR stem exactly for --image_size <= 32; '
             f'config.model.cifar_stem={config.model.cifar_stem} with config.data.image_size='
             f'{config.data.image_size} has no official twin.')
  return {
      'train_mode': 'pretrain', 'lineareval_while_pretraining': config.data.num_classes > 0,
      'resnet_depth': config.model.depth, 'width_multiplier': int(width),
      'sk_ratio': config.model.sk_ratio, 'se_ratio': config.model.se_ratio,
      'image_size': config.data.image_size, 'proj_head_mode': 'nonlinear',
      'num_proj_layers': config.model.num_proj_layers, 'proj_out_dim': config.model.proj_dim,
      'train_batch_size': batch, 'temperature': config.loss.temperature, 'hidden_norm': True,
      'optimizer': 'lars', 'learning_rate': config.optim.base_lr,
      'learning_rate_scaling': config.optim.lr_scaling, 'momentum': config.optim.momentum,
      'weight_decay': config.optim.weight_decay, 'warmup_epochs': config.optim.warmup_epochs,
      'train_epochs': int(config.train.epochs), 'batch_norm_decay': 0.9, 'global_bn': True}


def official_env(onednn: str, environ: dict[str, str]) -> dict[str, str]:
  """`environ` for the official child: Keras 2, quiet logs, and TF_ENABLE_ONEDNN_OPTS set from
  `onednn` ('on', 'off', or 'default': unset, so TensorFlow's own CPU policy decides)."""
  env = dict(environ, TF_USE_LEGACY_KERAS='1', TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('TF_ENABLE_ONEDNN_OPTS', None)
  if onednn != 'default':
    env['TF_ENABLE_ONEDNN_OPTS'] = {'on': '1', 'off': '0'}[onednn]
  return env


def _official_times(path: str, settings: dict[str, Any], num_classes: int, steps: int,
                    warmup: int) -> tuple[list[float], float, bool]:
  """(step times, CPU seconds per step, whether oneDNN was on) of the official step; this
  process imports TensorFlow and the official code."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # TensorFlow's own answer (env var and CPU policy together); it has no public accessor.
  from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
  if not tf.keras.__name__.startswith('tf_keras'):
    sys.exit("error: tf.keras is Keras 3; the official code needs Keras 2: pip install "
             "'tf_keras==2.21.*' (or put it on PYTHONPATH).")
  sys.path.insert(0, path)
  # pylint: disable=g-import-not-at-top
  import model as model_lib  # the official tf2/model.py
  import objective as obj_lib
  import run  # pylint: disable=unused-import  # noqa: F401  (defines the official flags)
  # pylint: enable=g-import-not-at-top
  official = flags.FLAGS
  for key, value in settings.items():
    setattr(official, key, value)
  model = model_lib.Model(num_classes)
  optimizer = model_lib.build_optimizer(model_lib.WarmUpAndCosineDecay(
      official.learning_rate, 50_000))

  @tf.function
  def step(features, labels):
    with tf.GradientTape() as tape:
      projection, supervised = model(features, training=True)
      loss, _, _ = obj_lib.add_contrastive_loss(projection, hidden_norm=official.hidden_norm,
                                                temperature=official.temperature)
      if supervised is not None:
        loss += obj_lib.add_supervised_loss(labels=tf.concat([labels, labels], 0),
                                            logits=supervised)
      loss += model_lib.add_weight_decay(model, adjust_per_optimizer=True)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  rng = np.random.default_rng(0)
  size, batch = settings['image_size'], settings['train_batch_size']
  views = tf.constant(rng.random((batch, size, size, 6), np.float32))  # two views, as official
  labels = tf.one_hot(rng.integers(0, max(num_classes, 1), batch), max(num_classes, 1))
  for _ in range(1 + warmup):  # the first call traces and builds
    step(views, labels).numpy()
  times, cpu = [], time.process_time()
  for _ in range(steps):
    start = time.perf_counter()
    step(views, labels).numpy()
    times.append(time.perf_counter() - start)
  # CPU seconds of this process per step: whether TensorFlow kept the cores busy.
  return times, (time.process_time() - cpu) / steps, bool(_pywrap_util_port.IsMklEnabled())


def _child(args: list[str], env: dict[str, str] | None = None) -> list[str]:
  """Runs `python -m simclr_jax.bench <args>` in a process of its own (in `env`, default this
  process's environment); its stdout lines."""
  proc = subprocess.run([sys.executable, '-m', 'simclr_jax.bench', *args], env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
  if proc.returncode:
    sys.exit(f'error: `python -m simclr_jax.bench {args[0]}` failed (exit {proc.returncode}):'
             f'\n{proc.stdout[-1000:]}{proc.stderr[-3000:]}')
  return proc.stdout.splitlines()


def _official_round(overrides: list[str], path: str, onednn: str) -> tuple[float, float, bool]:
  """(median step time, CPU seconds per step, oneDNN on) of the official step in one child
  process."""
  lines = _child(['vs_tf', *overrides, f'--official={path}', '--role=official'],
                 official_env(onednn, dict(os.environ)))
  record = json.loads([l for l in lines if l.startswith('{')][-1])
  return statistics.median(record['step_s']), record['cpu_s_per_step'], record['onednn']


def _our_round(overrides: list[str], out_dir: str) -> tuple[float, float]:
  """(median step time, CPU seconds per step) of one `bench step` child process."""
  lines = _child(['step', *overrides, f'--out_dir={out_dir}'])
  saved = [l.removeprefix('saved ') for l in lines if l.startswith('saved ')][-1]
  with open(saved) as f:
    figures = json.load(f)['figures']
  return figures['step_s_median'], figures['cpu_s_per_step']


def _run(argv: list[str]) -> None:
  del argv
  config, batch = _CONFIG.value, _BATCH.value
  path = check_official(_OFFICIAL.value)
  settings = official_flags(config, batch)
  if _ROLE.value == 'official':
    times, cpu_s, onednn = _official_times(path, settings, config.data.num_classes,
                                           _STEPS.value, _WARMUP.value)
    print(json.dumps({'step_s': times, 'cpu_s_per_step': cpu_s, 'onednn': onednn}))
    return
  from simclr_jax.bench import common  # pylint: disable=g-import-not-at-top
  # The recipe as given (--config=FILE and any --config.key=value), for both children.
  recipe = [a for a in sys.argv[1:] if a.startswith('--config')]
  if not any(a.startswith('--config=') for a in recipe):
    recipe.insert(0, f'--config={config_flags.get_config_filename(flags.FLAGS["config"])}')
  overrides = [*recipe, f'--batch={batch}', f'--steps={_STEPS.value}',
               f'--warmup={_WARMUP.value}']
  rounds = []
  for r in range(_ROUNDS.value):
    official_s, official_cpu_s, onednn = _official_round(overrides, path, _ONEDNN.value)
    ours_s, ours_cpu_s = _our_round(overrides, os.path.join(_OUT.value, 'vs_tf_steps'))
    rounds.append({'official_s': official_s, 'ours_s': ours_s, 'official_onednn': onednn,
                   'official_cpu_s': official_cpu_s, 'ours_cpu_s': ours_cpu_s})
    rounds[-1]['ratio'] = rounds[-1]['official_s'] / rounds[-1]['ours_s']
    print(f"round {r + 1}: official {rounds[-1]['official_s']:.3f} s (oneDNN "
          f"{'on' if onednn else 'off'}), ours {rounds[-1]['ours_s']:.3f} s, official/ours "
          f"{rounds[-1]['ratio']:.2f}", flush=True)
  ratios = [x['ratio'] for x in rounds]
  figures = {'ratio_min': min(ratios), 'ratio_median': statistics.median(ratios),
             'ratio_max': max(ratios),
             'official_s_median': statistics.median(x['official_s'] for x in rounds),
             'ours_s_median': statistics.median(x['ours_s'] for x in rounds),
             'official_onednn': _ONEDNN.value, 'global_batch': batch, 'rounds': rounds}
  common.print_table([{k: v for k, v in figures.items() if k != 'rounds'}])
  saved = common.save('vs_tf', _OUT.value, {'config': config.to_dict(), 'batch': batch,
                                            'official_flags': settings}, figures)
  print(f'saved {saved}')


def main(argv: list[str]) -> None:
  """Entry point used by simclr_jax.bench.__main__ (argv[0] is the program name)."""
  app.run(_run, argv=argv)
