"""The official TF2 SimCLR checkpoint's variables as this project's SimCLR variables.

Every variable is matched by what it is: the layer it belongs to in the official object graph
(`model/resnet_model/block_groups/<stage>/layers/<block>/...`, as the official `run.py` saves a
`tf.train.Checkpoint(model=model)`) and its shape, computed here from the architecture, never
from the order in which variables were created. Official list indices follow the layer lists of
`tf2/resnet.py` and `tf2/model.py`: e.g. a bottleneck block's `conv_relu_dropblock_layers` holds
conv, BN, DropBlock, then the 3x3 conv + BN (or one SK_Conv2D), DropBlock, the 1x1 conv, BN,
DropBlock and the SE layer. A checkpoint variable left unused, a parameter left unfilled or a
shape that differs is an `OfficialImportError` naming it.
"""
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from simclr_jax.errors import ConfigError
from simclr_jax.models import resnet

Path = tuple[str, ...]  # (collection, module, ..., leaf) of the flax variables


class OfficialImportError(ConfigError):
  """The checkpoint and the configured architecture do not match; the message names the variable."""


def _bn(flax: Path, tf: str, center: bool = True) -> Iterator[tuple[Path, str]]:
  """A BatchNormRelu layer's `bn` (gamma, beta, moving statistics) → flax BatchNorm."""
  yield ('params', *flax, 'scale'), f'{tf}/bn/gamma'
  if center:
    yield ('params', *flax, 'bias'), f'{tf}/bn/beta'
  yield ('batch_stats', *flax, 'mean'), f'{tf}/bn/moving_mean'
  yield ('batch_stats', *flax, 'var'), f'{tf}/bn/moving_variance'


def _conv(flax: Path, tf: str) -> Iterator[tuple[Path, str]]:
  """A Conv2dFixedPadding (`<tf>/conv2d/kernel`) → flax Conv kernel."""
  yield ('params', *flax, 'kernel'), f'{tf}/conv2d/kernel'


def _stem(sk: bool, cifar_stem: bool) -> Iterator[tuple[Path, str]]:
  tf = 'model/resnet_model/initial_conv_relu_max_pool'
  if cifar_stem or not sk:  # conv, IdentityLayer('initial_conv'), BatchNormRelu, ...
    yield from _conv(('encoder', 'stem_conv'), f'{tf}/0')
    yield from _bn(('encoder', 'stem_bn'), f'{tf}/2')
    return
  # ResNet-D: conv, BN, conv, BN, conv, IdentityLayer('initial_conv'), BatchNormRelu, max-pool.
  for i in range(2):
    yield from _conv(('encoder', f'stem_conv{i}'), f'{tf}/{2 * i}')
    yield from _bn(('encoder', f'stem_bn{i}'), f'{tf}/{2 * i + 1}')
  yield from _conv(('encoder', 'stem_conv'), f'{tf}/4')
  yield from _bn(('encoder', 'stem_bn'), f'{tf}/6')


def _shortcut(block: Path, tf: str, strides: int, sk: bool) -> Iterator[tuple[Path, str]]:
  # ResNet-D puts FixedPadding (strided blocks only) and an average pool before the conv.
  first = (2 if strides > 1 else 1) if sk else 0
  yield from _conv((*block, 'proj_conv'), f'{tf}/{first}')
  yield from _bn((*block, 'proj_bn'), f'{tf}/{first + 1}')


def _se(block: Path, tf: str) -> Iterator[tuple[Path, str]]:
  for ours, theirs in (('reduce', 'se_reduce'), ('expand', 'se_expand')):
    for leaf in ('kernel', 'bias'):
      yield ('params', *block, 'se', ours, leaf), f'{tf}/{theirs}/{leaf}'


def _basic(block: Path, tf: str, strides: int, projection: bool, sk: bool,
           se: bool) -> Iterator[tuple[Path, str]]:
  if projection:
    yield from _shortcut(block, f'{tf}/shortcut_layers', strides, sk)
  layers = f'{tf}/conv2d_bn_layers'
  for i in range(2):
    yield from _conv((*block, f'Conv_{i}'), f'{layers}/{2 * i}')
    yield from _bn((*block, f'BatchNorm_{i}'), f'{layers}/{2 * i + 1}')
  if se:
    yield from _se(block, f'{tf}/se_layer')


