"""Static routing of a stack's ids: which shard serves which id column.

Computed once per stack from the layout (NumPy constants baked into the
compiled step); `exchange.py` uses them to build its all-to-all blocks
(`OwnedExchange`) and its row-wise and replicated routes (`RowWiseExchange`,
`ReplicatedExchange`). Shape letters as in `exchange.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding.specs import COMBINERS


@dataclasses.dataclass(frozen=True)
class Routing:
  """Per id column (L of them) of some of a stack's segments."""

  cols: np.ndarray        # [L] packed id column of each
  col_slice: tuple[int, int] | None  # the same, when a contiguous range
  seg_of_col: np.ndarray  # [L] position of its segment among these
  num_rows: np.ndarray    # [L] rows of the table
  first: np.ndarray       # [L] first model shard of the table
  rps: np.ndarray         # [L] rows per shard
  offsets: np.ndarray     # [L, S'] local row offset of the piece per shard
  widths: tuple[int, ...]      # ids per example, per segment
  combiners: tuple[str, ...]   # per segment


def routing_of(segments: Sequence[plan_lib.FeatureRoute]) -> Routing:
  """The per-column routing of some of a stack's segments.

  Args:
    segments: the segments (`FeatureRoute`s), in order.

  Returns:
    Their `Routing`: one entry per id column, segments by position.
  """
  cols, seg_of_col, rows, first, rps, offsets = [], [], [], [], [], []
  for k, seg in enumerate(segments):
    for j in range(seg.max_ids):
      cols.append(seg.id_offset + j)
      seg_of_col.append(k)
      rows.append(seg.num_rows)
      first.append(seg.first_device)
      rps.append(seg.rows_per_shard)
      offsets.append(seg.offsets)
  cols = np.array(cols, np.int32)
  return Routing(
      cols=cols, col_slice=as_slice(cols),
      seg_of_col=np.array(seg_of_col, np.int32),
      num_rows=np.array(rows, np.int32), first=np.array(first, np.int32),
      rps=np.array(rps, np.int32), offsets=np.array(offsets, np.int32),
      widths=tuple(seg.max_ids for seg in segments),
      combiners=tuple(seg.combiner for seg in segments))


def as_slice(cols: np.ndarray) -> tuple[int, int] | None:
  if len(cols) and np.array_equal(cols, np.arange(cols[0],
                                                  cols[0] + len(cols))):
    return int(cols[0]), int(cols[0]) + len(cols)
  return None


def take_cols(ids: jax.Array, cols: np.ndarray,
               col_slice: tuple[int, int] | None) -> jax.Array:
  """`[X, T]` -> `[X, len(cols)]`; columns >= T read as -1 (padding)."""
  if col_slice is not None:
    return ids[:, col_slice[0]:col_slice[1]]
  return jnp.take(ids, jnp.asarray(cols), axis=1, mode='fill', fill_value=-1)


@dataclasses.dataclass(frozen=True)
class Owned:
  """The all-to-all routing of a stack's segments held by a few shards.

  Destination d serves bags `bag_seg[d, :N_d]` (stack segments) whose ids
  fill slots `:L_d` of its `[L]` id block; the rest is padding. A segment
  whose rows are split over a group of shards (table-row-wise) is served by
  each of them: the sender routes an id to the one holding its row (the
  others see it as held elsewhere) and sums the partial bags coming back.
  """

  segs: np.ndarray       # [K] stack segments served this way, in order
  cols: np.ndarray       # [S, L] packed id column of each slot (T: padding)
  col_slice: tuple[int, int] | None  # cols.ravel(), when contiguous
  offset: np.ndarray     # [S, L] local row offset of the slot's piece
  num_rows: np.ndarray   # [S, L] rows of its table (0: padding)
  block: np.ndarray      # [S, L] row block the destination holds
  rps: np.ndarray        # [S, L] rows per block (num_rows: not row-split)
  col_bag: np.ndarray    # [S, L] bag slot of each id slot (N: padding)
  bag_seg: np.ndarray    # [S, N] stack segment of each bag (n_seg: padding)
  bag_comb: np.ndarray   # [S, N] combiner code of each bag
  out_index: np.ndarray  # [K, G] slots d * N + j of each of `segs` coming
                         # back (S * N: padding), G shards per segment
  widths0: tuple[int, ...]    # shard 0's bag widths (static pooling, S = 1)
  combiners0: tuple[str, ...]
  multi: bool            # some bag has several ids
  weighted: bool         # some bag of several ids is not sum-pooled


