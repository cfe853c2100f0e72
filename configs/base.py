"""Shared base of every recipe: the full set of config keys with SimCLR's defaults.

Recipes import this and change only what differs (see flax/examples/imagenet). Every key any
module reads lives here, so `--config.some.key=value` overrides are checked against one schema.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the base config (CIFAR-10 sized defaults from the official SimCLR recipe)."""
  c = ml_collections.ConfigDict()
  c.job = 'pretrain'  # 'pretrain' | 'linear_eval'
  c.seed = 0
  # JAX devices on a host without an accelerator. XLA runs many CPU ops on one thread, so one
  # device per core (data parallel, global BN and loss unchanged) uses the cores far better.
  # 0: one per core, rounded down to a power of two that divides train.batch_size; n > 0: n.
  # Ignored when XLA_FLAGS already sets --xla_force_host_platform_device_count.
  c.cpu_devices = 0

  # --- data ----------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds'  # 'tfds' | 'folder' | 'demo'
  c.data.name = 'cifar10'  # TFDS name (source='tfds')
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir, may be gs://
  c.data.folder = ml_collections.config_dict.placeholder(str)  # root of <split>/<class>/*.jpg
  # source='folder': the run's class names; a label is a position in this list, in every split.
  # Empty: the class folders of <folder>/<train_split>/ (sorted); pretraining stores the list
  # it used in config.json, so a resumed run and its evaluation label the same way.
  c.data.classes = ()
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.image_size = 32  # side of the square views fed to the encoder
  c.data.num_classes = 10  # labels for the online probe; 0 disables the probe
  c.data.shuffle_buffer = 50_000
  # Folder files that are not whole JPEG/PNG images (empty, cut short, garbled), checked once
  # per file: 'skip' (log each with a running count) | 'error' (stop, naming the file).
  c.data.on_corrupt = 'skip'
  c.data.cache = True  # cache decoded examples in memory (small data sets)
  # Where the train views are made (README "Where the views are made"):
  #   'host': all of the view in tf.data on the host CPU;
  #   'split': tf.data decodes, crops, resizes and flips; colour jitter, grayscale and blur run
  #     inside the jitted train step;
  #   'device': the uint8 train split lives on the devices and the step gathers its examples by
  #     index and makes both views (in-memory sources, all images one size; no TensorFlow at run
  #     time with the demo source).
  c.data.augment_on = 'host'
  # augment_on='device': replicate the uint8 data set on every device when it is at most this
  # many MiB, else shard it over the "data" axis (each device then draws from its own shard).
  c.data.device_replicate_max_mb = 256.0

  # --- SimCLR views ---------------------------------------------------------------------------
  c.augment = ml_collections.ConfigDict()
  # Random resized crop, as the official crop_and_resize (tf.image.sample_distorted_bounding_box
  # of the whole image, 100 attempts, else the whole image): area fraction range (0 < lo <= hi
  # <= 1), aspect ratio w/h range, and the least fraction of the image a crop keeps.
  c.augment.crop_area = (0.08, 1.0)
  c.augment.crop_aspect = (3 / 4, 4 / 3)
  c.augment.min_object_covered = 0.1
  c.augment.flip = True
  c.augment.jitter_strength = 0.5  # s: CIFAR 0.5, ImageNet 1.0
  c.augment.jitter_prob = 0.8
  c.augment.grayscale_prob = 0.2
  c.augment.blur = False  # off for 32x32 data, on for ImageNet
  c.augment.blur_prob = 0.5

  # --- model ----------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.depth = 18  # 18 | 34 | 50 | 101 | 152 | 200
  c.model.width = 1.0  # width multiplier
  c.model.cifar_stem = True  # 3x3 stride-1 stem, no max-pool
  # Official flag default 3 (the README commands keep it); 2 = the SimCLRv1 paper's head.
  c.model.num_proj_layers = 3
  c.model.proj_dim = 128
  c.model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (params, BN stats, loss f32)
  # How convolutions run (same parameters and results either way, so checkpoints move freely):
  # 'lax' (XLA's convolution), 'im2col' (patches + one matmul each), 'auto' (= 'lax': the
  # fastest measured on CPU; on GPU/TPU XLA's convolutions use cuDNN / the TPU's units).
  c.model.conv_impl = 'auto'
  # Recompute each residual block's activations in the backward pass (jax.checkpoint): less
  # device memory on GPU/TPU for about one more forward pass of compute (XLA:CPU merges the
  # recomputation back into the forward pass, so there it saves nothing).
  c.model.remat = False
  # SimCLRv2 (official --sk_ratio / --se_ratio, default 0 = off): selective-kernel bottlenecks
  # with the ResNet-D stem and shortcuts (the published SK models: 0.0625), squeeze-excitation.
  c.model.sk_ratio = 0.0
  c.model.se_ratio = 0.0

  # --- loss -----------------------------------------------------------------------------------
  # Official objective: the mean over the N examples of the two directions' NT-Xent summed
  # (twice the mean over 2N anchors); the official recipes' hyperparameters are tuned on it.
  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.5  # official --temperature (CIFAR-10 command 0.5, ImageNet 0.1)

  # --- optimiser ------------------------------------------------------------------------------
  # Official LARS (classic momentum): BN parameters, biases and the online probe get neither
  # weight decay nor the trust ratio; the probe trains at the encoder's learning rate, its kernel
  # with weight decay. lr = scaled base_lr, linear warm-up from 0, cosine to 0.
  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.0  # official --learning_rate (per 256 examples when 'linear')
  c.optim.lr_scaling = 'linear'  # 'linear': base_lr*B/256 | 'sqrt': base_lr*sqrt(B)
  # Official --warmup_epochs (default 10): int(round(warmup_epochs * N // B)) steps.
  c.optim.warmup_epochs = 10.0
  c.optim.weight_decay = 1e-4  # official README pretraining commands (CIFAR-10 and ImageNet)
  c.optim.momentum = 0.9  # official --momentum default
  c.optim.trust_coefficient = 1e-3  # official LARS eeta

  # --- training loop --------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 512  # global batch, over all devices and hosts (official --train_batch_size)
  # Gradient caching: each device runs its rows in this many chunks, so activation memory is
  # about one chunk's, for one extra forward pass of compute. NT-Xent and its gradient stay exact
  # over the whole global batch; batch norm normalises each chunk with its own statistics
  # (ghost BN over the chunk's rows on all devices); running statistics get one update per step
  # from the mean of the chunks' statistics. 1: no chunking (BN over the global batch). Must
  # divide the per-device batch (README "Large batches on little memory").
  c.train.chunks = 1
  # Steps: official get_train_steps, N * epochs // batch_size + 1 (epochs may be fractional);
  # steps > 0 overrides it.
  c.train.epochs = 1000.0
  c.train.steps = -1
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 1000
  c.train.keep_checkpoints = 3

  # --- evaluation during pretraining ----------------------------------------------------------
  # config.evals: evaluators of the registry (simclr_jax/eval/evaluators.py) run on the live
  # train state every `every_steps` steps and at the end (0: never); the evaluation job runs
  # them, and the linear probe and fine-tuning, once on a checkpoint. Both share one inference
  # forward over the eval split per evaluation. On the CIFAR-10 recipe, 10k eval images plus
  # a 10k kNN memory every 1000 steps cost under 1% of the run.
  c.eval_batch_size = 256  # global batch of the inference forwards
  c.evals = ml_collections.ConfigDict()
  # The online probe's top-1/top-5 on the eval split (skipped when data.num_classes is 0).
  c.evals.online_probe = ml_collections.ConfigDict({'every_steps': 1000})
  # Weighted kNN on h (InstDisc: k neighbours, weights exp(cosine / temperature)). Memory: a
  # fixed, seeded sample of max_train labelled train examples, each class in its share of the
  # split (0, or fewer labelled examples: all of them).
  c.evals.knn = ml_collections.ConfigDict(
      {'every_steps': 1000, 'k': 200, 'temperature': 0.1, 'max_train': 10_000})
  return c
