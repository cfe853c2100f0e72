"""The import job: a published SimCLR TF2 SavedModel or checkpoint as an ordinary workdir.

  python -m simclr_jax.main --config=configs/import_official.py:r50_1x_sk1 \\
      --config.imported.source=PATH_OR_GS_URL --workdir=DIR

Reads every variable by its layer path (models/official.py), fills the configured model, and,
for a SavedModel, proves the import: the SavedModel's own signature and the imported model run
on the same seeded images, and h, the supervised logits and the projection must agree within
config.imported.check_rtol. Everything is checked before anything is written: a failed import
leaves no workdir behind (and refuses a workdir that already holds a run).
"""
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from simclr_jax import checkpoint, optim, parallel, train_step
from simclr_jax import workdir as workdir_lib
from simclr_jax.errors import ConfigError
from simclr_jax.eval import encoder
from simclr_jax.models import official, simclr

IMPORT_FILE = 'import.json'
# Our output -> the official SavedModel's output of the same tensor (tf2/run.py
# get_salient_tensors_dict: 'final_avg_pool', 'logits_sup', 'proj_head_output').
_OFFICIAL_OUTPUTS = {'h': 'final_avg_pool', 'probe_logits': 'logits_sup', 'z': 'proj_head_output'}


def check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """ConfigError naming a missing source, or a workdir that already holds a run."""
  if not config.imported.source:
    raise ConfigError('config.imported.source is not set; pass --config.imported.source=PATH '
                      '(a SavedModel directory, a checkpoint directory or prefix; may be gs://).')
  for name in (workdir_lib.CONFIG_FILE, 'checkpoints'):
    if (epath.Path(workdir) / name).exists():
      raise ConfigError(f'--workdir={workdir} already holds {name}: import into a new workdir '
                        '(nothing there was changed).')


def _mapped_template(template: dict[str, Any], projection_head: bool) -> dict[str, Any]:
  """The variables the source fills: all of them, or all but the projection head."""
  if projection_head:
    return template
  return {col: {k: v for k, v in tree.items() if k != 'projection'}
          for col, tree in template.items()}


