"""simclr_jax: SimCLR pretraining and linear evaluation in JAX/Flax."""
