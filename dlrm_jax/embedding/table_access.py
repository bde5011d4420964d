"""Reading and writing whole logical tables (and their optimizer slots).

The engine stores tables packed into stacks (`dlrm_jax.embedding.sharding.planner`): a
table may be one block on one device (table_wise), row blocks on several
(row_wise), column pieces (column_wise) or a copy on every device
(replicated), padded, side by side with other tables. These functions hide the
layout:

  get_table(engine, state, name, slot=None) -> `[R, D]` (or `[R]` for a
      row-wise slot such as rowwise_adagrad's 'acc') numpy array.
  set_table(engine, state, name, values, slot=None) -> new state, where the
      table's rows (or slot) are `values` and everything else is unchanged.

`set_table` builds each new stack with `jax.make_array_from_callback`: every
device's shard is assembled on its own from the device's old shard and the
rows of `values` it owns, so a process reads (and copies to its devices) only
the rows its devices hold, and nothing of the size of all tables is ever made
on one host. `values` may be any array-like with numpy slicing (an
`np.load(..., mmap_mode='r')` memory map, say), so with several processes each
one reads just its part of a file.

`get_table` reads from the local shards when every shard is local (one
process); otherwise it is collective (every process must call it, in the same
order): each piece is cut out on the devices and replicated, so only that
table crosses between processes.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dlrm_jax.embedding import optimizers
from dlrm_jax.embedding import rounding
from dlrm_jax.parallel import MODEL

EmbeddingState = dict[str, Any]


def _table_spec(engine, name: str):
  for t in engine.tables:
    if t.name == name:
      return t
  raise ValueError(
      f'unknown table {name!r}; the model has tables'
      f' {[t.name for t in engine.tables]}.')


def pieces(engine, name: str) -> Iterator[tuple[Any, Any, int]]:
  """Yields the pieces of a table.

  Args:
    engine: the `EmbeddingEngine`.
    name: the table.

  Yields:
    `(stack, piece, first_row)`, with `first_row` the piece's first global
    row in the stack array.
  """
  for s in engine.stacks:
    for pc in s.pieces:
      if pc.table == name:
        base = 0 if s.replicated else pc.device * s.capacity
        yield s, pc, base + pc.offset


def _array(engine, state: EmbeddingState, stack, slot: str | None):
  if slot is None:
    return state['stacks'][stack.name]
  slots = state['slots'][stack.name]
  if slot not in slots:
    raise ValueError(
        f'slot {slot!r} does not exist for optimizer'
        f' {stack.optimizer.kind!r} (it has {sorted(slots)}).')
  return slots[slot]


def _logical_shape(engine, name: str, state: EmbeddingState,
                   slot: str | None) -> tuple[int, ...]:
  t = _table_spec(engine, name)
  stack = next(pieces(engine, name))[0]
  arr = _array(engine, state, stack, slot)
  return (t.num_rows, t.dim) if arr.ndim == 2 else (t.num_rows,)


def _norm(index, shape) -> tuple[tuple[int, int], ...]:
  return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))


def table_slots(engine, name: str) -> tuple[str, ...]:
  """Lists the optimizer slot names of a table, such as 'acc', 'm' and 'v'.

  Args:
    engine: the `EmbeddingEngine`.
    name: the table.

  Returns:
    The slot names.

  Raises:
    ValueError: if the table is unknown.
  """
  _table_spec(engine, name)
  stack = next(pieces(engine, name))[0]
  return tuple(optimizers.slot_shapes(stack.optimizer, 1, stack.width))


def get_table(engine, state: EmbeddingState, name: str,
              slot: str | None = None) -> np.ndarray:
  """Reads the logical table `name`, or one of its slots, as a host array.

  Args:
    engine: the `EmbeddingEngine`.
    state: its state, with 'stacks' and 'slots'.
    name: the table.
    slot: None for the weights, else a slot of the table's optimizer.

  Returns:
    `[R, D]` in the table's logical dtype, or `[R]` float32 for a row-wise
    slot. A bfloat16 table comes back as bfloat16, though it is stored as
    its bit patterns in a float16 array.

  Raises:
    ValueError: if the table or the slot is unknown.
  """
  shape = _logical_shape(engine, name, state, slot)
  out = None
  for s, pc, g0 in pieces(engine, name):
    arr = _array(engine, state, s, slot)
    if out is None:
      out = np.zeros(shape, jnp.dtype(s.dtype) if slot is None else arr.dtype)
    holders = [d for d, idx in arr.sharding.devices_indices_map(
        arr.shape).items() if covers(idx[0], arr.shape[0], g0, pc.rows)]
    if {d.process_index for d in holders} == set(range(jax.process_count())):
      # Every process holds the piece (one process; or replicated): local.
      sh = next(sh for sh in arr.addressable_shards if sh.device in holders)
      r0 = sh.index[0].indices(arr.shape[0])[0]
      block = np.asarray(sh.data[g0 - r0:g0 - r0 + pc.rows])
    else:  # the same decision in every process: all take part
      block = np.asarray(_cut(engine, arr, s, pc).addressable_data(0))
    if slot is None:
      block = rounding.to_logical(block, s.dtype)
    if arr.ndim == 2:
      out[pc.row_start:pc.row_start + pc.rows,
          pc.col_start:pc.col_start + pc.width] = block
    else:  # a row-wise slot: the same in every column piece
      out[pc.row_start:pc.row_start + pc.rows] = block
  return out


def covers(sl: slice, n: int, start: int, rows: int) -> bool:
  """Tells whether a shard's row slice holds a block of rows.

  Args:
    sl: the shard's slice of the rows.
    n: the number of rows of the array.
    start: the block's first row.
    rows: the block's number of rows.

  Returns:
    True when `sl` covers all rows of the block.
  """
  a, b, _ = sl.indices(n)
  return a <= start and start + rows <= b


def _cut(engine, arr: jax.Array, stack, pc) -> jax.Array:
  return cut_fn(engine, stack, pc, arr.ndim)(arr)


def cut_fn(engine, stack, pc, ndim: int):
  """Builds a function that cuts a piece out of a model-sharded stack array.

  Inside `shard_map`, the owning device cuts the block out of its own shard
  with static offsets. The others contribute zeros, summed over the model
  axis. So only the block's size crosses devices. A slice of the global
  array would all-gather the whole stack first.

  Args:
    engine: the `EmbeddingEngine`.
    stack: the stack. It is unused, as the piece's offsets are local.
    pc: the piece.
    ndim: the number of dimensions of the stack array.

  Returns:
    A jitted `fn(stack_array)` that gives the piece's `[rows, ...]` block,
    replicated on every device.
  """
  del stack  # the piece's offsets are within its device's block
  spec = P(MODEL, *([None] * (ndim - 1)))

  def local(a):
    """The block on its owner, zeros elsewhere, summed over the model axis."""
    block = a[pc.offset:pc.offset + pc.rows]
    mine = jax.lax.axis_index(MODEL) == pc.device
    return jax.lax.psum(jnp.where(mine, block, jnp.zeros_like(block)), MODEL)

  return jax.jit(jax.shard_map(local, mesh=engine.mesh, in_specs=(spec,),
                               out_specs=P()))


def set_table(engine, state: EmbeddingState, name: str, values,
              slot: str | None = None) -> EmbeddingState:
  """Writes `values` into the table `name`, or one of its slots.

  Args:
    engine: the `EmbeddingEngine`.
    state: its state. It is not modified and its arrays stay valid.
    name: the table.
    values: an `[R, D]` array-like with numpy slicing, or `[R]` for a
      row-wise slot. Only the rows that this process's devices own are read.
      Weights are rounded to nearest in the table's logical dtype.
    slot: None for the weights, else a slot of the table's optimizer.

  Returns:
    A new state with new arrays for the stacks that hold the table. The
    other tables' rows, the padding rows and the other stacks are unchanged.

  Raises:
    ValueError: if the table or the slot is unknown, or if `values` has the
      wrong shape.
  """
  shape = _logical_shape(engine, name, state, slot)
  if tuple(np.shape(values)) != shape:
    raise ValueError(
        f'table {name!r}{"" if slot is None else f" slot {slot!r}"} has shape'
        f' {list(shape)}, got values of shape {list(np.shape(values))}.')
  by_stack: dict[str, list] = {}
  for s, pc, g0 in pieces(engine, name):
    by_stack.setdefault(s.name, []).append((s, pc, g0))
  new_stacks = dict(state['stacks'])
  new_slots = {k: dict(v) for k, v in state['slots'].items()}
  for stack_name, blocks in by_stack.items():
    s = blocks[0][0]
    old = _array(engine, state, s, slot)
    local = {}
    for sh in old.addressable_shards:
      local.setdefault(_norm(sh.index, old.shape), sh.data)

    def shard(index, old=old, local=local, blocks=blocks):
      """One device's new shard: its old shard with the table's rows set."""
      key = _norm(index, old.shape)
      buf = np.array(local[key])  # this device's old shard, a host copy
      (r0, r1) = key[0]
      for _, pc, g0 in blocks:
        lo, hi = max(g0, r0), min(g0 + pc.rows, r1)
        if lo >= hi:
          continue
        src = slice(pc.row_start + lo - g0, pc.row_start + hi - g0)
        if buf.ndim == 2:
          block = np.asarray(values[src, pc.col_start:pc.col_start + pc.width])
          buf[lo - r0:hi - r0] = (
              block.astype(buf.dtype) if slot is not None else
              rounding.to_storage(block, s.dtype))
        else:
          buf[lo - r0:hi - r0] = np.asarray(values[src]).astype(buf.dtype)
      return buf

    new = jax.make_array_from_callback(old.shape, old.sharding, shard)
    if slot is None:
      new_stacks[stack_name] = new
    else:
      new_slots[stack_name][slot] = new
  return {**state, 'stacks': new_stacks, 'slots': new_slots}


def get_slot(engine, state: EmbeddingState, name: str, slot: str
             ) -> np.ndarray:
  """Reads a slot of a table, as `get_table(..., slot=slot)`.

  Args:
    engine: the `EmbeddingEngine`.
    state: its state.
    name: the table.
    slot: a slot of the table's optimizer.

  Returns:
    The slot as a host array.
  """
  return get_table(engine, state, name, slot=slot)


def set_slot(engine, state: EmbeddingState, name: str, slot: str, values
             ) -> EmbeddingState:
  """Writes a slot of a table, as `set_table(..., slot=slot)`.

  Args:
    engine: the `EmbeddingEngine`.
    state: its state.
    name: the table.
    slot: a slot of the table's optimizer.
    values: the new slot values.

  Returns:
    The new state.
  """
  return set_table(engine, state, name, values, slot=slot)
