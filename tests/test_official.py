"""The official TF2 code's own models (tests/fixtures/official, made by make_official.py) load into
this project's SimCLR and give the official outputs: h, the projection and the supervised logits.

The fixtures cover the ResNet-50 bottleneck with selective kernels (and with them the ResNet-D
stem and shortcuts) and without them but with squeeze-excitation, and a ResNet-18 with SK's
shortcuts and squeeze-excitation: every variable random (BN statistics and scales too), in
inference mode on 64 px images.
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


def _load(name, **changes):
  """(model, variables imported from the fixture's checkpoint, official outputs, images)."""
  with open(os.path.join(FIXTURES, name, 'flags.json')) as f:
    meta = json.load(f)
  model = _model(meta['flags'], meta['num_classes'], **changes)
  images = make_official.fixture_images(np.random.default_rng(0))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1], train=False))
  mapping = official.variable_map(model.depth, model.cifar_stem, model.sk_ratio, model.se_ratio,
                                  model.num_proj_layers, model.num_classes)
  ckpt = official.read_checkpoint(os.path.join(FIXTURES, name, 'ckpt-1'))
  return model, official.to_variables(ckpt, template, mapping), ckpt, mapping, images


@pytest.fixture(scope='module', params=VARIANTS)
def imported(request):
  name = request.param
  model, variables, _, _, images = _load(name)
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


def test_every_variable_is_matched_by_name_and_used_once():
  for name in VARIANTS:
    _, _, ckpt, mapping, _ = _load(name)
    assert len(set(mapping.values())) == len(mapping)
    assert set(mapping.values()) == {k for k in ckpt if k.startswith('model/')}, name


@pytest.mark.parametrize('changes, message', [
    # without SK the stem is the 7x7 one, whose BN the ResNet-D stem holds at another index
    ({'sk_ratio': 0.0}, r'has no .*initial_conv_relu_max_pool/2/bn/gamma .*check config\.model'),
    ({'se_ratio': 0.0}, r'se_layer/se_expand/bias has no place'),
    ({'width': 1 / 8}, r'has shape .* needs .*config\.model\.width'),
    # two layers: the second is the last, without beta, so the third layer's are left too
    ({'num_proj_layers': 2}, r'linear_layers/1/bn_relu/bn/beta has no place .*num_proj_layers'),
])
def test_a_wrong_architecture_names_the_variable(changes, message):
  name = 'r18_sk1_se_w16' if 'se_ratio' in changes else 'r50_sk1_w16'
  with pytest.raises(official.OfficialImportError, match=message):
    _load(name, **changes)


def test_a_missing_variable_is_named():
  model, _, ckpt, mapping, images = _load('r50_se_w16')
  key = 'model/resnet_model/block_groups/2/layers/1/conv_relu_dropblock_layers/4/bn/' \
        'moving_variance/.ATTRIBUTES/VARIABLE_VALUE'
  del ckpt[key]
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1], train=False))
  with pytest.raises(official.OfficialImportError,
                     match=r'no model/resnet_model/block_groups/2/layers/1/.*/4/bn/moving_variance'
                           r' \(for batch_stats/encoder/stage3_block2/BatchNorm_1/var\)'):
    official.to_variables(ckpt, template, mapping)


def test_a_damaged_checkpoint_is_named(tmp_path):
  src = os.path.join(FIXTURES, 'r18_sk1_se_w16')
  for f in os.listdir(src):
    shutil.copy(os.path.join(src, f), tmp_path)
  data = tmp_path / 'ckpt-1.data-00000-of-00001'
  data.write_bytes(data.read_bytes()[:1000])
  with pytest.raises(official.OfficialImportError, match=r'ckpt-1'):
    official.read_checkpoint(str(tmp_path / 'ckpt-1'))


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
