"""The features job: the frozen encoder's h (or z) for every image of a folder or a data split.

  python -m simclr_jax.main --config=configs/extract.py \\
      --config.pretrain_workdir=RUN --config.data.folder=IMAGES --workdir=OUT

Writes to WORKDIR, rows sorted by example (the folder's sorted file order, or the split's order),
the same for any number of devices and processes:
  features.npy  float32 [N, dim];
  labels.npy    int32 [N], when the images have labels (a folder with class sub-folders, whose
                sorted names are the labels 0, 1, ... and are listed in classes.txt);
  paths.txt     one image path per row (folders), or ids.npy, the example's position in the
                split (TFDS and the demo digits);
  extract.json  counts, the checkpoint step, the feature, seconds.
Every image is the evaluation view (views_tf.eval_view) at the pretraining image size. A corrupt
file is skipped and logged, or stops the job, as config.data.on_corrupt says.
"""
import dataclasses
import json
import os
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from simclr_jax import metrics, parallel
from simclr_jax import workdir as workdir_lib
from simclr_jax.data import host_input, sources
from simclr_jax.data.tf_cpu import tf
from simclr_jax.errors import ConfigError
from simclr_jax.eval import encoder, features

SUMMARY_FILE = 'extract.json'


@dataclasses.dataclass(frozen=True)
class Images:
  """This process's shard of the images to embed, and what names them in the outputs."""
  ds: tf.data.Dataset  # {'image': uint8 [H, W, 3] or encoded bytes, 'label': int32, 'index': int64}
  num_total: int  # over all processes, before any corrupt file is skipped
  paths: list[str] | None  # path of example i (folders), else None: ids are split positions
  classes: list[str] | None  # label names (a folder with class sub-folders)


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first bad key of the extract config."""
  encoder.check_config(config)
  if config.feature not in features.FEATURES:
    raise ConfigError(f'config.feature={config.feature!r} is not one of {features.FEATURES}.')
  if config.eval_batch_size < 1:
    raise ConfigError(f'config.eval_batch_size={config.eval_batch_size} must be >= 1.')
  if config.data.on_corrupt not in ('skip', 'error'):
    raise ConfigError(f"config.data.on_corrupt={config.data.on_corrupt!r} must be 'skip' or "
                      "'error'.")


# --- input -------------------------------------------------------------------------------------


def list_folder(root: str, classes: Sequence[str] | None = None
                ) -> tuple[list[str], np.ndarray | None, list[str] | None]:
  """(sorted image paths, labels or None, class names or None) of a folder of images.

  Either the images lie in `root` itself (no labels), or in class sub-folders `root/<class>/`,
  labelled by their position in `classes` (default: the sorted sub-folder names).
  """
  if not tf.io.gfile.isdir(root):
    raise ConfigError(f'config.data.folder={root!r} is not a folder.')
  is_image = lambda name: name.lower().endswith(sources.IMAGE_EXTENSIONS)  # noqa: E731
  entries = sorted(e.rstrip('/') for e in tf.io.gfile.listdir(root))
  subdirs = [e for e in entries if tf.io.gfile.isdir(os.path.join(root, e))]
  files = [e for e in entries if e not in subdirs and is_image(e)]
  per_class = {d: sorted(f for f in tf.io.gfile.listdir(os.path.join(root, d)) if is_image(f))
               for d in subdirs}
  per_class = {d: f for d, f in per_class.items() if f}
  if per_class:
    if files:
      raise ConfigError(
          f'config.data.folder={root!r} holds both images ({files[0]}, ...) and class '
          f'sub-folders ({next(iter(per_class))}/, ...); put every image in a class sub-folder, '
          'or point config.data.folder at a folder of images only.')
    classes = list(classes) if classes is not None else sorted(per_class)
    unknown = sorted(set(per_class) - set(classes))
    if unknown:
      raise ConfigError(f'config.data.folder={root!r} has class folders {unknown} that are not '
                        f'classes of the run ({classes}); remove or rename them.')
    paths = [os.path.join(root, c, f) for c in classes for f in per_class.get(c, ())]
    labels = np.asarray([i for i, c in enumerate(classes) for _ in per_class.get(c, ())],
                        np.int32)
    return paths, labels, classes
  if not files:
    raise ConfigError(f'config.data.folder={root!r}: no {"/".join(sources.IMAGE_EXTENSIONS)} '
                      'images in it or in sub-folders of it.')
  return [os.path.join(root, f) for f in files], None, None


def folder_images(root: str, on_corrupt: str, process_index: int, process_count: int,
                  classes: Sequence[str] | None = None) -> Images:
  """The images of `root` (see list_folder), shard `process_index` of `process_count`."""
  paths, labels, classes = list_folder(root, classes)
  index = np.arange(len(paths))[process_index::process_count]
  label = (labels if labels is not None else np.full(len(paths), -1, np.int32))[index]
  ds = tf.data.Dataset.from_tensor_slices({'path': np.asarray(paths)[index], 'label': label,
                                           'index': index.astype(np.int64)})
  ds = ds.map(lambda ex: dict(ex, image=tf.io.read_file(ex['path'])),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = sources.check_images(ds, on_corrupt, len(paths))
  ds = ds.map(lambda ex: {k: ex[k] for k in ('image', 'label', 'index')})
  return Images(ds, len(paths), paths, classes)


def split_images(data_cfg: Any, split: str, process_index: int, process_count: int) -> Images:
  """The images of a TFDS (or demo) split through pretraining's own source."""
  src = sources.load(data_cfg, split, process_index=process_index, process_count=process_count)
  return Images(src.ds, src.num_examples_total, None, None)


