"""The import job (configs/import_official.py) on the official code's own fixtures.

It writes an ordinary workdir that the other jobs read unchanged, proves a SavedModel import
against the SavedModel's own signature, and on any mismatch stops with one line, writing nothing.
"""
import json
import os

import jax
import numpy as np
import pytest

from configs import import_official as import_config
import numerics
from fixtures import make_official
from simclr_jax import import_official
from simclr_jax import workdir as workdir_lib
from simclr_jax.errors import ConfigError
from simclr_jax.eval import encoder
from simclr_jax.models import official

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'official')


@pytest.fixture(scope='module')
def saved_model(tmp_path_factory):
  return make_official.unpack(os.path.join(FIXTURES, 'r18_sk1_se_w16'),
                              str(tmp_path_factory.mktemp('r18')))


def _config(name, source, **imported):
  """The import config for a fixture: its architecture, as in its flags.json."""
  with open(os.path.join(FIXTURES, name, 'flags.json')) as f:
    meta = json.load(f)
  flags = meta['flags']
  c = import_config.get_config('r50_1x_sk1')
  c.model.depth, c.model.width = flags['resnet_depth'], flags['width_multiplier']
  c.model.sk_ratio, c.model.se_ratio = flags['sk_ratio'], flags['se_ratio']
  c.model.num_proj_layers, c.model.proj_dim = flags['num_proj_layers'], flags['proj_out_dim']
  c.data.image_size, c.data.num_classes = flags['image_size'], meta['num_classes']
  c.imported.source = source
  c.imported.update(imported)
  return c


def _direct(config, source):
  """The variables as models/official.py reads them, without the job (host numpy)."""
  model = encoder.build_model(config)
  size = config.data.image_size
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3)),
                                               train=False))
  mapping = official.variable_map(model.depth, model.cifar_stem, model.sk_ratio, model.se_ratio,
                                  model.num_proj_layers, model.num_classes)
  return official.to_variables(official.read_checkpoint(source), template, mapping)


def _assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), b)  # copied, never computed: bit for bit


def test_a_saved_model_imports_proves_itself_and_restores(saved_model, tmp_path):
  config = _config('r18_sk1_se_w16', saved_model)
  record = import_official.run(config, str(tmp_path / 'w'))
  errors = record['check']['relative_error']
  assert set(errors) == {'h', 'probe_logits', 'z'}
  # float32 against the official float32: a ResNet's reductions (numerics.FEATURE_RTOL's
  # derivation) stay far below the 1e-4 the job enforces
  assert max(errors.values()) <= config.imported.check_rtol, errors
  with open(tmp_path / 'w' / import_official.IMPORT_FILE) as f:
    assert json.load(f)['check']['relative_error'] == errors
  saved = workdir_lib.read_config(str(tmp_path / 'w'))
  assert saved.job == 'pretrain' and 'imported' not in saved
  assert (saved.model.sk_ratio, saved.model.se_ratio) == (0.0625, 0.25)
  # the evaluation jobs' reader rebuilds the model from config.json and checks every leaf
  _, _, step, variables = encoder.read(str(tmp_path / 'w'), -1)
  assert step == 0
  _assert_same_tree(variables, _direct(config, saved_model))


def test_a_release_without_a_projection_head_gets_a_seeded_one(saved_model, monkeypatch,
                                                                tmp_path):
  """SimCLRv1's releases hold no projection head: the rest imports, the head is config.seed's."""
  read = official.read_checkpoint

  def without_head(path):
    ckpt = read(path)
    del ckpt.children[ckpt.children[0]['model']]['_projection_head']
    return ckpt
  monkeypatch.setattr(official, 'read_checkpoint', without_head)
  config = _config('r18_sk1_se_w16', saved_model, projection_head=False)
  record = import_official.run(config, str(tmp_path / 'w'))
  assert record['projection_head'].startswith('not in the release')
  assert set(record['check']['relative_error']) == {'h', 'probe_logits'}  # z is not the release's
  _, model, _, variables = encoder.read(str(tmp_path / 'w'), -1)
  monkeypatch.setattr(official, 'read_checkpoint', read)
  direct = _direct(config, saved_model)
  for col in ('params', 'batch_stats'):
    for k in direct[col]:
      if k != 'projection':
        _assert_same_tree(variables[col][k], direct[col][k])
  # the head as initialised (official N(0, 0.01^2) kernels, BN at 1/0 and statistics at 0/1),
  # not the release's: a std within 15% of 0.01 (32x32 samples: ~2% sampling error)
  head, stats = variables['params']['projection'], variables['batch_stats']['projection']
  assert abs(np.std(head['dense0']['kernel']) / 0.01 - 1) < 0.15
  np.testing.assert_array_equal(head['bn0']['scale'], 1.0)
  np.testing.assert_array_equal(stats['bn0']['var'], 1.0)


