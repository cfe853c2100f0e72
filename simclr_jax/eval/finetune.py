"""Fine-tuning of a pretrained encoder and projection layers, as official SimCLRv2.

The official semi-supervised command (google-research/simclr README, "Semi-supervised learning
and fine-tuning the whole network"):

  --fine_tune_after_block=-1 --zero_init_logits_layer=True --global_bn=True --optimizer=lars
  --learning_rate=0.005 --learning_rate_scaling=sqrt --weight_decay=0 --train_epochs=60
  --train_batch_size=1024 --warmup_epochs=0 --dataset=imagenet2012_subset/1pct
  --num_proj_layers=3 --ft_proj_selector=1

So: the whole network trained with BN in train mode over the global batch; a zero-initialised
linear head with bias (official 'head_supervised', named like the online probe so optim's LARS
gives it neither trust ratio nor, here, weight decay on its bias) on the output of projection
layer k = ft_proj_selector (tf2/model.py: `return proj_head_output,
hiddens_list[FLAGS.ft_proj_selector]`), those k layers trained too; LARS from optim; crop + flip
views without colour distortion (tf2/data.py: `color_distort=is_pretrain`), with the pretraining
run's crop area and flip unless config.finetune sets them; `N * epochs // B + 1` steps of an
endless shuffled stream. `from_block=k` freezes the stem and stages before k (official
fine_tune_after_block=k-1): frozen parts keep their parameters and run BN in inference mode.
Data sets without official subsets use `subsets.balanced_subset`, a fixed, seeded, class-balanced
fraction of the train split.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from simclr_jax import optim, parallel
from simclr_jax.data import host_input
from simclr_jax.errors import ConfigError
from simclr_jax.eval import encoder as encoder_lib
from simclr_jax.eval import features, linear_probe, subsets
from simclr_jax.models import resnet, simclr

HEAD = simclr.PROBE  # the supervised head: optim's masks treat it as official 'head_supervised'
NUM_STAGES = 4  # every ResNet depth in resnet.STAGES has four stages
OPTIMIZERS = ('lars', 'momentum')


def label_subset(cfg: ml_collections.ConfigDict, fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(example ids, labels) of the seeded class-balanced `fraction` of cfg.data.train_split.

  Every process reads the whole split's ids and labels (JPEGs are not decoded) and computes
  the same subset.
  """
  ids, labels = host_input.split_labels(cfg, cfg.data.train_split)
  if not len(labels) or labels.min() < 0 or labels.max() >= cfg.data.num_classes:
    raise ConfigError(f'split {cfg.data.train_split!r} needs labels in '
                      f'[0, config.data.num_classes={cfg.data.num_classes}) for a labelled '
                      'subset; set config.data.train_split (or config.finetune.train_split) to '
                      'a labelled split.')
  chosen = subsets.balanced_subset(labels, fraction, seed)
  return ids[chosen], labels[chosen]


def is_frozen(name: str, from_block: int) -> bool:
  """Whether the encoder's top-level part `name` ('stem_bn', 'stage2_block1', ...) is frozen."""
  if name.startswith('stem'):
    return from_block >= 1
  if name.startswith('stage'):
    return int(name[len('stage'):].split('_')[0]) < from_block
  raise ValueError(f'unknown encoder part {name!r}.')


class Classifier(nn.Module):
  """Encoder → projection layers 1..proj_selector → zero-initialised linear head (logits)."""
  encoder: nn.Module
  projection: Any  # simclr.ProjectionHead, or None when proj_selector is 0
  proj_selector: int
  num_classes: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    h = self.encoder(x, train)
    if self.proj_selector:
      h = self.projection(h, train, upto=self.proj_selector)
    return nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros, name=HEAD)(h)


def proj_selector(ft: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict) -> int:
  """config.finetune.proj_selector in [0, num_proj_layers] (-1: the last layer, as official)."""
  k, layers = int(ft.proj_selector), int(model_cfg.num_proj_layers)
  k = layers if k == -1 else k
  if not 0 <= k <= layers:
    raise ConfigError(f'config.finetune.proj_selector={ft.proj_selector}: the pretrained head '
                      f'has {layers} layers; set it in [0, {layers}] (or -1 for the last).')
  return k


