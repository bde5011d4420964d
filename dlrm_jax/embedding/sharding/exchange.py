"""The embedding exchange: lookups and sparse updates of one stack on a mesh.

Shape letters: B_l per-device batch, T packed id columns, S model shards,
R data replicas (the mesh's 'data' axis), C a stack's rows per device, W its
width, L_d the id columns device d owns (L = max_d L_d, the padded share),
N_d its bags (N = max_d N_d), K the segments one way serves.

A stack's segments (feature x column piece) are served in one of four ways,
all inside `jax.shard_map`, per device; each is one `SegmentExchange` class
(TorchRec's sharding classes: `tw_sharding.py`, `rw_sharding.py`, ...), and
the plan's placement of a segment's table picks it (`EXCHANGES`,
`exchange_of`):

  OwnedExchange (placements table_wise and column_wise: one model shard
         holds all rows of a piece; table_row_wise routed 'every_holder':
         rows split over a group of shards, each id sent to every shard of
         the group, the one holding its row reading it, partial bags summed
         by the sender):
    lookup   the ids of the bags each destination owns are routed to its
             local rows and sent by one `all_to_all` over 'model'
             (`[B_l, S * L]` int32, padded to the largest share); the owner
             gathers and pools them for the model group's `S * B_l`
             examples and a second `all_to_all` sends the pooled sums back
             (`[B_l, S * N, W]` float32).
    update   the transpose: the ids again and the pooled gradients go to the
             owners by `all_to_all`; each owner expands them to its
             `S * B_l * L` ids (combiner weights) and deduplicates those only.
  BucketizedExchange (placements row_wise and table_row_wise whose
         features the planner routes 'bucketized', the default where it
         sends fewer bytes: `planner.choose_row_exchange`; TorchRec's
         row-wise bucketize, `bucketize_kjt_before_all2all`, with static
         shapes):
    lookup   each id goes only to the shard holding its row (bucketized by
             row block), by one `all_to_all` over 'model' of `[S * cap]`
             int32; the owner pools the ids of a bag that it holds (one
             partial bag per bag and owner) and a second `all_to_all` sends
             `[S * bag_cap, W]` partial bags back, summed by the requester.
             `cap` and `bag_cap` are the expected loads plus a slack
             (`planner.bucket_capacity`); if any device of the mesh would
             overflow a block, a psum'ed flag makes all of them take
             the `lax.cond` branch with worst-case blocks instead, so the
             result never depends on the ids' distribution.
    update   the transpose: the partial bags' gradients go to the owners by
             `all_to_all` (the ids' blocks are the lookup's: the compiler
             merges the two sends); each owner hands every id it received
             its partial bag's gradient and deduplicates those only.
  RowWiseExchange (placement row_wise, features routed 'every_holder':
         rows split over every shard, TorchRec's row-wise pattern; a row
         split over fewer shards, one shard included, is served as owned,
         one over every shard as row-wise, whatever the placement's name):
    lookup   all-gather the model group's ids (`[S * B_l, T]`), pool the rows
             this shard holds (others read as zero), reduce-scatter the
             partial sums over 'model'.
    update   all-gather the group's ids and pooled gradients over 'model';
             each shard keeps the ids it holds.
  ReplicatedExchange (placement replicated: a full copy everywhere): lookups
             are local; an update needs the gradient of the whole batch on
             every device: either a dense `[C, W + 1]` psum (gradient sums
             and touch counts) when the table is small next to the batch, or
             an all-gather of each device's deduplicated (row, gradient)
             pairs.

`StackExchange` runs the ways a stack's segments need (a stack is replicated
or sharded as a whole, and a sharded one may mix owned and row-wise
segments) and combines them: the lookups' pooled segments are put back in
the stack's segment order, the (row, gradient) pairs of an update are
concatenated, and then deduplicated and summed once.

Data-parallel replicas (R > 1) of a shard make the same update: after the
owner's deduplication, the fixed-size (row, summed gradient) pairs are
all-gathered over 'data' and deduplicated once more. Nothing global-batch
sized is ever exchanged for sharded stacks, and per-device work (dedup,
gather, scatter) is over the ids a device owns plus padding.

Row resets (managed collisions) travel like lookup ids: to the owners by
all-to-all (row-wise: all-gather over 'model'), then over 'data' to the
replicas.

The rows a step touches are then gathered with their optimizer state,
updated by `optimizers.update_rows` and written back by `_store_rows`; plain
SGD on a stack nobody else updates skips the deduplication and scatter-adds
(`_sgd_scatter_add`).

With one device the same code runs without `shard_map`; every collective
over an axis of size 1 is skipped (XLA:CPU would run it as a copy).
"""

from __future__ import annotations

import abc
import functools
import zlib
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dlrm_jax.embedding import initialization
from dlrm_jax.embedding import optimizers
from dlrm_jax.embedding import pooling
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding import rounding
from dlrm_jax.embedding.sharding import routing
from dlrm_jax.embedding.specs import TableSpec
from dlrm_jax.parallel import BATCH_AXES, DATA, MODEL

Axes = str | tuple[str, ...]

# The name scope of `BucketizedExchange`'s worst-case branch. The collectives
# traced in it carry it in their HLO op_name (benchmarks/comm_volume.py costs
# them apart, as the rarely taken path).
FALLBACK_SCOPE = 'bucketized_worst_case'

# ----------------------------------------------------------------------------
# Collectives over the mesh, skipped on axes of size 1.


class Comm:
  """Collectives over a ('data', 'model') mesh, for use inside shard_map.

  A collective over axes of total size 1 is skipped.

  Args:
    mesh: the mesh.

  Attributes:
    shape: the size of each mesh axis, by name.
    num_devices: the devices of the mesh.
  """

  def __init__(self, mesh: Mesh):
    self.shape = {a: int(mesh.shape[a]) for a in BATCH_AXES}
    self.num_devices = int(mesh.devices.size)

  def size(self, axes) -> int:
    """Gives the number of devices along some mesh axes.

    Args:
      axes: an axis name or a tuple of them.

    Returns:
      The product of their sizes.
    """
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([self.shape[a] for a in axes]))

  def index(self, axis: str) -> jax.Array:
    """Gives this device's index along a mesh axis.

    Args:
      axis: the axis name.

    Returns:
      An int32 scalar. It is the constant 0 on an axis of size 1.
    """
    return jnp.int32(0) if self.size(axis) == 1 else jax.lax.axis_index(axis)

  def all_gather(self, x: jax.Array, axes) -> jax.Array:
    """All-gathers along dim 0, tiled.

    Args:
      x: this device's block.
      axes: the mesh axes to gather over.

    Returns:
      The blocks of all devices along `axes`, concatenated on dim 0.
    """
    if self.size(axes) == 1:
      return x
    return jax.lax.all_gather(x, axes, axis=0, tiled=True)

  def psum_scatter(self, x: jax.Array, axes) -> jax.Array:
    """Reduce-scatters along dim 0, tiled.

    Args:
      x: this device's full-size partial sums.
      axes: the mesh axes to reduce over.

    Returns:
      This device's block of the sums along dim 0.
    """
    if self.size(axes) == 1:
      return x
    return jax.lax.psum_scatter(x, axes, scatter_dimension=0, tiled=True)

  def psum(self, x: jax.Array, axes) -> jax.Array:
    """Sums over mesh axes.

    Args:
      x: this device's value.
      axes: the mesh axes to sum over.

    Returns:
      The sum, on every device along `axes`.
    """
    return x if self.size(axes) == 1 else jax.lax.psum(x, axes)

  def all_to_all(self, x: jax.Array) -> jax.Array:
    """Exchanges blocks over 'model', along dim 1.

    Args:
      x: S blocks along dim 1. Block d goes to shard d.

    Returns:
      S blocks along dim 1. Block d came from shard d.
    """
    if self.size(MODEL) == 1:
      return x
    return jax.lax.all_to_all(x, MODEL, 1, 1, tiled=True)


