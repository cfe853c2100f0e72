"""Demo: SimCLR on scikit-learn's bundled 8x8 digits, offline, a few minutes on a 2-core CPU.

  python -m simclr_jax.main --config=configs/demo.py --workdir=/tmp/simclr_demo
  python -m simclr_jax.main --config=configs/linear_eval.py \
      --config.pretrain_workdir=/tmp/simclr_demo --workdir=/tmp/simclr_demo/eval

(`bash launch/demo.sh` sets up a venv and runs both.) 1,437 training digits upscaled to 16x16,
a ResNet-18 at width 1/8 with the CIFAR stem. Expected: linear-probe top-1 well above the
random-encoder baseline on the 360 test digits (figures in the README).
"""
from configs import base


def get_config():
  """Demo recipe: small everything, CIFAR-style views (no blur, jitter 0.5)."""
  c = base.get_config()
  # One CPU device: this model is so small that splitting its step over the cores costs more
  # in cross-device BN/loss reductions than it gains (2-core CPU: 542 vs 441 images/s end to
  # end); real recipes gain from one device per core (README "Performance").
  c.cpu_devices = 1
  c.data.source = 'demo'
  c.data.image_size = 16
  c.data.num_classes = 10
  c.data.shuffle_buffer = 2000
  c.model.depth = 18
  c.model.width = 0.125
  c.model.cifar_stem = True
  c.loss.temperature = 0.5
  c.optim.base_lr = 1.0
  c.optim.warmup_epochs = 2.0
  c.train.batch_size = 128
  c.train.epochs = 30.0
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 100
  return c