def _bottleneck(block: Path, tf: str, strides: int, projection: bool, sk: bool,
                se: bool) -> Iterator[tuple[Path, str]]:
  if projection:
    yield from _shortcut(block, f'{tf}/projection_layers', strides, sk)
  layers = f'{tf}/conv_relu_dropblock_layers'
  yield from _conv((*block, 'Conv_0'), f'{layers}/0')
  yield from _bn((*block, 'BatchNorm_0'), f'{layers}/1')  # 2: DropBlock
  if sk:  # 3: SK_Conv2D, 4: DropBlock
    sk_tf, sk_flax = f'{layers}/3', (*block, 'sk')
    yield from _conv((*sk_flax, 'conv'), f'{sk_tf}/conv2d_fixed_padding')
    yield from _bn((*sk_flax, 'bn'), f'{sk_tf}/batch_norm_relu')
    yield ('params', *sk_flax, 'mix_conv0', 'kernel'), f'{sk_tf}/conv2d_0/kernel'
    yield from _bn((*sk_flax, 'mix_bn'), f'{sk_tf}/batch_norm_relu_1')
    yield ('params', *sk_flax, 'mix_conv1', 'kernel'), f'{sk_tf}/conv2d_1/kernel'
    last, norms = 5, (('BatchNorm_1', 6),)
  else:  # 3: conv, 4: BN, 5: DropBlock
    yield from _conv((*block, 'Conv_1'), f'{layers}/3')
    last, norms = 6, (('BatchNorm_1', 4), ('BatchNorm_2', 7))
  yield from _conv((*block, f'Conv_{2 if not sk else 1}'), f'{layers}/{last}')
  for name, index in norms:
    yield from _bn((*block, name), f'{layers}/{index}')
  if se:  # after the last BN and DropBlock
    yield from _se(block, f'{layers}/{last + 3}')


def variable_map(depth: int, cifar_stem: bool, sk_ratio: float, se_ratio: float,
                 num_proj_layers: int, num_classes: int) -> dict[Path, str]:
  """Each flax variable path of `SimCLR(...)` → the official variable's object-graph path."""
  if depth not in resnet.STAGES:
    raise ConfigError(f'config.model.depth={depth} is not a ResNet depth; choose one of '
                      f'{sorted(resnet.STAGES)}.')
  kind, blocks = resnet.STAGES[depth]
  block_fn = _basic if kind == 'basic' else _bottleneck
  sk, se = sk_ratio > 0, se_ratio > 0
  pairs = list(_stem(sk, cifar_stem))
  for stage, num_blocks in enumerate(blocks):
    for i in range(num_blocks):
      tf = f'model/resnet_model/block_groups/{stage}/layers/{i}'
      strides = 2 if stage > 0 and i == 0 else 1
      pairs += block_fn(('encoder', f'stage{stage + 1}_block{i + 1}'), tf, strides, i == 0, sk,
                        se)
  for j in range(num_proj_layers):
    tf = f'model/_projection_head/linear_layers/{j}'
    pairs.append((('params', 'projection', f'dense{j}', 'kernel'), f'{tf}/dense/kernel'))
    pairs += _bn(('projection', f'bn{j}'), f'{tf}/bn_relu', center=j < num_proj_layers - 1)
  if num_classes:
    for leaf in ('kernel', 'bias'):
      pairs.append((('params', 'probe', leaf), f'model/supervised_head/linear_layer/dense/{leaf}'))
  return dict(pairs)


# What Keras adds to each layer of a SavedModel besides its own attributes: the same variables
# again, as lists in creation order.
_KERAS_LISTS = frozenset({'variables', 'trainable_variables', 'non_trainable_variables',
                          'keras_api', 'regularization_losses', 'layer_regularization_losses',
                          'layer_metrics'})


@dataclasses.dataclass
class Checkpoint:
  """An official TF2 checkpoint (or a SavedModel's variables), addressed by object-graph path.

  `children[node]` maps each child's name to its node, as the checkpoint's own object graph
  records them; a variable is found by walking the names of its path from the root
  (`model/resnet_model/...`), so the index keys a SavedModel gives its variables
  (`trainable_variables_list/17`, the order they were created in) are never used.
  """
  prefix: str  # the checkpoint read (for a SavedModel, its variables/variables)
  saved_model: str | None  # the SavedModel directory, when the source is one
  children: dict[int, dict[str, int]]
  keys: dict[int, str]  # variable node -> the checkpoint key holding its value
  reader: Any  # tf.train.CheckpointReader

  def find(self, path: str) -> str | None:
    """The checkpoint key of the variable at `path` (a/b/c), or None where there is none."""
    node = 0
    for name in path.split('/'):
      node = self.children.get(node, {}).get(name)
      if node is None:
        return None
    return self.keys.get(node)

  def model_variables(self) -> dict[str, str]:
    """{checkpoint key: a path naming it} of every variable under the root's `model`.

    Optimizer slots, the step counters and a SavedModel's own lists sit outside `model` (or
    are the same variables again), so they are neither used nor unused. Each variable is named
    by its layer's path where it has one, not by the lists Keras adds to a SavedModel.
    """
    found: dict[str, str] = {}
    for skip in (_KERAS_LISTS, frozenset()):  # layer paths first, then anything reachable
      start = self.children.get(0, {}).get('model')
      queue, seen = ([(start, 'model')] if start is not None else []), set()
      while queue:  # breadth first: each variable named by a shortest path
        node, path = queue.pop(0)
        if node in seen:
          continue
        seen.add(node)
        if node in self.keys:
          found.setdefault(self.keys[node], path)
        queue += [(child, f'{path}/{name}') for name, child in self.children.get(node, {}).items()
                  if name not in skip]
    return found

  def tensor(self, key: str) -> np.ndarray:
    """The value stored under `key`; a value that does not read is an OfficialImportError."""
    try:
      return self.reader.get_tensor(key)
    except Exception as e:  # pylint: disable=broad-except  (tf.errors.*, or IndexError: a cut file)
      why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise OfficialImportError(f'{self.prefix}: the value of {key} does not read ({why}): a '
                                'damaged or partly copied checkpoint.') from e


