"""Static routing of a stack's ids: which shard serves which id column.

Computed once per stack from the layout (NumPy constants baked into the
compiled step); `exchange.py` uses them to build its all-to-all blocks
(`OwnedExchange`), its row-wise, bucketized and replicated routes
(`RowWiseExchange`, `BucketizedExchange`, `ReplicatedExchange`) and the
expected loads that size the bucketized blocks (`bucket_shares`). Shape
letters as in `exchange.py`.
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
  """The routing of each of the L id columns of some of a stack's segments.

  Attributes:
    cols: `[L]` packed id column of each.
    col_slice: `cols` as a `(start, stop)` range when contiguous, else None.
    seg_of_col: `[L]` position of each column's segment among these.
    num_rows: `[L]` rows of the table.
    first: `[L]` first model shard of the table.
    rps: `[L]` rows per shard.
    owner: `[L, G]` model shard of each row block (`i // rps`), G the most
      blocks of a column, padded with the last block's shard (the padding
      blocks hold no rows).
    offsets: `[L, S']` local row offset of the piece on each shard.
    widths: the ids per example of each segment.
    combiners: the combiner of each segment.
  """

  cols: np.ndarray
  col_slice: tuple[int, int] | None
  seg_of_col: np.ndarray
  num_rows: np.ndarray
  first: np.ndarray
  rps: np.ndarray
  owner: np.ndarray
  offsets: np.ndarray
  widths: tuple[int, ...]
  combiners: tuple[str, ...]


def routing_of(segments: Sequence[plan_lib.FeatureRoute]) -> Routing:
  """The per-column routing of some of a stack's segments.

  Args:
    segments: the segments, as `FeatureRoute`s, in order.

  Returns:
    Their `Routing`, with one entry per id column. Segments are named by
    position.
  """
  cols, seg_of_col, rows, first, rps, offsets = [], [], [], [], [], []
  owners = []
  for k, seg in enumerate(segments):
    for j in range(seg.max_ids):
      cols.append(seg.id_offset + j)
      seg_of_col.append(k)
      rows.append(seg.num_rows)
      first.append(seg.first_device)
      rps.append(seg.rows_per_shard)
      offsets.append(seg.offsets)
      owners.append(block_devices(seg))
  cols = np.array(cols, np.int32)
  n_blocks = max((len(o) for o in owners), default=1)
  owner = np.array([o + (o[-1],) * (n_blocks - len(o)) for o in owners],
                   np.int32).reshape(len(owners), n_blocks)
  return Routing(
      cols=cols, col_slice=as_slice(cols),
      seg_of_col=np.array(seg_of_col, np.int32),
      num_rows=np.array(rows, np.int32), first=np.array(first, np.int32),
      rps=np.array(rps, np.int32), owner=owner,
      offsets=np.array(offsets, np.int32),
      widths=tuple(seg.max_ids for seg in segments),
      combiners=tuple(seg.combiner for seg in segments))


def as_slice(cols: np.ndarray) -> tuple[int, int] | None:
  """Gives a column list as a range when it is one.

  Args:
    cols: column numbers.

  Returns:
    `(start, stop)` when `cols` is non-empty and contiguous, else None.
  """
  if len(cols) and np.array_equal(cols, np.arange(cols[0],
                                                  cols[0] + len(cols))):
    return int(cols[0]), int(cols[0]) + len(cols)
  return None


def take_cols(ids: jax.Array, cols: np.ndarray,
               col_slice: tuple[int, int] | None) -> jax.Array:
  """Takes some columns of packed ids.

  Args:
    ids: `[X, T]` packed ids.
    cols: the columns to take. Columns >= T read as -1, the padding.
    col_slice: `cols` as a range, from `as_slice`, or None.

  Returns:
    `[X, len(cols)]` ids.
  """
  if col_slice is not None:
    return ids[:, col_slice[0]:col_slice[1]]
  return jnp.take(ids, jnp.asarray(cols), axis=1, mode='fill', fill_value=-1)


@dataclasses.dataclass(frozen=True)
class Owned:
  """The all-to-all routing of a stack's segments held by a few shards.

  Destination d serves the bags `bag_seg[d, :N_d]`, which are stack
  segments. Their ids fill slots `:L_d` of its `[L]` id block. The rest is
  padding. A table-row-wise segment has its rows split over a group of
  shards, and each of them serves it. The sender routes an id to the shard
  that holds its row. The others see the id as held elsewhere. The sender
  sums the partial bags that come back.

  Attributes:
    segs: `[K]` stack segments served this way, in order.
    cols: `[S, L]` packed id column of each slot. T marks padding.
    col_slice: `cols.ravel()` as a range when contiguous, else None.
    offset: `[S, L]` local row offset of the slot's piece.
    num_rows: `[S, L]` rows of the slot's table. 0 marks padding.
    block: `[S, L]` row block that the destination holds.
    rps: `[S, L]` rows per block. It equals num_rows when not row-split.
    col_bag: `[S, L]` bag slot of each id slot. N marks padding.
    bag_seg: `[S, N]` stack segment of each bag. The segment count marks
      padding.
    bag_comb: `[S, N]` combiner code of each bag.
    out_index: `[K, G]` slots `d * N + j` of each of `segs` coming back,
      with G shards per segment. `S * N` marks padding.
    widths0: shard 0's bag widths, for static pooling when S is 1.
    combiners0: shard 0's bag combiners.
    multi: whether some bag has several ids.
    weighted: whether some bag of several ids is not sum-pooled.
  """

  segs: np.ndarray
  cols: np.ndarray
  col_slice: tuple[int, int] | None
  offset: np.ndarray
  num_rows: np.ndarray
  block: np.ndarray
  rps: np.ndarray
  col_bag: np.ndarray
  bag_seg: np.ndarray
  bag_comb: np.ndarray
  out_index: np.ndarray
  widths0: tuple[int, ...]
  combiners0: tuple[str, ...]
  multi: bool
  weighted: bool


def owned_routing(stack: plan_lib.Stack, segs: Sequence[int],
                  num_shards: int, num_columns: int) -> Owned:
  """The all-to-all routing of the stack's segments `segs`.

  Args:
    stack: the stack.
    segs: the indices of the segments served by all-to-all. Each is held by
      some of the shards, not row-split over all of them.
    num_shards: S, the model shards.
    num_columns: T, the packed id columns. T itself marks a padding slot.

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
        block[d, c] = block_devices(seg).index(d)
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



