"""Every recipe parses, is locked against typos, matches the official command it quotes, and its
model and step compile at a tiny size."""
import glob
import os

import pytest
from ml_collections import config_flags

from simclr_jax import build, optim, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
  # The same loader as --config=path, so what is tested is what users run.
  loader = config_flags.config_flags._LoadConfigModule  # pylint: disable=protected-access
  return loader('cfg', path).get_config()


# The pretraining recipes: every config file whose job is 'pretrain' (base.py is their base).
PRETRAIN_RECIPES = sorted(
    p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
    if os.path.basename(p) not in ('__init__.py', 'base.py') and _load(p).job == 'pretrain')

# Official flag defaults (google-research/simclr tf2/run.py) that the README commands keep.
OFFICIAL_DEFAULTS = {
    'optim.lr_scaling': 'linear',  # --learning_rate_scaling
    'optim.warmup_epochs': 10.0,  # --warmup_epochs
    'optim.momentum': 0.9,  # --momentum
    'optim.trust_coefficient': 1e-3,  # lars_optimizer.EETA_DEFAULT
    'model.num_proj_layers': 3,  # --num_proj_layers
    'model.proj_dim': 128,  # --proj_out_dim
    'model.width': 1.0,  # --width_multiplier
}
# The README's pretraining commands (README.md and tf2/README.md), flag by flag.
OFFICIAL_COMMANDS = {
    # --train_batch_size=512 --train_epochs=1000 --learning_rate=1.0 --weight_decay=1e-4
    # --temperature=0.5 --image_size=32 --resnet_depth=18 --use_blur=False
    # --color_jitter_strength=0.5
    'cifar10': {
        'train.batch_size': 512, 'train.epochs': 1000.0, 'optim.base_lr': 1.0,
        'optim.weight_decay': 1e-4, 'loss.temperature': 0.5, 'data.image_size': 32,
        'model.cifar_stem': True, 'model.depth': 18, 'augment.blur': False,
        'augment.jitter_strength': 0.5, 'data.name': 'cifar10', 'data.eval_split': 'test'},
    # --train_batch_size=4096 --train_epochs=100 --temperature=0.1 --learning_rate=0.075
    # --learning_rate_scaling=sqrt --weight_decay=1e-4 --image_size=224 (defaults:
    # --resnet_depth=50 --use_blur=True --color_jitter_strength=1.0)
    'imagenet': {
        'train.batch_size': 4096, 'train.epochs': 100.0, 'loss.temperature': 0.1,
        'optim.base_lr': 0.075, 'optim.lr_scaling': 'sqrt', 'optim.weight_decay': 1e-4,
        'data.image_size': 224, 'model.cifar_stem': False, 'model.depth': 50,
        'augment.blur': True, 'augment.jitter_strength': 1.0, 'data.name': 'imagenet2012',
        'data.eval_split': 'validation'},
}


def _get(config, dotted):
  for key in dotted.split('.'):
    config = config[key]
  return config


def test_all_recipes_found():
  names = {os.path.basename(p)[:-3] for p in PRETRAIN_RECIPES}
  assert names >= {'demo', 'cifar10', 'cifar100', 'stl10', 'imagenet'}


@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'imagenet'])
def test_recipe_is_the_official_command(name):
  config = _load(os.path.join(ROOT, 'configs', f'{name}.py'))
  want = {**OFFICIAL_DEFAULTS, **OFFICIAL_COMMANDS['cifar10' if name == 'cifar100' else name]}
  if name == 'cifar100':
    want.update({'data.name': 'cifar100', 'data.num_classes': 100})
  for key, value in want.items():
    assert _get(config, key) == value, key
  doc = open(os.path.join(ROOT, 'configs', f'{name}.py')).read().split('"""')[1]
  assert '--weight_decay=1e-4' in doc or name == 'cifar100'
  if name == 'cifar10':
    assert 'around 91%' in doc
  if name == 'imagenet':
    assert 'around 64.5%' in doc


def test_peak_learning_rates_of_the_official_commands():
  """README: 0.3 linear equals 0.075 sqrt at batch 4096 (4.8); CIFAR-10: 1.0 × 512/256."""
  for name, peak in [('cifar10', 2.0), ('imagenet', 4.8)]:
    c = _load(os.path.join(ROOT, 'configs', f'{name}.py'))
    lr = optim.scaled_learning_rate(c.optim.base_lr, c.train.batch_size, c.optim.lr_scaling)
    assert lr == pytest.approx(peak), name  # Python floats: ~1e-16 off, approx's 1e-6 to spare.


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
  config.data.image_size = 8 if config.model.cifar_stem else 32
  training = build.training(config, parallel.make_mesh(devices), num_examples=160)
  state, batch, step = training.abstract_state(), training.abstract_batch(), training.step
  compiled = step.lower(state, batch, None).compile()
  assert compiled.cost_analysis() is not None
