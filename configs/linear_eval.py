"""Linear evaluation of a pretraining run: linear probe + kNN on frozen features (issue 5).

  python -m simclr_jax.main --config=configs/linear_eval.py \\
      --config.pretrain_workdir=DIR --workdir=EVAL_DIR

The model, data set and image size come from DIR/config.json; nothing of the pretraining
command line is needed again. `data.*` keys left unset (None) keep the pretraining values.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the linear-evaluation config (the official SimCLR linear-eval recipe's defaults)."""
  c = ml_collections.ConfigDict()
  c.job = 'linear_eval'
  c.seed = 0  # probe shuffles, augmented views and the random-encoder baseline

  # --- what to evaluate -----------------------------------------------------------------------
  c.pretrain_workdir = config_dict.placeholder(str)  # required: the pretraining --workdir
  c.checkpoint_step = -1  # -1: the latest checkpoint
  c.feature = 'h'  # 'h': encoder output (standard) | 'z': projection-head output
  c.eval_batch_size = 256  # global batch of the frozen-encoder forward passes
  c.baseline = False  # also evaluate a randomly initialised encoder of the same architecture
  # JAX devices without an accelerator, as in configs/base.py (0: one per core, a power of two
  # dividing eval_batch_size).
  c.cpu_devices = 0

  # --- data overrides (None: take the pretraining config's value) ----------------------------
  c.data = ml_collections.ConfigDict()
  c.data.train_split = config_dict.placeholder(str)  # split the probe / kNN memory train on
  c.data.eval_split = config_dict.placeholder(str)  # split the accuracies are reported on
  c.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir, e.g. when data moved
  c.data.folder = config_dict.placeholder(str)  # image-folder root, e.g. when data moved
  c.data.num_classes = config_dict.placeholder(int)  # number of label classes for the probe

  # --- linear probe ---------------------------------------------------------------------------
  c.probe = ml_collections.ConfigDict()
  c.probe.mode = 'cached'  # 'cached': features once | 'augmented': crop+flip views every epoch
  c.probe.epochs = 90
  c.probe.batch_size = 4096
  c.probe.learning_rate = 1.6  # cosine peak; official: 0.1 x batch / 256 (not rescaled here)
  c.probe.momentum = 0.9
  c.probe.nesterov = True
  c.probe.weight_decay = 0.0
  c.probe.crop_area = (0.08, 1.0)  # random-resized-crop area range of the augmented path
  c.probe.flip = True  # random horizontal flip in the augmented path

  # --- kNN (InstDisc-style weighted vote on L2-normalised features) --------------------------
  c.knn = ml_collections.ConfigDict()
  c.knn.k = 200
  c.knn.temperature = 0.1

  # --- fine-tuning (official SimCLR recipe: Nesterov SGD, no warm-up, crop + flip) ------------
  c.finetune = ml_collections.ConfigDict()
  c.finetune.enabled = False
  c.finetune.label_fraction = 1.0  # 0.01 / 0.1 / 1.0: seeded class-balanced train subset
  c.finetune.from_block = 0  # 0: whole network incl. stem | k: stage k onward (+ head) trained
  c.finetune.epochs = 60  # official: 60 for 1%, 30 for 10%
  c.finetune.batch_size = 4096
  c.finetune.learning_rate = 0.8  # cosine peak; official: 0.05 x batch / 256 (not rescaled)
  c.finetune.momentum = 0.9
  c.finetune.nesterov = True
  c.finetune.weight_decay = 0.0
  c.finetune.crop_area = (0.08, 1.0)
  c.finetune.flip = True
  return c
