"""The optax side of `SparseEmbed`: dense updates for the MLPs, replacement
for the tables.

The "gradient" that `jax.grad` gives a `SparseEmbed`'s tables and slots is
their new value (`dlrm_jax.embedding.lookup`). An optax step must then run
the user's transform on the dense parameters only and pass the tables'
values through, and the update must replace those leaves instead of adding
them. jax-tpu-embedding does the same in `embed_optimizer.py`
(`optax.multi_transform` with a pass-through transform for the SparseCore
leaves, and an `apply_updates` that overwrites them).

    tx = table_updates.with_tables(optax.adam(1e-3))
    opt_state = tx.init(params)
    grads = jax.grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = table_updates.apply_updates(params, updates)

Table leaves are the ones under a `lookup.STATE_KEY` ('sparse_state') key,
in linen parameter dicts and in NNX states alike.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import optax

from dlrm_jax.embedding.lookup import STATE_KEY

TABLES = 'tables'
DENSE = 'dense'


def _key_name(entry) -> Any:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def is_table_path(path) -> bool:
  """Whether a pytree key path leads into a `SparseEmbed`'s state."""
  return any(_key_name(e) == STATE_KEY for e in path)


def labels(params) -> Any:
  """`'tables'` for the leaves of `SparseEmbed` states, `'dense'` otherwise.

  Args:
    params: a parameter tree (linen dict or NNX State).

  Returns:
    A tree like `params` of labels, as `optax.multi_transform` takes.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: TABLES if is_table_path(path) else DENSE, params)


def with_tables(tx: optax.GradientTransformation
                ) -> optax.GradientTransformation:
  """The user's transform on dense parameters, pass-through on tables.

  Args:
    tx: the optax transform of the dense parameters. It never sees a table
      (its state, clipping norms and weight decay leave them out).

  Returns:
    A transform whose updates are `tx`'s for dense leaves and the new values
    for table leaves. Apply them with `apply_updates`.
  """
  return optax.multi_transform({DENSE: tx, TABLES: optax.identity()},
                               labels)


def apply_updates(params, updates) -> Any:
  """`optax.apply_updates` for dense leaves; table leaves are replaced.

  Args:
    params: the parameters.
    updates: from a `with_tables` transform (or, for tables, the gradient
      itself).

  Returns:
    The new parameters.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, p, u: u if is_table_path(path)
      else optax.apply_updates(p, u), params, updates)


def nnx_update(model: nnx.Module, grads: nnx.State,
               tx: optax.GradientTransformation, opt_state: Any) -> Any:
  """One optimizer step of an NNX model with `SparseEmbed` tables.

  Args:
    model: the model, updated in place (`nnx.update`).
    grads: `nnx.grad` of the loss with respect to the model's `nnx.Param`s.
    tx: a `with_tables` transform.
    opt_state: its state, from `tx.init(nnx.state(model, nnx.Param))`.

  Returns:
    The new optimizer state.
  """
  params = nnx.state(model, nnx.Param)
  updates, opt_state = tx.update(grads, opt_state, params)
  nnx.update(model, apply_updates(params, updates))
  return opt_state
