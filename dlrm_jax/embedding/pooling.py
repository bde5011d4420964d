"""Pooling of multi-hot bags: the combiners sum, mean and sqrtn.

A bag is the `L` ids of one feature in one example (-1 pads it). Its pooled
embedding is `sum_i w_i e_i` over its valid ids, with `w_i` = 1 (sum),
1 / n (mean) or 1 / sqrt(n) (sqrtn) for n valid ids (n = 0 counts as 1: an
empty bag pools to zero). The exchange (`dlrm_jax.embedding.sharding.exchange`)
weighs the gathered rows and sums them, and expands pooled gradients back to
the ids with the same weights; the export (`dlrm_jax.serving.export`) pools
the rows of its expanded bags with `pool`.

Shape letters: X bags (examples), L ids per bag, W the width of a row.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def combiner_weights(valid: jax.Array, combiner: str) -> jax.Array:
  """The pooling weight of each id of a bag.

  Args:
    valid: `[X, L]` bool, True where a bag holds an id.
    combiner: one of `specs.COMBINERS`.

  Returns:
    `[X, L]` float32 weights. They are 0 where not valid.
  """
  w = valid.astype(jnp.float32)
  if combiner == 'sum' or valid.shape[1] == 1:
    return w
  n = jnp.sum(w, axis=1, keepdims=True)
  if combiner == 'mean':
    return w / jnp.maximum(n, 1.0)
  return w * jax.lax.rsqrt(jnp.maximum(n, 1.0))  # sqrtn


def bag_weights(valid: jax.Array, widths: Sequence[int],
                combiners: Sequence[str]) -> jax.Array:
  """The pooling weights of bags side by side.

  Args:
    valid: `[X, sum(widths)]` bool, True where a bag holds an id.
    widths: the ids per bag of each bag, in column order.
    combiners: the combiner of each bag.

  Returns:
    `[X, sum(widths)]` float32 weights.
  """
  parts, start = [], 0
  for w, c in zip(widths, combiners):
    piece = valid[:, start:start + w]
    parts.append(combiner_weights(piece, c) if w > 1 else
                 piece.astype(jnp.float32))
    start += w
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def bag_sums(rows: jax.Array, widths: Sequence[int]) -> jax.Array:
  """The sums of bags side by side.

  Args:
    rows: `[X, sum(widths), W]` rows, already weighted.
    widths: the ids per bag of each bag, in column order.

  Returns:
    `[X, len(widths), W]`.
  """
  if all(w == 1 for w in widths):
    return rows
  out, start = [], 0
  for w in widths:
    out.append(jnp.sum(rows[:, start:start + w], axis=1))
    start += w
  return jnp.stack(out, axis=1)


def pool(rows: jax.Array, valid: jax.Array, combiner: str) -> jax.Array:
  """The pooled embedding of each bag.

  Args:
    rows: `[X, L, W]` float32 rows of the bags' ids.
    valid: `[X, L]` bool, True where a bag holds an id.
    combiner: one of `specs.COMBINERS`.

  Returns:
    `[X, W]` pooled rows.
  """
  return jnp.sum(rows * combiner_weights(valid, combiner)[..., None], axis=1)
