"""`python -m simclr_jax.bench convs`: every convolution of the recipe's encoder, timed alone.

The step's time on CPU is mostly convolutions, and XLA runs each as its own kernel: this finds
every distinct convolution of the encoder by tracing it (input and kernel shapes, strides,
padding, as the step has them), then compiles and times its forward pass, its input gradient
and its kernel gradient on one device at one device's share of the batch:

  python -m simclr_jax.bench convs --config=configs/cifar10.py --batch=128

Each row gives CPU-milliseconds per call (all threads: what the step pays when the cores are
busy) and GFLOP per CPU-second, against a float32 matmul timed the same way in the same run
(the machine's practical dense rate). Totals weight each convolution by how often the encoder
has it and leave out the input gradient of the first convolution (the step needs none for the
images), and are scaled to the global batch: the convolutions' share of a step's CPU-seconds,
to compare with `bench step`'s cpu_s_per_step.
"""
import collections
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax import lax
from ml_collections import config_flags

from simclr_jax import parallel
from simclr_jax.bench import common
from simclr_jax.models import simclr

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar10.py', 'Recipe to benchmark.',
                                          lock_config=True)
_BATCH = flags.DEFINE_integer('batch', None, "Global batch of images (default: the recipe's).")
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per convolution.', lower_bound=1)
_OUT = flags.DEFINE_string('out_dir', 'bench_results', 'Where the JSON goes.')


def _jaxprs(value: Any) -> list[Any]:
  """The jaxprs inside an equation parameter (a jaxpr, a closed jaxpr, or a sequence of them)."""
  if hasattr(value, 'eqns'):
    return [value]
  if hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    return [value.jaxpr]
  if isinstance(value, (list, tuple)):
    return [j for v in value for j in _jaxprs(v)]
  return []


