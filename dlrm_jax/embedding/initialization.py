"""Initial values of the embedding tables, made on the device that holds them.

Element (table t, row r, column c) is a counter-based hash of (seed of t, r,
c) turned into a uniform in [-1, 1), then into the table's distribution: it
depends only on (key, table, row, column), not on where the element is
stored, so every plan and mesh starts from the same logical tables.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding import rounding
from dlrm_jax.embedding import specs as specs_lib
from dlrm_jax.embedding.specs import TableSpec

_INIT_CHUNK_ROWS = 1 << 16


def hash_uniform(seed: jax.Array, row: jax.Array, col: jax.Array
                 ) -> jax.Array:
  """Hashes a position to a uniform value in [-1, 1).

  The value takes 24 bits of `rounding.hash_bits`.

  Args:
    seed: uint32 seeds.
    row: uint32 row numbers.
    col: uint32 column numbers.

  Returns:
    float32 values in [-1, 1), of the broadcast shape of the inputs.
  """
  z = rounding.hash_bits(seed, row, col)
  return (z >> 8).astype(jnp.float32) * np.float32(2.0**-23) - 1.0


def element_values(seed: jax.Array, kind: jax.Array, scale: jax.Array,
                   row: jax.Array, col: jax.Array) -> jax.Array:
  """The float32 initial value of elements of tables.

  Args:
    seed: uint32 seeds of the elements' tables (`table_seeds`).
    kind: int32 index of each table's initializer in
      `specs.INITIALIZERS`, or a Python int for one table.
    scale: float32 scale of each table (`TableSpec.scale`).
    row: uint32 logical rows.
    col: uint32 logical columns.

  Returns:
    float32 values, of the broadcast shape of the inputs.
  """
  u = hash_uniform(seed, row, col)
  sqrt2 = np.float32(math.sqrt(2.0))
  trunc = np.float32(math.erf(2.0 / math.sqrt(2.0)))
  branches = (lambda: u,
              lambda: sqrt2 * jax.scipy.special.erfinv(u * 0.999999),
              lambda: sqrt2 * jax.scipy.special.erfinv(u * trunc),
              lambda: jnp.zeros_like(u))
  if isinstance(kind, int):  # one table: only its initializer is computed
    return branches[kind]() * scale
  return jnp.select([kind == 0, kind == 1, kind == 2],
                    [f() for f in branches[:3]], branches[3]()) * scale


def table_rows(seed: jax.Array, table: TableSpec, row_start: jax.Array,
               num_rows: int) -> jax.Array:
  """Initial rows of one logical table, as `init` makes them on devices.

  Args:
    seed: the table's uint32 seed, `table_seeds(key, T)[t]` for its index t.
    table: its spec. Its `scale` and `initializer` count.
    row_start: the first row, a traced int32 scalar (one compile for every
      chunk of a table).
    num_rows: the rows to make, static.

  Returns:
    `[num_rows, D]` float32 values, rounded to the table's dtype and back
    (the logical values `table_access.get_table` reads).
  """
  row = (row_start + jnp.arange(num_rows, dtype=jnp.int32)).astype(
      jnp.uint32)
  col = jnp.arange(table.dim, dtype=jnp.uint32)
  kind = specs_lib.INITIALIZERS.index(table.initializer)
  val = element_values(seed, kind, jnp.float32(table.scale), row[:, None],
                       col[None, :])
  return val.astype(jnp.dtype(table.dtype)).astype(jnp.float32)


def piece_tables(stack: plan_lib.Stack, tables: Sequence[TableSpec],
                 num_shards: int) -> dict[str, np.ndarray]:
  """Lists the pieces each device holds of a stack, as arrays.

  Args:
    stack: the stack.
    tables: all table specs, in table-index order.
    num_shards: the number of model shards.

  Returns:
    A dict of int32 `[S', P]` arrays, with S' the number of shards, or 1 when
    the stack is replicated. P is the most pieces on one device. The keys are
    'offset', 'rows', 'row_start', 'col_start', 'table' and 'dim'. Each row of
    'offset' is sorted and padded with the int32 maximum.
  """
  index = {t.name: i for i, t in enumerate(tables)}
  dims = {t.name: t.dim for t in tables}
  n_dev = 1 if stack.replicated else num_shards
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
      arrs['table'][d, j] = index[pc.table]
      arrs['dim'][d, j] = dims[pc.table]
  return arrs


def piece_at(piece: dict[str, jax.Array], rows: jax.Array) -> jax.Array:
  """Finds the piece that each local row lies in or follows.

  Args:
    piece: one device's row of `piece_tables`.
    rows: local row numbers.

  Returns:
    The index of the piece of each row, of the shape of `rows`.
  """
  return jnp.maximum(
      jnp.searchsorted(piece['offset'], rows, side='right') - 1, 0)


def init_stack_local(stack: plan_lib.Stack, tables: Sequence[TableSpec],
                     num_shards: int, my: jax.Array,
                     seeds: jax.Array) -> jax.Array:
  """Builds this device's initial rows of a stack.

  Rows are filled in chunks, in place. Nothing table-sized is allocated twice.

  Args:
    stack: the stack.
    tables: all table specs, in table-index order.
    num_shards: the number of model shards.
    my: this device's model shard.
    seeds: `[T]` uint32 seeds, one per table, from `table_seeds`.

  Returns:
    `[C, W]` rows in the stack's stored form, `rounding.storage_dtype`.
  """
  arrs = piece_tables(stack, tables, num_shards)
  piece = {k: jnp.asarray(v)[my] for k, v in arrs.items()}
  kinds = jnp.asarray(np.array(
      [specs_lib.INITIALIZERS.index(t.initializer) for t in tables],
      np.int32))
  scales = jnp.asarray(np.array([t.scale for t in tables], np.float32))
  width, dtype = stack.width, jnp.dtype(stack.dtype)

  def rows_values(j):  # [n] local rows -> [n, W]
    p = piece_at(piece, j)
    r = j - piece['offset'][p]
    valid = (j >= piece['offset'][p]) & (r < piece['rows'][p])
    t = piece['table'][p]
    row = (piece['row_start'][p] + r).astype(jnp.uint32)
    col = (piece['col_start'][p][:, None] +
           jnp.arange(width, dtype=jnp.int32)[None, :]).astype(jnp.uint32)
    val = element_values(seeds[t][:, None], kinds[t][:, None],
                         scales[t][:, None], row[:, None], col)
    return rounding.to_storage(
        jnp.where(valid[:, None], val, 0.0).astype(dtype), dtype)

  cap = stack.capacity
  chunk = min(_INIT_CHUNK_ROWS, cap)
  n_full = cap // chunk

  def body(i, buf):
    j = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
    return jax.lax.dynamic_update_slice(buf, rows_values(j), (i * chunk, 0))

  buf = jnp.zeros((cap, width), rounding.storage_dtype(dtype))
  buf = jax.lax.fori_loop(0, n_full, body, buf)
  if cap % chunk:
    j = n_full * chunk + jnp.arange(cap % chunk, dtype=jnp.int32)
    buf = jax.lax.dynamic_update_slice(buf, rows_values(j),
                                       (n_full * chunk, 0))
  return buf


def table_seeds(key: jax.Array, num_tables: int) -> jax.Array:
  """Draws one seed per table.

  Args:
    key: a PRNG key.
    num_tables: T, the number of tables.

  Returns:
    `[T]` uint32 seeds.
  """
  return jax.vmap(lambda t: jax.random.bits(
      jax.random.fold_in(key, t), (), jnp.uint32))(jnp.arange(num_tables))
