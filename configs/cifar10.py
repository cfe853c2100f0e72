"""SimCLR on CIFAR-10: the official repository's CIFAR recipe.

  python -m simclr_jax.main --config=configs/cifar10.py --workdir=$WORKDIR \
      [--config.data.data_dir=$TFDS_DATA_DIR]
  python -m simclr_jax.main --config=configs/linear_eval.py \
      --config.pretrain_workdir=$WORKDIR --workdir=$WORKDIR/eval

ResNet-18 (CIFAR stem), batch 512, 1000 epochs, LARS lr 1.0 × 512/256, weight decay 1e-6 (the
official README's value; 1e-4 is often quoted but is not what its command uses), temperature 0.5,
no blur, jitter strength 0.5, 10 warm-up epochs. Expected: ≈ 91% linear-eval top-1 (official
README reference for this command); not yet reproduced with this code base.
"""
from configs import base


def get_config():
  """CIFAR-10 recipe; the base config already holds its values, named here for the reader."""
  c = base.get_config()
  c.data.source = 'tfds'
  c.data.name = 'cifar10'
  c.data.train_split, c.data.eval_split = 'train', 'test'
  c.data.image_size = 32
  c.data.num_classes = 10
  c.model.depth, c.model.width, c.model.cifar_stem = 18, 1.0, True
  c.model.num_proj_layers = 2
  c.augment.jitter_strength, c.augment.blur = 0.5, False
  c.loss.temperature = 0.5
  c.optim.base_lr, c.optim.lr_scaling, c.optim.weight_decay = 1.0, 'linear', 1e-6
  c.train.batch_size, c.train.epochs = 512, 1000.0
  return c