def test_a_self_check_above_the_bound_refuses_and_writes_nothing(saved_model, tmp_path):
  config = _config('r18_sk1_se_w16', saved_model, check_rtol=1e-12)
  with pytest.raises(official.OfficialImportError,
                     match=r'differs from the SavedModel .*relative error .* in (h|z|probe_logits)'
                           r' .*check_rtol=1e-12.*Nothing was written'):
    import_official.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('change, message', [
    ({'se_ratio': 0.0}, r'se_layer/se_expand/bias has no place'),
    ({'sk_ratio': 0.0}, r'has no model/resnet_model/.*check config\.model'),
    ({'width': 1 / 8}, r'has shape .* needs .*config\.model\.width'),
])
def test_a_wrong_architecture_stops_and_writes_nothing(saved_model, tmp_path, change, message):
  config = _config('r18_sk1_se_w16', saved_model)
  config.model.update(change)
  with pytest.raises(official.OfficialImportError, match=message):
    import_official.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_a_workdir_that_holds_a_run_is_refused_untouched(tmp_path):
  (tmp_path / workdir_lib.CONFIG_FILE).write_text('{"kept": true}')
  config = _config('r50_se_w16', os.path.join(FIXTURES, 'r50_se_w16'))
  with pytest.raises(ConfigError, match=r'already holds config.json: import into a new workdir'):
    import_official.run(config, str(tmp_path))
  assert (tmp_path / workdir_lib.CONFIG_FILE).read_text() == '{"kept": true}'


def test_an_unset_source_and_an_unknown_architecture_are_named(tmp_path):
  with pytest.raises(ConfigError, match=r'config\.imported\.source is not set'):
    import_official.run(import_config.get_config(), str(tmp_path / 'w'))
  with pytest.raises(ValueError, match=r'r50_5x is not a published .*r101_1x_sk0'):
    import_config.get_config('r50_5x')


@pytest.mark.parametrize('name', ['r18_sk1_se_w16', 'r50_sk1_w16'])
def test_an_imported_sk_model_exports_to_torch_with_the_official_outputs(name, saved_model,
                                                                        tmp_path):
  """The export job on an imported workdir (from a SavedModel, and from a checkpoint, which has
  no forward pass to check against); torch_resnet's h against the official code's own."""
  torch = pytest.importorskip('torch')
  from configs import export as export_config  # pylint: disable=g-import-not-at-top
  from simclr_jax.export import job as export_job  # pylint: disable=g-import-not-at-top
  from simclr_jax.export import torch_resnet  # pylint: disable=g-import-not-at-top
  source = saved_model if name in make_official.SAVED_MODELS else os.path.join(FIXTURES, name)
  config = _config(name, source, check_rtol=1.0)  # the parity asserted here is the export's
  record = import_official.run(config, str(tmp_path / 'w'))
  if name not in make_official.SAVED_MODELS:
    assert record['format'] == 'checkpoint' and record['check'].startswith('none')
    _assert_same_tree(encoder.read(str(tmp_path / 'w'), -1)[3], _direct(config, source))
  export = export_config.get_config()
  export.pretrain_workdir, export.format = str(tmp_path / 'w'), 'torchvision'
  info = export_job.run(export, str(tmp_path / 'export'))
  assert info['torch']['torchvision_model'] is None
  module = torch_resnet.load_encoder(str(tmp_path / 'export'))
  images = make_official.fixture_images(np.random.default_rng(0))
  with torch.no_grad():
    h = module(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  with open(os.path.join(FIXTURES, name, 'outputs.json')) as f:
    want = np.asarray(json.load(f)['h'], np.float32)
  # torch's float32 against TensorFlow's float32: two inference programs (numerics.FEATURE_RTOL)
  err = numerics.rel_err(h, want)
  print(f'{name}: torch export h vs the official TF2 outputs, relative error {err:.1e}')
  assert err <= numerics.FEATURE_RTOL, err


def test_non_finite_values_are_refused_and_nothing_is_written(monkeypatch, tmp_path):
  """A checkpoint holding NaN: checkpoint.save refuses non-finite parameters, so the job stops
  instead of leaving a config.json without a checkpoint."""
  read = official.read_checkpoint

  def with_nan(path):
    ckpt = read(path)
    tensor = ckpt.tensor
    ckpt.tensor = lambda key: tensor(key) * np.float32('nan')
    return ckpt
  monkeypatch.setattr(official, 'read_checkpoint', with_nan)
  config = _config('r50_se_w16', os.path.join(FIXTURES, 'r50_se_w16'))
  with pytest.raises(official.OfficialImportError, match=r'not finite .*nothing was written'):
    import_official.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()
