"""Compiles a recipe's pretraining step for a TPU slice (or local CPU devices) without running it.

  python -m simclr_jax.bench compile_check --config=configs/imagenet.py --topology=v4-32
  python -m simclr_jax.bench compile_check --config=configs/demo.py --topology=cpu:8

Lowers and compiles `train_step.make_train_step` on abstract inputs (no data, no parameters in
memory) for a mesh over the slice's devices, and prints per-device memory (arguments, outputs,
temporaries, total vs the chip's HBM) and FLOPs per step; the figures also go to a JSON file.
TPU topologies need libtpu on this machine (`pip install 'jax[tpu]'` or the libtpu wheel that
matches jax), but no TPU: XLA compiles ahead of time for the described slice. Topologies:
`cpu[:N]`, `v4-N`/`v5p-N` (N TensorCores, 2 per chip, one JAX device per chip), `v5e-N`/
`v5litepod-N`/`v6e-N` (N chips), or libtpu's own `gen:AxBxC` (e.g. `v4:2x2x4`).
"""
import json
import os
import re
import sys
import time
from importlib import metadata, util
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py recipe.',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', 'cpu:8',
                                'cpu[:N], v4-32, v5p-64, v5e-16, v6e-64, v4:2x2x4, ...')
_OUT = flags.DEFINE_string('out', None, 'JSON output path (default: bench_results/'
                           'compile_<recipe>_<topology>.json).')
_NUM_EXAMPLES = flags.DEFINE_integer(
    'num_examples', 1_281_167, 'Train examples: only shapes the LR schedule (compiled either '
    'way); default ImageNet\'s.')
flags.mark_flags_as_required(['config'])

GIB = 2**30
# (libtpu generation name, TensorCores per JAX device in the accelerator-type count, mesh rank,
#  HBM per JAX device). v4/v5p count TensorCores (2 per chip, megacore: one device per chip).
_GENERATIONS = {
    'v4': ('v4', 2, 3, 32 * GIB),
    'v5p': ('v5p', 2, 3, 95 * GIB),
    'v5e': ('v5e', 1, 2, 16 * GIB),
    'v5litepod': ('v5e', 1, 2, 16 * GIB),
    'v6e': ('v6e', 1, 2, 32 * GIB),
}
_SHAPES_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
              256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16'}
_SHAPES_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
              256: '16x16'}


class TopologyUnavailable(RuntimeError):
  """The topology cannot be described on this machine (no libtpu, unknown slice)."""


