"""Input pipeline: the only package that imports TensorFlow (DESIGN.md "Shape of the code").

TF is used for tf.data and image ops on the host CPU only; hiding accelerators at import keeps it
from grabbing GPU memory or a TPU that JAX owns.
"""
import tensorflow as tf

for _kind in ('GPU', 'TPU'):
  try:
    tf.config.set_visible_devices([], _kind)
  except (RuntimeError, ValueError):  # Already initialised, or no such device type.
    pass
