"""SimCLRv2 distillation / self-training: a student trained on a teacher's softened predictions.

  python -m simclr_jax.main --config=configs/distill.py \\
      --config.pretrain_workdir=TEACHER_RUN --workdir=STUDENT_RUN

The teacher is a pretraining (or imported) workdir. With teacher='finetune' (SimCLRv2's path) it
is first fine-tuned on config.finetune's labelled fraction, exactly as the evaluation job's
`finetune` evaluator does; with teacher='head' its own supervised head is used as it is (the
published models' linear-evaluation head, or a run's online probe). The student, a randomly
initialised ResNet (the teacher's architecture unless config.student says otherwise), learns
from the teacher's predictions on crop + flip views of the unlabelled train split. The official
recipe is the colab tf2/colabs/distillation_self_training.ipynb:

  def add_kd_loss(student_logits, teacher_logits, temperature):
    teacher_probs = tf.nn.softmax(teacher_logits / temperature)
    kd_loss = tf.reduce_mean(temperature**2 * tf.nn.softmax_cross_entropy_with_logits(
        teacher_probs, student_logits / temperature))
  learning_rate = 2.0; momentum = 0.9; weight_decay = 1e-4; temperature = 1.
  LARSOptimizer(CosineDecay(learning_rate, total_steps), momentum=momentum,
                weight_decay=weight_decay,
                exclude_from_weight_decay=['batch_normalization', 'bias'])
  preprocess_image(x['image'], 224, 224, is_training=True, color_distort=False)

The SimCLRv2 paper adds the labelled examples' cross-entropy with a weight when labels are
available (distill.label_weight; 0 as the colab). WORKDIR becomes an ordinary workdir of the
student (the evaluation job reads it) with distill.json: teacher and student top-1 and the
protocol.
"""
import ml_collections
from ml_collections import config_dict

from configs import linear_eval


def get_config() -> ml_collections.ConfigDict:
  """Returns the distillation config (the official colab's recipe)."""
  c = ml_collections.ConfigDict()
  c.job = 'distill'
  c.seed = 0  # label subset, data order and views, the student's initialisation
  c.cpu_devices = 0  # as configs/base.py
  c.pretrain_workdir = config_dict.placeholder(str)  # required: the teacher's workdir
  c.checkpoint_step = -1  # the teacher's checkpoint (-1: latest)
  c.eval_batch_size = 256
  evaluation = linear_eval.get_config()
  c.data = evaluation.data  # overrides of the teacher run's data (None: keep its value)
  # 'finetune': fine-tune the teacher on config.finetune.label_fraction of the labels first
  # (SimCLRv2); 'head': the teacher workdir's own supervised head as it is.
  c.teacher = 'finetune'
  c.finetune = evaluation.finetune  # the teacher's fine-tuning, as the evaluation job's

  # The student: -1 takes the teacher's value. Its projection head (the teacher's shape) is
  # initialised and kept only so that the workdir has the usual layout; it is not trained.
  c.student = ml_collections.ConfigDict()
  c.student.depth = -1
  c.student.width = -1.0
  c.student.sk_ratio = -1.0
  c.student.se_ratio = -1.0

  c.distill = ml_collections.ConfigDict()
  c.distill.temperature = 1.0  # colab: temperature = 1.
  c.distill.kd_weight = 1.0
  c.distill.label_weight = 0.0  # cross-entropy on the labelled fraction (paper; colab: none)
  # 'all': the whole train split, labels unused unless label_weight > 0 (self-training);
  # 'labelled': config.finetune.label_fraction of it (with kd_weight=0 and label_weight=1, the
  # student trained on the labels alone, the comparison SimCLRv2 makes).
  c.distill.train_on = 'all'
  c.distill.base_lr = 2.0  # colab: learning_rate = 2.0, as given (lr_scaling 'none')
  c.distill.lr_scaling = 'none'
  c.distill.momentum = 0.9
  c.distill.trust_coefficient = 1e-3  # LARS eeta, official default
  c.distill.weight_decay = 1e-4
  c.distill.warmup_epochs = 0.0  # colab: CosineDecay from the start
  c.distill.epochs = 100.0
  c.distill.steps = -1  # > 0: this many steps instead of N * epochs // batch + 1
  c.distill.batch_size = 256
  c.distill.log_every_steps = 50
  # Views: random resized crop (+ flip), no colour distortion (colab: color_distort=False).
  # None: the teacher run's augment.crop_area / augment.flip.
  c.distill.crop_area = config_dict.placeholder(tuple)
  c.distill.flip = config_dict.placeholder(bool)
  return c
