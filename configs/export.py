"""Export a pretraining run's encoder for PyTorch (torchvision key names) and/or TensorFlow.

  python -m simclr_jax.main --config=configs/export.py \\
      --config.pretrain_workdir=DIR --workdir=DIR/export

Writes encoder.safetensors + torch_resnet.py ('torchvision'), savedmodel/ ('savedmodel') and
export.json (architecture, input range and size, evaluation crop, checkpoint step). The model and
image size come from DIR/config.json. README "Using the trained encoder" shows how to load them.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the export config."""
  c = ml_collections.ConfigDict()
  c.job = 'export'
  c.pretrain_workdir = config_dict.placeholder(str)  # required: the pretraining --workdir
  c.checkpoint_step = -1  # -1: the latest checkpoint
  c.format = 'torchvision'  # 'torchvision' | 'savedmodel' | 'both'
  c.include_projection = False  # SavedModel: also return z, the projection head's output
  c.cpu_devices = 1  # nothing runs data-parallel here
  return c
