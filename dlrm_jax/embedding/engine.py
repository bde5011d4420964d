"""The embedding engine: pooled lookups and sparse row updates over a mesh.

Shape letters: B global batch, B_l = B / (all devices) per-device batch,
T packed id columns (feature k takes `max_ids[k]` of them; -1 pads a bag),
S model shards, C a stack's rows per device, W a stack's width.

The mesh has axes ('data', 'model'). Batches are split over both axes (every
device is a data-parallel replica of the MLPs). Stacks are split over 'model'
and repeated over 'data' (replicated stacks are on every device).

Lookup, per stack, inside `jax.shard_map`:
  1. all-gather the ids of the model group (`[S * B_l, T]`),
  2. map each id to (owner shard, local row); gather the rows this device owns
     (others read as zero) and pool them per example,
  3. reduce-scatter over 'model', so each device gets the sums for its own
     `B_l` examples.
Update, per stack, also inside `jax.shard_map`:
  1. all-gather ids and the gradients of the pooled embeddings over every
     device (`[B, T]`, `[B, ..., W]`),
  2. expand the gradients to the ids (combiner weights), keep the ids this
     device owns, deduplicate them with a fixed-size `jnp.unique` and sum
     their gradients (`segment_sum`),
  3. gather those rows and their optimizer state, update, scatter back in
     place (state buffers are donated by the train step).
No device ever reads or writes rows it does not own, nothing is table-sized
but the tables and their optimizer state, and every replica of a stack makes
the same update.

Invalid ids (outside `[0, rows)`, other than the -1 padding) read as zero,
update nothing, and are counted, so the training loop can stop on them.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlrm_jax import schedules
from dlrm_jax.embedding import optimizers
from dlrm_jax.embedding import plan as plan_lib
from dlrm_jax.embedding import rounding
from dlrm_jax.embedding import specs as specs_lib
from dlrm_jax.embedding.specs import FeatureSpec, TableSpec

DATA, MODEL = 'data', 'model'
BATCH_AXES = (DATA, MODEL)
EmbeddingState = dict[str, Any]  # {'stacks': {name: W}, 'slots': {name: {..}}}

_INIT_CHUNK_ROWS = 1 << 16


def _hash_uniform(seed: jax.Array, row: jax.Array, col: jax.Array
                  ) -> jax.Array:
  """Uniform in [-1, 1) from uint32 (seed, row, col): 24 bits of
  `rounding.hash_bits` (two rounds of MurmurHash3's finalizer)."""
  z = rounding.hash_bits(seed, row, col)
  return (z >> 8).astype(jnp.float32) * np.float32(2.0**-23) - 1.0


def _combiner_weights(valid: jax.Array, combiner: str) -> jax.Array:
  """`[X, L]` valid mask -> `[X, L]` float32 pooling weight of each id."""
  w = valid.astype(jnp.float32)
  if combiner == 'sum' or valid.shape[1] == 1:
    return w
  n = jnp.sum(w, axis=1, keepdims=True)
  if combiner == 'mean':
    return w / jnp.maximum(n, 1.0)
  return w * jax.lax.rsqrt(jnp.maximum(n, 1.0))  # sqrtn


def _dedup(idx: jax.Array, fill: int) -> tuple[jax.Array, jax.Array]:
  """Fixed-size unique: `[M]` ids -> (`[M]` sorted unique ids padded with
  `fill`, `[M]` position of each id among them).

  Equivalent to `jnp.unique(idx, size=M, fill_value=fill,
  return_inverse=True)` for ids <= fill, but built from a plain sort and a
  binary search, which XLA runs several times faster on CPU than the
  two-operand sort behind `jnp.unique`'s inverse.
  """
  m = idx.shape[0]
  s = jnp.sort(idx)
  is_new = jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]])
  pos = jnp.cumsum(is_new) - 1
  uniq = jnp.full((m,), fill, idx.dtype).at[jnp.where(is_new, pos, m)].set(
      s, mode='drop', unique_indices=True)
  inv = jnp.searchsorted(uniq, idx, side='left', method='scan')
  return uniq, inv.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Routing:
  """Constants routing a stack's id columns (L of them) to its rows."""

  cols: np.ndarray        # [L] packed id column of each
  col_slice: tuple[int, int] | None  # the same, when a contiguous range
  seg_of_col: np.ndarray  # [L] segment of each
  num_rows: np.ndarray    # [L] rows of the table
  first: np.ndarray       # [L] first model shard of the table
  rps: np.ndarray         # [L] rows per shard
  offsets: np.ndarray     # [L, S'] local row offset of the piece per shard
  widths: tuple[int, ...]      # ids per example, per segment
  combiners: tuple[str, ...]   # per segment


