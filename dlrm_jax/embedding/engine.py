"""The embedding engine: pooled lookups and sparse row updates over a mesh.

Shape letters: B global batch, B_l = B / (all devices) per-device batch,
T packed id columns (feature k takes `max_ids[k]` of them; -1 pads a bag),
S model shards, C a stack's rows per device, W a stack's width.

The mesh has axes ('data', 'model') (`dlrm_jax.parallel`). Batches are split
over both axes (every device is a data-parallel replica of the MLPs). Stacks
are split over 'model' and repeated over 'data' (replicated stacks are on
every device).

Models reach the engine through `lookup.sparse_lookup`, a custom_vjp whose
backward pass is `apply_gradients`, and the Flax modules built on it
(`dlrm_jax.models.embed.SparseEmbed`, linen and NNX).

The engine holds the layout and the shardings and runs each stack's
exchange (`exchange.StackExchange`, which combines one `SegmentExchange` per
way its segments are served: `OwnedExchange`, all-to-all for table-wise,
column-wise and table-row-wise pieces; `RowWiseExchange`, all-gather /
reduce-scatter for row-wise ones; `BucketizedExchange`, all-to-all of each
row-split id to the shard of its row, in capacity blocks with a worst-case
fallback, for the row-wise and table-row-wise pieces the planner routes so;
`ReplicatedExchange`, local lookups for replicated stacks) inside one
`jax.shard_map`. Initialization is in
`initialization.py`, moving state between layouts in `relayout.py`, reading
and writing whole logical tables in `table_access.py`. No device ever reads
or writes rows it does not own, nothing is table-sized but the tables and
their optimizer state, and every replica of a stack makes the same update.

Invalid ids (outside `[0, rows)`, other than the -1 padding) read as zero,
update nothing, and are counted, so the training loop can stop on them.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlrm_jax.train import schedules
from dlrm_jax.embedding.sharding import exchange
from dlrm_jax.embedding import initialization
from dlrm_jax.embedding import optimizers
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding.sharding import relayout as relayout_lib
from dlrm_jax.embedding import rounding
from dlrm_jax.embedding import specs as specs_lib
from dlrm_jax.embedding.sharding.relayout import EmbeddingState
from dlrm_jax.embedding.specs import FeatureSpec, TableSpec
from dlrm_jax.parallel import BATCH_AXES, MODEL


class EmbeddingEngine:
  """Embedding tables of a model, laid out on a mesh by a sharding plan.

  Args:
    tables: the table specs.
    features: the feature specs, in the order of the packed id columns.
    mesh: a mesh with axes ('data', 'model').
    plan: the sharding plan. None takes `planner.auto_plan`.

  Attributes:
    tables: the table specs.
    features: the feature specs, in the order of the packed id columns and of
      the lookup outputs.
    mesh: a mesh with axes ('data', 'model').
    num_shards: S, the size of the 'model' axis.
    num_devices: the number of devices of the mesh.
    plan: the sharding plan, with one placement per table.
    stacks: the physical layout.
    feature_dims: the embedding dim of each feature.
    num_id_columns: T, the packed id columns of a batch.
    comm: the collectives over the mesh.
    exchanges: the `exchange.StackExchange` of each stack that features read.

  Raises:
    ValueError: if the specs or the plan are invalid, the mesh axes are not
      ('data', 'model'), or the plan is for another number of shards.
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
    self._by_name = {t.name: t for t in self.tables}
    self.feature_dims = tuple(self._by_name[f.table].dim for f in self.features)
    self.num_id_columns = sum(f.max_ids for f in self.features)
    self._lr = {s.name: schedules.build(s.optimizer.schedule)
                for s in self.stacks}
    self.comm = exchange.Comm(mesh)
    self.exchanges = {
        s.name: exchange.StackExchange(
            s, self.feature_dims, self.tables, self.num_id_columns,
            self.comm)
        for s in self.stacks if s.segments}

  # --------------------------------------------------------------------------
  # One device runs the per-device code directly, without `shard_map`.
  # `exchange.Comm` also skips collectives over axes of size 1. XLA:CPU would
  # still run them as copies, a tenth of a single-device step.

  def _shard_map(self, fn, in_specs, out_specs):
    if self.num_devices == 1:
      return fn
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)

  # --------------------------------------------------------------------------
  # Shardings.

  def _stack_spec(self, stack, ndim: int) -> P:
    if stack.replicated:
      return P()
    return P(MODEL, *([None] * (ndim - 1)))

  def state_specs(self) -> EmbeddingState:
    """Gives the PartitionSpec of every array of the state.

    Returns:
      A tree like the state, with 'stacks' and 'slots', of PartitionSpecs.
    """
    stacks, slots = {}, {}
    for s in self.stacks:
      stacks[s.name] = self._stack_spec(s, 2)
      slots[s.name] = {
          k: self._stack_spec(s, len(shape))
          for k, (shape, _) in optimizers.slot_shapes(
              s.optimizer, 1, s.width).items()}
    return {'stacks': stacks, 'slots': slots}

  def state_shardings(self) -> EmbeddingState:
    """Gives the NamedSharding of every array of the state.

    Returns:
      A tree like the state, of NamedShardings on this mesh.
    """
    return jax.tree.map(lambda p: NamedSharding(self.mesh, p),
                        self.state_specs(),
                        is_leaf=lambda x: isinstance(x, P))

  def abstract_state(self) -> EmbeddingState:
    """Describes the state without allocating it.

    bfloat16 and float16 tables are stored in float16 arrays (bfloat16 as its
    bit patterns), as in `rounding.storage_dtype`. `table_access.get_table`
    gives their logical values. Optimizer slots are float32.

    Returns:
      A tree like the state, of ShapeDtypeStructs with shardings.
    """
    stacks, slots = {}, {}
    for s in self.stacks:
      rows, width = relayout_lib.stack_shape(s, self.num_shards)
      spec = self._stack_spec(s, 2)
      stacks[s.name] = jax.ShapeDtypeStruct(
          (rows, width), rounding.storage_dtype(s.dtype),
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
    """The PartitionSpec of `[B, T]` packed ids: batch-sharded."""
    return P(BATCH_AXES, None)

  # --------------------------------------------------------------------------
  # Initialization.

  def init(self, key: jax.Array) -> EmbeddingState:
    """Initializes tables and optimizer state, each device making its own rows.

    A value depends only on the key, table, row and column. So every plan and
    mesh starts from the same logical tables.

    Args:
      key: a PRNG key.

    Returns:
      The state, sharded as `state_shardings`.
    """
    def local(key):
      seeds = initialization.table_seeds(key, len(self.tables))
      stacks, slots = {}, {}
      for s in self.stacks:
        my = jnp.int32(0) if s.replicated else self.comm.index(MODEL)
        stacks[s.name] = initialization.init_stack_local(
            s, self.tables, self.num_shards, my, seeds)
        slots[s.name] = {
            k: jnp.full(shape, value, jnp.float32)
            for k, (shape, value) in optimizers.slot_shapes(
                s.optimizer, s.capacity, s.width).items()}
      return {'stacks': stacks, 'slots': slots}

    fn = self._shard_map(local, in_specs=P(), out_specs=self.state_specs())
    return jax.jit(fn, out_shardings=self.state_shardings())(key)

  # --------------------------------------------------------------------------
  # Lookup.

  def _invalid_count(self, ids: jax.Array) -> jax.Array:
    rows = np.concatenate([
        np.full(f.max_ids, self._by_name[f.table].num_rows, np.int32)
        for f in self.features])
    return jnp.sum((ids != -1) & ((ids < 0) | (ids >= rows))).astype(
        jnp.int32)

  def _whole_feature_stacks(self) -> bool:
    """True when every feature lives whole (all columns) in one stack."""
    return all(seg.col_start == 0 and s.width == self.feature_dims[seg.feature]
               for s in self.stacks for seg in s.segments)

  def lookup(self, stacks: dict[str, jax.Array], ids: jax.Array,
             *, stacked: bool = False):
    """Pooled embeddings of every feature.

    Args:
      stacks: the state's 'stacks'.
      ids: `[B, T]` int32 packed ids, batch-sharded.
      stacked: return one `[B, N, D]` array instead of one array per
        feature. All features must then have the same dim D.

    Returns:
      A pair. The first is a tuple of one `[B, D_k]` float32 array per
      feature, or one `[B, N, D]` array when `stacked`. It is batch-sharded.
      The second is the number of invalid ids in the batch, a scalar.

    Raises:
      ValueError: if `stacked` is set and the features' dims differ.
    """
    n_feat = len(self.features)
    if stacked and len(set(self.feature_dims)) != 1:
      raise ValueError(
          'a stacked lookup needs one embedding dim, got'
          f' {sorted(set(self.feature_dims))}.')
    concat = stacked and self._whole_feature_stacks()
    order = [seg.feature for s in self.stacks for seg in s.segments]
    perm = np.argsort(order)

    def local(stacks, ids):
      pooled = [(s, self.exchanges[s.name].lookup(stacks[s.name], ids))
                for s in self.stacks if s.segments]
      invalid = self.comm.psum(self._invalid_count(ids), BATCH_AXES)
      if concat:  # features whole in their stacks: one concatenation
        parts = [p for _, p in pooled]
        out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        if not np.array_equal(perm, np.arange(len(order))):
          out = jnp.take(out, jnp.asarray(perm), axis=1)
        return out, invalid
      pieces = [[] for _ in range(n_feat)]
      for s, p in pooled:
        for k, seg in enumerate(s.segments):
          pieces[seg.feature].append((seg.col_start, p[:, k]))
      outs = []
      for f in range(n_feat):
        parts = [x for _, x in sorted(pieces[f], key=lambda t: t[0])]
        outs.append(parts[0] if len(parts) == 1 else
                    jnp.concatenate(parts, axis=-1))
      if stacked:
        return jnp.stack(outs, axis=1), invalid
      return tuple(outs), invalid

    out_spec = (P(BATCH_AXES, None, None) if stacked else
                tuple(P(BATCH_AXES, None) for _ in range(n_feat)))
    fn = self._shard_map(
        local,
        in_specs=(self.state_specs()['stacks'], self.ids_spec()),
        out_specs=(out_spec, P()))
    return fn(stacks, ids)

  def _each_stack(self, state: EmbeddingState, fn) -> EmbeddingState:
    """Maps `fn(stack, table, slots) -> (table, slots)` over the stacks.

    Only the stacks that features read are mapped, inside shard_map. The
    others pass through.
    """
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
      rows: `[B, T]` int32, laid out like packed ids. A feature's columns
        name rows of its table. -1 means nothing is reset. It is
        batch-sharded. A managed-collision remapper sends these rows when it
        gives a row to a new id.

    Returns:
      The new state.
    """
    specs = self.state_specs()

    def local(state, rows):
      def reset(s, table, slots):
        idx = self.exchanges[s.name].rows_to_reset(rows)
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
        that `lookup` returned. It is one `[B, D_k]` array per feature, or
        one `[B, N, D]` array when stacked. It is batch-sharded.
      step: the 0-based step. The learning-rate schedules and Adam use it.

    Returns:
      The new state.
    """
    specs = self.state_specs()
    n_feat = len(self.features)
    stacked = not isinstance(grads, (tuple, list))
    lrs = {s.name: self._lr[s.name](step) for s in self.stacks}

    def feature_grad(grads, f):
      return grads[:, f] if stacked else grads[f]

    def stack_grads(s, grads):
      """`[B_l, n_segments, W]` gradients of a stack's segments."""
      feats = [seg.feature for seg in s.segments]
      whole = all(seg.col_start == 0 and s.width == self.feature_dims[f]
                  for seg, f in zip(s.segments, feats))
      if stacked and whole:
        if feats == list(range(feats[0], feats[0] + len(feats))):
          return grads[:, feats[0]:feats[0] + len(feats)]
        return jnp.take(grads, jnp.asarray(feats), axis=1)
      return jnp.stack(
          [feature_grad(grads, seg.feature)[
              :, seg.col_start:seg.col_start + s.width]
           for seg in s.segments], axis=1)

    def full_grads(s, grads, width):
      """`[B_l, n_segments, width]` full-width gradients, zero-padded."""
      out = []
      for seg in s.segments:
        g = feature_grad(grads, seg.feature).astype(jnp.float32)
        d = g.shape[-1]
        out.append(jnp.pad(g, ((0, 0), (0, width - d))) if d < width else g)
      return jnp.stack(out, axis=1)

    def local(state, ids, grads, lrs, step):
      def update(s, table, slots):
        ex = self.exchanges[s.name]
        full = (full_grads(s, grads, ex.full_width) if ex.full_width
                else None)
        return ex.update(table, slots, ids,
                         stack_grads(s, grads).astype(jnp.float32), full,
                         lrs[s.name], step)

      return self._each_stack(state, update)

    grad_specs = P(BATCH_AXES, None, None) if stacked else tuple(
        P(BATCH_AXES, None) for _ in range(n_feat))
    fn = self._shard_map(
        local,
        in_specs=(specs, self.ids_spec(), grad_specs,
                  {k: P() for k in lrs}, P()),
        out_specs=specs)
    return fn(state, ids, grads if stacked else tuple(grads), lrs, step)

  # --------------------------------------------------------------------------
  # Checkpoints written under another plan or mesh.

  def abstract_state_of_layout(self, stacks: Sequence[plan_lib.Stack],
                               num_shards: int) -> EmbeddingState:
    """Describes a state of another layout, placed on this mesh.

    See `relayout.abstract_state_of_layout`.

    Args:
      stacks: the other layout.
      num_shards: the model shards of the other layout.

    Returns:
      A tree like the state, of ShapeDtypeStructs with shardings.
    """
    return relayout_lib.abstract_state_of_layout(stacks, num_shards,
                                                 self.mesh)

  def relayout(self, old_stacks: Sequence[plan_lib.Stack],
               old_state: EmbeddingState) -> EmbeddingState:
    """Moves tables and optimizer state from another layout into this one.

    See `relayout.relayout`.

    Args:
      old_stacks: the other layout.
      old_state: the state in the other layout.

    Returns:
      The state in this engine's layout and shardings.
    """
    return relayout_lib.relayout(self.stacks, self.num_shards, old_stacks,
                                 old_state, self.state_shardings())