def _merge(into: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
  """`into` with the subtrees of `values` put in its place."""
  out = dict(into)
  for k, v in values.items():
    out[k] = _merge(into[k], v) if isinstance(v, dict) else v
  return out


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
  """max |ours - theirs| / max |theirs|: the error against the tensor's own scale."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def self_check(saved_model_dir: str, model: simclr.SimCLR, variables: Any, images: np.ndarray,
               outputs: tuple[str, ...]) -> dict[str, float]:
  """{our output: relative error} against the SavedModel's own signature on `images`."""
  # TensorFlow only here: the SavedModel's own forward pass needs it.
  from simclr_jax.data.tf_cpu import tf  # pylint: disable=g-import-not-at-top
  try:
    loaded = tf.saved_model.load(saved_model_dir)
    theirs = loaded(tf.constant(images), trainable=False)
  except Exception as e:  # pylint: disable=broad-except  (any TF failure: name the directory)
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise official.OfficialImportError(
        f'{saved_model_dir}: the SavedModel does not run as the official one does '
        f'(__call__(images, trainable=False)): {why}') from e
  ours = jax.device_get(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
  return {k: relative_error(ours[k], theirs[name].numpy())
          for k, name in _OFFICIAL_OUTPUTS.items() if k in outputs and name in theirs}


def _official_step(ckpt: official.Checkpoint) -> int | None:
  """The official run's global_step, where the checkpoint records it (SavedModels do not)."""
  key = ckpt.find('global_step')
  return None if key is None else int(ckpt.tensor(key))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Imports config.imported.source into `workdir`; returns what import.json records."""
  check_config(config, workdir)
  cfg = config.imported
  model = simclr.from_config(config.model, config.data.num_classes)
  size = config.data.image_size
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                               train=False))
  mapping = official.variable_map(
      model.depth, model.cifar_stem, model.sk_ratio, model.se_ratio,
      model.num_proj_layers if cfg.projection_head else 0, model.num_classes)
  ckpt = official.read_checkpoint(cfg.source)
  imported = official.to_variables(ckpt, _mapped_template(template, cfg.projection_head), mapping)
  if not cfg.projection_head:  # the release has none: a seeded random head, said in import.json
    initial = encoder.random_init(model, config, config.seed, parallel.make_mesh())
    imported = _merge(jax.tree.map(np.asarray, jax.device_get(initial)), imported)

  record: dict[str, Any] = {
      'source': cfg.source, 'architecture': cfg.architecture,
      'model': {k: config.model[k] for k in ('depth', 'width', 'sk_ratio', 'se_ratio',
                                             'num_proj_layers', 'proj_dim')},
      'num_classes': config.data.num_classes,
      'format': 'saved_model' if ckpt.saved_model else 'checkpoint',
      'official_global_step': _official_step(ckpt),
      'projection_head': 'imported' if cfg.projection_head else
                         f'not in the release: random (seed {config.seed})',
      'check_rtol': cfg.check_rtol}
  if ckpt.saved_model:
    images = np.random.default_rng(config.seed).uniform(
        0, 1, (cfg.check_images, size, size, 3)).astype(np.float32)
    compared = ('h', 'probe_logits') + (('z',) if cfg.projection_head else ())
    errors = self_check(ckpt.saved_model, model, imported, images, compared)
    record['check'] = {'images': f'{cfg.check_images} seeded uniform [0, 1] images of '
                                 f'{size}x{size} (seed {config.seed})',
                       'relative_error': errors}
    worst = max(errors, key=errors.get)
    if errors[worst] > cfg.check_rtol:
      raise official.OfficialImportError(
          f'the imported model differs from the SavedModel {ckpt.saved_model}: relative error '
          f'{errors[worst]:.2e} in {worst} (> config.imported.check_rtol={cfg.check_rtol:g}; '
          f'all: { {k: float(f"{v:.2e}") for k, v in errors.items()} }). Nothing was written; '
          'check config.model against the release.')
  else:
    record['check'] = ('none: a checkpoint holds no forward pass to compare with; import the '
                       "release's saved_model/ directory for the self-check")
  _write(config, workdir, imported, record)
  return record


def _write(config: ml_collections.ConfigDict, workdir: str,
           variables: dict[str, Any], record: dict[str, Any]) -> None:
  """config.json (job 'pretrain'), the checkpoint at step 0 and import.json; all or nothing."""
  created = not epath.Path(workdir).exists()
  pretrain_config = ml_collections.ConfigDict(config.to_dict())
  pretrain_config.job = 'pretrain'
  del pretrain_config['imported']
  # The optimiser state's structure does not depend on the schedule's length: a fresh (zero)
  # momentum, so that pretraining could continue from the imported weights.
  tx, _ = optim.make_optimizer(config.optim, config.train.batch_size, config.train.batch_size, 1)
  mesh = parallel.make_mesh()
  state = train_step.TrainState(step=np.zeros((), np.int32), params=variables['params'],
                                batch_stats=variables['batch_stats'],
                                opt_state=jax.tree.map(np.asarray, tx.init(variables['params'])))
  try:
    workdir_lib.ensure_writable(workdir, checkpoints=True)
    with workdir_lib.lock(workdir):
      mgr = checkpoint.manager(workdir, save_every_steps=1, keep=1)
      saved = checkpoint.save(mgr, parallel.replicate(state, mesh), force=True)
      checkpoint.close(mgr)
      if not saved:  # checkpoint.save keeps NaN/inf out of a workdir
        raise official.OfficialImportError(
            f'{record["source"]}: the imported parameters are not finite (NaN or inf); '
            'nothing was written.')
      if jax.process_index() == 0:
        workdir_lib.write_config(workdir, pretrain_config)
        record['written'] = time.strftime('%Y-%m-%dT%H:%M:%S%z')
        (epath.Path(workdir) / IMPORT_FILE).write_text(json.dumps(record, indent=1))
  except BaseException:
    if created and jax.process_index() == 0:  # all or nothing: no half-written workdir
      epath.Path(workdir).rmtree(missing_ok=True)
    raise
  logging.info('Imported %s (%s) into %s: %s', record['source'], record['architecture'],
               workdir, record['check'] if isinstance(record['check'], str) else
               'self-check relative errors ' + ', '.join(
                   f'{k} {v:.1e}' for k, v in record['check']['relative_error'].items()))
