"""The whole input, by concept: what a view is, its tf.data and JAX implementations, the sources,
the host and device-resident input streams, and the one seam the pretraining job calls.

TensorFlow is imported only by the modules that run tf.data (views_tf, sources, host_input, via
tf_cpu), never by this package's __init__.
"""
