"""The official TF2 code's own models (tests/fixtures/official, made by make_official.py) load into
this project's SimCLR and give the official outputs: h, the projection and the supervised logits.

The fixtures cover the ResNet-50 bottleneck with selective kernels (and with them the ResNet-D
stem and shortcuts) and without them but with squeeze-excitation, both as run.py's training
checkpoints, and a ResNet-18 with SK's shortcuts and squeeze-excitation as run.py's SavedModel
(whose variables are keyed by creation order, so only the object graph's names match them):
every variable random (BN statistics and scales too), in inference mode on 64 px images.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import numerics
from fixtures import make_official
from simclr_jax import parallel
from simclr_jax.models import official, simclr

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'official')
VARIANTS = sorted(make_official.VARIANTS)


def _model(flags, num_classes, **changes):
  fields = dict(depth=flags['resnet_depth'], width=flags['width_multiplier'],
                cifar_stem=flags['image_size'] <= 32, num_proj_layers=flags['num_proj_layers'],
                proj_dim=flags['proj_out_dim'], num_classes=num_classes,
                sk_ratio=flags['sk_ratio'], se_ratio=flags['se_ratio'])
  return simclr.SimCLR(**{**fields, **changes})


def _outputs(name):
  """The official outputs of a fixture: {'h', 'z', 'logits'} as float32 arrays."""
  with open(os.path.join(FIXTURES, name, 'outputs.json')) as f:
    return {k: np.asarray(v, np.float32) for k, v in json.load(f).items()}


@pytest.fixture(scope='session')
def sources(tmp_path_factory):
  """name -> what the import reads: the checkpoint directory, or the unpacked SavedModel."""
  out = {}
  for name in VARIANTS:
    fixture = os.path.join(FIXTURES, name)
    out[name] = (make_official.unpack(fixture, str(tmp_path_factory.mktemp(name)))
                 if name in make_official.SAVED_MODELS else fixture)
  return out


def _load(source, name, **changes):
  """(model, variables imported from the fixture, checkpoint, mapping, images)."""
  with open(os.path.join(FIXTURES, name, 'flags.json')) as f:
    meta = json.load(f)
  model = _model(meta['flags'], meta['num_classes'], **changes)
  images = make_official.fixture_images(np.random.default_rng(0))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1], train=False))
  mapping = official.variable_map(model.depth, model.cifar_stem, model.sk_ratio, model.se_ratio,
                                  model.num_proj_layers, model.num_classes)
  ckpt = official.read_checkpoint(source)
  return model, official.to_variables(ckpt, template, mapping), ckpt, mapping, images


@pytest.fixture(scope='module', params=VARIANTS)
def imported(request, sources):
  name = request.param
  model, variables, _, _, images = _load(sources[name], name)
  want = _outputs(name)
  return name, model, variables, images, want


# The fixtures' outputs are TensorFlow's float32 results, which differ from the exact ones by
# their own roundings: against this model in float64, up to 1e-6 for h and the logits and
# 6.4e-6 for z (r18_sk1_se_w16, after the head's three BN layers). Those are fixed numbers, data
# made once: a float64 import meets them on any CPU (its own rounding is ~1e-13), so 1e-5 (the
# import's promise) holds with the margin those numbers leave. A float32 import adds its own
# roundings, bounded by numerics.FEATURE_RTOL (its derivation: float32 over a ResNet's
# reductions). A misplaced variable (a swapped mean and variance, one SK stream for the other,
# a shortcut without its pooling) moves the outputs by 1e-2 or more.
OFFICIAL_RTOL = 1e-5


# float64 on 1 and 8 devices (the import's promise); float32, the everyday path, on one.
@pytest.mark.parametrize('num_devices, dtype', [(1, 'float64'), (8, 'float64'), (1, 'float32')])
def test_imported_model_gives_the_official_outputs(imported, num_devices, dtype, devices):
  name, model, variables, images, want = imported
  rtol = OFFICIAL_RTOL if dtype == 'float64' else numerics.FEATURE_RTOL
  mesh = parallel.make_mesh(devices[:num_devices])
  with numerics.float64() if dtype == 'float64' else contextlib.nullcontext():
    if dtype == 'float64':
      model, variables = numerics.float64_model(model), numerics.to_float64(variables)
      images = numerics.to_float64(images)
    # Two copies of the batch: 8 rows, one per device on the 8-device mesh.
    x = parallel.host_batch_to_global({'x': np.concatenate([images, images])}, mesh)['x']
    out = jax.device_get(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  got = {'h': out['h'], 'z': out['z'], 'logits': out['probe_logits']}
  for key, value in got.items():
    for half in (value[:len(images)], value[len(images):]):
      for row, ref in zip(half, want[key]):
        assert numerics.rel_err(row, ref) <= rtol, (name, key, numerics.rel_err(row, ref))


def test_the_fixtures_differ_where_the_architectures_do():
  """SK and SE change the network: the same images give other features in each fixture."""
  hs = {n: _outputs(n)['h'] for n in VARIANTS}
  assert numerics.rel_err(hs['r50_se_w16'], hs['r50_sk1_w16']) > 0.1


def test_every_variable_is_matched_by_name_and_used_once(sources):
  for name in VARIANTS:
    _, _, ckpt, mapping, _ = _load(sources[name], name)
    keys = [ckpt.find(path) for path in mapping.values()]
    assert None not in keys and len(set(keys)) == len(keys), name
    assert set(keys) == set(ckpt.model_variables()), name


def test_a_saved_model_is_read_by_name_not_by_creation_order(sources):
  """Its checkpoint keys are list indices; each resolved variable still holds its own layer."""
  _, _, ckpt, mapping, _ = _load(sources['r18_sk1_se_w16'], 'r18_sk1_se_w16')
  assert ckpt.saved_model is not None
  keys = {path: ckpt.find(path) for path in mapping.values()}
  assert any(k.startswith('trainable_variables_list/') for k in keys.values())
  # the first stage's SE reduce and expand kernels: the transposed shapes of each other
  block = 'model/resnet_model/block_groups/0/layers/0/se_layer'
  reduce, expand = (ckpt.tensor(keys[f'{block}/{n}/kernel']) for n in ('se_reduce', 'se_expand'))
  assert reduce.shape[-2:] == expand.shape[-2:][::-1] and reduce.shape != expand.shape


@pytest.mark.parametrize('changes, message', [
    # without SK the stem is the 7x7 one, whose BN the ResNet-D stem holds at another index
    ({'sk_ratio': 0.0}, r'has no .*initial_conv_relu_max_pool/2/bn/gamma .*check config\.model'),
    ({'se_ratio': 0.0}, r'se_layer/se_expand/bias has no place'),
    ({'width': 1 / 8}, r'has shape .* needs .*config\.model\.width'),
    # two layers: the second is the last, without beta, so the third layer's are left too
    ({'num_proj_layers': 2}, r'linear_layers/1/bn_relu/bn/beta has no place .*num_proj_layers'),
])
def test_a_wrong_architecture_names_the_variable(changes, message, sources):
  name = 'r18_sk1_se_w16' if 'se_ratio' in changes else 'r50_sk1_w16'
  with pytest.raises(official.OfficialImportError, match=message):
    _load(sources[name], name, **changes)


def test_a_missing_variable_is_named(sources):
  model, _, ckpt, mapping, images = _load(sources['r50_se_w16'], 'r50_se_w16')
  bn = 'model/resnet_model/block_groups/2/layers/1/conv_relu_dropblock_layers/4/bn'
  node = 0
  for name in bn.split('/'):
    node = ckpt.children[node][name]
  del ckpt.children[node]['moving_variance']  # as a checkpoint without that variable reads
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1], train=False))
  with pytest.raises(official.OfficialImportError,
                     match=r'no model/resnet_model/block_groups/2/layers/1/.*/4/bn/moving_variance'
                           r' \(for batch_stats/encoder/stage3_block2/BatchNorm_1/var\)'):
    official.to_variables(ckpt, template, mapping)


def test_a_damaged_checkpoint_is_named(tmp_path, sources):
  src = os.path.join(FIXTURES, 'r50_se_w16')
  for f in os.listdir(src):
    shutil.copy(os.path.join(src, f), tmp_path)
  data = tmp_path / 'ckpt-1.data-00000-of-00001'
  data.write_bytes(data.read_bytes()[:1000])
  with pytest.raises(official.OfficialImportError, match=r'ckpt-1.*(damaged|not a readable)'):
    _load(str(tmp_path), 'r50_se_w16')


def test_a_folder_without_a_checkpoint_is_named(tmp_path):
  with pytest.raises(official.OfficialImportError, match=r'neither saved_model.pb nor a TF '
                                                         r'checkpoint'):
    official.read_checkpoint(str(tmp_path))


def test_the_generator_names_a_missing_official_copy(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(FIXTURES, '..', 'make_official.py'),
                         f'--official={tmp_path}', f'--out={tmp_path / "out"}'],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and 'has no resnet.py' in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / 'out').exists()


@pytest.mark.skipif(not os.environ.get('SIMCLR_OFFICIAL_TF2'),
                    reason='set SIMCLR_OFFICIAL_TF2=PATH/simclr/tf2 (and install tf_keras) to '
                           'regenerate the fixtures with the official code and compare')
def test_the_fixtures_regenerate_from_the_official_code(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(FIXTURES, '..', 'make_official.py'),
                         f'--official={os.environ["SIMCLR_OFFICIAL_TF2"]}',
                         f'--out={tmp_path}'], capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, TF_USE_LEGACY_KERAS='1'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in VARIANTS:  # the same program on the same machine type: float32 roundings only
    with open(tmp_path / name / 'outputs.json') as f:
      again = {k: np.asarray(v, np.float32) for k, v in json.load(f).items()}
    for key, value in _outputs(name).items():
      assert numerics.rel_err(again[key], value) <= numerics.FEATURE_RTOL, (name, key)
