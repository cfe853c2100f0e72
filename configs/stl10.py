"""SimCLR on STL-10: pretrain on unlabelled + train (105k images at 96 px), probe on train/test.

  python -m simclr_jax.main --config=configs/stl10.py --workdir=$WORKDIR
  python -m simclr_jax.main --config=configs/linear_eval.py \
      --config.pretrain_workdir=$WORKDIR --workdir=$WORKDIR/eval --config.data.train_split=train

Not an official SimCLR recipe: neither the official README nor the paper has an STL-10 command.
This one takes the official ImageNet-style views (ImageNet stem, blur with a kernel of ~10% of
the 96 px side, jitter strength 1.0), the official flag default head (--num_proj_layers=3) and
optimiser (LARS, linear scaling, 10 warm-up epochs, momentum 0.9; weight decay 1e-4 as the
official commands), with ResNet-50, batch 512, 500 epochs and temperature 0.2 chosen here.
Expected: community reproductions of this setting report roughly 85–90% linear-eval top-1 (not
an official figure); not yet reproduced here.
The online probe sees labels only on the 5k 'train' images (unlabelled ones carry -1).
"""
from configs import base


def get_config():
  """STL-10 recipe."""
  c = base.get_config()
  c.data.source = 'tfds'
  c.data.name = 'stl10'
  c.data.train_split, c.data.eval_split = 'train+unlabelled', 'test'
  c.data.image_size = 96
  c.data.num_classes = 10
  c.data.shuffle_buffer = 20_000
  c.model.depth, c.model.width, c.model.cifar_stem = 50, 1.0, False
  c.model.num_proj_layers = 3
  c.augment.jitter_strength, c.augment.blur = 1.0, True
  c.loss.temperature = 0.2
  c.optim.base_lr, c.optim.lr_scaling, c.optim.weight_decay = 1.0, 'linear', 1e-4
  c.train.batch_size, c.train.epochs = 512, 500.0
  return c
