"""SimCLR on ImageNet (ILSVRC-2012): the paper's default ResNet-50 recipe.

  python -m simclr_jax.main --config=configs/imagenet.py --workdir=gs://$BUCKET/simclr_r50 \
      --config.data.data_dir=gs://$BUCKET/tensorflow_datasets

ResNet-50 (1x), batch 4096, 100 epochs (set --config.train.epochs=1000 for the long run), LARS
lr 0.075 × sqrt(4096) = 4.8, weight decay 1e-6, temperature 0.1, blur on, jitter strength 1.0,
3-layer projection head (SimCLRv2), bfloat16 compute. Expected linear-eval top-1: 64.5% at
100 epochs, 69.1% at 1000 epochs (paper / official README). Not yet reproduced with this code
base. Needs the prepared TFDS imagenet2012 (manual download) under data_dir.
"""
from configs import base


def get_config():
  """ImageNet recipe."""
  c = base.get_config()
  c.data.source = 'tfds'
  c.data.name = 'imagenet2012'
  c.data.train_split, c.data.eval_split = 'train', 'validation'
  c.data.image_size = 224
  c.data.num_classes = 1000
  c.data.shuffle_buffer = 50_000
  c.data.cache = False  # 140 GB of JPEGs: stream them
  c.model.depth, c.model.width, c.model.cifar_stem = 50, 1.0, False
  c.model.num_proj_layers = 3
  c.model.dtype = 'bfloat16'
  c.augment.jitter_strength, c.augment.blur = 1.0, True
  c.loss.temperature = 0.1
  c.optim.base_lr, c.optim.lr_scaling, c.optim.weight_decay = 0.075, 'sqrt', 1e-6
  c.train.batch_size, c.train.epochs = 4096, 100.0
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 2500
  return c
