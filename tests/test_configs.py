"""Every recipe parses, is locked against typos, and its model and step compile at a tiny size."""
import glob
import os

import jax
import pytest
from ml_collections import config_flags

from simclr_jax import optim, parallel
from simclr_jax import train_step as ts
from simclr_jax.models import simclr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_RECIPES = sorted(
    p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
    if os.path.basename(p) not in ('__init__.py', 'base.py', 'linear_eval.py'))


def _load(path):
  # The same loader as --config=path, so what is tested is what users run.
  return config_flags.config_flags._LoadConfigModule('cfg', path).get_config()  # pylint: disable=protected-access


def test_all_recipes_found():
  names = {os.path.basename(p)[:-3] for p in PRETRAIN_RECIPES}
  assert names >= {'demo', 'cifar10', 'cifar100', 'stl10', 'imagenet'}


@pytest.mark.parametrize('path', PRETRAIN_RECIPES, ids=os.path.basename)
def test_recipe_compiles_at_tiny_size(path, devices):
  config = _load(path)
  config.lock()
  with pytest.raises(AttributeError):
    config.train.batchsize = 8  # misspelt keys are errors, not silent new fields
  assert config.job == 'pretrain'
  module_doc = open(path).read().split('"""')[1]
  assert 'python -m simclr_jax.main' in module_doc and 'Expected' in module_doc
  config.model.width = 1 / 16
  config.train.batch_size = 16
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.train.batch_size, mesh)
  model = simclr.from_config(config.model, config.data.num_classes)
  tx, lr = optim.make_optimizer(config.optim, config.train.batch_size, 10, 100)
  size = 8 if config.model.cifar_stem else 32
  state = jax.eval_shape(lambda: ts.init_state(model, tx, jax.random.key(0), (size,) * 2 + (3,),
                                               mesh))
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                      sharding=parallel.replicated(mesh)), state)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharded(mesh))
           for k, shape, dtype in [('view1', (16, size, size, 3), 'float32'),
                                   ('view2', (16, size, size, 3), 'float32'),
                                   ('label', (16,), 'int32')]}
  step = ts.make_train_step(model, tx, lr, config.loss.temperature, mesh)
  compiled = step.lower(state, batch).compile()
  assert compiled.cost_analysis() is not None
