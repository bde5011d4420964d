"""Moving embedding state between layouts.

Used when a checkpoint written under one plan or mesh is restored under
another (`abstract_state_of_layout`, `relayout`). A whole logical table is
read with `dlrm_jax.embedding.table_access.get_table`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlrm_jax.embedding import optimizers
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding import rounding
from dlrm_jax.parallel import BATCH_AXES

EmbeddingState = dict[str, Any]  # {'stacks': {name: W}, 'slots': {name: {..}}}


def stack_shape(stack: plan_lib.Stack, num_shards: int) -> tuple[int, int]:
  """Gives the global shape of a stack's array.

  Args:
    stack: the stack.
    num_shards: S, the model shards.

  Returns:
    `(rows, W)`. `rows` is C for a replicated stack, else `S * C`.
  """
  rows = stack.capacity if stack.replicated else num_shards * stack.capacity
  return (rows, stack.width)


def abstract_state_of_layout(stacks: Sequence[plan_lib.Stack],
                             num_shards: int, mesh: Mesh) -> EmbeddingState:
  """Describes a state of another layout, for restoring its checkpoint.

  An array's rows are split over every device of `mesh` where they divide
  evenly. Otherwise the array is replicated.

  Args:
    stacks: the layout that the checkpoint was written under.
    num_shards: the model shards of that layout.
    mesh: the mesh to place the arrays on.

  Returns:
    A tree like the state, of ShapeDtypeStructs with shardings.
  """
  n = int(mesh.devices.size)

  def struct(shape, dtype):
    spec = P(BATCH_AXES, *([None] * (len(shape) - 1))) if (
        shape[0] % n == 0) else P()
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype),
                                sharding=NamedSharding(mesh, spec))

  out = {'stacks': {}, 'slots': {}}
  for s in stacks:
    rows, width = stack_shape(s, num_shards)
    out['stacks'][s.name] = struct((rows, width),
                                   rounding.storage_dtype(s.dtype))
    out['slots'][s.name] = {
        k: struct(shape, jnp.float32)
        for k, (shape, _) in optimizers.slot_shapes(
            s.optimizer, rows, width).items()}
  return out


def relayout(new_stacks: Sequence[plan_lib.Stack], num_shards: int,
             old_stacks: Sequence[plan_lib.Stack],
             old_state: EmbeddingState,
             out_shardings: EmbeddingState) -> EmbeddingState:
  """Moves tables and optimizer state from one layout into another.

  Every overlap in rows and columns of an old piece and a new piece of the
  same table is copied with static slices. So the compiler moves only those
  blocks between devices. Tables are moved in their stored form, which is
  float16 arrays for 16-bit tables (bfloat16 as its bit patterns). A table
  whose dtype changed is rounded to nearest into the new one.

  Args:
    new_stacks: the new layout.
    num_shards: the model shards of the new layout.
    old_stacks: the old layout.
    old_state: the state in the old layout.
    out_shardings: the shardings of the new state.

  Returns:
    The state in the new layout. Rows that no old piece covers start at zero
    with initial slots.
  """
  old_by_table: dict[str, list[tuple[plan_lib.Stack, plan_lib.Piece]]] = {}
  for s in old_stacks:
    for pc in s.pieces:
      old_by_table.setdefault(pc.table, []).append((s, pc))

  def base(stack, pc):
    return pc.offset + (0 if stack.replicated else pc.device * stack.capacity)

  def move(old_state):
    out_stacks, out_slots = {}, {}
    for s in new_stacks:
      rows, width = stack_shape(s, num_shards)
      table = jnp.zeros((rows, width), rounding.storage_dtype(s.dtype))
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
          if os_.dtype != s.dtype:  # a new table dtype: round to nearest
            block = rounding.to_storage(
                rounding.rows_to_float32(block, os_.dtype), s.dtype)
          table = table.at[dst:dst + n,
                           c0 - pc.col_start:c1 - pc.col_start].set(block)
          for k in slots:
            old = old_state['slots'][os_.name][k]
            if old.ndim == 1:
              slots[k] = slots[k].at[dst:dst + n].set(old[src:src + n])
            else:
              slots[k] = slots[k].at[
                  dst:dst + n, c0 - pc.col_start:c1 - pc.col_start].set(
                      old[src:src + n, c0 - opc.col_start:c1 - opc.col_start])
      out_stacks[s.name], out_slots[s.name] = table, slots
    return {'stacks': out_stacks, 'slots': out_slots}

  return jax.jit(move, out_shardings=out_shardings)(old_state)
