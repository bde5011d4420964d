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

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlrm_jax import schedules
from dlrm_jax.embedding import optimizers
from dlrm_jax.embedding import plan as plan_lib
from dlrm_jax.embedding import specs as specs_lib
from dlrm_jax.embedding.specs import FeatureSpec, TableSpec

DATA, MODEL = 'data', 'model'
BATCH_AXES = (DATA, MODEL)
EmbeddingState = dict[str, Any]  # {'stacks': {name: W}, 'slots': {name: {..}}}

_INIT_CHUNK_ROWS = 1 << 16


def _combiner_weights(valid: jax.Array, combiner: str) -> jax.Array:
  """`[X, L]` valid mask -> `[X, L]` float32 pooling weight of each id."""
  w = valid.astype(jnp.float32)
  if combiner == 'sum' or valid.shape[1] == 1:
    return w
  n = jnp.sum(w, axis=1, keepdims=True)
  if combiner == 'mean':
    return w / jnp.maximum(n, 1.0)
  return w * jax.lax.rsqrt(jnp.maximum(n, 1.0))  # sqrtn


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
    if stack.replicated:
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

  def _init_stack_local(self, stack, key: jax.Array) -> jax.Array:
    """This device's `[C, W]` rows of a stack."""
    arrs = self._piece_tables(stack)
    my = self._my_shard(stack)
    row = {k: jnp.asarray(v)[my] for k, v in arrs.items()}
    tables = self.tables
    kinds = np.array([specs_lib.INITIALIZERS.index(t.initializer)
                      for t in tables], np.int32)
    scales = np.array([t.scale for t in tables], np.float32)
    dims = sorted({self._by_name[pc.table].dim for pc in stack.pieces})
    width = stack.width

    def one_row(j):
      p = jnp.searchsorted(row['offset'], j, side='right') - 1
      p = jnp.maximum(p, 0)
      r = j - row['offset'][p]
      valid = (j >= row['offset'][p]) & (r < row['rows'][p])
      t = row['table'][p]
      k = jax.random.fold_in(jax.random.fold_in(key, t), row['row_start'][p] + r)
      out = jnp.zeros((width,), jnp.float32)
      for d in dims:  # static: the distinct full dims of tables in the stack
        u = jax.random.uniform(k, (d,), jnp.float32, minval=-1.0, maxval=1.0)
        piece = jax.lax.dynamic_slice(u, (row['col_start'][p],), (width,))
        out = jnp.where(row['dim'][p] == d, piece, out)
      kind = jnp.asarray(kinds)[t]
      scale = jnp.asarray(scales)[t]
      sqrt2 = np.float32(math.sqrt(2.0))
      trunc = np.float32(math.erf(2.0 / math.sqrt(2.0)))
      normal = sqrt2 * jax.scipy.special.erfinv(out * 0.999999)
      tnormal = sqrt2 * jax.scipy.special.erfinv(out * trunc)
      val = jnp.select(
          [kind == 0, kind == 1, kind == 2],
          [out, normal, tnormal], jnp.zeros_like(out)) * scale
      return jnp.where(valid, val, 0.0)

    rows = jnp.arange(stack.capacity, dtype=jnp.int32)
    values = jax.lax.map(one_row, rows, batch_size=_INIT_CHUNK_ROWS)
    return values.astype(jnp.dtype(stack.dtype))

  def init(self, key: jax.Array) -> EmbeddingState:
    """Initializes tables and optimizer state, each device making its own rows.

    A row's values depend only on (key, table, row), so every plan and mesh
    starts from the same logical tables.
    """
    specs = self.state_specs()

    def local(key):
      stacks, slots = {}, {}
      for s in self.stacks:
        stacks[s.name] = self._init_stack_local(s, key)
        slots[s.name] = {
            k: jnp.full(shape, value, jnp.float32)
            for k, (shape, value) in optimizers.slot_shapes(
                s.optimizer, s.capacity, s.width).items()}
      return {'stacks': stacks, 'slots': slots}

    fn = jax.shard_map(local, mesh=self.mesh, in_specs=P(), out_specs=specs)
    return jax.jit(fn, out_shardings=self.state_shardings())(key)

  # --------------------------------------------------------------------------
  # Routing.

  def _route(self, stack, seg, ids: jax.Array, my: jax.Array):
    """`[X, T]` ids -> (`[X, L]` local rows or C, `[X, L]` weights, valid)."""
    cols = ids[:, seg.id_offset:seg.id_offset + seg.max_ids]
    valid = (cols >= 0) & (cols < seg.num_rows)
    weights = _combiner_weights(valid, seg.combiner)
    safe = jnp.where(valid, cols, 0)
    if stack.replicated:
      local = seg.offsets[0] + safe
      mine = valid
    else:
      owner = seg.first_device + safe // seg.rows_per_shard
      offsets = jnp.asarray(np.array(seg.offsets, np.int32))
      mine = valid & (owner == my)
      local = offsets[my] + safe % seg.rows_per_shard
    local = jnp.where(mine, local, stack.capacity)
    return local, weights, valid

  @staticmethod
  def _pool(rows: jax.Array, widths: Sequence[int]) -> jax.Array:
    """`[X, L_total, W]` weighted rows -> `[X, n_segments, W]` bag sums."""
    if all(w == 1 for w in widths):
      return rows
    out, start = [], 0
    for w in widths:
      out.append(jnp.sum(rows[:, start:start + w], axis=1))
      start += w
    return jnp.stack(out, axis=1)

  # --------------------------------------------------------------------------
  # Lookup.

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
    stack_specs = self.state_specs()['stacks']
    n_feat = len(self.features)

    def local(stacks, ids):
      pieces = [[] for _ in range(n_feat)]
      ids_grp = None
      for s in self.stacks:
        if not s.segments:
          continue
        if s.replicated:
          src = ids
        else:
          if ids_grp is None:
            ids_grp = jax.lax.all_gather(ids, MODEL, axis=0, tiled=True)
          src = ids_grp
        my = self._my_shard(s)
        idx, wts = [], []
        for seg in s.segments:
          local_rows, w, _ = self._route(s, seg, src, my)
          idx.append(local_rows)
          wts.append(w)
        idx = jnp.concatenate(idx, axis=1)
        wts = jnp.concatenate(wts, axis=1)
        rows = stacks[s.name].at[idx].get(mode='fill', fill_value=0)
        rows = rows.astype(jnp.float32) * wts[..., None]
        pooled = self._pool(rows, [seg.max_ids for seg in s.segments])
        if not s.replicated:
          pooled = jax.lax.psum_scatter(
              pooled, MODEL, scatter_dimension=0, tiled=True)
        for k, seg in enumerate(s.segments):
          pieces[seg.feature].append((seg.col_start, pooled[:, k]))
      outs = []
      for f in range(n_feat):
        parts = [x for _, x in sorted(pieces[f], key=lambda t: t[0])]
        outs.append(parts[0] if len(parts) == 1 else
                    jnp.concatenate(parts, axis=-1))
      invalid = jnp.int32(0)
      for k, f in enumerate(self.features):
        start = sum(g.max_ids for g in self.features[:k])
        cols = ids[:, start:start + f.max_ids]
        rows_k = self._by_name[f.table].num_rows
        invalid += jnp.sum((cols != -1) & ((cols < 0) | (cols >= rows_k)))
      invalid = jax.lax.psum(invalid, BATCH_AXES)
      return tuple(outs), invalid

    fn = jax.shard_map(
        local, mesh=self.mesh,
        in_specs=(stack_specs, self.ids_spec()),
        out_specs=(tuple(P(BATCH_AXES, None) for _ in range(n_feat)), P()))
    return fn(stacks, ids)

  # --------------------------------------------------------------------------
  # Sparse update.

  def apply_gradients(
      self,
      state: EmbeddingState,
      ids: jax.Array,
      grads: Sequence[jax.Array],
      step: jax.Array,
  ) -> EmbeddingState:
    """Applies each table's sparse optimizer to the rows the batch touched.

    Args:
      state: the embedding state.
      ids: `[B, T]` packed ids of the batch, batch-sharded.
      grads: one `[B, D_k]` gradient per feature (of the loss with respect to
        the pooled embeddings returned by `lookup`), batch-sharded.
      step: the 0-based step (for the learning-rate schedules and Adam).

    Returns:
      The new state.
    """
    specs = self.state_specs()
    n_feat = len(self.features)
    lrs = {s.name: self._lr[s.name](step) for s in self.stacks}

    def local(state, ids, grads, lrs, step):
      ids_all = jax.lax.all_gather(ids, BATCH_AXES, axis=0, tiled=True,
                                   to='invarying')
      new_stacks, new_slots = {}, {}
      for s in self.stacks:
        table = state['stacks'][s.name]
        slots = state['slots'][s.name]
        if not s.segments:
          new_stacks[s.name], new_slots[s.name] = table, slots
          continue
        my = self._my_shard(s)
        g_seg = jnp.stack(
            [grads[seg.feature][:, seg.col_start:seg.col_start + s.width]
             for seg in s.segments], axis=1).astype(jnp.float32)
        g_all = jax.lax.all_gather(g_seg, BATCH_AXES, axis=0, tiled=True,
                                   to='invarying')
        idx, g_ids = [], []
        for k, seg in enumerate(s.segments):
          local_rows, w, _ = self._route(s, seg, ids_all, my)
          idx.append(local_rows.reshape(-1))
          g_ids.append((g_all[:, k, None, :] * w[..., None]).reshape(
              -1, s.width))
        idx = jnp.concatenate(idx)
        g_ids = jnp.concatenate(g_ids)
        m = idx.shape[0]
        uniq, inv = jnp.unique(idx, size=m, fill_value=s.capacity,
                               return_inverse=True)
        inv = inv.reshape(-1)
        g_sum = jax.ops.segment_sum(g_ids, inv, num_segments=m)
        row_msq = None
        if s.optimizer.kind == 'rowwise_adagrad' and any(
            self.feature_dims[seg.feature] != s.width for seg in s.segments):
          row_msq = self._full_row_msq(s, g_all, grads, ids_all, my, inv, m)
        w_rows = table.at[uniq].get(mode='fill', fill_value=0)
        slot_rows = {k: v.at[uniq].get(mode='fill', fill_value=0)
                     for k, v in slots.items()}
        new_rows, new_slot_rows = optimizers.update_rows(
            s.optimizer, lrs[s.name], step, w_rows.astype(jnp.float32), g_sum,
            slot_rows, row_msq=row_msq)
        new_stacks[s.name] = table.at[uniq].set(
            new_rows.astype(table.dtype), mode='drop')
        new_slots[s.name] = {
            k: slots[k].at[uniq].set(v, mode='drop')
            for k, v in new_slot_rows.items()}
      return {'stacks': new_stacks, 'slots': new_slots}

    grad_specs = tuple(P(BATCH_AXES, None) for _ in range(n_feat))
    fn = jax.shard_map(
        local, mesh=self.mesh,
        in_specs=(specs, self.ids_spec(), grad_specs,
                  {k: P() for k in lrs}, P()),
        out_specs=specs)
    return fn(state, ids, tuple(grads), lrs, step)

  def _full_row_msq(self, s, g_all, grads, ids_all, my, inv, m):
    """Row-wise Adagrad on column pieces: mean square over the full row.

    A column piece only sees its own columns, but the accumulator of a row is
    the mean over all of them; every device has the full-width pooled
    gradients, so it sums those per unique row instead.
    """
    del g_all
    d_max = max(self.feature_dims[seg.feature] for seg in s.segments)
    full, dims = [], []
    for seg in s.segments:
      g = jax.lax.all_gather(grads[seg.feature].astype(jnp.float32),
                             BATCH_AXES, axis=0, tiled=True, to='invarying')
      d = self.feature_dims[seg.feature]
      if d < d_max:
        g = jnp.pad(g, ((0, 0), (0, d_max - d)))
      _, w, _ = self._route(s, seg, ids_all, my)
      full.append((g[:, None, :] * w[..., None]).reshape(-1, d_max))
      dims.append(jnp.full((w.size,), d, jnp.float32))
    full = jax.ops.segment_sum(jnp.concatenate(full), inv, num_segments=m)
    dims = jax.ops.segment_max(jnp.concatenate(dims), inv, num_segments=m)
    return jnp.sum(full * full, axis=-1) / jnp.maximum(dims, 1.0)

  # --------------------------------------------------------------------------
  # Logical views (tests, export, checkpoint re-layout).

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
