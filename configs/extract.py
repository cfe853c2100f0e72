"""Features of a folder of images (or a data split) from a pretraining run's frozen encoder.

  python -m simclr_jax.main --config=configs/extract.py \\
      --config.pretrain_workdir=DIR --config.data.folder=IMAGES --workdir=OUT

IMAGES holds images directly (no labels) or in class sub-folders (labels = sorted folder names).
Without config.data.folder the pretraining run's own data set is read (its eval split unless
config.data.split says otherwise). Writes features.npy, labels.npy, paths.txt / ids.npy.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the feature-extraction config."""
  c = ml_collections.ConfigDict()
  c.job = 'extract'
  c.pretrain_workdir = config_dict.placeholder(str)  # required: the pretraining --workdir
  c.checkpoint_step = -1  # -1: the latest checkpoint
  c.feature = 'h'  # 'h': encoder output | 'z': projection-head output
  c.eval_batch_size = 256  # global batch of the forward passes
  # JAX devices without an accelerator, as in configs/base.py (0: one per core, a power of two
  # dividing eval_batch_size).
  c.cpu_devices = 0
  c.log_every_s = 10.0  # seconds between progress lines

  # --- what to embed (None: the pretraining run's value) ----------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = config_dict.placeholder(str)  # 'folder' | 'tfds' | 'demo'; folder if set
  c.data.folder = config_dict.placeholder(str)  # images, directly or in <class>/ sub-folders
  c.data.name = config_dict.placeholder(str)  # TFDS data set name
  c.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir
  c.data.split = config_dict.placeholder(str)  # TFDS split (default: pretraining's eval split)
  c.data.on_corrupt = 'skip'  # 'skip' (count and log) | 'error' (stop, naming the file)
  return c