# ----------------------------------------------------------------------------
# Helpers.


def _dedup(idx: jax.Array, fill: int, size: int
           ) -> tuple[jax.Array, jax.Array]:
  """Fixed-size unique of `[M]` ids, each <= fill.

  Returns the `[size]` sorted unique ids padded with `fill`, and the `[M]`
  position of each id among them. `size` must be at least the number of
  distinct ids.

  It equals `jnp.unique(idx, size=size, fill_value=fill,
  return_inverse=True)`. But it is built from a plain sort and a binary
  search. XLA runs those several times faster on CPU than the two-operand
  sort behind `jnp.unique`'s inverse.
  """
  s = jnp.sort(idx)
  is_new = jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]])
  pos = jnp.cumsum(is_new) - 1
  uniq = jnp.full((size,), fill, idx.dtype).at[
      jnp.where(is_new, pos, size)].set(s, mode='drop', unique_indices=True)
  inv = jnp.searchsorted(uniq, idx, side='left', method='scan')
  return uniq, inv.astype(jnp.int32)


def dedup_sum(idx: jax.Array, grads: jax.Array, fill: int
              ) -> tuple[jax.Array, jax.Array]:
  """Sums the gradients of repeated rows.

  Args:
    idx: `[M]` local rows. `fill` means none.
    grads: `[M, G]` gradients.
    fill: the padding row, usually C.

  Returns:
    The `[U]` unique rows, padded with `fill`, and their `[U, G]` summed
    gradients. U is `min(M, fill + 1)`.
  """
  size = min(idx.shape[0], fill + 1)
  uniq, inv = _dedup(idx, fill, size)
  return uniq, jax.ops.segment_sum(grads, inv, num_segments=size)


def gather_rows(x: jax.Array, idx: jax.Array, to_float32=None) -> jax.Array:
  """`x[idx]` for `[C, ...]` x and any `[...]` idx; rows outside read as zero.

  One row copy per id: a gather of clipped indices, times a 0/1 mask of the
  ids inside `[0, C)`. On XLA:CPU this emits a vectorised row loop, where
  `x.at[idx].get(mode='fill')` (a select per element) ran 3-5x slower
  (`benchmarks.step_breakdown`). An id outside reads row 0 or C-1 times
  zero, so it is zero while the tables are finite (the training loop stops
  at the first non-finite loss).

  Args:
    x: `[C, ...]` rows.
    idx: int32 row indices, any shape.
    to_float32: converts the gathered rows before the mask (16-bit tables:
      `rounding.rows_to_float32`, since their carrier's bits are not its
      values), or None.

  Returns:
    `idx.shape + x.shape[1:]` rows.
  """
  dn = jax.lax.GatherDimensionNumbers(
      offset_dims=tuple(range(idx.ndim, idx.ndim + x.ndim - 1)),
      collapsed_slice_dims=(0,), start_index_map=(0,))
  rows = jax.lax.gather(x, idx[..., None], dn, (1,) + x.shape[1:],
                        mode=jax.lax.GatherScatterMode.CLIP)
  if to_float32 is not None:
    rows = to_float32(rows)
  held = (idx >= 0) & (idx < x.shape[0])
  return rows * held.reshape(held.shape + (1,) * (x.ndim - 1)).astype(
      rows.dtype)


