"""Embedding tables: specs, sharding plans, lookups and sparse optimizers."""

from dlrm_jax.embedding.engine import EmbeddingEngine
from dlrm_jax.embedding.ids.managed_collision import ManagedCollisionRemapper
from dlrm_jax.embedding.sharding.planner import Plan, TablePlacement, auto_plan
from dlrm_jax.embedding.specs import FeatureSpec, SparseOptimizerSpec, TableSpec

__all__ = ['EmbeddingEngine', 'FeatureSpec', 'ManagedCollisionRemapper', 'Plan', 'SparseOptimizerSpec',
           'TablePlacement', 'TableSpec', 'auto_plan']
