"""The export job: a pretraining run's encoder as PyTorch weights and/or a TensorFlow SavedModel.

  python -m simclr_jax.main --config=configs/export.py \\
      --config.pretrain_workdir=RUN --workdir=RUN/export

Writes to WORKDIR: `encoder.safetensors` (a torch state dict with torchvision's key names) and
`torch_resnet.py` (a torch-only module that loads it) for format 'torchvision'; `savedmodel/` for
'savedmodel'; and `export.json`, which says what the weights expect (input range and size, the
evaluation crop) and which torchvision model, if any, loads them.
"""
import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from simclr_jax import workdir as workdir_lib
from simclr_jax.data import views
from simclr_jax.errors import ConfigError
from simclr_jax.eval import encoder
from simclr_jax.export import torch_weights
from simclr_jax.models import resnet, simclr

FORMATS = {'torchvision': ('torchvision',), 'savedmodel': ('savedmodel',),
           'both': ('torchvision', 'savedmodel')}
EXPORT_FILE = 'export.json'
WEIGHTS_FILE = 'encoder.safetensors'
# Copied beside the weights, not imported: it needs torch, this job does not.
MODULE_FILE = 'torch_resnet.py'
SAVEDMODEL_DIR = 'savedmodel'


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first bad key of the export config."""
  encoder.check_config(config)
  if config.format not in FORMATS:
    raise ConfigError(f'config.format={config.format!r} is not one of {sorted(FORMATS)}.')


def restore(pretrain_workdir: str, checkpoint_step: int
            ) -> tuple[ml_collections.ConfigDict, simclr.SimCLR, int, dict[str, Any]]:
  """(pretraining config, inference model without the probe head, step, host variables)."""
  pretrain_config, full, step, variables = encoder.read(pretrain_workdir, checkpoint_step)
  # The online probe is a training-time monitor, not part of the network a user takes away.
  model = full.clone(num_classes=0)
  params = {k: v for k, v in variables['params'].items() if k != 'probe'}
  return pretrain_config, model, step, {'params': params,
                                        'batch_stats': variables['batch_stats']}


def _eval_view(size: int) -> str:
  """The evaluation view the encoder was judged on, in words."""
  if size <= 32:
    return f'the whole image, bicubic resize to {size}x{size}'
  return (f'centre crop of {views.EVAL_CROP_FRACTION:g} x the shorter side, bicubic resize to '
          f'{size}x{size}')


def export_info(pretrain_config: ml_collections.ConfigDict, step: int, pretrain_workdir: str,
                formats: tuple[str, ...], torchvision_name: str | None,
                include_projection: bool) -> dict[str, Any]:
  """The contents of export.json: what the exported network is and what its input must be."""
  m, size = pretrain_config.model, pretrain_config.data.image_size
  info: dict[str, Any] = {
      'depth': m.depth, 'width': m.width,
      'stem': ('cifar: 3x3 stride-1 convolution, no max-pool' if m.cifar_stem else
               'imagenet: 7x7 stride-2 convolution, 3x3 stride-2 max-pool with TF SAME padding'),
      'cifar_stem': bool(m.cifar_stem),
      'feature_dim': resnet.feature_dim(m.depth, m.width),
      'image_size': size,
      'input': 'RGB in [0, 1] (uint8 / 255); no mean/std normalisation',
      'mean': None, 'std': None,
      'eval_view': _eval_view(size),
      'batch_norm_epsilon': resnet.BN_EPSILON,
      'checkpoint_step': int(step),
      'pretrain_workdir': str(pretrain_workdir),
      'formats': list(formats),
  }
  if 'torchvision' in formats:
    info['torch'] = {
        'weights': WEIGHTS_FILE,
        'module': MODULE_FILE,
        'torchvision_model': torchvision_name,
        'notes': (
            f'torchvision.models.{torchvision_name}() loads {WEIGHTS_FILE} with strict=True '
            'after `model.fc = nn.Identity()`; replace `model.maxpool` with '
            'torch_resnet.MaxPoolSame() for the same outputs on even-sized feature maps '
            '(TF SAME pads the max-pool (0, 1), torchvision (1, 1)).' if torchvision_name else
            'No torchvision model has this architecture (torchvision has ResNet-50/101/152 at '
            'width 1 with the 7x7 stem; its ResNet-18/34 have no projection in stage 1, and '
            'it has no selective kernels, squeeze-excitation or ResNet-D stem): load it with '
            'torch_resnet.load_encoder(EXPORT_DIR).'),
    }
  if 'savedmodel' in formats:
    info['savedmodel'] = {
        'dir': SAVEDMODEL_DIR,
        'signatures': {'serving_default': f'float32 [N, {size}, {size}, 3] in [0, 1]',
                       'serving_uint8': f'uint8 [N, {size}, {size}, 3]'},
        'outputs': ['h', 'z'] if include_projection else ['h'],
    }
  return info


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Exports config.pretrain_workdir's encoder to `workdir`; returns export.json's contents."""
  check_config(config)
  workdir_lib.ensure_writable(workdir)
  start = time.time()
  formats = FORMATS[config.format]
  pretrain_config, model, step, variables = restore(config.pretrain_workdir,
                                                    config.checkpoint_step)
  size = pretrain_config.data.image_size
  out = epath.Path(workdir)
  torchvision_name = None
  write = jax.process_index() == 0
  if 'torchvision' in formats:
    state = torch_weights.encoder_state_dict(model, variables, (size, size, 3))
    torchvision_name = torch_weights.torchvision_model(state)
    if write:
      from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
      save_file(state, os.fspath(out / WEIGHTS_FILE), metadata={'format': 'pt'})
      shutil.copyfile(os.path.join(os.path.dirname(__file__), MODULE_FILE),
                      os.fspath(out / MODULE_FILE))
  if 'savedmodel' in formats and write:
    from simclr_jax.export import savedmodel  # pylint: disable=g-import-not-at-top
    if 'conv_impl' in {f.name for f in dataclasses.fields(model)}:
      # XLA's own convolution, not a CPU-specific rewrite: the SavedModel may run on any device.
      model = model.clone(conv_impl='lax')
    savedmodel.export(os.fspath(out / SAVEDMODEL_DIR), model, variables, size,
                      config.include_projection)
  info = export_info(pretrain_config, step, config.pretrain_workdir, formats, torchvision_name,
                     config.include_projection)
  if write:
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=2) + '\n')
    logging.info('Exported step %d of %s (%s) to %s in %.1f s.', step, config.pretrain_workdir,
                 ', '.join(formats), workdir, time.time() - start)
  return info
