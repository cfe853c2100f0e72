"""Evaluation of a pretraining run: linear probe, kNN, fine-tuning, baselines.

  python -m simclr_jax.main --config=configs/linear_eval.py \\
      --config.pretrain_workdir=DIR --workdir=EVAL_DIR

The model, data set and image size come from DIR/config.json; nothing of the pretraining
command line is needed again. `data.*` keys left unset (None) keep the pretraining values, and
so do probe keys left unset: those take the official linear-evaluation command for the
pretraining image size (probe.presets).
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the evaluation config (the official SimCLR protocols by default)."""
  c = ml_collections.ConfigDict()
  c.job = 'linear_eval'
  c.seed = 0  # probe and fine-tune data orders and views, subsets, the random-encoder baseline

  # --- what to evaluate -----------------------------------------------------------------------
  c.pretrain_workdir = config_dict.placeholder(str)  # required: the pretraining --workdir
  c.checkpoint_step = -1  # -1: the latest checkpoint
  # Evaluators of the registry (simclr_jax/eval/evaluators.py) to run, in order,
  # comma-separated: linear_probe, knn, finetune, online_probe (the probe trained alongside
  # pretraining, read from the checkpoint).
  c.evaluators = 'linear_probe,knn'
  c.feature = 'h'  # probe and kNN input: 'h' encoder output (standard) | 'z' projection output
  c.eval_batch_size = 256  # global batch of the frozen-encoder forward passes
  # Also report baselines: the same evaluators on a randomly initialised encoder of the same
  # architecture, and the linear probe on raw pixels (see c.pixels).
  c.baseline = False
  # Write embedding.png (t-SNE of the eval split's features) and curves.png (the pretraining
  # run's metrics) beside results.json.
  c.pictures = True
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

  # --- linear probe (official linear evaluation) ----------------------------------------------
  c.probe = ml_collections.ConfigDict()
  # 'augmented' (official): a fresh random-resized-crop + flip view of every example each epoch
  # through the frozen encoder. 'cached': eval-view features computed once (fast; not official).
  c.probe.mode = 'augmented'
  # The official linear-evaluation commands (google-research/simclr README, "Finetuning the
  # linear head (linear eval)"): 'cifar'
  #   --optimizer=momentum --learning_rate=0.1 --weight_decay=0.0 --train_epochs=100
  #   --train_batch_size=512 --warmup_epochs=0 ... --dataset=cifar10 --image_size=32
  # and 'imagenet'
  #   --optimizer=momentum --learning_rate=0.1 --weight_decay=1e-6 --train_epochs=90
  #   --train_batch_size=4096 --warmup_epochs=0 ... --dataset=imagenet2012 --image_size=224
  # 'demo', for the bundled digits only (not an official protocol): 1,437 examples give the
  # 'cifar' preset 281 steps, too few for SGD on raw features of crops (measured top-1 0.92
  # against 0.97 for the same encoders' cached, standardised features). On standardised
  # features at batch 128, 100 epochs (1,123 steps) gave 0.970 and 200 epochs (2,246 steps)
  # 0.976, against 0.978 cached (3 pretraining seeds): crops need the longer schedule.
  # 'auto' picks 'demo' for the demo source, else
  # 'cifar' when the pretraining image_size <= 32 (the official code's own CIFAR-size rule),
  # else 'imagenet'. The preset fills the four keys below when they are left unset (None); a
  # value set there wins.
  c.probe.preset = 'auto'
  c.probe.presets = ml_collections.ConfigDict({
      'cifar': {'epochs': 100.0, 'batch_size': 512, 'weight_decay': 0.0, 'standardise': False},
      'imagenet': {'epochs': 90.0, 'batch_size': 4096, 'weight_decay': 1e-6,
                   'standardise': False},
      'demo': {'epochs': 200.0, 'batch_size': 128, 'weight_decay': 0.0, 'standardise': True},
  })
  c.probe.epochs = config_dict.placeholder(float)
  c.probe.batch_size = config_dict.placeholder(int)  # global
  c.probe.weight_decay = config_dict.placeholder(float)  # wd * w on kernel and bias
  # Standardise features with the train split's statistics (official: False).
  c.probe.standardise = config_dict.placeholder(bool)
  c.probe.steps = -1  # > 0: this many steps instead of official N * epochs // batch + 1
  c.probe.base_lr = 0.1  # official --learning_rate; peak = base_lr * batch / 256 ('linear')
  c.probe.lr_scaling = 'linear'  # 'linear' | 'sqrt' (base_lr * sqrt(batch))
  c.probe.momentum = 0.9
  c.probe.nesterov = True  # official --optimizer=momentum is Nesterov
  # Augmented mode's views: random-resized-crop area range and horizontal flip. None: the
  # pretraining run's augment.crop_area and augment.flip (config.json), so a recipe that pretrains
  # without flips or with large crops (the demo's digits) is probed on views it was trained on;
  # for the official recipes that is the official (0.08, 1) crop + flip.
  c.probe.crop_area = config_dict.placeholder(tuple)
  c.probe.flip = config_dict.placeholder(bool)

  # --- kNN (InstDisc-style weighted vote on L2-normalised features) --------------------------
  c.knn = ml_collections.ConfigDict()
  c.knn.k = 200
  c.knn.temperature = 0.1
  c.knn.max_train = 0  # memory: every train example (> 0: a seeded, class-proportional sample)

  # --- fine-tuning (official SimCLRv2 semi-supervised command, README "Semi-supervised
  # learning and fine-tuning the whole network": --fine_tune_after_block=-1
  # --zero_init_logits_layer=True --global_bn=True --optimizer=lars --learning_rate=0.005
  # --learning_rate_scaling=sqrt --weight_decay=0 --train_epochs=60 --train_batch_size=1024
  # --warmup_epochs=0 --dataset=imagenet2012_subset/1pct --num_proj_layers=3
  # --ft_proj_selector=1) -------------------------------------------------------------------
  c.finetune = ml_collections.ConfigDict()
  # The fine-tuning data set (TFDS), e.g. 'imagenet2012_subset/1pct' or '.../10pct': trained on
  # its train_split, evaluated on its eval_split. None: the pretraining data set.
  c.finetune.dataset = config_dict.placeholder(str)
  c.finetune.train_split = config_dict.placeholder(str)  # None: data.train_split
  c.finetune.eval_split = config_dict.placeholder(str)  # None: data.eval_split
  # For data sets without official subsets: a fixed, seeded, class-balanced fraction of the
  # train split (0.01 / 0.1 / 1.0).
  c.finetune.label_fraction = 1.0
  # Official ft_proj_selector: the supervised head sits on the output of projection layer k,
  # and those k layers are fine-tuned with the encoder (0: on h; -1: the last layer).
  c.finetune.proj_selector = 1
  c.finetune.from_block = 0  # 0: the whole network | k: ResNet stage k onward (stem frozen)
  c.finetune.optimizer = 'lars'  # 'lars' (optim's LARS) | 'momentum' (as the linear probe)
  c.finetune.base_lr = 0.005
  c.finetune.lr_scaling = 'sqrt'  # peak = 0.005 * sqrt(1024) = 0.16
  c.finetune.momentum = 0.9  # official --momentum default
  c.finetune.trust_coefficient = 1e-3  # LARS eeta (official default)
  c.finetune.weight_decay = 0.0
  c.finetune.warmup_epochs = 0.0
  c.finetune.epochs = 60.0  # the README's 1% command (it gives no 10% command)
  c.finetune.steps = -1  # > 0: this many steps instead of N * epochs // batch + 1
  c.finetune.batch_size = 1024  # global; BN statistics over the whole batch (global BN)
  # Views, as probe.crop_area / probe.flip: None takes the pretraining run's augment values.
  c.finetune.crop_area = config_dict.placeholder(tuple)
  c.finetune.flip = config_dict.placeholder(bool)

  # --- raw-pixel baseline (with c.baseline) ---------------------------------------------------
  # The linear probe (cached, standardised, the probe's schedule) on the flattened eval-view
  # pixels. Train examples are capped by memory: at most max_mb MiB of float32 pixels, a
  # seeded class-balanced subset when the split is larger (CIFAR-10 fits whole; ImageNet at
  # 224 px keeps ~3,500 examples).
  c.pixels = ml_collections.ConfigDict()
  c.pixels.max_mb = 2048.0
  return c
