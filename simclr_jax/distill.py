"""The distillation job (SimCLRv2 self-training): a student learns a teacher's soft predictions.

  python -m simclr_jax.main --config=configs/distill.py \\
      --config.pretrain_workdir=TEACHER_RUN --workdir=STUDENT_RUN

Read top to bottom: the teacher (a workdir's model, fine-tuned on a labelled fraction first
unless config.teacher='head'), the student (a fresh ResNet with a zero-initialised linear head),
official LARS with cosine decay, then a jitted step that runs the frozen teacher in inference
mode on the student's crop (+ flip) view and descends `losses.kd_loss` (plus, optionally, the
labelled examples' cross-entropy). The student's workdir has the usual layout (config.json, a
checkpoint, metrics.jsonl) plus distill.json with both top-1 figures and the protocol.
"""
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from simclr_jax import checkpoint, losses, metrics, optim, parallel, train_step
from simclr_jax import workdir as workdir_lib
from simclr_jax.data import host_input
from simclr_jax.errors import ConfigError
from simclr_jax.eval import encoder as encoder_lib
from simclr_jax.eval import features, finetune, linear_probe
from simclr_jax.eval import job as eval_job
from simclr_jax.models import resnet, simclr

DISTILL_FILE = 'distill.json'
TEACHERS = ('finetune', 'head')
TRAIN_ON = ('all', 'labelled')


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first bad key of the distillation config."""
  encoder_lib.check_config(config)
  d = config.distill
  choices = {'teacher': (config.teacher, TEACHERS), 'distill.train_on': (d.train_on, TRAIN_ON)}
  for key, (value, allowed) in choices.items():
    if value not in allowed:
      raise ConfigError(f'config.{key}={value!r} is not one of {allowed}.')
  if not d.temperature > 0:
    raise ConfigError(f'config.distill.temperature={d.temperature} must be > 0 (1.0 official).')
  if d.kd_weight < 0 or d.label_weight < 0 or d.kd_weight + d.label_weight == 0:
    raise ConfigError(f'config.distill.kd_weight={d.kd_weight} and label_weight='
                      f'{d.label_weight} must be >= 0, not both 0.')


def student_model_config(pretrain_config: ml_collections.ConfigDict,
                         student: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The teacher run's config.model with config.student's set (>= 0) fields, in float32."""
  model_cfg = ml_collections.ConfigDict(pretrain_config.model.to_dict())
  for key, value in student.items():
    if value >= 0:
      model_cfg[key] = value
  model_cfg.dtype = 'float32'
  return model_cfg


def _teacher(config: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
             pretrain_config: ml_collections.ConfigDict, model: simclr.SimCLR, variables: Any,
             mesh: Any) -> tuple[Any, Any, dict[str, Any]]:
  """(logits fn (variables, images), its variables, what distill.json says of the teacher)."""
  if config.teacher == 'head':
    apply = lambda v, x: model.apply(v, x, train=False)['probe_logits']  # noqa: E731
    logits, labels = features.extract(
        features.make_predict_fn(apply, mesh), variables,
        host_input.eval_iterator(cfg, cfg.data.eval_split, config.eval_batch_size), mesh)
    return apply, variables, {'kind': 'head', **features.topk_accuracy(logits, labels)}
  results, tuned = finetune.finetune(variables, pretrain_config, cfg, config.finetune, mesh,
                                     config.eval_batch_size, config.pretrain_workdir)
  ft = config.finetune
  module = finetune.build_classifier(pretrain_config.model, cfg.data.num_classes,
                                     int(ft.from_block),
                                     finetune.proj_selector(ft, pretrain_config.model))
  apply = lambda v, x: module.apply(v, x, train=False)  # noqa: E731
  return apply, parallel.replicate(tuned, mesh), {'kind': 'finetune', **results}


