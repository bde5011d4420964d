"""The sharded lookup as a differentiable function whose gradient is the update.

`sparse_lookup(engine, state, ids, step)` returns the pooled embeddings of a
batch. It is a `jax.custom_vjp`: its backward pass runs the engine's exchange
and table optimizer (`EmbeddingEngine.apply_gradients`: deduplication, the
optimizer of each table, weight decay, stochastic rounding) and returns, as
the "gradient" of `state`, the **new** tables and optimizer slots. So a
`jax.grad` of a loss over all of a model's variables gives ordinary
gradients for the dense parameters and the updated embedding state for the
tables, and no dense gradient of a table is ever formed: the backward pass
holds the table, its slots and rows of the batch only.

This is the contract of jax-tpu-embedding's `SparseCoreEmbed`
(`jax_tpu_embedding/sparsecore/lib/flax/linen/embed.py`: the backward
returns updated tables, and `embed_optimizer.py` routes them through optax
with a pass-through transform whose `apply_updates` replaces rather than
adds) and of keras-rs's distributed embedding (variables marked
`overwrite_with_gradient`). TorchRec's FBGEMM `fused_optimizer` does the same
inside the backward of `EmbeddingBagCollection`. The optax side is in
`dlrm_jax.train.table_updates`; the Flax modules built on this function are
`dlrm_jax.models.embed.SparseEmbed` (linen) and
`dlrm_jax.models.nnx_embed.SparseEmbed` (NNX).

Rules that follow from the contract:

  * Call each state once per loss. A second use would add two "gradients",
    each a whole new table.
  * The loss must depend on the lookup's output. If nothing downstream uses
    it, JAX skips the backward pass and the state's cotangent is zero: the
    replacement would then write zeros.
  * The state's arrays are floats. bfloat16 and float16 tables are stored in
    float16 arrays (`rounding.CARRIER`): a custom_vjp cotangent has its
    primal's dtype, and an integer primal's cotangent (float0) carries no
    values.

Managed-collision row resets are an input: `resets` (`[B, T]` rows to zero,
-1 for none) are applied in the forward pass before the lookup, and the
backward updates the reset state. The number of invalid ids (outside a
table, other than the -1 padding) is a second output.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dlrm_jax.embedding.engine import EmbeddingEngine
from dlrm_jax.embedding.sharding.relayout import EmbeddingState

# The key under which a module keeps its `EmbeddingState` ({'stacks': ...,
# 'slots': ...}) among its parameters. `dlrm_jax.train.table_updates` finds
# the leaves to replace by this key in their path.
STATE_KEY = 'sparse_state'


def _lookup_fn(engine: EmbeddingEngine, stacked: bool):
  """The custom_vjp lookup of one engine and output form, made once."""
  cache = engine.__dict__.setdefault('_sparse_lookup_fns', {})
  if stacked in cache:
    return cache[stacked]

  def forward(state, ids, step, resets):
    if resets is not None:
      state = engine.reset_rows(state, resets)
    pooled, invalid = engine.lookup(state['stacks'], ids, stacked=stacked)
    return (pooled, invalid), (state, ids, step)

  @jax.custom_vjp
  def lookup(state, ids, step, resets):
    return forward(state, ids, step, resets)[0]

  def backward(residuals, cotangents):
    state, ids, step = residuals
    g_pooled, _ = cotangents  # the invalid count's cotangent is float0
    new_state = engine.apply_gradients(
        state, ids, g_pooled if stacked else tuple(g_pooled), step)
    return new_state, None, None, None

  lookup.defvjp(forward, backward)
  cache[stacked] = lookup
  return lookup


def sparse_lookup(
    engine: EmbeddingEngine,
    state: EmbeddingState,
    ids: jax.Array,
    step: jax.Array | int,
    resets: jax.Array | None = None,
    *,
    stacked: bool = True,
) -> tuple[Any, jax.Array]:
  """Looks up pooled embeddings; the gradient of `state` is the new state.

  Args:
    engine: the embedding engine (specs, mesh and plan).
    state: the tables and optimizer slots, `{'stacks': ..., 'slots': ...}`,
      sharded as `engine.state_shardings()`.
    ids: `[B, T]` int32 packed ids (feature k takes `max_ids[k]` columns; -1
      pads a bag), batch-sharded.
    step: the 0-based training step, an int32 scalar. Learning-rate
      schedules, Adam's bias correction and the stochastic-rounding bits use
      it.
    resets: `[B, T]` int32 rows to zero before the lookup (managed
      collisions), laid out like `ids`; -1 resets nothing. None: no resets.
    stacked: return one `[B, N, D]` array (every feature of one dim D), or
      one `[B, D_k]` array per feature, in the order of `engine.features`.

  Returns:
    The pooled embeddings (float32, batch-sharded) and the number of invalid
    ids in the batch (an int32 scalar). Under `jax.grad` of a loss, the
    cotangent of `state` is the state after the table optimizers' step.

  Raises:
    ValueError: if `stacked` is set and the features' dims differ.
  """
  step = jnp.asarray(step, jnp.int32)
  return _lookup_fn(engine, stacked)(state, ids, step, resets)
