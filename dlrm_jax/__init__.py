"""dlrm_jax: DLRM in JAX/Flax with sparse, sharded embedding tables."""

__version__ = '0.1.0'
