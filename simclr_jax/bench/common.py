"""What every benchmark shares: the environment record, the JSON file and the table print."""
import datetime
import json
import os
import platform
from importlib import metadata
from typing import Any

import jax

_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-cpu',
             'tensorflow-datasets', 'numpy')


def environment() -> dict[str, Any]:
  """Device kind and count, host, software versions and the date, for the JSON record."""
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'host_cpus': os.cpu_count(),
      # Other work on the host slows CPU figures: the 1/5/15-minute load at the time of saving.
      'load_average': os.getloadavg(),
      'platform': platform.platform(),
      'python': platform.python_version(),
      'versions': versions,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


def program_flops(lowered: jax.stages.Lowered) -> float:
  """FLOPs of one step over all devices, from XLA's cost analysis of the HLO as written.

  The lowered (pre-partitioning) HLO has the global shapes and is the same on every backend;
  the compiled program's analysis counts one device's share and, on GPU, misses convolutions
  (cuDNN custom calls). PJRT plugins (GPU) do not analyse unoptimised HLO, so there the CPU
  client analyses the same module.
  """
  try:
    cost = lowered.cost_analysis()
  except NotImplementedError:
    cost = None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or 'flops' not in cost:
    try:
      # Private: XLA's HLO cost analysis has no public JAX API (the backend has:
      # jax.extend.backend).
      from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
      from jax.extend import backend  # pylint: disable=g-import-not-at-top
      cost = _jax.hlo_module_cost_analysis(backend.get_backend('cpu'),
                                           lowered.compiler_ir('hlo').as_hlo_module())
    except Exception:  # pylint: disable=broad-except  # private API moved: report no FLOPs
      return float('nan')
  return float(cost.get('flops', float('nan')))


def device_bytes_limit(device: Any) -> float:
  """Memory an accelerator lets XLA allocate (inf where the backend does not say, e.g. CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without memory stats
    stats = None
  return float(stats.get('bytes_limit', float('inf'))) if stats else float('inf')


def save(name: str, out_dir: str, config: dict[str, Any], figures: Any) -> str:
  """Writes {config, environment, figures} to OUT_DIR/<name>_<timestamp>.json; returns the path."""
  os.makedirs(out_dir, exist_ok=True)
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  path = os.path.join(out_dir, f'{name}_{stamp}.json')
  with open(path, 'w') as f:
    json.dump({'benchmark': name, 'config': config, 'environment': environment(),
               'figures': figures}, f, indent=2, default=str)
  return path


def print_table(rows: list[dict[str, Any]]) -> None:
  """Prints a list of flat dicts as an aligned text table (floats to 4 significant digits)."""
  if not rows:
    return
  cols = list(rows[0])
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  cells = [[fmt(r.get(c, '')) for c in cols] for r in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
  print('  '.join(c.ljust(w) for c, w in zip(cols, widths)))
  for r in cells:
    print('  '.join(v.ljust(w) for v, w in zip(r, widths)))


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int] | None:
  """Per-device bytes from XLA's memory analysis: argument, output, alias (donated outputs),
  temp (scratch, activations), generated_code and their peak estimate 'total'."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  out = {k: int(getattr(mem, f'{k}_size_in_bytes')) for k in
         ('argument', 'output', 'alias', 'temp', 'generated_code')}
  # Live arguments + outputs not written in place (donation) + scratch + code.
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp'] + out[
      'generated_code']
  return out