def make_step(student: finetune.Classifier, teacher_apply: Any, tx: optax.GradientTransformation,
              d: ml_collections.ConfigDict, mesh: Any) -> Any:
  """Jitted (params, opt_state, batch_stats, teacher vars, images, labels, labelled) → same 3,
  loss. The teacher runs in inference mode and gets no gradient; BN trains on the global batch."""
  temperature, kd_weight, label_weight = (float(d.temperature), float(d.kd_weight),
                                          float(d.label_weight))

  def step(params, opt_state, batch_stats, teacher_vars, images, labels, labelled):
    teacher_logits = jax.lax.stop_gradient(teacher_apply(teacher_vars, images))

    def loss_fn(params):
      logits, new = student.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
      loss = kd_weight * losses.kd_loss(logits, teacher_logits, temperature)
      if label_weight:  # the mean cross-entropy over this batch's labelled examples
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        loss += label_weight * jnp.sum(ce * labelled) / jnp.maximum(jnp.sum(labelled), 1)
      return loss, new['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_stats, loss

  rep = parallel.replicated_sharding(mesh)
  return jax.jit(step, out_shardings=(rep, rep, rep, rep))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Distils config.pretrain_workdir's (fine-tuned) teacher into a student in `workdir`."""
  check_config(config)
  d = config.distill
  if (epath.Path(workdir) / 'checkpoints').exists():
    raise ConfigError(f'--workdir={workdir} already holds checkpoints: distil into a new '
                      'workdir (nothing there was changed).')
  workdir_lib.ensure_writable(workdir, checkpoints=True)
  start = time.time()
  mesh = parallel.make_mesh()
  parallel.check_batch_size(int(d.batch_size), mesh, 'distill.batch_size')

  # --- teacher ------------------------------------------------------------------------------
  pretrain_config, model, step, variables = encoder_lib.restore(config.pretrain_workdir,
                                                                config.checkpoint_step, mesh)
  cfg = eval_job.input_config(config, pretrain_config)
  if not cfg.data.num_classes:
    raise ConfigError('config.data.num_classes is 0: distillation needs the teacher\'s classes; '
                      'set config.data.num_classes.')
  teacher_apply, teacher_vars, teacher_record = _teacher(config, cfg, pretrain_config, model,
                                                         variables, mesh)
  logging.info('Teacher (%s) top-1 %.3f on %s.', config.teacher, teacher_record['top1'],
               cfg.data.eval_split)

  # --- data: the unlabelled split, and which of its examples count as labelled --------------
  fraction = float(config.finetune.label_fraction)
  labelled_ids = (finetune.label_subset(cfg, fraction, cfg.seed)[0] if fraction < 1.0
                  else None)
  train_ids = labelled_ids if d.train_on == 'labelled' else None
  n = host_input.num_examples(cfg) if train_ids is None else len(train_ids)
  views = linear_probe.resolve_views(d, pretrain_config.augment)
  steps = optim.train_steps(n, d)

  # --- student, optimiser --------------------------------------------------------------------
  student_cfg = student_model_config(pretrain_config, config.student)
  num_classes = int(cfg.data.num_classes)
  student = finetune.build_classifier(student_cfg, num_classes, 0, 0)
  size = cfg.data.image_size
  # An 'rbg' key: the same initialiser distributions, compiled far faster on CPU (as
  # encoder.random_init).
  init = jax.jit(lambda key: student.init(key, jnp.zeros((1, size, size, 3)), train=False))(
      jax.random.key(cfg.seed, impl='rbg'))
  # The colab's LARS: exclude_from_weight_decay=['batch_normalization', 'bias'] (and so from
  # the trust ratio): the student's head kernel gets both, like every other kernel.
  tx, learning_rate = optim.make_optimizer(d, int(d.batch_size), n, steps,
                                           probe_trust_ratio=True)
  params, opt_state, batch_stats = parallel.replicate(
      jax.tree.map(np.asarray, (init['params'], tx.init(init['params']), init['batch_stats'])),
      mesh)
  step_fn = make_step(student, teacher_apply, tx, d, mesh)

  # --- loop ----------------------------------------------------------------------------------
  batches = host_input.probe_train_iterator(
      cfg, int(d.batch_size), crop_area=tuple(views.crop_area), flip=bool(views.flip),
      indices=train_ids, batch_key='distill.batch_size')
  labelled_set = None if labelled_ids is None else np.asarray(labelled_ids)
  with metrics.MetricWriter(workdir) as writer:
    for i, batch in zip(range(1, steps + 1), batches):
      labelled = (batch['label'] >= 0 if labelled_set is None else  # -1: an unlabelled example
                  np.isin(batch['index'], labelled_set)).astype(np.float32)
      arrays = parallel.host_batch_to_global(
          {'image': batch['image'], 'label': batch['label'].astype(np.int32),
           'labelled': labelled}, mesh)
      params, opt_state, batch_stats, loss = step_fn(
          params, opt_state, batch_stats, teacher_vars, arrays['image'], arrays['label'],
          arrays['labelled'])
      if i % d.log_every_steps == 0 or i == steps or i == 1:
        scalars = {'distill_loss': float(loss), 'learning_rate': float(learning_rate(i - 1))}
        writer.write(i, scalars)
        logging.info('distill step %d/%d: loss %.4f', i, steps, scalars['distill_loss'])

  # --- the student's figures and workdir --------------------------------------------------------
  trained = {'params': params, 'batch_stats': batch_stats}
  logits, labels = features.extract(
      features.make_predict_fn(lambda v, x: student.apply(v, x, train=False), mesh), trained,
      host_input.eval_iterator(cfg, cfg.data.eval_split, config.eval_batch_size), mesh)
  record = {
      'teacher': {'workdir': str(config.pretrain_workdir), 'checkpoint_step': int(step),
                  **teacher_record},
      'student': {**features.topk_accuracy(logits, labels),
                  'model': {k: student_cfg.get(k, 0.0) for k in ('depth', 'width', 'cifar_stem',
                                                                 'sk_ratio', 'se_ratio')}},
      'labels': {'label_fraction': fraction,
                 'num_labelled': int(host_input.num_examples(cfg) if labelled_ids is None
                                     else len(labelled_ids))},
      'protocol': {**d.to_dict(), 'crop_area': list(views.crop_area), 'flip': bool(views.flip),
                   'views_from': dict(views.views_from), 'steps': steps, 'num_train': int(n),
                   'learning_rate': optim.scaled_learning_rate(float(d.base_lr),
                                                               int(d.batch_size), d.lr_scaling)},
      'eval_split': cfg.data.eval_split, 'seconds': time.time() - start}
  _write(workdir, cfg, student_cfg, jax.device_get(trained), steps, record, mesh)
  logging.info('Student top-1 %.3f (teacher %.3f) on %s; %s', record['student']['top1'],
               teacher_record['top1'], cfg.data.eval_split, epath.Path(workdir) / DISTILL_FILE)
  return record


def _write(workdir: str, cfg: ml_collections.ConfigDict, student_cfg: ml_collections.ConfigDict,
           trained: Any, steps: int, record: dict[str, Any], mesh: Any) -> None:
  """The student as a SimCLR workdir: encoder and head trained, projection head initialised."""
  run_config = ml_collections.ConfigDict(cfg.to_dict())
  run_config.job, run_config.model = 'pretrain', student_cfg
  # The projection head alone (small: no need to initialise the whole network again).
  head = simclr.ProjectionHead(student_cfg.num_proj_layers,
                               resnet.feature_dim(student_cfg.depth, student_cfg.width),
                               student_cfg.proj_dim)
  dim = resnet.feature_dim(student_cfg.depth, student_cfg.width)
  init = jax.device_get(head.init(jax.random.key(cfg.seed), jnp.zeros((1, dim)), train=False))
  params = {**trained['params'], 'projection': init['params']}
  stats = {**trained['batch_stats'], 'projection': init['batch_stats']}
  tx, _ = optim.make_optimizer(cfg.optim, cfg.train.batch_size, cfg.train.batch_size, 1)
  state = train_step.TrainState(step=np.asarray(steps, np.int32), params=params,
                                batch_stats=stats,
                                opt_state=jax.tree.map(np.asarray, tx.init(params)))
  mgr = checkpoint.manager(workdir, save_every_steps=1, keep=1)
  saved = checkpoint.save(mgr, parallel.replicate(state, mesh), force=True)
  checkpoint.close(mgr)
  if not saved:  # checkpoint.save keeps NaN/inf out of a workdir
    raise ConfigError(f'the student diverged (non-finite parameters) after {steps} steps; '
                      'nothing was saved in the workdir: lower config.distill.base_lr.')
  if jax.process_index() == 0:
    workdir_lib.write_config(workdir, run_config)
    (epath.Path(workdir) / DISTILL_FILE).write_text(json.dumps(record, indent=1, default=float))
