"""The export: torch weights that torchvision / torch_resnet load strictly and that compute the JAX
encoder's h; a SavedModel that TensorFlow loads and that computes h and z; export.json.

torch runs on the CPU. PyPI's torchvision is a CUDA build whose C++ ops cannot load beside the
CPU build of torch that CI installs (requirements-export.txt); its models need none of those ops,
so `torchvision_module` declares the two op schemas torchvision's import registers fakes for.
"""
import glob
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from configs import base
from configs import export as export_config
from simclr_jax import checkpoint
from simclr_jax import workdir as workdir_lib
from simclr_jax.data.tf_cpu import tf
from simclr_jax.errors import ConfigError
from simclr_jax.export import job, torch_resnet, torch_weights
from simclr_jax.models import simclr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch = pytest.importorskip('torch')
_TORCHVISION_OPS: list[Any] = []  # keeps the op-schema library alive


@pytest.fixture(scope='module')
def torchvision_module():
  """torchvision, importable beside a CPU-only torch (see the module docstring)."""
  spec = importlib.util.find_spec('torchvision')
  if spec is None:
    pytest.skip('torchvision is not installed (pip install -r requirements-export.txt)')
  try:
    torch.ops.load_library(glob.glob(os.path.join(os.path.dirname(spec.origin), '_C*.so'))[0])
  except (OSError, IndexError):
    lib = torch.library.Library('torchvision', 'FRAGMENT')
    for op in ('nms', 'qnms'):
      lib.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    _TORCHVISION_OPS.append(lib)
  import torchvision  # pylint: disable=g-import-not-at-top
  return torchvision


def _model(depth, width, cifar_stem, num_classes=0):
  cfg = base.get_config()
  cfg.model.depth, cfg.model.width, cfg.model.cifar_stem = depth, width, cifar_stem
  return cfg, simclr.from_config(cfg.model, num_classes)


def _fill(path, leaf, rng):
  """Random values for one variable: He-normal kernels, BN statistics and affines away from
  their init (0/1), so a mapping that dropped or swapped any of them would show."""
  name = str(getattr(path[-1], 'key', path[-1]))
  shape = leaf.shape
  if name == 'kernel':
    return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32)
  if name in ('scale', 'var'):
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  return rng.normal(0, 0.1, shape).astype(np.float32)


def _variables(model, size, seed=0):
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                               train=False))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(lambda p, x: _fill(p, x, rng), abstract)


def _jax_outputs(model, variables, images):
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  return {k: np.asarray(v) for k, v in out.items()}


def _images(n, size, seed=1):
  return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def _torch_h(module, images):
  with torch.no_grad():
    return module.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def _state_dict(sd):
  return {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}


# --- the layout --------------------------------------------------------------------------------


def test_torchvision_shapes_are_torchvision_s(torchvision_module):
  for depth in (18, 50):
    model = getattr(torchvision_module.models, f'resnet{depth}')()
    real = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith('fc.')}
    assert torch_weights.torchvision_shapes(depth) == real


@pytest.mark.parametrize('size', [6, 7, 8, 9])
def test_max_pool_same_is_tf_same(size):
  """MaxPoolSame equals TF's 3x3/2 'SAME' max-pool, on even and odd sizes."""
  x = np.random.default_rng(size).normal(size=(2, size, size + 1, 3)).astype(np.float32)
  want = tf.nn.max_pool2d(x, 3, 2, 'SAME').numpy()
  got = torch_resnet.MaxPoolSame()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  np.testing.assert_array_equal(got.numpy().transpose(0, 2, 3, 1), want)


# --- parity ------------------------------------------------------------------------------------


def test_resnet50_loads_strictly_into_torchvision_and_matches(torchvision_module):
  """ResNet-50 x1, 56 px: torchvision's pooled features equal h (fc = Identity, eval mode)."""
  _, model = _model(50, 1.0, False)
  variables = _variables(model, 56)
  images = _images(2, 56)
  h = _jax_outputs(model, variables, images)['h']
  sd = torch_weights.encoder_state_dict(model, variables, (56, 56, 3))
  assert torch_weights.torchvision_model(sd) == 'resnet50'
  tv = torchvision_module.models.resnet50()
  tv.fc = torch.nn.Identity()
  tv.load_state_dict(_state_dict(sd), strict=True)
  plain = _torch_h(tv, images)
  tv.maxpool = torch_resnet.MaxPoolSame()
  got = _torch_h(tv, images)
  err = numerics.rel_err(got, h)
  print(f'ResNet-50 torchvision vs JAX h: max abs err {np.max(np.abs(got - h)):.2e}, '
        f'relative (Frobenius) {err:.2e}')
  assert err <= numerics.FEATURE_RTOL  # torch against XLA: two float32 inference programs
  # torchvision's own max-pool pads (1, 1) on the even 28x28 map: not the same network, and
  # 10x the parity bound away.
  assert numerics.rel_err(plain, h) > 10 * numerics.FEATURE_RTOL