def _read_rows(table: jax.Array, idx: jax.Array, dtype: str) -> jax.Array:
  """Gathers `[..., W]` float32 rows of a stored `[C, W]` table.

  Rows >= C read as zero (`gather_rows`). 16-bit tables are stored in
  float16 arrays, and only the gathered rows are converted. See
  `rounding.storage_dtype`.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return gather_rows(table, idx)
  return gather_rows(table, idx,
                     lambda r: rounding.rows_to_float32(r, dtype))


def _route_weights(r: routing.Routing, valid: jax.Array):
  """Gives the `[X, L]` float32 pooling weights of a route's valid ids.

  Returns None when every bag holds one id.
  """
  return (pooling.bag_weights(valid, r.widths, r.combiners)
          if any(w > 1 for w in r.widths) else None)


def _owner_of(r: routing.Routing, safe: jax.Array) -> jax.Array:
  """The `[X, L]` model shard holding each of `[X, L]` valid ids' rows."""
  n_cols, n_blocks = r.owner.shape
  if n_blocks == 1:
    return jnp.broadcast_to(jnp.asarray(r.owner[:, 0]), safe.shape)
  block = jnp.minimum(safe // r.rps, n_blocks - 1)
  return jnp.asarray(r.owner)[jnp.arange(n_cols)[None, :], block]


def _valid_cols(r: routing.Routing, ids: jax.Array):
  """Takes a route's columns of `[X, T]` packed ids.

  Returns the `[X, L]` valid mask and the ids, with invalid ones read as
  row 0.
  """
  cols = routing.take_cols(ids, r.cols, r.col_slice)
  valid = (cols >= 0) & (cols < r.num_rows)
  return valid, jnp.where(valid, cols, 0)


# ----------------------------------------------------------------------------
# One way of serving segments.


class SegmentExchange(abc.ABC):
  """Lookups and gradient routing of some of a stack's segments, per device.

  A subclass is one way of serving segments, as the module docstring
  describes. Its `serves` says which segments it serves. `EXCHANGES` lists
  the subclasses.

  Attributes:
    kind: the way's name.
    replicas: the mesh axes over which devices hold the same rows of these
      segments and must make the same update.
    dense_sum: whether an update may all-reduce a dense `[C, G + 1]`
      gradient over `replicas`. It does so where that moves less than the
      deduplicated row and gradient pairs.
    reset_gather: the mesh axes over which the rows from `rows_to_reset` are
      then all-gathered. So every replica resets the same rows.
    stack: the stack.
    segs: the positions of the served segments in `stack.segments`.
    comm: the mesh's collectives.
    num_shards: S, the model shards.

  Args:
    stack: the stack.
    segs: the positions of the segments to serve in `stack.segments`.
    num_columns: T, the packed id columns.
    comm: the mesh's collectives.
  """

  kind: ClassVar[str]
  replicas: ClassVar[Axes] = DATA
  dense_sum: ClassVar[bool] = False
  reset_gather: ClassVar[Axes] = DATA

  def __init__(self, stack: plan_lib.Stack, segs: Sequence[int],
               num_columns: int, comm: Comm):
    del num_columns  # used by some ways
    self.stack = stack
    self.segs = tuple(segs)
    self.comm = comm
    self.num_shards = comm.size(MODEL)

  @classmethod
  @abc.abstractmethod
  def serves(cls, stack: plan_lib.Stack, seg: plan_lib.Segment,
             num_shards: int) -> bool:
    """Whether this way serves a segment.

    Args:
      stack: the stack holding it.
      seg: the segment.
      num_shards: S.

    Returns:
      True for exactly one of `EXCHANGES`.
    """

  def shard_index(self) -> jax.Array:
    """The block of the stack that this device holds, its model shard."""
    return self.comm.index(MODEL)

  def _rows(self, table: jax.Array, idx: jax.Array) -> jax.Array:
    return _read_rows(table, idx, self.stack.dtype)

  @abc.abstractmethod
  def lookup(self, table: jax.Array, ids: jax.Array) -> jax.Array:
    """The pooled embeddings of the served segments.

    Args:
      table: `[C, W]` rows held here.
      ids: `[B_l, T]` packed ids of this device's examples.

    Returns:
      `[B_l, K, W]` float32, segments in the order of `segs`.
    """

  @abc.abstractmethod
  def grads_here(self, ids: jax.Array, grads: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """The ids held here among those the served segments route here.

    Args:
      ids: `[B_l, T]` packed ids of this device's examples.
      grads: `[B_l, n_seg, G]` gradients of the pooled embeddings of all the
        stack's segments.

    Returns:
      `[M]` local rows and their `[M, G]` gradients. C means none. The
      combiner weights are applied.
    """

  @abc.abstractmethod
  def rows_to_reset(self, rows: jax.Array) -> jax.Array:
    """Finds the rows held here that the served segments' devices name.

    Args:
      rows: `[B_l, T]` rows named like packed ids. -1 means none.

    Returns:
      `[M]` local rows, before the gather over `reset_gather`. C means none.
    """


class ReplicatedExchange(SegmentExchange):
  """Segments of a replicated stack, looked up locally.

  See the module docstring.

  Attributes:
    routing: the per-column `routing.Routing` of the served segments.
  """

  kind = 'replicated'
  replicas = BATCH_AXES
  dense_sum = True
  reset_gather = ()  # `rows_to_reset` reads every device's rows itself

  def __init__(self, stack, segs, num_columns, comm):
    super().__init__(stack, segs, num_columns, comm)
    self.routing = routing.routing_of([stack.segments[k] for k in segs])

  @classmethod
  def serves(cls, stack, seg, num_shards) -> bool:
    """Serves every segment of a replicated stack.

    Args:
      stack: the stack holding the segment.
      seg: the segment.
      num_shards: S.

    Returns:
      Whether the stack is replicated.
    """
    return stack.replicated

  def shard_index(self) -> jax.Array:
    """Block 0: every device holds the whole stack."""
    return jnp.int32(0)

  def _route(self, ids: jax.Array):
    """Routes `[X, T]` packed ids to local rows.

    Returns the `[X, L]` local rows, C where invalid, and their `[X, L]`
    pooling weights or None.
    """
    r = self.routing
    valid, safe = _valid_cols(r, ids)
    local = jnp.where(valid, r.offsets[:, 0] + safe, self.stack.capacity)
    return local, _route_weights(r, valid)

  def lookup(self, table, ids):
    """Pools rows of the local copy.

    Args:
      table: `[C, W]` rows, the full copy.
      ids: `[B_l, T]` packed ids of this device's examples.

    Returns:
      `[B_l, K, W]` float32, segments in the order of `segs`.
    """
    idx, wts = self._route(ids)
    rows = self._rows(table, idx)
    if wts is not None:
      rows = rows * wts[..., None]
    return pooling.bag_sums(rows, self.routing.widths)

  def grads_here(self, ids, grads):
    """Expands this device's pooled gradients to its ids.

    Args:
      ids: `[B_l, T]` packed ids of this device's examples.
      grads: `[B_l, n_seg, G]` gradients of the pooled embeddings.

    Returns:
      `[M]` local rows and their `[M, G]` weighted gradients. C means none.
    """
    g = grads.shape[-1]
    idx, w = self._route(ids)
    if w is not None:
      grads = jnp.take(grads, jnp.asarray(self.routing.seg_of_col),
                       axis=1) * w[..., None]
    return idx.reshape(-1), grads.reshape(-1, g)

  def rows_to_reset(self, rows):
    """Gathers the rows that any device names, over the whole mesh.

    Args:
      rows: `[B_l, T]` rows named like packed ids. -1 means none.

    Returns:
      `[M]` local rows. C means none.
    """
    local, _ = self._route(self.comm.all_gather(rows, BATCH_AXES))
    return local.reshape(-1)


def _over_every_shard(seg: plan_lib.Segment, num_shards: int) -> bool:
  """Whether a segment's rows are split over every model shard."""
  return (seg.rows_per_shard < seg.num_rows and
          len(routing.holders(seg, num_shards)) == num_shards)


def _bucketized(stack: plan_lib.Stack, seg: plan_lib.Segment) -> bool:
  """Whether a row-split segment's ids go only to the shard of their row."""
  return (not stack.replicated and seg.rows_per_shard < seg.num_rows and
          seg.row_exchange == 'bucketized')


class RowWiseExchange(SegmentExchange):
  """Segments whose rows are split over every model shard.

  They use an all-gather and a reduce-scatter over 'model'. See the module
  docstring.

  Attributes:
    routing: the per-column `routing.Routing` of the served segments.
    seg_index: `[K]` int32 positions of the served segments.
  """

  kind = 'row_wise'

  def __init__(self, stack, segs, num_columns, comm):
    super().__init__(stack, segs, num_columns, comm)
    self.routing = routing.routing_of([stack.segments[k] for k in segs])
    self.seg_index = np.array(segs, np.int32)

  @classmethod
  def serves(cls, stack, seg, num_shards) -> bool:
    """Serves the segments of a sharded stack split over every shard.

    Args:
      stack: the stack holding the segment.
      seg: the segment.
      num_shards: S.

    Returns:
      Whether the stack is sharded and the segment's rows are split over
      every model shard.
    """
    return (not stack.replicated and _over_every_shard(seg, num_shards) and
            not _bucketized(stack, seg))

  def _route(self, ids: jax.Array, my: jax.Array):
    """Routes `[X, T]` packed ids to the local rows of shard `my`.

    Returns the `[X, L]` local rows, C where not held here or invalid, and
    their `[X, L]` pooling weights or None.
    """
    r = self.routing
    valid, safe = _valid_cols(r, ids)
    off = jnp.take(jnp.asarray(r.offsets), my, axis=1)
    mine = valid & (_owner_of(r, safe) == my) & (off >= 0)
    local = jnp.where(mine, off + safe % r.rps, self.stack.capacity)
    return local, _route_weights(r, valid)

  def lookup(self, table, ids):
    """Pools the model group's ids on the rows held here and reduce-scatters.

    Args:
      table: `[C, W]` rows held here.
      ids: `[B_l, T]` packed ids of this device's examples.

    Returns:
      `[B_l, K, W]` float32, segments in the order of `segs`.
    """
    idx, wts = self._route(self.comm.all_gather(ids, MODEL),
                           self.shard_index())
    rows = self._rows(table, idx)
    if wts is not None:
      rows = rows * wts[..., None]
    return self.comm.psum_scatter(pooling.bag_sums(rows, self.routing.widths),
                                  MODEL)

  def grads_here(self, ids, grads):
    """All-gathers the model group's ids and gradients, keeps those held here.

    Args:
      ids: `[B_l, T]` packed ids of this device's examples.
      grads: `[B_l, n_seg, G]` gradients of the pooled embeddings.

    Returns:
      `[M]` local rows and their `[M, G]` weighted gradients. C means none.
    """
    g = grads.shape[-1]
    ids_grp = self.comm.all_gather(ids, MODEL)
    g_grp = self.comm.all_gather(
        jnp.take(grads, jnp.asarray(self.seg_index), axis=1)
        if len(self.segs) != len(self.stack.segments) else grads, MODEL)
    idx, w = self._route(ids_grp, self.shard_index())
    if w is not None:
      g_grp = jnp.take(g_grp, jnp.asarray(self.routing.seg_of_col),
                       axis=1) * w[..., None]
    return idx.reshape(-1), g_grp.reshape(-1, g)

  def rows_to_reset(self, rows):
    """All-gathers the model group's rows and keeps those held here.

    Args:
      rows: `[B_l, T]` rows named like packed ids. -1 means none.

    Returns:
      `[M]` local rows. C means none.
    """
    local, _ = self._route(self.comm.all_gather(rows, MODEL),
                           self.shard_index())
    return local.reshape(-1)


class OwnedExchange(SegmentExchange):
  """Segments held by some of the model shards, served by all-to-all.

  These are table-wise, column-wise and table-row-wise pieces. See the module
  docstring.

  Attributes:
    plan: the all-to-all plan, a `routing.Owned`.
  """

  kind = 'owned'

  def __init__(self, stack, segs, num_columns, comm):
    super().__init__(stack, segs, num_columns, comm)
    self.plan = routing.owned_routing(stack, segs, self.num_shards, num_columns)

  @classmethod
  def serves(cls, stack, seg, num_shards) -> bool:
    """Serves the segments of a sharded stack not split over every shard.

    Args:
      stack: the stack holding the segment.
      seg: the segment.
      num_shards: S.

    Returns:
      Whether the stack is sharded and the segment is held by some shards
      only.
    """
    return (not stack.replicated and not _over_every_shard(seg, num_shards)
            and not _bucketized(stack, seg))

  def _send_rows(self, ids: jax.Array) -> jax.Array:
    """Maps `[B_l, T]` ids to `[B_l, S * L]` rows on each owner.

    C means nothing. C + 1 is a valid id whose row another shard of the
    group holds.
    """
    o = self.plan
    x = routing.take_cols(ids, o.cols.ravel(), o.col_slice)
    valid = (x >= 0) & (x < o.num_rows.ravel())
    cap = self.stack.capacity
    if np.all(o.rps >= o.num_rows):  # no row-split segment
      return jnp.where(valid, x + o.offset.ravel(), cap)
    rps = o.rps.ravel()
    here = valid & (x // rps == o.block.ravel())
    return jnp.where(here, x % rps + o.offset.ravel(),
                     jnp.where(valid, cap + 1, cap))

  def _owner_weights(self, local: jax.Array, my: jax.Array):
    """Owner side: the `[X, S, L]` weights of received `[X, S * L]` rows.

    Returns None when only valid masks would be needed.
    """
    o = self.plan
    s, n_cols = o.cols.shape
    valid = (local != self.stack.capacity).reshape(-1, s, n_cols)
    if not o.weighted:
      return None
    if self.num_shards == 1:
      weights = pooling.bag_weights(valid[:, 0], o.widths0, o.combiners0)
      return weights[:, None]
    col_bag = jnp.take(jnp.asarray(o.col_bag), my, axis=0)  # [L]
    one_hot = jax.nn.one_hot(col_bag, o.bag_seg.shape[1], dtype=jnp.float32)
    v = valid.astype(jnp.float32)
    n = jnp.einsum('xsl,ln->xsn', v, one_hot,
                   precision=jax.lax.Precision.HIGHEST)
    n_col = jnp.maximum(jnp.einsum('xsn,ln->xsl', n, one_hot,
                                   precision=jax.lax.Precision.HIGHEST), 1.0)
    code = jnp.take(jnp.take(jnp.asarray(o.bag_comb), my, axis=0), col_bag,
                    mode='fill', fill_value=0)
    scale = jnp.where(code == 1, 1.0 / n_col,
                      jnp.where(code == 2, jax.lax.rsqrt(n_col), 1.0))
    return v * scale

  def _owner_pool(self, rows: jax.Array, weights, my) -> jax.Array:
    """`[X, S * L, W]` rows -> `[X, S * N, W]` bag sums per source."""
    o = self.plan
    if not o.multi:
      return rows
    s, n_cols = o.cols.shape
    x, w = rows.shape[0], rows.shape[-1]
    rows = rows.reshape(x, s, n_cols, w)
    if weights is not None:
      rows = rows * weights[..., None]
    if self.num_shards == 1:
      return pooling.bag_sums(rows[:, 0], o.widths0)
    col_bag = jnp.take(jnp.asarray(o.col_bag), my, axis=0)
    one_hot = jax.nn.one_hot(col_bag, o.bag_seg.shape[1], dtype=rows.dtype)
    out = jnp.einsum('xslw,ln->xsnw', rows, one_hot,
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(x, -1, w)

  def _owner_expand(self, grads: jax.Array, weights, my) -> jax.Array:
    """The transpose of `_owner_pool`.

    It maps `[X, S * N, G]` bag gradients to `[X, S * L, G]` id gradients.
    """
    o = self.plan
    if not o.multi:
      return grads
    s, n_cols = o.cols.shape
    x, g = grads.shape[0], grads.shape[-1]
    if self.num_shards == 1:
      out = jnp.take(grads, jnp.asarray(o.col_bag[0]), axis=1)[:, None]
    else:
      col_bag = jnp.take(jnp.asarray(o.col_bag), my, axis=0)
      one_hot = jax.nn.one_hot(col_bag, o.bag_seg.shape[1],
                               dtype=grads.dtype)
      out = jnp.einsum('xsnw,ln->xslw', grads.reshape(x, s, -1, g), one_hot,
                       precision=jax.lax.Precision.HIGHEST)
    if weights is not None:
      out = out * weights[..., None]
    return out.reshape(x, -1, g)

  def lookup(self, table, ids):
    """Sends ids to their owners, pools there and sends the sums back.

    Args:
      table: `[C, W]` rows held here.
      ids: `[B_l, T]` packed ids of this device's examples.

    Returns:
      `[B_l, K, W]` float32, segments in the order of `segs`.
    """
    o, my = self.plan, self.shard_index()
    local = self.comm.all_to_all(self._send_rows(ids))
    rows = self._rows(table, local)
    pooled = self._owner_pool(rows, self._owner_weights(local, my), my)
    back = self.comm.all_to_all(pooled)
    if o.out_index.shape[1] > 1:  # partial bags of row-split segments
      pad = jnp.concatenate([back, jnp.zeros_like(back[:, :1])], axis=1)
      back = jnp.take(pad, jnp.asarray(o.out_index.ravel()), axis=1)
      return jnp.sum(back.reshape(back.shape[0], *o.out_index.shape, -1),
                     axis=2)
    if not np.array_equal(o.out_index[:, 0], np.arange(back.shape[1])):
      back = jnp.take(back, jnp.asarray(o.out_index[:, 0]), axis=1)
    return back

  def grads_here(self, ids, grads):
    """Sends ids and pooled gradients to their owners and expands them there.

    Args:
      ids: `[B_l, T]` packed ids of this device's examples.
      grads: `[B_l, n_seg, G]` gradients of the pooled embeddings.

    Returns:
      `[M]` local rows and their `[M, G]` weighted gradients. C means none.
    """
    o, my = self.plan, self.shard_index()
    g = grads.shape[-1]
    local = self.comm.all_to_all(self._send_rows(ids))
    send = grads
    if not np.array_equal(o.bag_seg.ravel(),
                          np.arange(len(self.stack.segments))):
      pad = jnp.concatenate([grads, jnp.zeros_like(grads[:, :1])], axis=1)
      send = jnp.take(pad, jnp.asarray(o.bag_seg.ravel()), axis=1)
    got = self.comm.all_to_all(send)
    g_ids = self._owner_expand(got, self._owner_weights(local, my), my)
    if not np.all(o.rps >= o.num_rows):  # C + 1: held elsewhere
      local = jnp.minimum(local, self.stack.capacity)
    return local.reshape(-1), g_ids.reshape(-1, g)

  def rows_to_reset(self, rows):
    """Sends the named rows to their owners by all-to-all.

    Args:
      rows: `[B_l, T]` rows named like packed ids. -1 means none.

    Returns:
      `[M]` local rows. C means none.
    """
    local = self.comm.all_to_all(self._send_rows(rows))
    return jnp.minimum(local, self.stack.capacity).reshape(-1)


class BucketizedExchange(SegmentExchange):
  """Row-split segments whose ids go only to the shard holding their row.

  These are the row_wise and table_row_wise pieces whose route says
  'bucketized' (`planner.choose_row_exchange` picks it by bytes). See the
  module docstring for the exchange itself.

  Capacity. All-to-all blocks have static shapes, so each destination gets
  a block of `cap` ids and one of `bag_cap` partial bags (a bag's ids that
  one shard holds, pooled there) from every sender, with
  `planner.bucket_capacity` of the load expected under uniform ids
  (`routing.bucket_shares`, times B_l): a slack of 2% plus four standard
  deviations, rounded up to 8. Single-id bags make one partial bag per id,
  so `bag_cap` is `cap`.

  Fallback. Each sender counts what it sends each destination; the counts
  over the blocks set a flag, psum'ed over the whole mesh, so every device
  sees the same value and `lax.cond` takes the same branch on all of them
  (the update's branch also holds the replicas' collectives over 'data'): either the capacity blocks or blocks of the worst case
  (`B_l L` ids, `B_l K` partial bags: every id on one shard), which always
  fit. Both branches compute the same sums, so the result does not depend
  on the ids' distribution. Where the capacity already reaches the worst
  case there is no `cond`. The capacity blocks of ids are sent before the
  `cond` (once a step: the lookup's and the update's are merged), so an
  overflowing step sends them in vain and then the worst case's.

  Encoding. An id is sent as its local row on the owner; for multi-id bags
  the first id of a bag on that owner is sent as `-1 - row`, so the owner
  numbers the partial bags of each sender's block by a running count
  (the sender keeps the ids of a bag together, in example order).

  Attributes:
    routing: the per-column `routing.Routing` of the served segments.
    seg_index: `[K]` int32 positions of the served segments.
    multi: whether some bag has several ids.
    id_share: `[S]` expected ids per example that go to each shard.
    bag_share: `[S]` expected partial bags per example that come from each
      shard.
  """

  kind = 'bucketized'

  def __init__(self, stack, segs, num_columns, comm):
    super().__init__(stack, segs, num_columns, comm)
    self.routing = routing.routing_of([stack.segments[k] for k in segs])
    self.seg_index = np.array(segs, np.int32)
    self.multi = any(w > 1 for w in self.routing.widths)
    self.id_share, self.bag_share = routing.bucket_shares(self.routing,
                                                          self.num_shards)

  @classmethod
  def serves(cls, stack, seg, num_shards) -> bool:
    """Serves the row-split segments routed 'bucketized'.

    Args:
      stack: the stack holding the segment.
      seg: the segment.
      num_shards: S.

    Returns:
      Whether the stack is sharded, the segment split by rows and its
      `row_exchange` 'bucketized'.
    """
    return _bucketized(stack, seg)

  def capacities(self, batch: int) -> tuple[int, int, int, int]:
    """The block sizes for a per-device batch.

    Args:
      batch: B_l.

    Returns:
      `(cap, bag_cap, worst, worst_bags)`: ids and partial bags per
      destination at the capacity and in the worst case.
    """
    r = self.routing
    worst, worst_bags = batch * len(r.cols), batch * len(r.widths)
    cap = plan_lib.bucket_capacity(batch * float(self.id_share.max()), worst)
    if not self.multi:
      return cap, cap, worst, worst_bags
    bag_cap = plan_lib.bucket_capacity(batch * float(self.bag_share.max()),
                                       worst_bags)
    return cap, bag_cap, worst, worst_bags

  def _bucketize(self, ids: jax.Array) -> dict[str, jax.Array]:
    """Sender side: where each of `[X, T]` packed ids goes.

    Returns `[E]` arrays (E = X L, example-major): `valid`, `dest` (the
    model shard), `local` (the row there), `new` (the first id of its bag on
    that shard), `pos` (its place among the ids to `dest`), `slot` (its
    bag's place among the partial bags to `dest`); `[S]` `counts` of ids and
    `bag_counts` of partial bags per destination; `valid2d`, `[X, L]`.
    """
    r, s = self.routing, self.num_shards
    valid, safe = _valid_cols(r, ids)
    n_cols = valid.shape[1]
    dest = _owner_of(r, safe)
    off = jnp.asarray(r.offsets)[jnp.arange(n_cols)[None, :], dest]
    local = off + safe % r.rps
    new = valid
    if self.multi:
      parts, start = [], 0
      for w in r.widths:
        d, v = dest[:, start:start + w], valid[:, start:start + w]
        if w > 1:  # an earlier valid id of the bag on the same shard
          seen = (d[:, :, None] == d[:, None, :]) & v[:, :, None]
          v = v & ~jnp.any(seen & np.triu(np.ones((w, w), bool), 1), axis=1)
        parts.append(v)
        start += w
      new = _concat(parts, axis=1)
    out = {'valid2d': valid}
    valid, dest, local, new = (a.reshape(-1) for a in (valid, dest, local,
                                                        new))
    hot = (dest[:, None] == jnp.arange(s)[None, :]) & valid[:, None]
    out.update(valid=valid, dest=dest, local=local, new=new,
               pos=_running_count(hot, dest),
               counts=jnp.sum(hot, axis=0, dtype=jnp.int32))
    if self.multi:
      hot = hot & new[:, None]
      out.update(slot=_running_count(hot, dest),
                 bag_counts=jnp.sum(hot, axis=0, dtype=jnp.int32))
    else:
      out.update(slot=out['pos'], bag_counts=out['counts'])
    return out

  def _send_ids(self, b: dict, cap: int) -> jax.Array:
    """Sends the ids to their owners in `[S * cap]` blocks.

    Returns the `[S * cap]` received values: local rows, C for none, the
    first id of a partial bag as `-1 - row` when bags hold several ids.
    """
    s, e = self.num_shards, b['dest'].shape[0]
    val = b['local']
    if self.multi:
      val = jnp.where(b['new'], -1 - val, val)
    at = jnp.where(b['valid'] & (b['pos'] < cap), b['dest'] * cap + b['pos'],
                   s * cap + jnp.arange(e))
    send = jnp.full((s * cap,), self.stack.capacity, jnp.int32).at[at].set(
        val, mode='drop', unique_indices=True)
    return self.comm.all_to_all(send[None])[0]

  def _owner_slots(self, got: jax.Array, cap: int, bag_cap: int):
    """Owner side: decodes `[S * cap]` received values.

    Returns the `[S * cap]` local rows (C for none) and the partial bag of
    each among the `[S * bag_cap]` going back (`S * bag_cap` for none), or
    None when each id is its own bag.
    """
    if not self.multi:
      return got, None
    s, c = self.num_shards, self.stack.capacity
    first = got < 0
    local = jnp.where(first, -1 - got, got)
    run = jnp.cumsum(first.reshape(s, cap), axis=1, dtype=jnp.int32) - 1
    slot = (jnp.arange(s, dtype=jnp.int32)[:, None] * bag_cap + run).ravel()
    return local, jnp.where(local < c, slot, s * bag_cap)

  def _wanted(self, b: dict, bag_cap: int) -> jax.Array:
    """`[E]` place of each id's partial bag among `[S * bag_cap]`.

    Only the first id of a bag on a shard names it; the others name
    `S * bag_cap`, none.
    """
    s, e = self.num_shards, b['dest'].shape[0]
    return jnp.where(b['valid'] & b['new'] & (b['slot'] < bag_cap),
                     b['dest'] * bag_cap + b['slot'], s * bag_cap +
                     jnp.arange(e))

  def _bag_scale(self, valid: jax.Array):
    """`[X, K]` float32 combiner weight of each bag, or None if all are 1.

    Mean and sqrtn weigh every id of a bag alike, `1 / n` or `1 / sqrt(n)`
    (`pooling.combiner_weights`), so the requester applies them to whole
    bags: to the summed partial bags and to the gradients it sends.
    """
    r = self.routing
    if not any(w > 1 and c != 'sum' for w, c in zip(r.widths, r.combiners)):
      return None
    parts, start = [], 0
    for w, c in zip(r.widths, r.combiners):
      n = jnp.maximum(jnp.sum(valid[:, start:start + w], axis=1,
                              dtype=jnp.float32), 1.0)
      if w == 1 or c == 'sum':
        parts.append(jnp.ones_like(n))
      else:
        parts.append(1.0 / n if c == 'mean' else jax.lax.rsqrt(n))
      start += w
    return jnp.stack(parts, axis=1)

  def prepare(self, ids: jax.Array) -> dict:
    """The sender's side of a step: routes, capacity blocks, overflow.

    The capacity blocks of ids are sent here, before any `cond`, so the
    lookup's and the update's sends are one computation, which the compiler
    merges; the worst case sends its own.

    Args:
      ids: `[B_l, T]` packed ids of this device's examples.

    Returns:
      A dict: 'b', the routes (`_bucketize`); 'got', what the owners
      received of the capacity blocks; 'over', whether a block of this
      device would overflow (a bool scalar, not yet psum'ed). 'got' and
      'over' are None where the capacity is the worst case (no `cond`).
    """
    b = self._bucketize(ids)
    cap, bag_cap, worst, worst_bags = self.capacities(ids.shape[0])
    if cap >= worst and bag_cap >= worst_bags:
      return {'b': b, 'got': None, 'over': None}
    over = (jnp.max(b['counts']) > cap) | (jnp.max(b['bag_counts']) > bag_cap)
    return {'b': b, 'got': self._send_ids(b, cap), 'over': over}

  def _blocks(self, prep: dict, batch: int, worst: bool):
    """`(cap, bag_cap, got)` of one branch: the capacity's or the worst's."""
    cap, bag_cap, w_ids, w_bags = self.capacities(batch)
    if worst or prep['got'] is None:
      return w_ids, w_bags, self._send_ids(prep['b'], w_ids)
    return cap, bag_cap, prep['got']

  def _pool(self, table, prep: dict, batch: int, worst: bool) -> jax.Array:
    """One branch of `lookup`: `[B_l, K, W]` sums of the partial bags."""
    s, b = self.num_shards, prep['b']
    cap, bag_cap, got_ids = self._blocks(prep, batch, worst)
    local, slot = self._owner_slots(got_ids, cap, bag_cap)
    rows = self._rows(table, local)  # [S * cap, W]
    if slot is not None:
      rows = jax.ops.segment_sum(rows, slot, num_segments=s * bag_cap)
    back = self.comm.all_to_all(rows[None])[0]  # [S * bag_cap, W]
    got = back.at[self._wanted(b, bag_cap)].get(mode='fill', fill_value=0)
    return pooling.bag_sums(got.reshape(batch, len(self.routing.cols), -1),
                            self.routing.widths)

  def lookup(self, table, ids):
    """Sends ids to their rows' owners, pools there, sums the partial bags.

    Args:
      table: `[C, W]` rows held here.
      ids: `[B_l, T]` packed ids of this device's examples.

    Returns:
      `[B_l, K, W]` float32, segments in the order of `segs`.
    """
    x = ids.shape[0]
    prep = self.prepare(ids)
    if prep['over'] is None:
      pooled = self._pool(table, prep, x, True)
    else:
      pooled = jax.lax.cond(
          overflow(self.comm, [prep['over']]),
          in_fallback_scope(lambda: self._pool(table, prep, x, True)),
          lambda: self._pool(table, prep, x, False))
    scale = self._bag_scale(prep['b']['valid2d'])
    return pooled if scale is None else pooled * scale[..., None]

  def grads_at(self, prep: dict, grads: jax.Array, worst: bool
               ) -> tuple[jax.Array, jax.Array]:
    """One branch of the update: the ids held here and their gradients.

    The pooled gradients of the partial bags go to their owners; the owner
    hands each id it received the gradient of its partial bag.
    `StackExchange.update` runs the whole update of the stack in the branch
    that `prepare`'s overflow flags choose, so the capacity branch
    deduplicates `S * cap` ids, not the worst case's.

    Args:
      prep: from `prepare`.
      grads: `[B_l, n_seg, G]` gradients of the pooled embeddings.
      worst: whether to use the worst-case blocks.

    Returns:
      `[S * cap]` local rows and their `[S * cap, G]` weighted gradients,
      `cap` the branch's ids per block. C means none.
    """
    s, x, g = self.num_shards, grads.shape[0], grads.shape[-1]
    b = prep['b']
    if not np.array_equal(self.seg_index, np.arange(grads.shape[1])):
      grads = jnp.take(grads, jnp.asarray(self.seg_index), axis=1)
    scale = self._bag_scale(b['valid2d'])
    if scale is not None:
      grads = grads * scale[..., None]
    if self.multi:
      grads = jnp.take(grads, jnp.asarray(self.routing.seg_of_col), axis=1)
    cap, bag_cap, got_ids = self._blocks(prep, x, worst)
    send = jnp.zeros((s * bag_cap, g), grads.dtype).at[
        self._wanted(b, bag_cap)].set(grads.reshape(-1, g), mode='drop',
                                      unique_indices=True)
    got = self.comm.all_to_all(send[None])[0]  # [S * bag_cap, G]
    local, slot = self._owner_slots(got_ids, cap, bag_cap)
    if slot is not None:
      got = got.at[slot].get(mode='fill', fill_value=0)
    return local, got

  def grads_here(self, ids, grads):
    """The ids held here and their gradients, by worst-case blocks.

    `StackExchange.update` uses `prepare` and `grads_at` instead, under the
    overflow `cond`; this is the same exchange without one.

    Args:
      ids: `[B_l, T]` packed ids of this device's examples.
      grads: `[B_l, n_seg, G]` gradients of the pooled embeddings.

    Returns:
      `[M]` local rows and their `[M, G]` weighted gradients. C means none.
    """
    return self.grads_at(self.prepare(ids), grads, True)

  def rows_to_reset(self, rows):
    """Sends the named rows to their owners, in worst-case blocks.

    Args:
      rows: `[B_l, T]` rows named like packed ids. -1 means none.

    Returns:
      `[M]` local rows. C means none.
    """
    _, _, worst, worst_bags = self.capacities(rows.shape[0])
    local, _ = self._owner_slots(self._send_ids(self._bucketize(rows), worst),
                                 worst, worst_bags)
    return jnp.minimum(local, self.stack.capacity)


def overflow(comm: Comm, flags: Sequence[jax.Array]) -> jax.Array:
  """Whether any device of the mesh overflows a bucketized block.

  The flag is summed over the whole mesh, not only the model group: the
  update's branch holds collectives over 'data' too (the replicas'
  combine), which must pair devices that take the same branch.

  Args:
    comm: the mesh's collectives.
    flags: this device's bool scalars, one per block kind.

  Returns:
    A bool scalar, the same on every device, so a `lax.cond` on it takes
    the same branch on all of them.
  """
  over = functools.reduce(jnp.logical_or, flags)
  return comm.psum(over.astype(jnp.int32), BATCH_AXES) > 0


def in_fallback_scope(fn):
  """`fn` traced in `FALLBACK_SCOPE`, named in its collectives' op_name."""
  def run():
    with jax.named_scope(FALLBACK_SCOPE):
      return fn()
  return run


def _running_count(hot: jax.Array, dest: jax.Array) -> jax.Array:
  """`[E]` place of each entry among those with its destination.

  Takes the `[E, S]` bool hits (entry e goes to shard d) and the `[E]`
  destinations; entries that are not hits get junk.
  """
  run = jnp.cumsum(hot, axis=0, dtype=jnp.int32)
  return jnp.take_along_axis(run, dest[:, None], axis=1)[:, 0] - 1


# The ways, in the order in which a stack's parts are combined. Owned comes
# before row-wise, the order of the concatenations in the compiled step.
EXCHANGES: tuple[type[SegmentExchange], ...] = (
    ReplicatedExchange, OwnedExchange, RowWiseExchange, BucketizedExchange)


def exchange_of(stack: plan_lib.Stack, seg: plan_lib.Segment,
                num_shards: int) -> type[SegmentExchange]:
  """The way a segment is served.

  Args:
    stack: the stack holding it.
    seg: the segment.
    num_shards: S.

  Returns:
    The one class of `EXCHANGES` that serves it.

  Raises:
    ValueError: if not exactly one serves it.
  """
  found = [c for c in EXCHANGES if c.serves(stack, seg, num_shards)]
  if len(found) != 1:
    raise ValueError(
        f'stack {stack.name!r}: segment of feature {seg.feature} is served'
        f' by {[c.kind for c in found]}; exactly one way must serve it.')
  return found[0]


def _concat(parts: Sequence[jax.Array], axis: int = 0) -> jax.Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


# ----------------------------------------------------------------------------
# One stack's exchange.


class StackExchange:
  """Lookup and update of one stack, per device (inside shard_map).

  Attributes:
    stack: the stack.
    parts: one `SegmentExchange` per way its segments are served, in the
      order of `EXCHANGES`.
    full_width: F, the width of the full-width gradients that `update`
      takes. 0 means none.
    tables: the table specs.
    comm: the mesh's collectives.
    num_shards: S, the model shards.
    n_seg: the number of the stack's segments.
    dims: the embedding dim of each segment's feature.

  Args:
    stack: the stack.
    feature_dims: the embedding dim of every feature.
    tables: the table specs. Their names seed stochastic rounding.
    num_columns: T, the packed id columns.
    comm: the mesh's collectives.

  Raises:
    ValueError: if the stack's parts disagree on where its rows are held.
      A stack is replicated or sharded as a whole.
  """

  def __init__(self, stack: plan_lib.Stack, feature_dims: Sequence[int],
               tables: Sequence[TableSpec], num_columns: int, comm: Comm):
    self.stack = stack
    self.tables = tuple(tables)
    self.comm = comm
    self.num_shards = comm.size(MODEL)
    self.n_seg = len(stack.segments)
    self.parts = self._parts(num_columns)
    self._order = [k for p in self.parts for k in p.segs]
    lead = self.parts[0]
    for p in self.parts[1:]:
      if (p.replicas, p.dense_sum, p.reset_gather) != (
          lead.replicas, lead.dense_sum, lead.reset_gather):
        raise ValueError(
            f'stack {stack.name!r} mixes the exchanges {lead.kind} and'
            f' {p.kind}, which hold rows on different devices.')
    self.dims = [feature_dims[g.feature] for g in stack.segments]
    # Row-wise Adagrad on column pieces needs each row's full-width gradient.
    self.full_width = (
        max(self.dims) if stack.optimizer.kind == 'rowwise_adagrad' and
        any(d != stack.width for d in self.dims) else 0)

  def _parts(self, num_columns: int) -> list[SegmentExchange]:
    """One `SegmentExchange` per way the segments need, `EXCHANGES` order."""
    by_way: dict[type[SegmentExchange], list[int]] = {}
    for k, seg in enumerate(self.stack.segments):
      by_way.setdefault(exchange_of(self.stack, seg, self.num_shards),
                        []).append(k)
    return [cls(self.stack, by_way[cls], num_columns, self.comm)
            for cls in EXCHANGES if cls in by_way]

  @property
  def owned(self) -> routing.Owned | None:
    """The all-to-all plan of the owned segments, or None without any."""
    for p in self.parts:
      if isinstance(p, OwnedExchange):
        return p.plan
    return None

  def _shard_index(self) -> jax.Array:
    return self.parts[0].shard_index()  # the same for every part

  def rows_to_reset(self, rows: jax.Array) -> jax.Array:
    """The rows to reset that this device holds.

    Args:
      rows: `[B_l, T]` rows named like packed ids on each device. -1 means
        none.

    Returns:
      `[M]` local rows held here that some device names. C means none. They
      are sent the way lookups send ids. Every replica of a shard gets the
      same rows.
    """
    idx = _concat([p.rows_to_reset(rows) for p in self.parts])
    return self.comm.all_gather(idx, self.parts[0].reset_gather)

  # --------------------------------------------------------------------------
  # Lookup.

  def lookup(self, table: jax.Array, ids: jax.Array) -> jax.Array:
    """The pooled embeddings of the stack's segments.

    Args:
      table: `[C, W]` rows held here.
      ids: `[B_l, T]` packed ids of this device's examples.

    Returns:
      `[B_l, n_seg, W]` float32, in the order of `stack.segments`.
    """
    out = _concat([p.lookup(table, ids) for p in self.parts], axis=1)
    if self._order != list(range(self.n_seg)):
      out = jnp.take(out, jnp.asarray(np.argsort(self._order)), axis=1)
    return out

  # --------------------------------------------------------------------------
  # Update.

  def _sgd_scatter_add(self) -> bool:
    """Whether the update may skip deduplication and scatter-add.

    Plain SGD is linear in the gradient. Where no other device must make the
    same update, a scatter-add sums repeated ids itself. Low-precision tables
    and SGD with weight decay take the path of dedup, float32 sum and one
    rounding. See `optimizers.scatter_add_ok`.
    """
    shared = self.comm.size(self.parts[0].replicas) > 1
    return optimizers.scatter_add_ok(self.stack.optimizer,
                                     self.stack.dtype) and not shared

  def _combine(self, idx: jax.Array, g: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Combines this device's `[M]` rows and `[M, G]` gradients over replicas.

    Returns the unique rows that every device holding them must update, and
    their summed gradients.
    """
    cap = self.stack.capacity
    comm = self.comm
    replicas = self.parts[0].replicas
    n = comm.size(replicas)
    # Per device, a ring all-reduce of the dense [C, G + 1] sums sends
    # 2 (n-1)/n C rows. An all-gather of the deduplicated pairs sends (n-1) U.
    if (self.parts[0].dense_sum and n > 1 and
        2 * cap <= n * min(idx.shape[0], cap + 1)):
      ones = jnp.ones((g.shape[0], 1), g.dtype)
      dense = jnp.zeros((cap, g.shape[1] + 1), g.dtype).at[idx].add(
          jnp.concatenate([g, ones], axis=1), mode='drop')
      dense = comm.psum(dense, replicas)
      uniq = jnp.where(dense[:, -1] > 0, jnp.arange(cap, dtype=jnp.int32),
                       cap)
      return uniq, dense[:, :-1]
    uniq, g_sum = dedup_sum(idx, g, cap)
    if n > 1:
      uniq, g_sum = dedup_sum(comm.all_gather(uniq, replicas),
                              comm.all_gather(g_sum, replicas), cap)
    return uniq, g_sum

  def _pieces_at(self, rows: jax.Array):
    """Finds the piece of each of `[U]` local rows.

    Returns this device's `initialization.piece_tables` and the `[U]` piece
    index of each row.
    """
    arrs = initialization.piece_tables(self.stack, self.tables,
                                       self.num_shards)
    piece = {k: jnp.asarray(v)[self._shard_index()] for k, v in arrs.items()}
    return piece, initialization.piece_at(piece, rows)

  def _row_dims(self, rows: jax.Array) -> jax.Array:
    """`[U]` local rows -> float32 dim of the table each belongs to."""
    piece, p = self._pieces_at(rows)
    return piece['dim'][p].astype(jnp.float32)

  def update(self, table: jax.Array, slots: dict[str, jax.Array],
             ids: jax.Array, grads: jax.Array, full_grads, lr: jax.Array,
             step: jax.Array):
    """One sparse optimizer step of the stack.

    Args:
      table: `[C, W]` rows held here.
      slots: their optimizer state.
      ids: `[B_l, T]` ids of this device's examples.
      grads: `[B_l, n_seg, W]` float32 gradients of the pooled embeddings.
      full_grads: `[B_l, n_seg, F]` full-width gradients, with F
        `self.full_width`. None when `self.full_width` is 0.
      lr: the learning rate.
      step: the 0-based step.

    Returns:
      The new table and slots.
    """
    if full_grads is not None:
      grads = jnp.concatenate([grads, full_grads], axis=-1)
    # The other parts' exchanges run before any cond: the compiler merges
    # their id sends with the lookup's.
    here = {k: p.prepare(ids) if isinstance(p, BucketizedExchange)
            else p.grads_here(ids, grads) for k, p in enumerate(self.parts)}
    flags = [h['over'] for h in here.values()
             if isinstance(h, dict) and h['over'] is not None]
    args = (table, slots, grads, full_grads is not None, lr, step, here)
    if not flags:
      return self._update(*args, worst=True)
    # Every bucketized part's blocks by capacity, or all by the worst case:
    # the whole update in the branch, so the capacity branch deduplicates
    # its own ids only.
    return jax.lax.cond(
        overflow(self.comm, flags),
        in_fallback_scope(lambda: self._update(*args, worst=True)),
        lambda: self._update(*args, worst=False))

  def _update(self, table, slots, grads, full: bool, lr, step, here: dict,
              worst: bool):
    """`update` with the bucketized parts at their capacity or worst case.

    Takes `update`'s arguments, the gradients already joined with the
    full-width ones (`full` says whether), and, by position in `parts`, the
    other parts' `grads_here` and the bucketized parts' `prepare`; `worst`
    picks the bucketized blocks. Returns the new table and slots.
    """
    w = self.stack.width
    idx, g = zip(*[p.grads_at(here[k], grads, worst)
                   if isinstance(p, BucketizedExchange) else here[k]
                   for k, p in enumerate(self.parts)])
    idx, g = _concat(idx), _concat(g)
    if self._sgd_scatter_add():
      return _sgd_store(table, idx, g, lr), slots
    uniq, g_sum = self._combine(idx, g)
    row_msq = None
    if full:
      wide = g_sum[:, w:]
      g_sum = g_sum[:, :w]
      row_msq = jnp.sum(wide * wide, axis=-1) / jnp.maximum(
          self._row_dims(uniq), 1.0)
    w_rows = _read_rows(table, uniq, self.stack.dtype)
    slot_rows = {k: gather_rows(v, uniq) for k, v in slots.items()}
    new_rows, new_slot_rows = optimizers.update_rows(
        self.stack.optimizer, lr, step, w_rows, g_sum,
        slot_rows, row_msq=row_msq)
    new_rows = self._to_storage(new_rows, uniq, step)
    return _store_rows(table, uniq, new_rows), {
        k: _store_rows(slots[k], uniq, v) for k, v in new_slot_rows.items()}

  def _to_storage(self, rows: jax.Array, uniq: jax.Array,
                  step: jax.Array) -> jax.Array:
    """Casts updated `[U, W]` float32 rows at local rows `uniq` to storage.

    bfloat16 and float16 tables are rounded stochastically. The bits hash the
    table, step, logical row and logical column. So every replica, plan and
    mesh draws the same bits for the same element. The rows are then kept as
    float16 carriers, by `rounding.to_storage`.
    """
    dtype = jnp.dtype(self.stack.dtype)
    if dtype == jnp.float32:
      return rows
    piece, p = self._pieces_at(uniq)
    t = piece['table'][p]
    row = piece['row_start'][p] + uniq - piece['offset'][p]
    col = piece['col_start'][p][:, None] + jnp.arange(
        self.stack.width)[None, :]
    seeds = jnp.asarray(np.array(
        [zlib.crc32(tb.name.encode()) for tb in self.tables], np.uint32))
    return rounding.to_storage(
        optimizers.cast_rows(self.stack.optimizer, rows, dtype, seeds[t],
                             row, step, col_ids=col), dtype)


def _store_rows(table: jax.Array, rows: jax.Array, new_rows: jax.Array
                ) -> jax.Array:
  """Writes `[U, ...]` `new_rows` at unique local `rows`.

  Rows >= the table's rows are dropped. Values are cast to the table's dtype.
  16-bit tables get rows already in their stored form, from
  `StackExchange._to_storage`. This is the one place where updated rows are
  written back.
  """
  return table.at[rows].set(new_rows.astype(table.dtype), mode='drop',
                            unique_indices=True)


def _sgd_store(table: jax.Array, rows: jax.Array, grads: jax.Array,
               lr: jax.Array) -> jax.Array:
  """Plain SGD by scatter-add.

  It takes `[M]` rows and `[M, W]` float32 gradients. Rows may repeat. Rows
  >= the table's rows are dropped.
  """
  lr = jnp.asarray(lr, jnp.float32)
  return table.at[rows].add((-lr * grads).astype(table.dtype), mode='drop')