def resolve_input(config: ml_collections.ConfigDict, pretrain_config: ml_collections.ConfigDict,
                  process_index: int, process_count: int) -> Images:
  """The images the config names; unset keys fall back to the pretraining run's data set."""
  data = config.data
  source = data.source or ('folder' if data.folder else pretrain_config.data.source)
  split = data.split or pretrain_config.data.eval_split
  if source == 'folder':
    if data.folder:
      return folder_images(data.folder, data.on_corrupt, process_index, process_count)
    # A split of the pretraining folder: labelled by the run's own class list.
    return folder_images(os.path.join(pretrain_config.data.folder, split), data.on_corrupt,
                         process_index, process_count,
                         sources.folder_classes(pretrain_config.data))
  merged = ml_collections.ConfigDict(pretrain_config.data.to_dict())
  merged.source = source
  for key in ('name', 'data_dir'):
    if data[key] is not None:
      merged[key] = data[key]
  merged.on_corrupt = data.on_corrupt
  return split_images(merged, split, process_index, process_count)


def eval_batches(images: Images, size: int, batch_size: int, process_count: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """This process's padded batches {'image', 'label', 'index', 'mask'} of eval views: the
  evaluation's own padded stream (host_input.padded_eval_views) over these images."""
  num_batches = parallel.num_padded_batches(images.num_total, batch_size, process_count)
  ds = host_input.padded_eval_views(images.ds, size, batch_size // process_count, num_batches)
  return ds.as_numpy_iterator()


# --- extraction --------------------------------------------------------------------------------


def extract_rows(predict_fn: features.PredictFn, variables: Any,
                 batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh, num_total: int,
                 log_every_s: float = 10.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(outputs, labels, indices) of every real row on every process, sorted by index.

  features.gathered with the example index carried along (so rows can be put back in example
  order whatever the device and process layout) and a progress line every `log_every_s`.
  """
  outs, labels, ids = [], [], []
  start = last = time.time()
  done = 0
  for out, columns in features.gathered(predict_fn, variables, batches, mesh,
                                        keys=('label', 'index')):
    outs.append(np.asarray(out, np.float32))
    labels.append(columns['label'])
    ids.append(columns['index'])
    done += len(columns['index'])
    if time.time() - last >= log_every_s and jax.process_index() == 0:
      last = time.time()
      rate = done / (last - start)
      logging.info('extract: %d/%d images (%.0f%%), %.0f images/s, ETA %s', done, num_total,
                   100 * done / max(num_total, 1), rate,
                   metrics.format_duration((num_total - done) / rate if rate else None))
  ids = np.concatenate(ids).astype(np.int64)
  order = np.argsort(ids, kind='stable')
  if len(np.unique(ids)) != len(ids):
    raise RuntimeError('an example was embedded twice; the input shards overlap.')
  return (np.concatenate(outs)[order], np.concatenate(labels)[order].astype(np.int32),
          ids[order])


def write_outputs(workdir: str, feats: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                  images: Images, summary: dict[str, Any]) -> None:
  """features.npy, labels.npy (if labelled), paths.txt or ids.npy, classes.txt, extract.json."""
  out = epath.Path(workdir)
  np.save(os.fspath(out / 'features.npy'), feats)
  if len(labels) and labels.min() >= 0:
    np.save(os.fspath(out / 'labels.npy'), labels)
  if images.paths is not None:
    (out / 'paths.txt').write_text(''.join(images.paths[i] + '\n' for i in ids))
  else:
    np.save(os.fspath(out / 'ids.npy'), ids)
  if images.classes is not None:
    (out / 'classes.txt').write_text(''.join(c + '\n' for c in images.classes))
  (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + '\n')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Embeds the images config.data names with config.pretrain_workdir's encoder into `workdir`."""
  check_config(config)
  workdir_lib.ensure_writable(workdir)
  start = time.time()
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  pretrain_config = workdir_lib.read_config(config.pretrain_workdir)
  pi, pc = jax.process_index(), jax.process_count()
  images = resolve_input(config, pretrain_config, pi, pc)
  _, model, step, variables = encoder.restore(config.pretrain_workdir, config.checkpoint_step,
                                              mesh)
  outputs = features.outputs_fn(model, mesh, (config.feature,))
  predict_fn = lambda v, x: outputs(v, x)[config.feature]  # noqa: E731
  size = pretrain_config.data.image_size
  feats, labels, ids = extract_rows(
      predict_fn, variables, eval_batches(images, size, config.eval_batch_size, pc), mesh,
      images.num_total, config.log_every_s)
  summary = {'num_images': int(len(ids)), 'num_skipped': int(images.num_total - len(ids)),
             'feature': config.feature, 'feature_dim': int(feats.shape[1]),
             'image_size': size, 'checkpoint_step': int(step),
             'pretrain_workdir': str(config.pretrain_workdir), 'labelled': bool(
                 len(labels) and labels.min() >= 0),
             'seconds': time.time() - start}
  if jax.process_index() == 0:
    write_outputs(workdir, feats, labels, ids, images, summary)
    logging.info('Extracted %s of %d images (%d skipped) at step %d in %s to %s.',
                 config.feature, summary['num_images'], summary['num_skipped'], step,
                 metrics.format_duration(summary['seconds']), workdir)
  return summary