@pytest.mark.parametrize('cifar_stem,size', [(True, 8), (False, 15)])  # even 16 px: the job's
def test_torch_resnet_matches_any_layout(cifar_stem, size):
  """torch_resnet builds ResNet-18 x1/16 (no torchvision equal) from the keys; same h."""
  _, model = _model(18, 0.0625, cifar_stem)
  variables = _variables(model, size)
  images = _images(3, size)
  sd = torch_weights.encoder_state_dict(model, variables, (size, size, 3))
  assert torch_weights.torchvision_model(sd) is None  # width 1/16
  tsd = _state_dict(sd)
  module = torch_resnet.ResNet(tsd)
  module.load_state_dict(tsd, strict=True)
  err = numerics.rel_err(_torch_h(module, images), _jax_outputs(model, variables, images)['h'])
  assert err <= numerics.FEATURE_RTOL, err  # torch against XLA: two float32 inference programs


@pytest.mark.parametrize('depth, sk, se, size', [
    (50, 0.0625, 0.0, 33),  # SK convolutions, ResNet-D stem and shortcuts, odd sizes
    (50, 0.0, 0.25, 32),  # squeeze-excitation with the 7x7 stem, even sizes
    (18, 0.0625, 0.25, 30),  # basic blocks: ResNet-D stem and shortcuts (no SK conv) + SE
])
def test_torch_resnet_builds_the_simclr_v2_options(depth, sk, se, size):
  """SK, SE and ResNet-D from the keys alone; float64 on both sides, so any difference is the
  network's, not rounding (float64 sums over these layers stay within F64_RTOL)."""
  cfg, _ = _model(depth, 0.0625, False)
  cfg.model.sk_ratio, cfg.model.se_ratio = sk, se
  model = simclr.from_config(cfg.model, 0)
  variables = _variables(model, size)
  images = _images(2, size)
  sd = torch_weights.encoder_state_dict(model, variables, (size, size, 3))
  assert torch_weights.torchvision_model(sd) is None
  assert any(k.startswith('conv1.0.') for k in sd) == (sk > 0)
  assert any('.se.fc1.' in k for k in sd) == (se > 0)
  tsd = {k: v.double() if v.is_floating_point() else v for k, v in _state_dict(sd).items()}
  module = torch_resnet.ResNet(tsd).double()
  module.load_state_dict(tsd, strict=True)
  with numerics.float64():
    h = _jax_outputs(numerics.float64_model(model), numerics.to_float64(variables),
                     images.astype(np.float64))['h']
  with torch.no_grad():
    got = module.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float64))).numpy()
  assert numerics.rel_err(got, h) <= numerics.F64_RTOL, numerics.rel_err(got, h)


# --- the job -----------------------------------------------------------------------------------


@flax.struct.dataclass
class _State:
  """What checkpoint.save needs of a train state (restore_variables reads params, batch_stats)."""
  step: Any
  params: Any
  batch_stats: Any


STEP = 7
SIZE = 16


@pytest.fixture(scope='module')
def pretrain(tmp_path_factory):
  """(workdir, config, variables): a saved 'pretraining run', ResNet-18 x1/16, 7x7 stem, 16 px."""
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  cfg, model = _model(18, 0.0625, False, num_classes=10)
  cfg.data.source, cfg.data.image_size, cfg.data.num_classes = 'demo', SIZE, 10
  variables = _variables(model, SIZE)
  mgr = checkpoint.manager(workdir, save_every_steps=1000, keep=3)
  assert checkpoint.save(mgr, _State(np.int32(STEP), variables['params'],
                                     variables['batch_stats']), force=True)
  checkpoint.close(mgr)
  workdir_lib.write_config(workdir, cfg)
  return workdir, cfg, model, variables


