"""Cached tables: a device cache of hot rows over a host or disk store.

A table placed `cached` keeps all its rows, and its optimizer slots, in a
`HostStore`: numpy arrays in host memory, or `numpy.memmap` files under a
directory. The devices hold only a cache of `cache_rows` rows with their
slots: the engine is built on the table's cache spec (`cache_table_spec`,
the table with `num_rows = cache_rows`), and trains on cache slot ids with
its usual lookups and sparse updates. Nothing of the step changes.

The host maps ids to slots, batch after batch (`CachedTables.prepare`):

- The batch's unique rows that are cached keep their slots (hits).
- The others (misses) get the slots of victims: empty slots first, then the
  least recently used ones. The policy is LRU over batches: a slot's age is
  the last batch that used it. (TorchRec's UVM cache offers LRU and LFU;
  LRU needs no counts that outlive a row and is the simpler to reason
  about.)
- Victims are chosen among the slots that neither this batch nor the next
  one uses. So a row evicted by step i is never needed by step i + 1.
- The step first reads the victims' current rows and slots out of the
  cache (the evicted values), then writes the loaded rows and slots in
  (`swap_fn`), then trains. The host writes the evicted values back to the
  store at their old rows.

The hazards, and how they are closed:

- *A row evicted at step i and needed at step i + 1 before its write-back
  lands* (torchrec#4191: garbage rows when prefetch and eviction race).
  The victims of step i exclude the rows of batch i + 1, so the case cannot
  arise. A load for batch j reads the store only after the write-backs of
  steps up to j - 2 have landed (`CachePipeline` waits for them); step
  j - 1's victims are not in batch j by the rule above. `prepare` also
  checks, for every load, that its row is not among the rows still in
  flight, and raises if it ever were.
- *Rows of one batch mapped twice*: rows are taken unique (`np.unique`),
  and a victim slot is given to one row only (`np.argpartition` picks
  distinct slots).
- *A cache smaller than a batch needs*: the unique rows of this batch plus
  the cached rows of the next must fit, else `prepare` raises a ValueError
  naming the table, the rows needed and `cache_rows`. So `cache_rows` must
  be at least the unique rows of two consecutive batches. A cache of the
  whole table always hits once every row is loaded (HugeCTR#278).

Checkpoints flush every cached row to the store first (`flush`), then save
the store chunk by chunk (`HostStore.save`, never one host array): per chunk
of 2^20 rows, the rows written since initialization and their values; the
rest is remade from the seed on load, and a chunk unchanged since the last
save is a hard link to it. A restore reads the store back and starts with an
empty cache, so it works onto any cache size, and training after it is
exact: a row's value does not depend on where it was cached.

The store starts with the values `EmbeddingEngine.init` gives the same
table, bit for bit for the 'uniform' and 'zeros' initializers; 'normal' and
'truncated_normal' go through XLA's float32 erfinv, which it fuses
differently on and off the devices, and agree to an ulp.

Cached tables are float32 with a single process. 16-bit tables round
stochastically with a hash of the row number, which a slot number would
change. On a row-wise table each shard caches the slots it holds; which
rows those are is the LRU's choice, not the row's shard in an uncached
layout.

Shape letters: R a table's rows, D its dim, K the most swaps per step of a
table (`max_swaps`), C cache rows.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import shutil
import threading
import zlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dlrm_jax.embedding import initialization
from dlrm_jax.embedding import optimizers
from dlrm_jax.embedding import table_access
from dlrm_jax.embedding.specs import FeatureSpec, TableSpec
from dlrm_jax.parallel import MODEL

POLICY = 'lru'
_CHUNK_ROWS = 1 << 20
# Batches between drops of the stores' mapped pages from the resident set.
_RELEASE_EVERY = 8


def cache_table_spec(table: TableSpec, cache_rows: int) -> TableSpec:
  """The spec of a cached table's device cache.

  Args:
    table: the table's spec.
    cache_rows: C, the cache's rows.

  Returns:
    The table with `num_rows = cache_rows`. Its init scale is pinned to the
    table's own (`TableSpec.scale` defaults to one of `num_rows`).
  """
  return dataclasses.replace(table, num_rows=int(cache_rows),
                             init_scale=table.scale)


def check_cached(table: TableSpec, cache_rows: int, path: str) -> None:
  """Checks that a table can be cached with `cache_rows` rows.

  Args:
    table: the table's spec.
    cache_rows: C.
    path: the config path named in errors.

  Raises:
    ValueError: C is not in [1, R], or the table is not float32.
  """
  if not 1 <= cache_rows <= table.num_rows:
    raise ValueError(
        f'{path} ({cache_rows}) must be in [1, {table.num_rows}], the rows'
        f' of table {table.name!r}.')
  if table.dtype != 'float32':
    raise ValueError(
        f'table {table.name!r} is {table.dtype}: a cached table must be'
        ' float32 (16-bit tables round with a hash of the row, which a cache'
        ' slot would change).')


def _slot_layout(table: TableSpec) -> dict[str, tuple[tuple[int, ...], float]]:
  """The optimizer slots of a table: name -> (shape, initial value)."""
  return optimizers.slot_shapes(table.optimizer, table.num_rows, table.dim)


# ----------------------------------------------------------------------------
# The store.


class HostStore:
  """All rows of one table and of its optimizer slots, off the devices.

  In host memory when `directory` is None, else in `numpy.memmap` files
  `<directory>/<table>.<array>.f32` (raw float32, row-major). Reads and
  writes take sorted unique rows. `release` drops the mapped pages from
  this process's resident set (they stay in the page cache, and dirty ones
  are written by the kernel), so a store larger than memory keeps a small
  RSS.

  Args:
    table: the table's spec (all its rows).
    directory: where the files live, or None for host memory.
    create: make the files (True), or open existing ones (False).

  Attributes:
    table: the table's spec.
    directory: the files' directory, or None.
    arrays: 'weights' `[R, D]` and each optimizer slot (`[R, D]` or `[R]`),
      float32.
  """

  def __init__(self, table: TableSpec, directory: str | None = None, *,
               create: bool = True):
    self.table = table
    self.directory = directory
    shapes = {'weights': ((table.num_rows, table.dim), 0.0)}
    shapes.update(_slot_layout(table))
    self.shapes = shapes
    self.arrays: dict[str, np.ndarray] = {}
    self.rows_per_chunk = min(table.num_rows, _CHUNK_ROWS)
    self.num_chunks = -(-table.num_rows // self.rows_per_chunk)
    self.seed = 0
    self._rows_fn = None
    # Rows written since initialize; chunks written since the last save.
    self.written = np.zeros(table.num_rows, bool)
    self.dirty = np.zeros(self.num_chunks, bool)
    # Whether an array's file is as `create` made it (zeros), unwritten.
    self._fresh = {k: bool(create) for k in shapes}
    if directory is not None:
      os.makedirs(directory, exist_ok=True)
    for name, (shape, _) in shapes.items():
      if directory is None:
        self.arrays[name] = np.zeros(shape, np.float32)
        continue
      path = self.path(name)
      nbytes = int(np.prod(shape)) * 4
      if create:
        with open(path, 'wb') as f:
          f.truncate(nbytes)  # a sparse file of zeros
      elif not os.path.exists(path) or os.path.getsize(path) != nbytes:
        raise ValueError(
            f'store file {path} is missing or not {nbytes} bytes (table'
            f' {table.name!r}, array {name!r} of shape {shape}).')
      self.arrays[name] = np.memmap(path, np.float32, 'r+', shape=shape)

  def path(self, name: str) -> str:
    """The file of array `name`."""
    return os.path.join(self.directory, f'{self.table.name}.{name}.f32')

  @property
  def nbytes(self) -> int:
    """The bytes of all its arrays."""
    return sum(int(np.prod(s)) * 4 for s, _ in self.shapes.values())

  @staticmethod
  def bytes_of(table: TableSpec) -> int:
    """The bytes a store of `table` takes: its rows and optimizer slots."""
    shapes = [(table.num_rows, table.dim)] + [
        s for s, _ in _slot_layout(table).values()]
    return sum(int(np.prod(s)) * 4 for s in shapes)

  def initialize(self, seed: jax.Array) -> None:
    """Writes the initial rows and slot values, in chunks.

    The weights are `initialization.table_rows`, the values the engine's
    `init` gives the same table on devices; the slots their optimizer's
    start values.

    Args:
      seed: the table's uint32 seed (`initialization.table_seeds`).
    """
    self.seed = int(np.asarray(seed))
    for name in self.shapes:
      for c in range(self.num_chunks):
        self._init_chunk(name, c, clear=not self._fresh[name])
      self.release()
    self.written[:] = False
    self.dirty[:] = False

  def _init_chunk(self, name: str, c: int, clear: bool = True) -> None:
    """Writes the initial values of chunk `c` of array `name` (zeros only
    when `clear`: a fresh file reads as zeros)."""
    shape, value = self.shapes[name]
    r0 = c * self.rows_per_chunk
    n = min(self.rows_per_chunk, shape[0] - r0)
    if name == 'weights':
      if self._rows_fn is None:
        chunk, table = self.rows_per_chunk, self.table
        self._rows_fn = jax.jit(lambda s, r: initialization.table_rows(
            s, table, r, chunk))
      block = np.asarray(self._rows_fn(jnp.uint32(self.seed),
                                       jnp.int32(r0)))[:n]
    elif value == 0.0 and self.directory is not None and not clear:
      return  # the sparse file already reads as zeros
    else:
      block = np.full((n,) + tuple(shape[1:]), value, np.float32)
    self._write_block(name, r0, block)

  def _write_block(self, name: str, r0: int, block: np.ndarray) -> None:
    self._fresh[name] = False
    if self.directory is None:
      self.arrays[name][r0:r0 + len(block)] = block
      return
    row_bytes = int(np.prod(self.shapes[name][0][1:])) * 4
    with open(self.path(name), 'r+b') as f:
      f.seek(r0 * row_bytes)
      f.write(np.ascontiguousarray(block).tobytes())

  def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Reads rows of every array.

    Args:
      rows: `[n]` sorted unique rows.

    Returns:
      Array name -> `[n, ...]` float32 copies.
    """
    return {k: a[rows] for k, a in self.arrays.items()}

  def write(self, rows: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
    """Writes rows of every array, marking their chunks changed.

    Args:
      rows: `[n]` unique rows.
      values: array name -> `[n, ...]` float32.
    """
    rows = np.asarray(rows)
    for k, a in self.arrays.items():
      a[rows] = values[k]
      self._fresh[k] = False
    self.written[rows] = True
    self.dirty[np.unique(rows // self.rows_per_chunk)] = True

  def release(self) -> None:
    """Drops the mapped pages from the resident set (memmap files only)."""
    if self.directory is None:
      return
    for a in self.arrays.values():
      m = getattr(a, '_mmap', None)
      if m is not None and hasattr(mmap, 'MADV_DONTNEED'):
        m.madvise(mmap.MADV_DONTNEED)

  # --------------------------------------------------------------------------
  # Checkpoints.

  def save(self, directory: str, previous: str | None = None) -> None:
    """Writes the rows written since `initialize`, chunk by chunk.

    A checkpoint holds, per chunk of rows, the rows ever written (their
    numbers and their values in every array, with a crc32); the other
    rows are remade from the seed on load. A chunk none of whose rows was
    written since the save in `previous` is hard-linked to that save's
    files. Values are read through the mapping chunk by chunk and the
    pages dropped after each, so the resident set stays small; nothing
    larger than one chunk's written rows is held in memory.

    Args:
      directory: a new directory.
      previous: the directory of this store's last save or load, or None.
    """
    os.makedirs(directory, exist_ok=True)
    meta = {'table': self.table.name, 'seed': self.seed,
            'rows_per_chunk': self.rows_per_chunk,
            'arrays': sorted(self.shapes), 'chunks': []}
    prev_meta = None
    if previous and os.path.exists(os.path.join(previous, 'store.json')):
      with open(os.path.join(previous, 'store.json')) as f:
        prev_meta = json.load(f)
      if prev_meta.get('rows_per_chunk') != self.rows_per_chunk:
        prev_meta = None
    for c in range(self.num_chunks):
      r0 = c * self.rows_per_chunk
      written = np.flatnonzero(
          self.written[r0:r0 + self.rows_per_chunk]).astype(np.int64) + r0
      if not len(written):
        meta['chunks'].append(None)
        continue
      before = prev_meta['chunks'][c] if prev_meta else None
      if not self.dirty[c] and before is not None:
        try:
          for f in before['files'].values():
            os.link(os.path.join(previous, f), os.path.join(directory, f))
          meta['chunks'].append(before)
          continue
        except OSError:
          pass  # another file system: write below
      files, crcs = {}, {}
      values = {'rows': written}
      values.update(self.read(written))
      for name, v in values.items():
        f = f'{c:06d}.{name}.bin'
        data = np.ascontiguousarray(v).tobytes()
        with open(os.path.join(directory, f), 'wb') as out:
          out.write(data)
        files[name], crcs[name] = f, zlib.crc32(data)
      self.release()
      meta['chunks'].append({'count': len(written), 'files': files,
                             'crc32': crcs})
    tmp = os.path.join(directory, 'store.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(meta, f)
    os.replace(tmp, os.path.join(directory, 'store.json'))
    self.dirty[:] = False

  def load(self, directory: str) -> None:
    """Reads a store saved by `save` into this one, checking every chunk.

    Args:
      directory: a directory written by `save`.

    Raises:
      ValueError: the directory is incomplete or of another table or shape,
        or a chunk's crc32 differs (a damaged checkpoint).
    """
    meta_path = os.path.join(directory, 'store.json')
    if not os.path.exists(meta_path):
      raise ValueError(f'{meta_path} is missing: not a complete store'
                       ' checkpoint.')
    with open(meta_path) as f:
      meta = json.load(f)
    if (meta.get('table') != self.table.name
        or meta.get('rows_per_chunk') != self.rows_per_chunk
        or meta.get('arrays') != sorted(self.shapes)
        or len(meta.get('chunks', ())) != self.num_chunks):
      raise ValueError(
          f'{directory} is a store of table {meta.get("table")!r} with'
          f' arrays {meta.get("arrays")} in {len(meta.get("chunks", ()))}'
          f' chunks of {meta.get("rows_per_chunk")} rows; table'
          f' {self.table.name!r} needs {sorted(self.shapes)} in'
          f' {self.num_chunks} chunks of {self.rows_per_chunk} rows.')
    self.seed = meta['seed']
    self.written[:] = False
    for c, ch in enumerate(meta['chunks']):
      for name in self.shapes:  # the chunk as initialized
        self._init_chunk(name, c, clear=not self._fresh[name])
      if ch is None:
        continue
      values = {}
      for name, f in ch['files'].items():
        with open(os.path.join(directory, f), 'rb') as src:
          data = src.read()
        if zlib.crc32(data) != ch['crc32'][name]:
          raise ValueError(
              f'{directory}/{f}: chunk {c} ({name}) fails its crc32: the'
              ' store checkpoint is damaged.')
        dtype = np.int64 if name == 'rows' else np.float32
        tail = () if name == 'rows' else tuple(self.shapes[name][0][1:])
        values[name] = np.frombuffer(data, dtype).reshape((-1,) + tail)
      rows = values.pop('rows')
      for name, a in self.arrays.items():
        a[rows] = values[name]
      self.written[rows] = True
      self.release()
    self.dirty[:] = False
    for k in self._fresh:
      self._fresh[k] = False


def store_checkpoint_dir(checkpoint_dir, step: int) -> str:
  """Where the stores of train checkpoint `step` go: beside the orbax
  checkpoints, `<workdir>/store_checkpoints/<step>`."""
  return os.path.join(os.path.dirname(os.path.abspath(str(checkpoint_dir))),
                      'store_checkpoints', str(step))


# ----------------------------------------------------------------------------
# The slot map.


class RowCache:
  """Which rows of a table are in which cache slots (host side, LRU).

  Args:
    name: the table's name, for errors.
    num_rows: R.
    cache_rows: C.

  Attributes:
    slot_of_row: `[R]` int32, -1 when the row is not cached.
    row_of_slot: `[C]` int64, -1 when the slot is empty.
    last_use: `[C]` int64, the last batch that used each slot; -1 empty.
    hits, misses: unique rows found cached and loaded, over all batches.
  """

  def __init__(self, name: str, num_rows: int, cache_rows: int):
    self.name = name
    self.num_rows = num_rows
    self.cache_rows = cache_rows
    self.slot_of_row = np.full(num_rows, -1, np.int32)
    self.row_of_slot = np.full(cache_rows, -1, np.int64)
    self.last_use = np.full(cache_rows, -1, np.int64)
    self.clock = 0
    self.hits = 0
    self.misses = 0
    self.id_hits = 0
    self.ids = 0
    self.hint = ''  # appended to the too-small error: the config field

  def assign(self, rows: np.ndarray, next_rows: np.ndarray | None,
             counts: np.ndarray | None = None, count: bool = True
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gives every row of a batch a slot, loading the misses.

    Args:
      rows: the batch's sorted unique rows.
      next_rows: the next batch's unique rows, or None at the end.
      counts: the ids of the batch on each row (for the id hit rate).
      count: add the batch to the hit and miss counts.

    Returns:
      `(slots, loads, evicted)`: the victim slots, the rows loaded into
      them, and each victim's old row (-1 for a slot that was empty).

    Raises:
      ValueError: the cache cannot hold this batch's rows and the next
        batch's cached rows.
    """
    self.clock += 1
    slots = self.slot_of_row[rows]
    hit = slots >= 0
    loads = rows[~hit]
    n = len(loads)
    if count:
      self.hits += int(hit.sum())
      self.misses += n
      if counts is not None:
        self.id_hits += int(counts[hit].sum())
        self.ids += int(counts.sum())
    if n:
      big = np.iinfo(np.int64).max
      key = self.last_use.copy()
      key[slots[hit]] = big
      if next_rows is not None and len(next_rows):
        s_next = self.slot_of_row[next_rows]
        key[s_next[s_next >= 0]] = big
      free = int(np.count_nonzero(key != big))
      if free < n:
        raise ValueError(
            f'cached table {self.name!r}: a batch needs {n} more rows than'
            f' its cache holds free ({free} of cache_rows={self.cache_rows},'
            f' the rest held by this batch\'s {int(hit.sum())} cached rows'
            ' and the next batch\'s); cache_rows must be at least the unique'
            ' rows of two consecutive batches'
            f'{self.hint}.')
      empty = np.flatnonzero(key == -1)
      if len(empty) >= n:  # empty slots first (argpartition is slow on ties)
        victims = empty[:n]
      elif n < len(key):
        victims = np.argpartition(key, n - 1)[:n]
      else:
        victims = np.arange(n)
      victims = np.sort(victims)
      old = self.row_of_slot[victims]
      self.slot_of_row[old[old >= 0]] = -1
      self.slot_of_row[loads] = victims
      self.row_of_slot[victims] = loads
    else:
      victims = np.zeros(0, np.int64)
      old = np.zeros(0, np.int64)
    self.last_use[self.slot_of_row[rows]] = self.clock
    return victims.astype(np.int32), loads, old

  def clear(self) -> None:
    """Empties the cache map (after a restore)."""
    self.slot_of_row[:] = -1
    self.row_of_slot[:] = -1
    self.last_use[:] = -1


# ----------------------------------------------------------------------------
# Swaps on the devices.


def _swap_local(engine, cached: Sequence[str], state, swaps):
  """Per device: read the victims' rows out, write the loads in."""
  comm = engine.comm
  my = comm.index(MODEL)
  stacks = dict(state['stacks'])
  slots_all = {k: dict(v) for k, v in state['slots'].items()}
  evicted = {}
  writes = []  # (stack name, array key or None, local rows, values)
  for name in cached:
    sw = swaps[name]
    ids = sw['slots']
    t = next(t for t in engine.tables if t.name == name)
    out = {'weights': jnp.zeros((ids.shape[0], t.dim), jnp.float32)}
    replicated = False
    for s, pc, _ in table_access.pieces(engine, name):
      assert s.width == pc.width, (s.width, pc.width)
      replicated = s.replicated
      inr = (ids >= pc.row_start) & (ids < pc.row_start + pc.rows)
      mine = inr if s.replicated else inr & (my == pc.device)
      local = jnp.where(mine, pc.offset + ids - pc.row_start, s.capacity)
      safe = jnp.clip(local, 0, s.capacity - 1)
      cols = slice(pc.col_start, pc.col_start + pc.width)
      got = stacks[s.name][safe].astype(jnp.float32)
      out['weights'] = out['weights'].at[:, cols].add(
          jnp.where(mine[:, None], got, 0.0))
      writes.append((s.name, None, local, sw['weights'][:, cols]))
      for k, v in slots_all[s.name].items():
        if v.ndim == 2:
          if k not in out:
            out[k] = jnp.zeros((ids.shape[0], t.dim), jnp.float32)
          out[k] = out[k].at[:, cols].add(
              jnp.where(mine[:, None], v[safe], 0.0))
          writes.append((s.name, k, local, sw[k][:, cols]))
        else:  # a row-wise slot, the same in every column piece
          if k not in out:
            out[k] = jnp.zeros((ids.shape[0],), jnp.float32)
          if pc.col_start == 0:
            out[k] = out[k] + jnp.where(mine, v[safe], 0.0)
          writes.append((s.name, k, local, sw[k]))
    if not replicated:
      out = {k: comm.psum(v, MODEL) for k, v in out.items()}
    evicted[name] = out
  for stack, key, local, values in writes:  # all reads come first
    if key is None:
      stacks[stack] = stacks[stack].at[local].set(
          values.astype(stacks[stack].dtype), mode='drop')
    else:
      slots_all[stack][key] = slots_all[stack][key].at[local].set(
          values, mode='drop')
  return {'stacks': stacks, 'slots': slots_all}, evicted


def swap_fn(engine, cached: Sequence[str]):
  """The swap of a cached engine: `(emb_state, swaps) -> (emb_state,
  evicted)`.

  `swaps[table]` holds 'slots' `[K]` int32 (-1 pads) and, for 'weights'
  and every optimizer slot, the `[K, ...]` values to load. `evicted[table]`
  holds the values the slots had before, read before anything is written.
  The swaps are replicated; each device writes and reads only the slots it
  holds, and the evicted values are summed over 'model'.

  It runs as two compiled functions: the reads, then the writes, which
  donate the state. In one function that reads a donated array and then
  scatters into it, XLA:CPU copies the whole cache twice (52 ms against 5
  ms for a 20% cache of 26 tables of 100k rows; `benchmarks.cached_tables`).
  The runtime orders the reads before the donation.

  Args:
    engine: the `EmbeddingEngine`, built on the cache specs.
    cached: the cached tables' names.

  Returns:
    The function. It donates the state.
  """
  specs = engine.state_specs()
  local = lambda st, sw: _swap_local(engine, cached, st, sw)

  def reads(state, swaps):
    return engine._shard_map(  # pylint: disable=protected-access
        lambda st, sw: local(st, sw)[1], in_specs=(specs, P()),
        out_specs=P())(state, swaps)

  def writes(state, swaps):
    return engine._shard_map(  # pylint: disable=protected-access
        lambda st, sw: local(st, sw)[0], in_specs=(specs, P()),
        out_specs=specs)(state, swaps)

  rep = NamedSharding(engine.mesh, P())
  read_fn = jax.jit(reads, out_shardings=rep)
  write_fn = jax.jit(writes, out_shardings=engine.state_shardings(),
                     donate_argnums=0)

  def swap(state, swaps):
    evicted = read_fn(state, swaps)
    return write_fn(state, swaps), evicted

  return swap


# ----------------------------------------------------------------------------
# The cached tables of a model.


@dataclasses.dataclass
class Prepared:
  """One batch, mapped to cache slots, with its swaps.

  Attributes:
    index: the batch's number, from 0.
    ids: `[B, T]` int32 packed ids, the cached tables' columns as slots.
    swaps: the host arrays `swap_fn` takes.
    evict_rows: per cached table, `[K]` int64 old rows of the swapped slots
      (-1: none to write back).
    position: the input's position after this batch (`CachePipeline`'s
      `position_fn`, read before the lookahead batch was read), or None.
  """

  index: int
  ids: np.ndarray
  swaps: dict[str, dict[str, np.ndarray]]
  evict_rows: dict[str, np.ndarray]
  position: Any = None


class CachedTables:
  """The cached tables of a model: stores, slot maps and swaps.

  Args:
    tables: the model's table specs, all rows.
    features: the feature specs, in packed-column order.
    cache_rows: table name -> C, for the cached tables.
    batch_size: B, the global batch. It fixes K.
    directory: where the stores' files go (`<directory>/<table>.*.f32`), or
      None for host memory.

  Attributes:
    tables: the full table specs.
    device_tables: the specs the engine is built on: cached tables replaced
      by `cache_table_spec`.
    cached: the cached tables' names.
    max_swaps: table -> K, `min(C, B * its id columns)`.
    caches: table -> `RowCache`.
    stores: table -> `HostStore` (after `create` or `open`).

  Raises:
    ValueError: an unknown table, a cache size out of range or a table that
      cannot be cached (`check_cached`).
  """

  def __init__(self, tables: Sequence[TableSpec],
               features: Sequence[FeatureSpec], cache_rows: Mapping[str, int],
               batch_size: int, directory: str | None = None):
    by_name = {t.name: t for t in tables}
    for name in cache_rows:
      if name not in by_name:
        raise ValueError(f'cache_rows names unknown table {name!r}; the'
                         f' tables are {sorted(by_name)}.')
    for name, c in cache_rows.items():
      check_cached(by_name[name], c, f'cache_rows[{name!r}]')
    if jax.process_count() > 1:
      raise ValueError('cached tables run in a single process for now.')
    self.tables = tuple(tables)
    self.features = tuple(features)
    self.cached = tuple(t.name for t in tables if t.name in cache_rows)
    self.device_tables = tuple(
        cache_table_spec(t, cache_rows[t.name]) if t.name in cache_rows
        else t for t in tables)
    self.directory = directory
    cols: dict[str, list[int]] = {n: [] for n in self.cached}
    off = 0
    for f in features:
      if f.table in cols:
        cols[f.table].extend(range(off, off + f.max_ids))
      off += f.max_ids
    self.columns = {k: np.asarray(v, np.int64) for k, v in cols.items()}
    self.max_swaps = {n: max(1, min(cache_rows[n],
                                    batch_size * len(self.columns[n])))
                      for n in self.cached}
    self.caches = {n: RowCache(n, by_name[n].num_rows, cache_rows[n])
                   for n in self.cached}
    self.stores: dict[str, HostStore] = {}
    # Batch index -> table -> rows evicted by it and not written back yet.
    self._in_flight: dict[int, dict[str, np.ndarray]] = {}
    self._saved: dict[str, str] = {}  # table -> its last save's directory
    # Prepared batches whose swap has not run: index -> table -> (victim
    # slots, their old rows). `flush` undoes them to see the device's map.
    self._unswapped: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    self.lock = threading.RLock()  # prepare and flush see one map
    self._prepared = 0
    self._ahead, self._ahead_index = {}, None  # the lookahead's unique rows

  def create(self, key: jax.Array) -> None:
    """Makes the stores and writes their initial values.

    Args:
      key: the PRNG key that `EmbeddingEngine.init` is given. Each table's
        rows are then the ones an engine over all rows would make.
    """
    seeds = np.asarray(initialization.table_seeds(key, len(self.tables)))
    for i, t in enumerate(self.tables):
      if t.name in self.caches:
        store = HostStore(t, self.directory, create=True)
        store.initialize(jnp.uint32(seeds[i]))
        self.stores[t.name] = store

  def allocate(self) -> None:
    """Makes empty stores, to `load` a checkpoint into."""
    for t in self.tables:
      if t.name in self.caches:
        self.stores[t.name] = HostStore(t, self.directory, create=True)

  @property
  def nbytes(self) -> int:
    """The bytes of all stores."""
    return sum(s.nbytes for s in self.stores.values())

  # --------------------------------------------------------------------------
  # Batches.

  def _rows(self, name: str, ids: np.ndarray, with_counts: bool = False):
    col = ids[:, self.columns[name]]
    r = self.caches[name].num_rows
    valid = col[(col >= 0) & (col < r)].astype(np.int64)
    if with_counts:
      return np.unique(valid, return_counts=True)
    return np.unique(valid)

  def prepare(self, index: int, ids: np.ndarray,
              next_ids: np.ndarray | None, count: bool = True) -> Prepared:
    """Maps a batch to cache slots and reads its loads from the stores.

    Call it in batch order, after the write-backs of batches up to
    `index - 2` (`write_back`).

    Args:
      index: the batch's number, from 0 (eval batches: negative).
      ids: `[B, T]` packed ids.
      next_ids: the next batch's ids, or None at the end.
      count: add the batch to the hit and miss counts.

    Returns:
      The `Prepared` batch. Invalid ids (not -1, outside the table) become
      C, outside the cache, so the engine counts them.

    Raises:
      ValueError: a cache is too small (`RowCache.assign`).
      RuntimeError: a load would read a row whose write-back is in flight.
    """
    with self.lock:
      return self._prepare(index, ids, next_ids, count)

  def _prepare(self, index, ids, next_ids, count) -> Prepared:
    ids = np.array(ids, np.int32, copy=True)
    swaps, evict_rows, undo = {}, {}, {}
    # The unique rows of this batch were taken as the last call's lookahead.
    ahead = self._ahead if self._ahead_index == index else {}
    self._ahead, self._ahead_index = {}, index + 1
    for name in self.cached:
      cache, k = self.caches[name], self.max_swaps[name]
      rows, counts = ahead.get(name) or self._rows(name, ids, True)
      nxt = None
      if next_ids is not None:
        self._ahead[name] = self._rows(name, next_ids, True)
        nxt = self._ahead[name][0]
      slots, loads, old = cache.assign(rows, nxt, counts, count=count)
      undo[name] = (slots, old)
      if len(slots) > k:
        raise ValueError(
            f'cached table {name!r}: {len(slots)} loads in one batch, more'
            f' than max_swaps={k}.')
      for i, flight in self._in_flight.items():
        if len(loads) and np.isin(loads, flight[name]).any():
          raise RuntimeError(
              f'cached table {name!r}: batch {index} loads a row that batch'
              f' {i} evicted and whose write-back has not landed.')
      values = self.stores[name].read(loads)
      sw = {'slots': np.full(k, -1, np.int32)}
      sw['slots'][:len(slots)] = slots
      for a, v in values.items():  # the padding is never written
        buf = np.empty((k,) + v.shape[1:], np.float32)
        buf[:len(v)] = v
        sw[a] = buf
      ev = np.full(k, -1, np.int64)
      ev[:len(old)] = old
      swaps[name], evict_rows[name] = sw, ev
      col = ids[:, self.columns[name]]
      valid = (col >= 0) & (col < cache.num_rows)
      mapped = np.where(valid, cache.slot_of_row[np.where(valid, col, 0)],
                        np.where(col == -1, -1, cache.cache_rows))
      ids[:, self.columns[name]] = mapped
    self._in_flight[index] = {n: np.sort(r[r >= 0])
                              for n, r in evict_rows.items()}
    self._unswapped[index] = undo
    self._prepared += 1
    if self._prepared % _RELEASE_EVERY == 0:  # keep the resident set small
      for store in self.stores.values():
        store.release()
    return Prepared(index, ids, swaps, evict_rows)

  def rollback(self) -> None:
    """Undoes the maps of prepared batches whose swaps never ran.

    After it the map matches the device again. `CachePipeline.finish`
    calls it for the batches it drops.
    """
    with self.lock:
      for i in sorted(self._unswapped, reverse=True):
        for name, (victims, old) in self._unswapped[i].items():
          c = self.caches[name]
          loaded = c.row_of_slot[victims]
          c.slot_of_row[loaded[loaded >= 0]] = -1
          c.row_of_slot[victims] = old
          c.slot_of_row[old[old >= 0]] = victims[old >= 0]
        self._in_flight.pop(i, None)
      self._unswapped = {}
      self._ahead, self._ahead_index = {}, None

  def swapped(self, prepared: Prepared) -> None:
    """Records that `swap_fn` was dispatched for a prepared batch."""
    with self.lock:
      self._unswapped.pop(prepared.index, None)

  def write_back(self, prepared: Prepared, evicted) -> None:
    """Writes a step's evicted rows back to the stores.

    Args:
      prepared: the batch that `swap_fn` ran for.
      evicted: what it returned (device or host arrays).
    """
    host = jax.device_get(evicted)
    self._in_flight.pop(prepared.index, None)
    for name in self.cached:
      old = prepared.evict_rows[name]
      keep = old >= 0
      if keep.any():
        order = np.argsort(old[keep])
        self.stores[name].write(
            old[keep][order],
            {a: np.asarray(v)[keep][order] for a, v in host[name].items()})

  def flush(self, emb_state, engine) -> None:
    """Writes every cached row's current value to the stores.

    The cache keeps its rows. Call it before a checkpoint, an export or a
    read of the stores, after the write-backs of every step whose swap was
    dispatched. Batches prepared but not swapped yet (`swapped`) are seen
    through: their victims' rows are still in the device's slots, and
    their loads are not.

    Args:
      emb_state: the engine's state.
      engine: the engine (on the cache specs).
    """
    with self.lock:
      self._flush(emb_state, engine)

  def _flush(self, emb_state, engine) -> None:
    for name in self.cached:
      row_of_slot = self.caches[name].row_of_slot.copy()
      for i in sorted(self._unswapped, reverse=True):
        victims, old = self._unswapped[i][name]
        row_of_slot[victims] = old
      slots = np.flatnonzero(row_of_slot >= 0).astype(np.int32)
      rows = row_of_slot[slots]
      if not len(slots):
        continue
      order = np.argsort(rows)
      values = {'weights': table_access.get_table(engine, emb_state, name)[
          slots[order]]}
      for k in table_access.table_slots(engine, name):
        values[k] = table_access.get_table(engine, emb_state, name,
                                           slot=k)[slots[order]]
      self.stores[name].write(rows[order], values)
      self.stores[name].release()

  def hit_rates(self) -> dict[str, float]:
    """Per cached table, the share of unique rows found cached so far."""
    out = {}
    for name, c in self.caches.items():
      total = c.hits + c.misses
      out[name] = c.hits / total if total else 1.0
    return out

  def counts(self) -> dict[str, tuple[int, int, int, int]]:
    """Per cached table: (unique-row hits, misses, id hits, ids) so far.

    An id hit is a lookup whose row was cached: TorchRec's UVM cache
    counts these (`cache_hit_rate`); the unique-row figures count each
    row once per batch, as the loads do.
    """
    return {n: (c.hits, c.misses, c.id_hits, c.ids)
            for n, c in self.caches.items()}

  def save(self, directory: str) -> None:
    """Saves every store under `<directory>/<table>` (call `flush` first).

    It writes into `<directory>.tmp`, then marks it complete and renames
    it, so a crash leaves no half-written store checkpoint under the name.
    Chunks unchanged since the last save or load are hard links to it.
    """
    tmp = directory + '.tmp'
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
    for name, store in self.stores.items():
      prev = self._saved.get(name)
      store.save(os.path.join(tmp, name), prev)
    with open(os.path.join(tmp, 'complete'), 'w') as f:
      f.write('ok\n')
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
    self._saved = {n: os.path.join(directory, n) for n in self.stores}

  def load(self, directory: str) -> None:
    """Loads every store from `save`'s directory and empties the caches.

    The cache sizes may differ from the saved run's: only the stores are
    saved.
    """
    for name, store in self.stores.items():
      store.load(os.path.join(directory, name))
      self.caches[name].clear()
    self._in_flight = {}
    self._saved = {n: os.path.join(directory, n) for n in self.stores}


class CachePipeline:
  """Prepares batches one ahead of the step, on its own thread.

  `prepare` of batch j needs batch j + 1's ids (the lookahead) and the
  write-backs of steps up to j - 2. The training loop hands each step's
  evicted values over with `evicted(prepared, values)` right after
  dispatching its swap; the thread writes them back (waiting for the device
  there, not in the loop) before it reads the store for batch j + 2.
  Write-backs run in step order under one lock, whoever runs them: a row
  evicted twice is written in the order of its evictions.

  Args:
    cached: the `CachedTables`.
    batches: an iterator of `[B, T]` packed ids, or of dicts with 'ids'.
    position_fn: called before each batch is read; what it returns for the
      batch after batch j is `Prepared.position` of batch j (the input's
      position to save with a checkpoint after step j, although the
      lookahead has read further).
    pause_after: `pause_after(j)` true makes the thread stop after
      preparing batch j until `resume()`: the map then matches the device
      after step j, and the loop may run other swaps (an evaluation).

  Yields:
    `(Prepared, batch)`: the mapped batch and the original item.
  """

  def __init__(self, cached: CachedTables, batches: Iterable[Any], *,
               position_fn=None, pause_after=None):
    self.cached = cached
    self._it = iter(batches)
    self._position_fn = position_fn
    self._pause_after = pause_after
    self._cond = threading.Condition()
    self._wb_lock = threading.Lock()
    self._pending: dict[int, tuple[Prepared, Any]] = {}
    self._ready: list = []
    self._error: BaseException | None = None
    self._done = False
    self._paused_at: int | None = None
    self._handed = -1
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  @staticmethod
  def _ids(item):
    return item['ids'] if isinstance(item, dict) else item

  def _write_back(self, upto: int) -> None:
    """Writes back the handed-over steps up to `upto`, in order."""
    with self._wb_lock:
      with self._cond:
        items = [self._pending.pop(i) for i in sorted(self._pending)
                 if i <= upto]
      for prepared, values in items:
        self.cached.write_back(prepared, values)

  def _wait_for(self, index: int) -> bool:
    """Waits until steps up to `index` are handed over, and writes them back.

    Returns:
      False when the pipeline was finished while waiting.
    """
    with self._cond:
      while self._handed < index and not self._done:
        self._cond.wait()
      if self._handed < index:
        return False
    self._write_back(index)
    return True

  def _position(self):
    return None if self._position_fn is None else self._position_fn()

  def _run(self):
    try:
      cur = next(self._it, None)
      j = 0
      while cur is not None:
        position = self._position()
        nxt = next(self._it, None)
        if not self._wait_for(j - 2):
          return
        prepared = self.cached.prepare(
            j, self._ids(cur), None if nxt is None else self._ids(nxt))
        prepared.position = position
        with self._cond:
          while self._ready and not self._done:
            self._cond.wait()
          if self._done:
            return
          self._ready.append((prepared, cur))
          if self._pause_after and self._pause_after(j):
            self._paused_at = j
          self._cond.notify_all()
          while self._paused_at is not None and not self._done:
            self._cond.wait()
          if self._done:
            return
        cur, j = nxt, j + 1
    except BaseException as e:  # pylint: disable=broad-except
      self._error = e
    with self._cond:  # the end (or the error) follows the last batch
      self._ready.append(None)
      self._cond.notify_all()

  def __iter__(self) -> Iterator[tuple[Prepared, Any]]:
    return self

  def __next__(self) -> tuple[Prepared, Any]:
    with self._cond:
      while not self._ready:
        self._cond.wait()
      item = self._ready.pop(0)
      self._cond.notify_all()
    if item is None:
      if self._error is not None:
        raise self._error
      raise StopIteration
    return item

  def evicted(self, prepared: Prepared, values) -> None:
    """Hands over a step's evicted values, to be written back."""
    self.cached.swapped(prepared)
    with self._cond:
      self._pending[prepared.index] = (prepared, values)
      self._handed = max(self._handed, prepared.index)
      self._cond.notify_all()

  def drain(self) -> None:
    """Writes back every step handed over so far (waits for the device)."""
    self._write_back(1 << 62)

  def resume(self, index: int) -> None:
    """Lets the thread go on if it paused after batch `index`."""
    with self._cond:
      if self._paused_at == index:
        self._paused_at = None
        self._cond.notify_all()

  def finish(self) -> None:
    """Writes back everything handed over and stops the thread.

    Batches prepared and not yet taken are dropped: their swaps never run,
    which `CachedTables.flush` sees through.
    """
    with self._cond:
      self._done = True
      self._cond.notify_all()
    self._thread.join()
    self.drain()
    self.cached.rollback()
