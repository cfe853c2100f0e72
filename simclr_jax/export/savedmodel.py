"""The inference encoder as a TensorFlow SavedModel, through jax2tf's native serialization.

The JAX forward (train=False) is lowered to StableHLO for the CPU, CUDA and TPU platforms and
wrapped in two signatures over a symbolic batch size:
  'serving_default': float32 [N, S, S, 3] in [0, 1] (what the evaluation view makes);
  'serving_uint8':   uint8 [N, S, S, 3], scaled to [0, 1] as the input pipeline does
                     (tf.image.convert_image_dtype).
Both return {'h': [N, dim]} and, with include_projection, 'z' (the projection head's output).
Weights are tf.Variables of the SavedModel (not constants in the graph), so large encoders save.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.data.tf_cpu import tf

PLATFORMS = ('cpu', 'cuda', 'tpu')
SIGNATURES = ('serving_default', 'serving_uint8')


def export(path: str, model: nn.Module, variables: Any, image_size: int,
           include_projection: bool = False) -> None:
  """Writes the SavedModel of `model`'s inference forward with `variables` to `path`."""
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  outputs = ('h', 'z') if include_projection else ('h',)

  def forward(v: Any, images: jax.Array) -> dict[str, jax.Array]:
    out = model.apply(v, images, train=False)
    return {k: out[k].astype(jnp.float32) for k in outputs}

  tf_forward = jax2tf.convert(forward, polymorphic_shapes=[None, '(b, _, _, _)'],
                              with_gradient=False, native_serialization_platforms=PLATFORMS)
  module = tf.Module()
  # Only what the forward reads (no probe head, no optimiser state).
  module.model_variables = tf.nest.map_structure(
      lambda x: tf.Variable(np.asarray(x), trainable=False),
      {k: variables[k] for k in ('params', 'batch_stats')})
  spec = [image_size, image_size, 3]

  @tf.function(input_signature=[tf.TensorSpec([None, *spec], tf.float32, name='images')],
               autograph=False)
  def serve_float(images: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf_forward(module.model_variables, images)

  @tf.function(input_signature=[tf.TensorSpec([None, *spec], tf.uint8, name='images')],
               autograph=False)
  def serve_uint8(images: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf_forward(module.model_variables, tf.image.convert_image_dtype(images, tf.float32))

  module.serve_float, module.serve_uint8 = serve_float, serve_uint8
  tf.saved_model.save(module, path, signatures=dict(zip(SIGNATURES, (serve_float, serve_uint8))))
