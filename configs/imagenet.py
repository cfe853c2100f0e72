"""SimCLR on ImageNet (ILSVRC-2012): the official ResNet-50 pretraining command.

  python -m simclr_jax.main --config=configs/imagenet.py --workdir=gs://$BUCKET/simclr_r50 \
      --config.data.data_dir=gs://$BUCKET/tensorflow_datasets

It follows the official README (google-research/simclr, README.md and tf2/README.md, "which
reflects the default hyperparameters in our paper"):

  python run.py --train_mode=pretrain \
    --train_batch_size=4096 --train_epochs=100 --temperature=0.1 \
    --learning_rate=0.075 --learning_rate_scaling=sqrt --weight_decay=1e-4 \
    --dataset=imagenet2012 --image_size=224 --eval_split=validation \
    --data_dir=$DATA_DIR --model_dir=$MODEL_DIR \
    --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0

with the flag defaults for what it leaves out: --resnet_depth=50, --width_multiplier=1,
--color_jitter_strength=1.0, --use_blur=True, --warmup_epochs=10, --momentum=0.9,
--batch_norm_decay=0.9, --num_proj_layers=3, --proj_out_dim=128. Peak lr 0.075 × sqrt(4096)
= 4.8. bfloat16 compute is this code base's choice (parameters, BN statistics and the loss stay
float32).

Expected: "around 64.5%" linear-eval top-1 (top-level README, after its linear-eval command:
"As a reference, the above runs on ImageNet should give you around 64.5% accuracy."). That
sentence was written for an older README pretraining command (--learning_rate=0.3 linear,
--weight_decay=1e-6, SimCLRv1 code); the README kept it when the command became the one above.
The README's table lists the released SimCLRv1 ResNet-50 (1x) checkpoint at 69.1% ImageNet
top-1 without its command (longer training: --config.train.epochs). Not yet reproduced with
this code base. Needs the prepared TFDS imagenet2012 (manual download) under data_dir.
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
  c.model.num_proj_layers, c.model.proj_dim = 3, 128
  c.model.dtype = 'bfloat16'
  c.augment.jitter_strength, c.augment.blur = 1.0, True
  c.loss.temperature = 0.1
  c.optim.base_lr, c.optim.lr_scaling, c.optim.weight_decay = 0.075, 'sqrt', 1e-4
  c.optim.warmup_epochs, c.optim.momentum = 10.0, 0.9
  c.train.batch_size, c.train.epochs = 4096, 100.0
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 2500
  return c
