"""TensorFlow for tf.data on the host CPU: the data modules import `tf` from here, never directly.

Hiding every accelerator from TensorFlow at import keeps it from grabbing GPU memory or a TPU
that JAX owns. Only the modules that run tf.data import this, so the model, the loss and the
step (and the 'device' input with the demo source) run where TensorFlow is not installed.
"""
import tensorflow as tf

for _kind in ('GPU', 'TPU'):
  try:
    tf.config.set_visible_devices([], _kind)
  except (RuntimeError, ValueError):  # Already initialised, or no such device type.
    pass

__all__ = ['tf']