class EmbeddingEngine:
  """Embedding tables of a model, laid out on a mesh by a sharding plan.

  Attributes:
    tables: the table specs.
    features: the feature specs, in the order of the packed id columns and of
      the lookup outputs.
    mesh: a mesh with axes ('data', 'model').
    plan: the sharding plan (one placement per table).
    stacks: the physical layout.
  """

  def __init__(
      self,
      tables: Sequence[TableSpec],
      features: Sequence[FeatureSpec],
      mesh: Mesh,
      plan: plan_lib.Plan | None = None,
  ):
    specs_lib.validate(tables, features)
    if tuple(mesh.axis_names) != BATCH_AXES:
      raise ValueError(
          f'the mesh axes must be {BATCH_AXES}, got {mesh.axis_names}.')
    self.tables = tuple(tables)
    self.features = tuple(features)
    self.mesh = mesh
    self.num_shards = int(mesh.shape[MODEL])
    self.num_devices = int(mesh.devices.size)
    if plan is None:
      plan = plan_lib.auto_plan(self.tables, self.num_shards)
    if plan.num_shards != self.num_shards:
      raise ValueError(
          f'the sharding plan is for {plan.num_shards} model shards but the'
          f' mesh has {self.num_shards}.')
    self.plan = plan
    self.stacks = plan_lib.build_layout(plan, self.tables, self.features)
    self._table_index = {t.name: i for i, t in enumerate(self.tables)}
    self._by_name = {t.name: t for t in self.tables}
    self.feature_dims = tuple(self._by_name[f.table].dim for f in self.features)
    self.num_id_columns = sum(f.max_ids for f in self.features)
    self._lr = {s.name: schedules.build(s.optimizer.schedule)
                for s in self.stacks}
    self._routings: dict[str, _Routing] = {}

  # --------------------------------------------------------------------------
  # Collectives. On one device there is nothing to exchange: the engine then
  # runs its per-device code directly, without `shard_map`, and collectives
  # over an axis of size 1 are skipped (XLA:CPU would still run them as
  # copies, a tenth of a single-device step).

  def _shard_map(self, fn, in_specs, out_specs):
    if self.num_devices == 1:
      return fn
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs,
                         out_specs=out_specs)

  def _axes_size(self, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([self.mesh.shape[a] for a in axes]))

  def _all_gather(self, x: jax.Array, axes, **kwargs) -> jax.Array:
    """Tiled all-gather along dim 0."""
    if self._axes_size(axes) == 1:
      return x
    return jax.lax.all_gather(x, axes, axis=0, tiled=True, **kwargs)

  def _psum_scatter(self, x: jax.Array, axes) -> jax.Array:
    """Tiled reduce-scatter along dim 0."""
    if self._axes_size(axes) == 1:
      return x
    return jax.lax.psum_scatter(x, axes, scatter_dimension=0, tiled=True)

  def _psum(self, x: jax.Array, axes) -> jax.Array:
    return x if self._axes_size(axes) == 1 else jax.lax.psum(x, axes)

  # --------------------------------------------------------------------------
  # Shardings.

  def _stack_spec(self, stack, ndim: int) -> P:
    if stack.replicated:
      return P()
    return P(MODEL, *([None] * (ndim - 1)))

  def _stack_shape(self, stack) -> tuple[int, int]:
    rows = stack.capacity if stack.replicated else (
        self.num_shards * stack.capacity)
    return (rows, stack.width)

  def state_specs(self) -> EmbeddingState:
    stacks, slots = {}, {}
    for s in self.stacks:
      stacks[s.name] = self._stack_spec(s, 2)
      slots[s.name] = {
          k: self._stack_spec(s, len(shape))
          for k, (shape, _) in optimizers.slot_shapes(
              s.optimizer, 1, s.width).items()}
    return {'stacks': stacks, 'slots': slots}

  def state_shardings(self) -> EmbeddingState:
    return jax.tree.map(lambda p: NamedSharding(self.mesh, p),
                        self.state_specs(),
                        is_leaf=lambda x: isinstance(x, P))

  def abstract_state(self) -> EmbeddingState:
    """ShapeDtypeStructs (with shardings) of the state, allocating nothing."""
    stacks, slots = {}, {}
    for s in self.stacks:
      rows, width = self._stack_shape(s)
      spec = self._stack_spec(s, 2)
      stacks[s.name] = jax.ShapeDtypeStruct(
          (rows, width), jnp.dtype(s.dtype),
          sharding=NamedSharding(self.mesh, spec))
      slots[s.name] = {
          k: jax.ShapeDtypeStruct(
              shape, jnp.float32,
              sharding=NamedSharding(self.mesh,
                                     self._stack_spec(s, len(shape))))
          for k, (shape, _) in optimizers.slot_shapes(
              s.optimizer, rows, width).items()}
    return {'stacks': stacks, 'slots': slots}

  def ids_spec(self) -> P:
    return P(BATCH_AXES, None)

  def state_bytes_per_device(self) -> int:
    total = 0
    for leaf in jax.tree.leaves(self.abstract_state()):
      n = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
      total += n if leaf.sharding.spec == P() else n // self.num_shards
    return total

  # --------------------------------------------------------------------------
  # Initialization.

  def _my_shard(self, stack) -> jax.Array:
    if stack.replicated or self.num_shards == 1:
      return jnp.int32(0)
    return jax.lax.axis_index(MODEL)

  def _piece_tables(self, stack):
    """Per-device piece arrays `[S', P]` (S' = 1 when replicated)."""
    n_dev = 1 if stack.replicated else self.num_shards
    per_dev = [[] for _ in range(n_dev)]
    for pc in stack.pieces:
      per_dev[max(pc.device, 0)].append(pc)
    n = max(1, max(len(p) for p in per_dev))
    big = np.iinfo(np.int32).max
    arrs = {k: np.zeros((n_dev, n), np.int32) for k in (
        'offset', 'rows', 'row_start', 'col_start', 'table', 'dim')}
    arrs['offset'][:] = big
    for d, pcs in enumerate(per_dev):
      for j, pc in enumerate(sorted(pcs, key=lambda pc: pc.offset)):
        arrs['offset'][d, j] = pc.offset
        arrs['rows'][d, j] = pc.rows
        arrs['row_start'][d, j] = pc.row_start
        arrs['col_start'][d, j] = pc.col_start
        arrs['table'][d, j] = self._table_index[pc.table]
        arrs['dim'][d, j] = self._by_name[pc.table].dim
    return arrs

  def _init_stack_local(self, stack, seeds: jax.Array) -> jax.Array:
    """This device's `[C, W]` rows of a stack.

    Element (table t, row r, column c) is a counter-based hash of (seed of t,
    r, c) turned into a uniform in [-1, 1), then into the table's
    distribution: it does not depend on where the element is stored. Rows are
    filled in chunks, in place, so nothing table-sized is allocated twice.
    """
    arrs = self._piece_tables(stack)
    my = self._my_shard(stack)
    piece = {k: jnp.asarray(v)[my] for k, v in arrs.items()}
    kinds = jnp.asarray(np.array(
        [specs_lib.INITIALIZERS.index(t.initializer) for t in self.tables],
        np.int32))
    scales = jnp.asarray(np.array([t.scale for t in self.tables], np.float32))
    width, dtype = stack.width, jnp.dtype(stack.dtype)
    sqrt2 = np.float32(math.sqrt(2.0))
    trunc = np.float32(math.erf(2.0 / math.sqrt(2.0)))

    def rows_values(j):  # [n] local rows -> [n, W]
      p = jnp.maximum(jnp.searchsorted(piece['offset'], j, side='right') - 1,
                      0)
      r = j - piece['offset'][p]
      valid = (j >= piece['offset'][p]) & (r < piece['rows'][p])
      t = piece['table'][p]
      row = (piece['row_start'][p] + r).astype(jnp.uint32)
      col = (piece['col_start'][p][:, None] +
             jnp.arange(width, dtype=jnp.int32)[None, :]).astype(jnp.uint32)
      u = _hash_uniform(seeds[t][:, None], row[:, None], col)
      kind = kinds[t][:, None]
      normal = sqrt2 * jax.scipy.special.erfinv(u * 0.999999)
      tnormal = sqrt2 * jax.scipy.special.erfinv(u * trunc)
      val = jnp.select([kind == 0, kind == 1, kind == 2], [u, normal, tnormal],
                       jnp.zeros_like(u)) * scales[t][:, None]
      return jnp.where(valid[:, None], val, 0.0).astype(dtype)

    cap = stack.capacity
    chunk = min(_INIT_CHUNK_ROWS, cap)
    n_full = cap // chunk

    def body(i, buf):
      j = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
      return jax.lax.dynamic_update_slice(buf, rows_values(j), (i * chunk, 0))

    buf = jnp.zeros((cap, width), dtype)
    if not stack.replicated and self.num_devices > 1:  # rows differ per shard
      buf = jax.lax.pcast(buf, (MODEL,), to='varying')
    buf = jax.lax.fori_loop(0, n_full, body, buf)
    if cap % chunk:
      j = n_full * chunk + jnp.arange(cap % chunk, dtype=jnp.int32)
      buf = jax.lax.dynamic_update_slice(buf, rows_values(j),
                                         (n_full * chunk, 0))
    return buf

  def init(self, key: jax.Array) -> EmbeddingState:
    """Initializes tables and optimizer state, each device making its own rows.

    A value depends only on (key, table, row, column), so every plan and mesh
    starts from the same logical tables.
    """
    specs = self.state_specs()

    def local(key):
      seeds = jax.vmap(lambda t: jax.random.bits(
          jax.random.fold_in(key, t), (), jnp.uint32))(
              jnp.arange(len(self.tables)))
      stacks, slots = {}, {}
      for s in self.stacks:
        stacks[s.name] = self._init_stack_local(s, seeds)
        slots[s.name] = {
            k: jnp.full(shape, value, jnp.float32)
            for k, (shape, value) in optimizers.slot_shapes(
                s.optimizer, s.capacity, s.width).items()}
      return {'stacks': stacks, 'slots': slots}

    fn = self._shard_map(local, in_specs=P(), out_specs=specs)
    return jax.jit(fn, out_shardings=self.state_shardings())(key)

  # --------------------------------------------------------------------------
  # Routing.

  def _routing(self, stack) -> _Routing:
    """Per id-column constants of a stack (cached)."""
    r = self._routings.get(stack.name)
    if r is not None:
      return r
    cols, seg_of_col, rows, first, rps, offsets = [], [], [], [], [], []
    for k, seg in enumerate(stack.segments):
      for j in range(seg.max_ids):
        cols.append(seg.id_offset + j)
        seg_of_col.append(k)
        rows.append(seg.num_rows)
        first.append(seg.first_device)
        rps.append(seg.rows_per_shard)
        offsets.append(seg.offsets)
    cols = np.array(cols, np.int32)
    contiguous = (len(cols) > 0 and
                  np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))))
    r = _Routing(
        cols=cols,
        col_slice=(int(cols[0]), int(cols[0]) + len(cols)) if contiguous
        else None,
        seg_of_col=np.array(seg_of_col, np.int32),
        num_rows=np.array(rows, np.int32),
        first=np.array(first, np.int32),
        rps=np.array(rps, np.int32),
        offsets=np.array(offsets, np.int32),
        widths=tuple(seg.max_ids for seg in stack.segments),
        combiners=tuple(seg.combiner for seg in stack.segments))
    self._routings[stack.name] = r
    return r

  def _route(self, stack, ids: jax.Array, my: jax.Array):
    """`[X, T]` packed ids -> (`[X, L]` local rows, C where not owned or
    invalid; `[X, L]` float32 pooling weights), L the stack's id columns."""
    r = self._routing(stack)
    if r.col_slice is not None:
      cols = ids[:, r.col_slice[0]:r.col_slice[1]]
    else:
      cols = jnp.take(ids, jnp.asarray(r.cols), axis=1)
    valid = (cols >= 0) & (cols < r.num_rows)
    safe = jnp.where(valid, cols, 0)
    if stack.replicated:
      local = r.offsets[:, 0] + safe
      mine = valid
    else:
      off = jnp.take(jnp.asarray(r.offsets), my, axis=1)
      if np.all(r.rps >= r.num_rows):  # no row-wise pieces
        owner_ok = (r.first == my) & (off >= 0)
        mine = valid & owner_ok
        local = off + safe
      else:
        mine = valid & (r.first + safe // r.rps == my) & (off >= 0)
        local = off + safe % r.rps
    local = jnp.where(mine, local, stack.capacity)
    weights = valid.astype(jnp.float32)
    if any(w > 1 and c != 'sum' for w, c in zip(r.widths, r.combiners)):
      parts, start = [], 0
      for w, c in zip(r.widths, r.combiners):
        piece = weights[:, start:start + w]
        parts.append(_combiner_weights(piece > 0, c) if w > 1 else piece)
        start += w
      weights = jnp.concatenate(parts, axis=1)
    return local, weights

  @staticmethod
  def _pool(rows: jax.Array, widths: Sequence[int]) -> jax.Array:
    """`[X, L, W]` weighted rows -> `[X, n_segments, W]` bag sums."""
    if all(w == 1 for w in widths):
      return rows
    out, start = [], 0
    for w in widths:
      out.append(jnp.sum(rows[:, start:start + w], axis=1))
      start += w
    return jnp.stack(out, axis=1)

  def _invalid_count(self, ids: jax.Array) -> jax.Array:
    rows = np.concatenate([
        np.full(f.max_ids, self._by_name[f.table].num_rows, np.int32)
        for f in self.features])
    return jnp.sum((ids != -1) & ((ids < 0) | (ids >= rows))).astype(
        jnp.int32)

  # --------------------------------------------------------------------------
  # Lookup.

  def _lookup_local(self, stacks, ids):
    """Inside shard_map: [(stack, `[B_l, n_segments, W]` pooled)]."""
    out = []
    ids_grp = None
    for s in self.stacks:
      if not s.segments:
        continue
      if s.replicated:
        src = ids
      else:
        if ids_grp is None:
          ids_grp = self._all_gather(ids, MODEL)
        src = ids_grp
      idx, wts = self._route(s, src, self._my_shard(s))
      rows = stacks[s.name].at[idx].get(mode='fill', fill_value=0)
      rows = rows.astype(jnp.float32)
      widths = self._routing(s).widths
      if any(w > 1 for w in widths):
        # Invalid and padding ids read as zero already, so single ids need
        # no weights; bags do (mean, sqrtn).
        rows = rows * wts[..., None]
      pooled = self._pool(rows, widths)
      if not s.replicated:
        pooled = self._psum_scatter(pooled, MODEL)
      out.append((s, pooled))
    return out

  def _whole_feature_stacks(self) -> bool:
    """True when every feature lives whole (all columns) in one stack."""
    return all(seg.col_start == 0 and s.width == self.feature_dims[seg.feature]
               for s in self.stacks for seg in s.segments)

  def lookup(self, stacks: dict[str, jax.Array], ids: jax.Array
             ) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Pooled embeddings of every feature.

    Args:
      stacks: the state's 'stacks'.
      ids: `[B, T]` int32 packed ids, batch-sharded.

    Returns:
      (one `[B, D_k]` float32 array per feature, batch-sharded; the number of
      invalid ids in the batch, a scalar).
    """
    n_feat = len(self.features)

    def local(stacks, ids):
      pieces = [[] for _ in range(n_feat)]
      for s, pooled in self._lookup_local(stacks, ids):
        for k, seg in enumerate(s.segments):
          pieces[seg.feature].append((seg.col_start, pooled[:, k]))
      outs = []
      for f in range(n_feat):
        parts = [x for _, x in sorted(pieces[f], key=lambda t: t[0])]
        outs.append(parts[0] if len(parts) == 1 else
                    jnp.concatenate(parts, axis=-1))
      invalid = self._psum(self._invalid_count(ids), BATCH_AXES)
      return tuple(outs), invalid

    fn = self._shard_map(
        local,
        in_specs=(self.state_specs()['stacks'], self.ids_spec()),
        out_specs=(tuple(P(BATCH_AXES, None) for _ in range(n_feat)), P()))
    return fn(stacks, ids)

  def lookup_stacked(self, stacks: dict[str, jax.Array], ids: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """Like `lookup`, as one `[B, N, D]` array (all features of dim D)."""
    dims = set(self.feature_dims)
    if len(dims) != 1:
      raise ValueError(
          f'lookup_stacked needs one embedding dim, got {sorted(dims)}.')
    if not self._whole_feature_stacks():
      embs, invalid = self.lookup(stacks, ids)
      return jnp.stack(embs, axis=1), invalid
    order = [seg.feature for s in self.stacks for seg in s.segments]
    perm = np.argsort(order)
    identity = np.array_equal(perm, np.arange(len(order)))

    def local(stacks, ids):
      parts = [pooled for _, pooled in self._lookup_local(stacks, ids)]
      out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
      if not identity:
        out = jnp.take(out, jnp.asarray(perm), axis=1)
      invalid = self._psum(self._invalid_count(ids), BATCH_AXES)
      return out, invalid

    fn = self._shard_map(
        local,
        in_specs=(self.state_specs()['stacks'], self.ids_spec()),
        out_specs=(P(BATCH_AXES, None, None), P()))
    return fn(stacks, ids)

  def _each_stack(self, state: EmbeddingState, fn) -> EmbeddingState:
    """`fn(stack, table, slots) -> (table, slots)` over the stacks that
    features read (inside shard_map); the others pass through."""
    new_stacks, new_slots = {}, {}
    for s in self.stacks:
      table, slots = state['stacks'][s.name], state['slots'][s.name]
      if s.segments:
        table, slots = fn(s, table, slots)
      new_stacks[s.name], new_slots[s.name] = table, slots
    return {'stacks': new_stacks, 'slots': new_slots}

  # --------------------------------------------------------------------------
  # Row resets (managed collisions).

  def reset_rows(self, state: EmbeddingState, rows: jax.Array
                 ) -> EmbeddingState:
    """Zeroes rows and restores their optimizer state to its initial value.

    Args:
      state: the embedding state.
      rows: `[B, T]` int32, laid out like packed ids (a feature's columns
        name rows of its table), -1 where nothing is reset; batch-sharded.
        Used when a managed-collision remapper gives a row to a new id.

    Returns:
      The new state.
    """
    specs = self.state_specs()

    def local(state, rows):
      rows_all = self._all_gather(rows, BATCH_AXES, to='invarying')

      def reset(s, table, slots):
        idx, _ = self._route(s, rows_all, self._my_shard(s))
        idx = idx.reshape(-1)
        init = optimizers.slot_shapes(s.optimizer, 1, s.width)
        return table.at[idx].set(
            jnp.zeros((idx.shape[0], s.width), table.dtype), mode='drop'), {
                k: v.at[idx].set(jnp.full((idx.shape[0],) + v.shape[1:],
                                          init[k][1], v.dtype), mode='drop')
                for k, v in slots.items()}

      return self._each_stack(state, reset)

    fn = self._shard_map(local, in_specs=(specs, self.ids_spec()),
                         out_specs=specs)
    return fn(state, rows)

  # --------------------------------------------------------------------------
  # Sparse update.

  def apply_gradients(
      self,
      state: EmbeddingState,
      ids: jax.Array,
      grads: Sequence[jax.Array] | jax.Array,
      step: jax.Array,
  ) -> EmbeddingState:
    """Applies each table's sparse optimizer to the rows the batch touched.

    Args:
      state: the embedding state.
      ids: `[B, T]` packed ids of the batch, batch-sharded.
      grads: the gradient of the loss with respect to the pooled embeddings
        returned by `lookup` (one `[B, D_k]` array per feature) or by
        `lookup_stacked` (one `[B, N, D]` array), batch-sharded.
      step: the 0-based step (for the learning-rate schedules and Adam).

    Returns:
      The new state.
    """
    specs = self.state_specs()
    n_feat = len(self.features)
    stacked = not isinstance(grads, (tuple, list))
    lrs = {s.name: self._lr[s.name](step) for s in self.stacks}

    def stack_grads(s, grads):
      """`[B_l, n_segments, W]` gradients of a stack's segments."""
      feats = [seg.feature for seg in s.segments]
      whole = all(seg.col_start == 0 and s.width == self.feature_dims[f]
                  for seg, f in zip(s.segments, feats))
      if stacked and whole:
        if feats == list(range(feats[0], feats[0] + len(feats))):
          return grads[:, feats[0]:feats[0] + len(feats)]
        return jnp.take(grads, jnp.asarray(feats), axis=1)
      per = (lambda f: grads[:, f]) if stacked else (lambda f: grads[f])
      return jnp.stack(
          [per(seg.feature)[:, seg.col_start:seg.col_start + s.width]
           for seg in s.segments], axis=1)

    def local(state, ids, grads, lrs, step):
      ids_all = self._all_gather(ids, BATCH_AXES, to='invarying')

      def update(s, table, slots):
        my = self._my_shard(s)
        r = self._routing(s)
        g_seg = stack_grads(s, grads).astype(jnp.float32)
        g_all = self._all_gather(g_seg, BATCH_AXES, to='invarying')
        idx, w = self._route(s, ids_all, my)
        if r.widths != (1,) * len(s.segments):
          g_all = jnp.take(g_all, jnp.asarray(r.seg_of_col), axis=1)
          g_all = g_all * w[..., None]
        # (Single ids need no weights: invalid ones are routed nowhere.)
        g_ids = g_all.reshape(-1, s.width)
        idx = idx.reshape(-1)
        m = idx.shape[0]
        if optimizers.scatter_add_ok(s.optimizer, table.dtype):
          # Plain SGD on float32 is linear in the gradient: a scatter-add sums
          # repeated ids itself, no deduplication needed. (Low-precision
          # tables dedup, sum in float32 and round once, below.)
          lr = jnp.asarray(lrs[s.name], jnp.float32)
          return table.at[idx].add((-lr * g_ids).astype(table.dtype),
                                   mode='drop'), slots
        uniq, inv = _dedup(idx, s.capacity)
        g_sum = jax.ops.segment_sum(g_ids, inv, num_segments=m)
        row_msq = None
        if s.optimizer.kind == 'rowwise_adagrad' and any(
            self.feature_dims[seg.feature] != s.width for seg in s.segments):
          row_msq = self._full_row_msq(s, grads, stacked, ids_all, my, inv, m)
        w_rows = table.at[uniq].get(mode='fill', fill_value=0)
        slot_rows = {k: v.at[uniq].get(mode='fill', fill_value=0)
                     for k, v in slots.items()}
        new_rows, new_slot_rows = optimizers.update_rows(
            s.optimizer, lrs[s.name], step, w_rows.astype(jnp.float32), g_sum,
            slot_rows, row_msq=row_msq)
        new_rows = self._rows_to_table_dtype(s, new_rows, table.dtype, uniq,
                                             my, step)
        return rounding.set_rows(table, uniq, new_rows), {
                k: slots[k].at[uniq].set(v, mode='drop', unique_indices=True)
                for k, v in new_slot_rows.items()}

      return self._each_stack(state, update)

    grad_specs = P(BATCH_AXES, None, None) if stacked else tuple(
        P(BATCH_AXES, None) for _ in range(n_feat))
    fn = self._shard_map(
        local,
        in_specs=(specs, self.ids_spec(), grad_specs,
                  {k: P() for k in lrs}, P()),
        out_specs=specs)
    return fn(state, ids, grads if stacked else tuple(grads), lrs, step)

  def _rows_to_table_dtype(self, s, rows, dtype, uniq, my, step):
    """Updated `[U, W]` float32 rows of stack `s` (local rows `uniq`) in the
    table dtype: stochastic rounding for bfloat16/float16 tables, hashed on
    (table, step, logical row, logical column), so every replica, plan and
    mesh draws the same bits for the same element."""
    if jnp.dtype(dtype) == jnp.float32:
      return rows
    piece = {k: jnp.asarray(v)[my] for k, v in self._piece_tables(s).items()}
    p = jnp.maximum(jnp.searchsorted(piece['offset'], uniq, side='right') - 1,
                    0)
    t = piece['table'][p]
    row = piece['row_start'][p] + uniq - piece['offset'][p]
    col = piece['col_start'][p][:, None] + jnp.arange(s.width)[None, :]
    seeds = jnp.asarray(np.array(
        [zlib.crc32(tb.name.encode()) for tb in self.tables], np.uint32))
    return optimizers.cast_rows(s.optimizer, rows, dtype, seeds[t], row, step,
                                col_ids=col)

  def _full_row_msq(self, s, grads, stacked, ids_all, my, inv, m):
    """Row-wise Adagrad on column pieces: mean square over the full row.

    A column piece only sees its own columns, but the accumulator of a row is
    the mean over all of them; every device has the full-width pooled
    gradients, so it sums those per unique row instead.
    """
    r = self._routing(s)
    d_max = max(self.feature_dims[seg.feature] for seg in s.segments)
    full = []
    for seg in s.segments:
      g = grads[:, seg.feature] if stacked else grads[seg.feature]
      g = self._all_gather(g.astype(jnp.float32), BATCH_AXES,
                           to='invarying')
      d = self.feature_dims[seg.feature]
      full.append(jnp.pad(g, ((0, 0), (0, d_max - d))) if d < d_max else g)
    full = jnp.stack(full, axis=1)  # [B, n_segments, d_max]
    _, w = self._route(s, ids_all, my)
    full = jnp.take(full, jnp.asarray(r.seg_of_col), axis=1) * w[..., None]
    dims = np.array([self.feature_dims[s.segments[k].feature]
                     for k in r.seg_of_col], np.float32)
    dims = jnp.broadcast_to(jnp.asarray(dims), w.shape).reshape(-1)
    full = jax.ops.segment_sum(full.reshape(-1, d_max), inv, num_segments=m)
    dims = jax.ops.segment_max(dims, inv, num_segments=m)
    return jnp.sum(full * full, axis=-1) / jnp.maximum(dims, 1.0)

  # --------------------------------------------------------------------------
  # Checkpoints written under another plan or mesh.

  def abstract_state_of_layout(self, stacks: Sequence[plan_lib.Stack],
                               num_shards: int) -> EmbeddingState:
    """ShapeDtypeStructs of a state laid out as `stacks` over `num_shards`
    shards, placed on this engine's mesh (rows split over every device where
    they divide evenly, else replicated), for restoring a checkpoint that was
    written under another plan."""
    n = self.num_devices

    def struct(shape, dtype):
      spec = P(BATCH_AXES, *([None] * (len(shape) - 1))) if (
          shape[0] % n == 0) else P()
      return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype),
                                  sharding=NamedSharding(self.mesh, spec))

    out = {'stacks': {}, 'slots': {}}
    for s in stacks:
      rows = s.capacity if s.replicated else num_shards * s.capacity
      out['stacks'][s.name] = struct((rows, s.width), s.dtype)
      out['slots'][s.name] = {
          k: struct(shape, jnp.float32)
          for k, (shape, _) in optimizers.slot_shapes(
              s.optimizer, rows, s.width).items()}
    return out

  def relayout(self, old_stacks: Sequence[plan_lib.Stack],
               old_state: EmbeddingState) -> EmbeddingState:
    """Moves tables and optimizer state from another layout into this one.

    Every overlap of an old piece and a new piece of the same table (rows and
    columns) is copied with static slices, so the compiler moves only those
    blocks between devices. Used when a checkpoint written on one mesh or plan
    is restored on another.
    """
    old_by_table: dict[str, list[tuple[plan_lib.Stack, plan_lib.Piece]]] = {}
    for s in old_stacks:
      for pc in s.pieces:
        old_by_table.setdefault(pc.table, []).append((s, pc))

    def base(stack, pc):
      return pc.offset + (0 if stack.replicated else pc.device * stack.capacity)

    def move(old_state):
      new_stacks, new_slots = {}, {}
      for s in self.stacks:
        rows, width = self._stack_shape(s)
        table = jnp.zeros((rows, width), jnp.dtype(s.dtype))
        slot_shapes = optimizers.slot_shapes(s.optimizer, rows, width)
        slots = {k: jnp.full(shape, v, jnp.float32)
                 for k, (shape, v) in slot_shapes.items()}
        for pc in s.pieces:
          for os_, opc in old_by_table.get(pc.table, ()):
            r0 = max(pc.row_start, opc.row_start)
            r1 = min(pc.row_start + pc.rows, opc.row_start + opc.rows)
            c0 = max(pc.col_start, opc.col_start)
            c1 = min(pc.col_start + pc.width, opc.col_start + opc.width)
            if r0 >= r1 or c0 >= c1:
              continue
            dst = base(s, pc) + r0 - pc.row_start
            src = base(os_, opc) + r0 - opc.row_start
            n = r1 - r0
            block = old_state['stacks'][os_.name][
                src:src + n, c0 - opc.col_start:c1 - opc.col_start]
            table = table.at[dst:dst + n,
                             c0 - pc.col_start:c1 - pc.col_start].set(
                                 block.astype(table.dtype))
            for k in slots:
              old = old_state['slots'][os_.name][k]
              if old.ndim == 1:
                slots[k] = slots[k].at[dst:dst + n].set(old[src:src + n])
              else:
                slots[k] = slots[k].at[
                    dst:dst + n, c0 - pc.col_start:c1 - pc.col_start].set(
                        old[src:src + n, c0 - opc.col_start:c1 - opc.col_start])
        new_stacks[s.name], new_slots[s.name] = table, slots
      return {'stacks': new_stacks, 'slots': new_slots}

    return jax.jit(move, out_shardings=self.state_shardings())(old_state)

  # --------------------------------------------------------------------------
  # Logical views (tests, export).

  def gather_table(self, state: EmbeddingState, name: str,
                   slot: str | None = None) -> np.ndarray:
    """The whole logical `[R, D]` table (or a slot of it) on the host.

    For tests and small tables only: it copies the table to host memory.
    """
    t = self._by_name[name]
    out = None
    for s in self.stacks:
      arr = state['stacks'][s.name] if slot is None else state['slots'][
          s.name][slot]
      arr = np.asarray(jax.device_get(arr))
      for pc in s.pieces:
        if pc.table != name:
          continue
        if out is None:
          tail = (t.dim,) if arr.ndim == 2 else ()
          out = np.zeros((t.num_rows,) + tail, arr.dtype)
        base = 0 if s.replicated else pc.device * s.capacity
        block = arr[base + pc.offset: base + pc.offset + pc.rows]
        if arr.ndim == 2:
          out[pc.row_start:pc.row_start + pc.rows,
              pc.col_start:pc.col_start + pc.width] = block
        else:  # row-wise slot: identical across column pieces
          out[pc.row_start:pc.row_start + pc.rows] = block
    return out