def _checkpoint_prefix(path: str, gfile: Any) -> tuple[str, str | None]:
  """(checkpoint prefix, SavedModel dir or None) of a SavedModel, checkpoint dir or prefix."""
  path = path.rstrip('/')
  if gfile.exists(f'{path}/saved_model.pb'):
    return f'{path}/variables/variables', path
  if gfile.isdir(path):
    from simclr_jax.data.tf_cpu import tf  # pylint: disable=g-import-not-at-top
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise OfficialImportError(f'{path} holds neither saved_model.pb nor a TF checkpoint (no '
                                '"checkpoint" file): pass a SavedModel directory, a checkpoint '
                                'directory or a checkpoint prefix such as DIR/ckpt-1.')
    return latest, None
  return path, None


def read_checkpoint(path: str) -> Checkpoint:
  """The official checkpoint at `path`: a SavedModel dir, a checkpoint dir or prefix (or gs://)."""
  # TensorFlow only here: reading a TF checkpoint and its object graph needs it.
  from simclr_jax.data.tf_cpu import tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.protobuf import (  # pylint: disable=g-import-not-at-top
      trackable_object_graph_pb2)
  prefix, saved_model = _checkpoint_prefix(path, tf.io.gfile)
  try:
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'))
  except (tf.errors.OpError, ValueError, IndexError) as e:  # IndexError: a cut data file
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise OfficialImportError(f'{prefix}: not a readable TF2 checkpoint ({first_line}).') from e
  children = {i: {c.local_name: c.node_id for c in node.children}
              for i, node in enumerate(graph.nodes)}
  keys = {i: a.checkpoint_key for i, node in enumerate(graph.nodes) for a in node.attributes
          if a.name == 'VARIABLE_VALUE'}
  return Checkpoint(prefix, saved_model, children, keys, reader)


def to_variables(checkpoint: Checkpoint, template: Mapping[str, Any],
                 mapping: Mapping[Path, str]) -> dict[str, Any]:
  """The flax variables `template` (same tree) filled from the official `checkpoint`."""
  flat: dict[Path, Any] = {}

  def walk(node: Any, path: Path) -> None:
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, (*path, k))
    else:
      flat[path] = node

  walk(template, ())
  unfilled = [p for p in flat if p not in mapping]
  if unfilled:
    raise OfficialImportError(f'no official variable for {"/".join(unfilled[0])} '
                              f'({len(unfilled)} in all): the architecture config differs.')
  keys = {p: checkpoint.find(k) for p, k in mapping.items() if p in flat}  # network order
  missing = [p for p, k in keys.items() if k is None]
  if missing:
    raise OfficialImportError(f'the checkpoint has no {mapping[missing[0]]} (for '
                              f'{"/".join(missing[0])}): check config.model (depth, sk_ratio, '
                              'se_ratio, num_proj_layers) against the checkpoint.')
  named = checkpoint.model_variables()
  unused = sorted(named[k] for k in set(named) - set(keys.values()))
  if unused:
    raise OfficialImportError(f'the checkpoint variable {unused[0]} has no place in the '
                              f'configured model ({len(unused)} unused in all): check '
                              'config.model (sk_ratio, se_ratio, num_proj_layers) and '
                              'config.data.num_classes against the checkpoint.')
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    value = np.asarray(checkpoint.tensor(keys[path]))
    if value.shape != tuple(leaf.shape):
      raise OfficialImportError(f'{mapping[path]} has shape {value.shape}, '
                                f'{"/".join(path)} needs {tuple(leaf.shape)}: check '
                                'config.model.width (and proj_dim, num_classes).')
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value.astype(leaf.dtype)
  return out