def parse_topology(name: str) -> tuple[str, str | int, int | None]:
  """'cpu:8' → ('cpu', 8, None); 'v4-32' → ('v4', '2x2x4', HBM bytes); 'v4:2x2x4' likewise."""
  m = re.fullmatch(r'cpu(?::(\d+))?', name)
  if m:
    return 'cpu', int(m.group(1) or 0), None
  m = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)([-:])(\w+)', name)
  if not m:
    raise ValueError(f'--topology={name!r}: expected cpu[:N], <gen>-<size> (gen in '
                     f'{sorted(_GENERATIONS)}) or <gen>:AxB[xC].')
  gen, per_device, rank, hbm = _GENERATIONS[m.group(1)]
  if m.group(2) == ':':
    return gen, m.group(3), hbm
  size = int(m.group(3))
  shapes = _SHAPES_3D if rank == 3 else _SHAPES_2D
  if size % per_device or size // per_device not in shapes:
    raise ValueError(f'--topology={name!r}: no known slice shape for {size} '
                     f'{"TensorCores" if per_device == 2 else "chips"}; pass '
                     f'{gen}:AxB{"xC" if rank == 3 else ""} instead.')
  return gen, shapes[size // per_device], hbm


def topology_devices(name: str) -> tuple[list[Any], int | None]:
  """The devices of `name` (abstract TPU devices, or local CPU ones) and HBM bytes per device."""
  import jax  # pylint: disable=g-import-not-at-top
  gen, shape, hbm = parse_topology(name)
  if gen == 'cpu':
    devices = jax.devices('cpu')
    if shape and len(devices) < shape:
      raise TopologyUnavailable(
          f'--topology={name} needs {shape} CPU devices, this process has {len(devices)} '
          f'(run it in a fresh process, or set XLA_FLAGS=--xla_force_host_platform_device_count='
          f'{shape}).')
    return devices[:shape] if shape else devices, None
  if util.find_spec('libtpu') is None:
    raise TopologyUnavailable(
        f'--topology={name} needs libtpu to compile for TPU (no TPU needed): pip install '
        f"'jax[tpu]' (or the libtpu wheel that matches jax {jax.__version__}); "
        '--topology=cpu:N compiles for local CPU devices instead.')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {'chip_config_name': 'megacore'} if gen in ('v4', 'v5p') else {}
  try:
    desc = topologies.get_topology_desc(f'{gen}:{shape}', platform='tpu', **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise TopologyUnavailable(f'libtpu could not describe {gen}:{shape}: {e}') from None
  return list(desc.devices), hbm


def compile_step(config: Any, devices: list[Any], num_examples: int = 1_281_167
                 ) -> dict[str, Any]:
  """Lowers and compiles the recipe's train step for `devices`; returns the figures."""
  import jax  # pylint: disable=g-import-not-at-top
  from simclr_jax import build, parallel  # pylint: disable=g-import-not-at-top
  from simclr_jax.bench import common  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(devices)
  batch_size, size = config.train.batch_size, config.data.image_size
  training = build.training(config, mesh, num_examples)
  state = training.abstract_state()
  step, batch = training.step, training.abstract_batch()
  started = time.monotonic()
  lowered = step.lower(state, batch, None)
  compiled = lowered.compile()
  seconds = time.monotonic() - started
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n = len(devices)
  memory = common.compiled_memory(compiled)
  # The per-device (SPMD) program's; with chunks > 1 XLA counts a loop body once.
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  params = sum(x.size for x in jax.tree.leaves(state.params))
  return {
      'devices': n, 'device_kind': devices[0].device_kind, 'platform': devices[0].platform,
      'global_batch': batch_size, 'per_device_batch': batch_size // n, 'image_size': size,
      'params': int(params), 'memory_per_device_bytes': memory,
      'flops_per_device': flops, 'flops_per_step': flops * n,
      'flops_per_image': flops * n / batch_size if batch_size else 0.0,
      'compile_seconds': round(seconds, 1),
  }


def _size(n: float) -> str:
  for unit, scale in (('GiB', GIB), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{n:.0f} B'


def _format(figures: dict[str, Any]) -> str:
  lines = [f"{figures['topology']}: {figures['devices']} x {figures['device_kind']}, global batch "
           f"{figures['global_batch']} ({figures['per_device_batch']} per device) at "
           f"{figures['image_size']}px, {figures['params'] / 1e6:.2f}M parameters; compiled in "
           f"{figures['compile_seconds']:.0f} s"]
  mem = figures['memory_per_device_bytes']
  if mem:
    hbm = figures.get('hbm_per_device_bytes')
    used = f" of {_size(hbm)} HBM ({mem['total'] / hbm:.0%})" if hbm else ''
    lines.append(f"memory per device: arguments {_size(mem['argument'])}, outputs "
                 f"{_size(mem['output'])} (aliased {_size(mem['alias'])}), temporaries "
                 f"{_size(mem['temp'])}, total {_size(mem['total'])}{used}")
  lines.append(f"FLOPs per step: {figures['flops_per_step']:.3e} ({figures['flops_per_device']:.3e}"
               f" per device, {figures['flops_per_image'] / 1e9:.1f} GFLOP per image, both views)")
  return '\n'.join(lines)


def _run(argv: list[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  config, topology = _CONFIG.value, _TOPOLOGY.value
  gen, count, _ = parse_topology(topology)
  if 'JAX_PLATFORMS' not in os.environ:
    jax.config.update('jax_platforms', 'cpu')  # TPU slices are described by libtpu, not attached
  if gen == 'cpu' and count:
    jax.config.update('jax_num_cpu_devices', count)
  try:
    devices, hbm = topology_devices(topology)
  except TopologyUnavailable as e:
    sys.exit(f'skipped: {e}')
  figures = {'config': _CONFIG.value.to_dict(), 'topology': topology}
  figures.update(compile_step(config, devices, _NUM_EXAMPLES.value))
  figures['hbm_per_device_bytes'] = hbm
  figures['versions'] = {p: metadata.version(p) for p in ('jax', 'jaxlib', 'libtpu')
                         if util.find_spec(p.replace('-', '_')) is not None}
  print(_format(figures))
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  recipe = os.path.splitext(os.path.basename(path))[0]
  out = _OUT.value or os.path.join('bench_results', f'compile_{recipe}_{topology}.json')
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  with open(out, 'w') as f:
    json.dump(figures, f, indent=1, default=str)
  print(f'wrote {out}')


def main(argv: list[str]) -> None:
  """Entry point used by simclr_jax.bench.__main__ (argv[0] is the program name)."""
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')  # no GCE metadata server off Cloud TPU VMs
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(_run, argv=argv)


if __name__ == '__main__':
  main(sys.argv)