def owned_routing(stack: plan_lib.Stack, segs: Sequence[int],
                  num_shards: int, num_columns: int) -> Owned:
  """The all-to-all routing of the stack's segments `segs`.

  Args:
    stack: the stack.
    segs: the indices of the segments served by all-to-all (each held by
      some of the shards, not row-split over all of them).
    num_shards: S, the model shards.
    num_columns: T, the packed id columns (T itself marks a padding slot).

  Returns:
    The `Owned` routing of those segments.
  """
  s = num_shards
  segments = stack.segments
  multi = any(segments[k].max_ids > 1 for k in segs)
  by_dev: list[list[int]] = [[] for _ in range(s)]
  for k in segs:
    for d in holders(segments[k], s):
      by_dev[d].append(k)
  n_bags = max(1, max(len(b) for b in by_dev))
  n_cols = max(1, max(sum(segments[k].max_ids for k in b) for b in by_dev))
  if not multi:
    n_bags = n_cols = max(n_bags, n_cols)
  cols = np.full((s, n_cols), num_columns, np.int32)
  offset = np.zeros((s, n_cols), np.int32)
  num_rows = np.zeros((s, n_cols), np.int32)
  block = np.zeros((s, n_cols), np.int32)
  rps = np.ones((s, n_cols), np.int32)
  col_bag = np.full((s, n_cols), n_bags, np.int32)
  bag_seg = np.full((s, n_bags), len(segments), np.int32)
  bag_comb = np.zeros((s, n_bags), np.int32)
  n_hold = max(len(holders(segments[k], s)) for k in segs)
  out_index = np.full((len(segs), n_hold), s * n_bags, np.int32)
  filled = np.zeros(len(segs), np.int32)
  pos_of = {k: i for i, k in enumerate(segs)}
  for d, bags in enumerate(by_dev):
    c = 0
    for j, k in enumerate(bags):
      seg = segments[k]
      bag_seg[d, j] = k
      bag_comb[d, j] = COMBINERS.index(seg.combiner)
      out_index[pos_of[k], filled[pos_of[k]]] = d * n_bags + j
      filled[pos_of[k]] += 1
      for i in range(seg.max_ids):
        cols[d, c] = seg.id_offset + i
        offset[d, c] = seg.offsets[d]
        num_rows[d, c] = seg.num_rows
        block[d, c] = d - seg.first_device
        rps[d, c] = min(seg.rows_per_shard, seg.num_rows)
        col_bag[d, c] = j
        c += 1
  return Owned(
      segs=np.array(segs, np.int32), cols=cols,
      col_slice=as_slice(cols.ravel()), offset=offset, num_rows=num_rows,
      block=block, rps=rps, col_bag=col_bag, bag_seg=bag_seg, bag_comb=bag_comb,
      out_index=out_index,
      widths0=tuple(segments[k].max_ids for k in by_dev[0]),
      combiners0=tuple(segments[k].combiner for k in by_dev[0]),
      multi=multi,
      weighted=any(segments[k].max_ids > 1 and segments[k].combiner != 'sum'
                   for k in segs))


# The name exchange.py still calls (its owner switches to owned_routing).


def holders(seg: plan_lib.FeatureRoute, num_shards: int) -> list[int]:
  """The model shards holding rows of a segment.

  Args:
    seg: the segment.
    num_shards: S, the model shards.

  Returns:
    The shards, in order (`[0]` when replicated).
  """
  if len(seg.offsets) == 1:  # replicated
    return [0]
  return [d for d in range(num_shards) if seg.offsets[d] >= 0]


