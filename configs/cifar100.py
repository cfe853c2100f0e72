"""SimCLR on CIFAR-100: the CIFAR-10 recipe with CIFAR-100's data and 100 probe classes.

  python -m simclr_jax.main --config=configs/cifar100.py --workdir=$WORKDIR

Expected: no official SimCLR figure; published reproductions of this setting (ResNet-18,
1000 epochs) report roughly 60–65% linear-eval top-1. Not yet reproduced with this code base.
"""
from configs import cifar10


def get_config():
  """CIFAR-100 recipe."""
  c = cifar10.get_config()
  c.data.name = 'cifar100'
  c.data.num_classes = 100
  return c
