"""`SparseEmbed`: sharded embedding tables as a Flax linen module.

A user's model writes

    pooled = SparseEmbed(tables, features, mesh)(ids, step=step)   # [B, N, D]

and trains with one `jax.grad` of its loss over all of its parameters: the
tables and their optimizer slots are parameters of the module (under the key
`lookup.STATE_KEY`), laid out over the mesh as the sharding plan says, and
the lookup's backward pass applies each table's sparse optimizer and returns
the new tables and slots in place of their gradient (`dlrm_jax.embedding.
lookup`). `dlrm_jax.train.table_updates` gives the optax side: the user's
transform for the dense parameters, pass-through for the tables, and an
`apply_updates` that replaces them. The NNX module with the same contract is
`dlrm_jax.models.nnx_embed.SparseEmbed`; both run `sparse_lookup`.

Shape letters: B the global batch, T packed id columns (feature k takes
`max_ids[k]` of them; -1 pads a bag), N features, D their common dim.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh

from dlrm_jax.embedding.engine import EmbeddingEngine
from dlrm_jax.embedding import lookup as lookup_lib
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding.specs import FeatureSpec, TableSpec

OUTPUTS = ('stacked', 'features')

PlanLike = plan_lib.Plan | str | Mapping[str, str] | None


def _plan_key(plan: PlanLike):
  if isinstance(plan, Mapping):
    return ('overrides', tuple(sorted(plan.items())))
  return plan


@functools.lru_cache(maxsize=64)
def _cached_engine(tables, features, mesh, plan_key) -> EmbeddingEngine:
  if plan_key is None or isinstance(plan_key, plan_lib.Plan):
    plan = plan_key
  else:
    if isinstance(plan_key, str):
      if plan_key == 'auto':
        overrides = {}
      else:
        overrides = {t.name: plan_key for t in tables}
    else:
      overrides = dict(plan_key[1])
    plan = plan_lib.auto_plan(tables, int(mesh.shape['model']),
                              overrides=overrides,
                              lookups=plan_lib.lookups_per_table(features))
  return EmbeddingEngine(tables, features, mesh, plan)


def embedding_engine(tables: Sequence[TableSpec],
                     features: Sequence[FeatureSpec], mesh: Mesh,
                     plan: PlanLike = None) -> EmbeddingEngine:
  """The engine of a set of tables on a mesh, made once per arguments.

  Args:
    tables: the table specs.
    features: the feature specs, in the order of the packed id columns.
    mesh: a mesh with axes ('data', 'model'), as `dlrm_jax.parallel` makes.
    plan: a `Plan`; None or 'auto' for `planner.auto_plan`'s; a strategy
      name (one of `planner.STRATEGIES`) for every table; or a dict of table
      name -> strategy, the others placed by `auto_plan`.

  Returns:
    The `EmbeddingEngine`. The same arguments give the same object.

  Raises:
    ValueError: if the specs or the plan are invalid for the mesh.
  """
  return _cached_engine(tuple(tables), tuple(features), mesh, _plan_key(plan))


def check_output(output: str) -> None:
  """Refuses an unknown `output` of a SparseEmbed, naming it."""
  if output not in OUTPUTS:
    raise ValueError(f'output ({output!r}) must be one of {list(OUTPUTS)}.')


def pooled_lookup(engine: EmbeddingEngine, state, ids: jax.Array, step,
                  resets, output: str) -> tuple[Any, jax.Array]:
  """The lookup of both modules: checks `ids`, looks up, names the features.

  Args:
    engine: the module's engine.
    state: its tables and slots.
    ids: `[B, T]` int32 packed ids.
    step: the 0-based training step.
    resets: `[B, T]` rows to zero first, or None.
    output: 'stacked' or 'features'.

  Returns:
    The pooled embeddings in the `output` form, and the invalid-id count.

  Raises:
    ValueError: if `ids` is not `[B, T]`.
  """
  if ids.ndim != 2 or ids.shape[1] != engine.num_id_columns:
    raise ValueError(
        f'ids have shape {ids.shape}, expected [B, {engine.num_id_columns}]'
        ' (each feature takes max_ids columns).')
  stacked = output == 'stacked'
  pooled, invalid = lookup_lib.sparse_lookup(engine, state, ids, step, resets,
                                             stacked=stacked)
  if not stacked:
    pooled = {f.name: x for f, x in zip(engine.features, pooled)}
  return pooled, invalid


class SparseEmbed(nn.Module):
  """Pooled lookups in sharded embedding tables, updated sparsely.

  Attributes:
    tables: the table specs (rows, dim, initializer, optimizer, dtype,
      combiner).
    features: the feature specs (name, table, bag size), in the order of the
      packed id columns.
    mesh: a mesh with axes ('data', 'model'). Tables are split over 'model'
      and repeated over 'data'; the batch is split over both.
    plan: the sharding plan, as `embedding_engine` takes it.
    output: 'stacked' for one `[B, N, D]` array (every feature of one dim),
      'features' for a dict of feature name -> `[B, D_k]`.
  """

  tables: Sequence[TableSpec]
  features: Sequence[FeatureSpec]
  mesh: Mesh
  plan: Any = None
  output: str = 'stacked'

  @property
  def engine(self) -> EmbeddingEngine:
    """The embedding engine: layout, shardings, exchanges."""
    return embedding_engine(self.tables, self.features, self.mesh, self.plan)

  @nn.compact
  def __call__(self, ids: jax.Array, *, step: jax.Array | int = 0,
               resets: jax.Array | None = None) -> Any:
    """Looks up the pooled embeddings of a batch.

    The number of invalid ids (outside their table, other than -1) is sown
    as `intermediates/<module>/invalid_ids` (`mutable=['intermediates']`).

    Args:
      ids: `[B, T]` int32 packed ids, batch-sharded over the mesh.
      step: the 0-based training step. The table optimizers' schedules,
        Adam and stochastic rounding read it; it does not matter for
        inference.
      resets: `[B, T]` int32 rows to zero first (managed collisions), or
        None.

    Returns:
      `[B, N, D]` float32, or a dict of feature name -> `[B, D_k]` with
      `output='features'`.

    Raises:
      ValueError: if `output` is unknown, or 'stacked' with features of
        different dims, or `ids` is not `[B, T]`.
    """
    check_output(self.output)
    engine = self.engine
    state = self.param(lookup_lib.STATE_KEY, lambda key: engine.init(key))
    pooled, invalid = pooled_lookup(engine, state, ids, step, resets,
                                    self.output)
    self.sow('intermediates', 'invalid_ids', invalid)
    return pooled