@pytest.fixture(scope='module')
def exported(pretrain, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('export'))
  config = export_config.get_config()
  config.pretrain_workdir, config.format, config.include_projection = pretrain[0], 'both', True
  return workdir, job.run(config, workdir)


def test_export_json(exported, pretrain):
  workdir, info = exported
  assert {'encoder.safetensors', 'torch_resnet.py', 'savedmodel', 'export.json'} <= set(
      os.listdir(workdir))
  with open(os.path.join(workdir, 'export.json'), encoding='utf-8') as f:
    saved = json.load(f)
  assert saved == info
  assert (saved['depth'], saved['width'], saved['cifar_stem']) == (18, 0.0625, False)
  assert (saved['feature_dim'], saved['image_size']) == (32, SIZE)
  assert saved['checkpoint_step'] == STEP and saved['pretrain_workdir'] == pretrain[0]
  assert saved['mean'] is None and saved['std'] is None
  assert saved['torch']['torchvision_model'] is None
  assert saved['savedmodel']['outputs'] == ['h', 'z']


def test_exported_torch_module_matches(exported, pretrain):
  """The torch_resnet.py copy beside the weights loads them (strict) and computes h."""
  workdir, _ = exported
  _, _, model, variables = pretrain
  spec = importlib.util.spec_from_file_location('exported_resnet',
                                                os.path.join(workdir, 'torch_resnet.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  encoder = module.load_encoder(workdir)
  assert encoder.export_info['checkpoint_step'] == STEP
  images = _images(4, SIZE)
  want = _jax_outputs(model.clone(num_classes=0), {
      'params': {k: v for k, v in variables['params'].items() if k != 'probe'},
      'batch_stats': variables['batch_stats']}, images)
  # torch against XLA: two float32 inference programs.
  assert numerics.rel_err(_torch_h(encoder, images), want['h']) <= numerics.FEATURE_RTOL


def test_savedmodel_matches(exported, pretrain):
  workdir, _ = exported
  _, _, model, variables = pretrain
  loaded = tf.saved_model.load(os.path.join(workdir, 'savedmodel'))
  uint8 = np.random.default_rng(3).integers(0, 256, (5, SIZE, SIZE, 3)).astype(np.uint8)
  floats = tf.image.convert_image_dtype(uint8, tf.float32).numpy()  # as the input pipeline
  want = _jax_outputs(model, variables, floats)
  for name, images in (('serving_default', floats), ('serving_uint8', uint8)):
    got = loaded.signatures[name](images=tf.constant(images))
    assert sorted(got) == ['h', 'z']
    for k in ('h', 'z'):
      assert got[k].shape == want[k].shape
      # TensorFlow's XLA build against JAX's: two float32 inference programs. z adds the
      # head's 3 dense + BN layers to h's ~20: 23 x 4e-6 is still under numerics.FEATURE_RTOL.
      err = numerics.rel_err(got[k].numpy(), want[k])
      assert err <= numerics.FEATURE_RTOL, (name, k, err)


def test_file_names_agree():
  assert (job.WEIGHTS_FILE, job.EXPORT_FILE) == (torch_resnet.WEIGHTS_FILE,
                                                 torch_resnet.EXPORT_FILE)
  assert job.MODULE_FILE == os.path.basename(torch_resnet.__file__)


def test_jobs_import_no_torch():
  """The export and features jobs and the pictures run without torch installed."""
  code = ('import sys\n'
          'class NoTorch:\n'
          '  def find_spec(self, name, path=None, target=None):\n'
          '    if name.split(".")[0] in ("torch", "torchvision"):\n'
          '      raise ImportError(name)\n'
          'sys.meta_path.insert(0, NoTorch())\n'
          'import simclr_jax.export.job, simclr_jax.eval.extract, simclr_jax.eval.pictures\n'
          'assert "torch" not in sys.modules\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_config_errors(pretrain, tmp_path):
  config = export_config.get_config()
  with pytest.raises(ConfigError, match='pretrain_workdir'):
    job.run(config, str(tmp_path))
  config.pretrain_workdir, config.format = pretrain[0], 'onnx'
  with pytest.raises(ConfigError, match='config.format'):
    job.run(config, str(tmp_path))