def bucket_shares(r: Routing, num_shards: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The expected load of each shard under bucketized routing, per example.

  Ids are taken as drawn uniformly over each table's rows. So column c sends
  shard d a share `rows of c on d / rows of c`, and a bag of w ids reaches
  shard d with probability `1 - (1 - share)^w`.

  Args:
    r: the routing of some row-split segments.
    num_shards: S, the model shards.

  Returns:
    `[S]` expected ids and `[S]` expected partial bags (bags with an id on
    the shard) that one example sends each shard.
  """
  n_cols, n_blocks = r.owner.shape
  share = np.zeros((n_cols, num_shards))
  for k in range(n_blocks):  # padding blocks hold no rows
    held = np.clip(r.num_rows - k * r.rps, 0, r.rps)
    np.add.at(share, (np.arange(n_cols), r.owner[:, k]),
              held / np.maximum(r.num_rows, 1))
  bags, start = np.zeros(num_shards), 0
  for w in r.widths:
    bags += 1.0 - (1.0 - share[start]) ** w
    start += w
  return share.sum(axis=0), bags


def block_devices(seg: plan_lib.FeatureRoute) -> tuple[int, ...]:
  """The model shard of each row block of a segment, in block order.

  Args:
    seg: the segment.

  Returns:
    `seg.block_devices`, or `(first_device,)` when not split by rows.
  """
  return tuple(seg.block_devices) or (seg.first_device,)


def holders(seg: plan_lib.FeatureRoute, num_shards: int) -> list[int]:
  """The model shards holding rows of a segment.

  Args:
    seg: the segment.
    num_shards: S, the model shards.

  Returns:
    The shards, in order. A replicated segment gives `[0]`.
  """
  if len(seg.offsets) == 1:  # replicated
    return [0]
  return [d for d in range(num_shards) if seg.offsets[d] >= 0]


