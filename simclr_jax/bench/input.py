"""`python -m simclr_jax.bench input`: the host's side of the train input (two views per example).

Presets: 'cifar' reads 32x32 uint8 images from memory (the demo digits, cached; no blur, s=0.5);
'imagenet' reads ~400x350 JPEG files written to a temp folder (decode_and_crop_jpeg, blur,
s=1.0, 224 px). Images/s counts examples delivered with both views, as the trainer sees them.

--augment_on (config.data.augment_on) picks what the host does: 'host' the whole view in
tf.data, 'split' decode + crop + resize + flip (colour and blur then run in the step), 'device'
only the index stream (the views are made in the step from the device-resident data set; the
imagenet preset's folder of differently sized JPEGs cannot be held there, so it is skipped).
cpu_s_per_1000_images is this process's CPU time over the timed batches, every thread counted.
"""
import os
import tempfile
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from simclr_jax.bench import common

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/cifar10.py', 'Recipe whose data keys the presets override.',
    lock_config=True)
flags.DEFINE_list('preset', ['cifar', 'imagenet'], 'Presets to run: cifar, imagenet.')
flags.DEFINE_list('augment_on', ['host'], 'Where the views are made: host, split, device.')
flags.DEFINE_string('out_dir', 'bench_results', 'Where the JSON record goes.')
flags.DEFINE_integer('batch_size', 128, 'Per-process batch size.')
flags.DEFINE_integer('warmup_batches', 3, 'Batches read before timing (tracing, buffers).')
flags.DEFINE_integer('batches', 20, 'Timed batches.')
flags.DEFINE_integer('num_files', 300, 'JPEG files for the imagenet preset.')


def _write_jpegs(root: str, n: int) -> None:
  """n smooth random ~400x350 JPEGs (natural-image-like size and compressibility) in 2 classes."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for i in range(n):
    d = os.path.join(root, 'train', f'class{i % 2}')
    os.makedirs(d, exist_ok=True)
    h, w = rng.integers(300, 400), rng.integers(350, 450)
    low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    noise = rng.integers(-12, 12, (h, w, 3))
    arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(os.path.join(d, f'{i}.jpg'), quality=90)


def _config(preset: str, folder: str | None) -> Any:
  """Base config with the preset's data and augment keys."""
  from simclr_jax.data import views
  c = ml_collections.ConfigDict(_CONFIG.value.to_dict())
  c.train.batch_size = FLAGS.batch_size
  c.augment.update(views.PRESETS[preset])
  if preset == 'cifar':
    c.data.source, c.data.image_size = 'demo', 32  # In memory: the digits at 32x32.
  else:
    c.data.update(source='folder', folder=folder, image_size=224, cache=False,
                  shuffle_buffer=1000)
  return c


def _host_batches(config: Any) -> Iterator[dict[str, np.ndarray]]:
  """What the host produces per step for config.data.augment_on (numpy, before the transfer)."""
  from simclr_jax import parallel
  from simclr_jax.data import train_input
  return train_input.make(config, parallel.make_mesh(jax.devices()[:1])).host_batches(0)


def _measure(config: Any) -> dict[str, float]:
  """Images/s and CPU seconds of the host batches after warm-up."""
  it = _host_batches(config)
  for _ in range(FLAGS.warmup_batches):
    next(it)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(FLAGS.batches):
    next(it)
  seconds = time.perf_counter() - start
  cpu_seconds = time.process_time() - cpu_start  # every tf.data thread of this process
  images = FLAGS.batches * FLAGS.batch_size
  rate = images / seconds
  return {'images_per_s': rate, 'images_per_s_per_core': rate / os.cpu_count(),
          'batch_ms': 1000 * seconds / FLAGS.batches,
          'cpu_s_per_1000_images': 1000 * cpu_seconds / images}


def _run(argv: list[str]) -> None:
  del argv
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for preset in FLAGS.preset:
      if preset == 'imagenet':
        _write_jpegs(tmp, FLAGS.num_files)
      for augment_on in FLAGS.augment_on:
        if preset == 'imagenet' and augment_on == 'device':
          continue  # JPEGs of many sizes: not a device-resident data set (see the docstring)
        config = _config(preset, tmp if preset == 'imagenet' else None)
        config.data.augment_on = augment_on
        rows.append({'preset': preset, 'augment_on': augment_on,
                     'image_size': config.data.image_size, 'batch': FLAGS.batch_size,
                     'cores': os.cpu_count(), **_measure(config)})
  common.print_table(rows)
  path = common.save('input', FLAGS.out_dir,
                     {'presets': FLAGS.preset, 'augment_on': FLAGS.augment_on,
                      'batch_size': FLAGS.batch_size,
                      'batches': FLAGS.batches, 'num_files': FLAGS.num_files}, rows)
  print(f'saved {path}')


def main(argv: list[str]) -> None:
  """Entry point used by simclr_jax.bench.__main__ (argv[0] is the program name)."""
  app.run(_run, argv=argv)