def build_classifier(model_cfg: ml_collections.ConfigDict, num_classes: int, from_block: int,
                     selector: int) -> Classifier:
  """The fine-tuning network; its encoder and projection layers have the pretraining names."""
  enc = simclr.encoder_from_config(model_cfg, train_from_stage=from_block)
  projection = None
  if selector:
    projection = simclr.ProjectionHead(model_cfg.num_proj_layers,
                                       resnet.feature_dim(model_cfg.depth, model_cfg.width),
                                       model_cfg.proj_dim, simclr.compute_dtype(model_cfg))
  return Classifier(enc, projection, selector, num_classes)


def _select(tree: Any, like: Any) -> Any:
  """The entries of `tree` at the keys of `like` (recursively): pretrained layers by name."""
  if not isinstance(like, dict):
    return np.asarray(tree)
  return {k: _select(tree[k], v) for k, v in like.items() if k in tree}


def initial_variables(module: Classifier, pretrained: Any, image_size: int,
                      pretrain_workdir: str) -> dict[str, Any]:
  """{'params', 'batch_stats'} on the host: the pretrained layers `module` uses, a zero head."""
  expected = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  host = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), pretrained)
  chosen = {col: _select(host[col], {k: v for k, v in expected[col].items() if k != HEAD})
            for col in ('params', 'batch_stats')}
  chosen['params'][HEAD] = {k: np.zeros(v.shape, np.float32)
                            for k, v in expected['params'][HEAD].items()}
  encoder_lib.check_variables_match(chosen, expected, pretrain_workdir)
  return chosen


