"""`SparseEmbed` for Flax NNX: the linen module's tables, as NNX parameters.

    embed = SparseEmbed(tables, features, mesh, rngs=nnx.Rngs(0))
    pooled = embed(ids, step=step)                       # [B, N, D]

Construction builds the tables and slots sharded on the mesh (each device
makes its own rows, `EmbeddingEngine.init`), as `nnx.Param`s under the
attribute `lookup.STATE_KEY`. The lookup is the same `sparse_lookup` as the
linen module's (`dlrm_jax.models.embed`), so `nnx.grad` of a loss gives the
new tables and slots for those parameters, and
`dlrm_jax.train.table_updates.nnx_update` applies a step (dense optax update,
tables replaced). With the same state, linen and NNX give the same numbers.
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx
import jax
from jax.sharding import Mesh

from dlrm_jax.embedding import lookup as lookup_lib
from dlrm_jax.embedding.engine import EmbeddingEngine
from dlrm_jax.embedding.specs import FeatureSpec, TableSpec
from dlrm_jax.models import embed as linen_embed


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


class SparseEmbed(nnx.Module):
  """Pooled lookups in sharded embedding tables, updated sparsely (NNX).

  Args:
    tables: the table specs.
    features: the feature specs, in the order of the packed id columns.
    mesh: a mesh with axes ('data', 'model').
    plan: the sharding plan, as `dlrm_jax.models.embed.embedding_engine`
      takes it (a Plan, None/'auto', a strategy, or table -> strategy).
    output: 'stacked' (`[B, N, D]`) or 'features' (name -> `[B, D_k]`).
    rngs: the `params` stream seeds the tables.

  Raises:
    ValueError: if the specs, the plan or `output` are invalid.
  """

  def __init__(self, tables: Sequence[TableSpec],
               features: Sequence[FeatureSpec], mesh: Mesh, plan: Any = None,
               *, output: str = 'stacked', rngs: nnx.Rngs):
    linen_embed.check_output(output)
    self.engine: EmbeddingEngine = linen_embed.embedding_engine(
        tables, features, mesh, plan)
    self.output = output
    state = self.engine.init(rngs.params())
    setattr(self, lookup_lib.STATE_KEY,
            nnx.data(jax.tree.map(nnx.Param, state)))
    self.invalid_ids = nnx.Intermediate(jax.numpy.zeros((), jax.numpy.int32))

  @property
  def state(self) -> dict[str, Any]:
    """The tables and slots as arrays, `{'stacks': ..., 'slots': ...}`."""
    return jax.tree.map(lambda v: v[...],
                        getattr(self, lookup_lib.STATE_KEY),
                        is_leaf=_is_variable)

  def set_state(self, state: dict[str, Any]) -> None:
    """Replaces the tables and slots, as from a checkpoint or a linen init.

    Args:
      state: `{'stacks': ..., 'slots': ...}` arrays of this engine's layout
        (`engine.abstract_state()`).
    """
    jax.tree.map(lambda v, x: v.set_value(x),
                 getattr(self, lookup_lib.STATE_KEY), state,
                 is_leaf=_is_variable)

  def __call__(self, ids: jax.Array, *, step: jax.Array | int = 0,
               resets: jax.Array | None = None) -> Any:
    """Looks up the pooled embeddings of a batch.

    The invalid-id count of the batch is left in `self.invalid_ids` (an
    `nnx.Intermediate`).

    Args:
      ids: `[B, T]` int32 packed ids, batch-sharded.
      step: the 0-based training step.
      resets: `[B, T]` int32 rows to zero first (managed collisions), or
        None.

    Returns:
      `[B, N, D]` float32, or feature name -> `[B, D_k]` with
      `output='features'`.

    Raises:
      ValueError: if `ids` is not `[B, T]`.
    """
    pooled, invalid = linen_embed.pooled_lookup(self.engine, self.state, ids,
                                                step, resets, self.output)
    self.invalid_ids.set_value(invalid)
    return pooled
