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