def split_params(params: dict[str, Any], from_block: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """(frozen {'encoder': parts before from_block}, trained: the rest, projection and head)."""
  enc = params['encoder']
  frozen = {'encoder': {k: v for k, v in enc.items() if is_frozen(k, from_block)}}
  trained = {**params, 'encoder': {k: v for k, v in enc.items() if not is_frozen(k, from_block)}}
  return frozen, trained


def merge_params(frozen: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
  """The inverse of split_params."""
  return {**trained, 'encoder': {**frozen['encoder'], **trained['encoder']}}


def make_optimizer(ft: ml_collections.ConfigDict, num_examples: int, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, lr schedule): optim's LARS, or the linear probe's Keras momentum ('momentum').

  LARS: official build_optimizer with exclude_from_weight_decay=['batch_normalization', 'bias',
  'head_supervised'] (optim.make_optimizer's masks). Momentum: official add_weight_decay's
  non-LARS branch, weight decay on every non-BN variable (kernels and the head's bias).
  """
  optim_cfg = ml_collections.ConfigDict({
      'base_lr': float(ft.base_lr), 'lr_scaling': ft.lr_scaling,
      'warmup_epochs': float(ft.warmup_epochs), 'weight_decay': float(ft.weight_decay),
      'momentum': float(ft.momentum), 'trust_coefficient': float(ft.trust_coefficient)})
  if ft.optimizer == 'lars':
    return optim.make_optimizer(optim_cfg, int(ft.batch_size), num_examples, num_steps)
  peak = optim.scaled_learning_rate(optim_cfg.base_lr, int(ft.batch_size), ft.lr_scaling)
  schedule = optim.warmup_cosine(
      peak, optim.warmup_steps(optim_cfg.warmup_epochs, num_examples, int(ft.batch_size)),
      num_steps)

  def mask(params):
    return {k: jax.tree.map(lambda _: True, v) if k == HEAD else optim.decay_mask(v)
            for k, v in params.items()}

  return linear_probe.keras_momentum(schedule, optim_cfg.momentum, True,
                                     optim_cfg.weight_decay, mask), schedule


def make_train_step(module: Classifier, tx: optax.GradientTransformation, mesh: Mesh) -> Any:
  """Jitted step (trained, opt_state, frozen, batch_stats, images, labels) → (same 3, loss).

  `frozen` parts are an argument, never differentiated nor updated; BN runs in train mode on
  the global batch (sharded on "data") in the trained parts and updates their statistics.
  """

  def step(trained, opt_state, frozen, batch_stats, images, labels):
    def loss_fn(trained):
      variables = {'params': merge_params(frozen, trained), 'batch_stats': batch_stats}
      logits, new = module.apply(variables, images, train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, new_stats, loss

  rep = parallel.replicated_sharding(mesh)
  return jax.jit(step, out_shardings=(rep, rep, rep, rep))


def with_finetune_data(cfg: ml_collections.ConfigDict, ft: ml_collections.ConfigDict
                       ) -> ml_collections.ConfigDict:
  """The data config fine-tuning reads: cfg with config.finetune's data set and splits."""
  merged = ml_collections.ConfigDict(cfg.to_dict())
  if ft.dataset:
    merged.data.source, merged.data.name = 'tfds', ft.dataset
  if ft.train_split:
    merged.data.train_split = ft.train_split
  if ft.eval_split:
    merged.data.eval_split = ft.eval_split
  return merged


def _batches(ft_data: ml_collections.ConfigDict, ft: ml_collections.ConfigDict,
             indices: np.ndarray | None, mesh: Mesh) -> Any:
  """Endless global (images, labels) batches of crop (+ flip) views of the labelled examples."""
  num_classes = ft_data.data.num_classes
  for batch in host_input.probe_train_iterator(
      ft_data, int(ft.batch_size), crop_area=tuple(ft.crop_area), flip=bool(ft.flip),
      indices=indices, batch_key='finetune.batch_size'):
    if batch['label'].min() < 0 or batch['label'].max() >= num_classes:
      raise ConfigError(f'split {ft_data.data.train_split!r} has labels outside [0, '
                        f'{num_classes}); fine-tuning needs a labelled split '
                        '(config.finetune.train_split / config.data.train_split).')
    arrays = parallel.host_batch_to_global({'image': batch['image'], 'label': batch['label']},
                                           mesh)
    yield arrays['image'], arrays['label']


def finetune(variables: Any, pretrain_config: ml_collections.ConfigDict,
             cfg: ml_collections.ConfigDict, ft: ml_collections.ConfigDict, mesh: Mesh,
             eval_batch_size: int, pretrain_workdir: str = ''
             ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Fine-tunes the pretrained SimCLR `variables` per config.finetune `ft`.

  `cfg` is the evaluation's data config (cfg.seed seeds the subset, data order and views).
  Returns (results with top-1/top-5 on the eval split and the protocol, the fine-tuned
  {'params', 'batch_stats'} of the Classifier).
  """
  ft_data = with_finetune_data(cfg, ft)
  ft = linear_probe.resolve_views(ft, pretrain_config.augment)
  model_cfg = pretrain_config.model
  selector, from_block = proj_selector(ft, model_cfg), int(ft.from_block)
  module = build_classifier(model_cfg, ft_data.data.num_classes, from_block, selector)
  fraction = float(ft.label_fraction)
  indices = label_subset(ft_data, fraction, cfg.seed)[0] if fraction < 1.0 else None
  n = host_input.num_examples(ft_data) if indices is None else len(indices)
  steps = optim.train_steps(n, ft)
  tx, _ = make_optimizer(ft, n, steps)

  init = initial_variables(module, variables, ft_data.data.image_size, pretrain_workdir)
  frozen, trained = split_params(init['params'], from_block)
  opt_state = jax.tree.map(np.asarray, tx.init(trained))
  trained, opt_state, frozen, batch_stats = parallel.replicate(
      (trained, opt_state, frozen, init['batch_stats']), mesh)
  step = make_train_step(module, tx, mesh)
  for _, (images, labels) in zip(range(steps), _batches(ft_data, ft, indices, mesh)):
    trained, opt_state, batch_stats, _ = step(trained, opt_state, frozen, batch_stats, images,
                                              labels)

  tuned = {'params': merge_params(frozen, trained), 'batch_stats': batch_stats}
  logits_fn = features.make_predict_fn(lambda v, x: module.apply(v, x, train=False), mesh)
  logits, labels = features.extract(
      logits_fn, tuned,
      host_input.eval_iterator(ft_data, ft_data.data.eval_split, eval_batch_size),
      mesh)
  results = {
      **features.topk_accuracy(logits, labels), 'label_fraction': fraction,
      'num_train_examples': int(n), 'num_test': int(len(labels)),
      'data': {'dataset': (ft_data.data.name if ft_data.data.source == 'tfds'
                           else ft_data.data.source),
               'train_split': ft_data.data.train_split, 'eval_split': ft_data.data.eval_split},
      'protocol': {
          'optimizer': ft.optimizer, 'base_lr': float(ft.base_lr), 'lr_scaling': ft.lr_scaling,
          'learning_rate': optim.scaled_learning_rate(float(ft.base_lr), int(ft.batch_size),
                                                      ft.lr_scaling),
          'momentum': float(ft.momentum), 'weight_decay': float(ft.weight_decay),
          'warmup_epochs': float(ft.warmup_epochs), 'epochs': float(ft.epochs), 'steps': steps,
          'batch_size': int(ft.batch_size), 'from_block': from_block,
          'proj_selector': selector,
          'augmentation': linear_probe.augmentation_text(ft),
          'views': linear_probe.views_record(ft)}}
  return results, tuned