def encoder_convolutions(config: ml_collections.ConfigDict,
                         rows: int) -> list[tuple[dict[str, Any], int]]:
  """[(convolution, count)] of the encoder on `rows` images, in order of first use.

  A convolution is {'lhs': shape, 'rhs': shape, 'out': shape, 'params': the primitive's
  parameters, 'first': whether it reads the images}.
  """
  size = config.data.image_size
  encoder = simclr.encoder_from_config(config.model)
  x = jax.ShapeDtypeStruct((rows, size, size, 3), jnp.float32)
  variables = jax.eval_shape(encoder.init, jax.random.key(0), x)
  closed = jax.make_jaxpr(
      lambda v, x: encoder.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  image = closed.jaxpr.invars[-1]
  found: dict[Any, dict[str, Any]] = {}
  counts: collections.Counter = collections.Counter()

  def walk(jaxpr: Any) -> None:
    for eqn in jaxpr.eqns:
      if eqn.primitive is lax.conv_general_dilated_p:
        lhs, rhs = (v.aval for v in eqn.invars)
        params = dict(eqn.params)
        key = (lhs.shape, rhs.shape, str(lhs.dtype), tuple(sorted(
            (k, str(v)) for k, v in params.items())))
        counts[key] += 1
        found.setdefault(key, {'lhs': lhs.shape, 'rhs': rhs.shape,
                               'out': eqn.outvars[0].aval.shape, 'dtype': lhs.dtype,
                               'params': params, 'first': eqn.invars[0] is image})
      for value in eqn.params.values():
        for sub in _jaxprs(value):
          walk(sub)

  walk(closed.jaxpr)
  return [(conv, counts[key]) for key, conv in found.items()]


def conv_flops(conv: dict[str, Any]) -> float:
  """Multiply-adds x 2 of one call: every output element sums kernel window x input features."""
  rhs_spec = conv['params']['dimension_numbers'].rhs_spec  # (out feature, in feature, spatial...)
  window = np.prod([conv['rhs'][d] for d in rhs_spec[2:]])
  return 2.0 * np.prod(conv['out']) * conv['rhs'][rhs_spec[1]] * window


def _cpu_ms(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> float:
  """CPU-milliseconds of this process per call of jitted `fn`, after one untimed call."""
  jax.block_until_ready(fn(*args))
  start = time.process_time()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.process_time() - start) / repeats * 1e3


def time_convolution(conv: dict[str, Any], repeats: int) -> dict[str, float]:
  """CPU-ms per call of the forward pass, input gradient and kernel gradient of `conv`."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(conv['lhs']), conv['dtype'])
  w = jnp.asarray(rng.standard_normal(conv['rhs']) * 0.1, conv['dtype'])
  g = jnp.asarray(rng.standard_normal(conv['out']), conv['dtype'])
  apply = lambda x, w: lax.conv_general_dilated_p.bind(x, w, **conv['params'])
  passes = {
      'forward': (jax.jit(apply), (x, w)),
      'input_grad': (jax.jit(lambda x, w, g: jax.vjp(lambda x: apply(x, w), x)[1](g)[0]),
                     (x, w, g)),
      'kernel_grad': (jax.jit(lambda x, w, g: jax.vjp(lambda w: apply(x, w), w)[1](g)[0]),
                      (x, w, g)),
  }
  return {name: _cpu_ms(fn, args, repeats) for name, (fn, args) in passes.items()}


def matmul_gflops_per_cpu_s(n: int = 1024, repeats: int = 5) -> float:
  """GFLOP per CPU-second of a float32 n x n matmul: the dense rate the rows compare with."""
  a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
  return 2 * n**3 / _cpu_ms(jax.jit(lambda a: a @ a), (a,), repeats) / 1e6


def benchmark(config: ml_collections.ConfigDict, batch: int, devices: int,
              repeats: int) -> dict[str, Any]:
  """The table's rows and totals for one device's share (2 views per image) of `batch`."""
  rows = 2 * batch // devices
  table, totals = [], collections.Counter()
  for index, (conv, count) in enumerate(encoder_convolutions(config, rows)):
    ms = time_convolution(conv, repeats)
    gflop = conv_flops(conv) / 1e9
    p = conv['params']
    row = {'conv': index, 'count': count, 'input': 'x'.join(map(str, conv['lhs'])),
           'kernel': 'x'.join(map(str, conv['rhs'])),
           'stride': 'x'.join(map(str, p['window_strides'])), 'gflop': gflop}
    for name, value in ms.items():
      row[f'{name}_cpu_ms'] = value
      row[f'{name}_gflop_per_cpu_s'] = gflop / value * 1e3
      if not (name == 'input_grad' and conv['first']):
        totals[name] += count * value * devices / 1e3
    table.append(row)
  return {'rows_per_device': rows, 'devices': devices, 'table': table,
          'step_conv_cpu_s': {**totals, 'all': sum(totals.values())},
          'matmul_gflop_per_cpu_s': matmul_gflops_per_cpu_s()}


def _run(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  batch = _BATCH.value or config.train.batch_size
  # The step's CPU devices split the batch; this times one device's share on one device, which
  # has all the threads (as each convolution does in the step while the other device waits).
  devices = parallel.cpu_device_count(os.cpu_count() or 1, batch, config.cpu_devices)
  parallel.set_cpu_devices(batch, 1)
  if jax.default_backend() != 'cpu':
    sys.exit(f'error: bench convs times CPU-seconds, which say nothing on '
             f'{jax.default_backend()}; run it with JAX_PLATFORMS=cpu.')
  figures = benchmark(config, batch, devices, _REPEATS.value)
  common.print_table(figures['table'])
  print('step convolution CPU-s (global batch):', {k: round(v, 3) for k, v in
                                                   figures['step_conv_cpu_s'].items()},
        f"matmul {figures['matmul_gflop_per_cpu_s']:.1f} GFLOP/CPU-s")
  path = common.save('convs', _OUT.value, {'config': config.to_dict(), 'batch': batch}, figures)
  print(f'saved {path}')


def main(argv: list[str]) -> None:
  """Entry point used by simclr_jax.bench.__main__ (argv[0] is the program name)."""
  app.run(_run, argv=argv)
