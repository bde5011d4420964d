"""Embedding tables of an export: one file per table, quantized on request.

Every table of an export is written as `.npy` files under `tables/` beside the
exported function, streamed from the devices that hold it: each process
writes the rows its devices own (a shared file system is assumed for several
processes), a block of at most `CHUNK_ROWS` rows at a time, so no host ever
holds one table whole, let alone all of them. A loader reads them with
`np.load(mmap_mode='r')` (`dlrm_jax.serving.runtime`).

Quantization (`quantize=`), as TorchEasyRec's QUANT_EMB and FBGEMM's
table-batched embeddings store serving tables:
  None:   float32 rows (bfloat16 tables too: .npy has no bfloat16),
          `<name>.npy`.
  'fp16': float16 rows, `<name>.npy`.
  'int8': FBGEMM's fused 8-bit row-wise format, split into three arrays:
          `<name>.q.npy` uint8 `[R, D]`, `<name>.scale.npy` and
          `<name>.bias.npy` float32 `[R]`, with, per row (FBGEMM
          `FloatOrHalfToFused8BitRowwiseQuantizedSBFloatRef`, QuantUtils.cc):
            bias = min(w), scale = (max(w) - min(w)) / 255,
            q = lrint((w - bias) * 255 / (max(w) - min(w) + 1e-8)),
          dequantized as q * scale + bias (FBGEMM's
          `Fused8BitRowwiseQuantizedSBFloatToFloatOrHalf`).
The exported function takes the stored arrays and dequantizes the rows it
gathers (`take_rows`), so the tables stay small in memory.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dlrm_jax.embedding import rounding
from dlrm_jax.embedding import table_access

QUANTIZE = (None, 'fp16', 'int8')
CHUNK_ROWS = 1 << 16
_EPS = 1e-8


def check_quantize(quantize: str | None, path: str = 'quantize') -> None:
  """Checks a quantization name.

  Args:
    quantize: None, 'fp16' or 'int8'.
    path: the config path or flag to name in the message.

  Raises:
    ValueError: any other value.
  """
  if quantize not in QUANTIZE:
    raise ValueError(
        f'{path} ({quantize!r}) must be one of {list(QUANTIZE)}.')


def quantize_int8(w: np.ndarray) -> dict[str, np.ndarray]:
  """Quantizes `[R, D]` rows in FBGEMM's 8-bit row-wise format.

  The module docstring gives the formulas.

  Args:
    w: the rows.

  Returns:
    {'q': uint8 `[R, D]`, 'scale': float32 `[R]`, 'bias': float32 `[R]`}.
  """
  w = np.asarray(w, np.float32)
  lo = w.min(axis=1)
  span = w.max(axis=1) - lo
  q = np.rint((w - lo[:, None]) * (np.float32(255.0) /
                                   (span + np.float32(_EPS)))[:, None])
  return {'q': np.clip(q, 0, 255).astype(np.uint8),
          'scale': (span / np.float32(255.0)).astype(np.float32),
          'bias': lo.astype(np.float32)}


def quantize_rows(w: np.ndarray, quantize: str | None):
  """Puts rows in the stored form of `quantize`.

  Args:
    w: the rows, `[R, D]`.
    quantize: None, 'fp16' or 'int8'.

  Returns:
    An array, or int8's dict of arrays.
  """
  if quantize == 'int8':
    return quantize_int8(w)
  if quantize == 'fp16':
    return np.asarray(w, np.float32).astype(np.float16)
  return np.asarray(w, np.float32)


def take_rows(table, ids: jax.Array) -> jax.Array:
  """Gathers rows of a stored table as float32, dequantized.

  Args:
    table: the stored table: an array, or int8's dict.
    ids: the row ids, any shape.

  Returns:
    The rows, `[..., D]`.
  """
  if isinstance(table, dict):
    q = jnp.take(table['q'], ids, axis=0).astype(jnp.float32)
    return (q * jnp.take(table['scale'], ids)[..., None] +
            jnp.take(table['bias'], ids)[..., None])
  return jnp.take(table, ids, axis=0).astype(jnp.float32)


def stored_structs(spec, quantize: str | None):
  """Gives the ShapeDtypeStructs of a table's stored form.

  That form is what the exported function takes.

  Args:
    spec: the table spec.
    quantize: None, 'fp16' or 'int8'.

  Returns:
    One struct, or int8's dict of structs.
  """
  r, d = spec.num_rows, spec.dim
  if quantize == 'int8':
    return {'q': jax.ShapeDtypeStruct((r, d), np.uint8),
            'scale': jax.ShapeDtypeStruct((r,), np.float32),
            'bias': jax.ShapeDtypeStruct((r,), np.float32)}
  dtype = np.float16 if quantize == 'fp16' else np.float32
  return jax.ShapeDtypeStruct((r, d), dtype)


def file_names(name: str, quantize: str | None):
  """Gives the files of a table, relative to the export directory.

  Args:
    name: the table's name.
    quantize: None, 'fp16' or 'int8'.

  Returns:
    One name, or int8's dict of names, as `stored_structs` is shaped.
  """
  if quantize == 'int8':
    return {k: f'tables/{name}.{k}.npy' for k in ('q', 'scale', 'bias')}
  return f'tables/{name}.npy'


def _writer_blocks(engine, state, name):
  """(stack, piece, the jax shard holding it, its first row in the shard) for
  the blocks this process writes: each stored block once, by the process of
  the lowest-id device holding it."""
  out = []
  for s, pc, g0 in table_access.pieces(engine, name):
    arr = state['stacks'][s.name]
    holders = [d for d, idx in arr.sharding.devices_indices_map(
        arr.shape).items() if table_access.covers(
            idx[0], arr.shape[0], g0, pc.rows)]
    writer = min(holders, key=lambda d: d.id)
    if writer.process_index != jax.process_index():
      continue
    shard = next(sh for sh in arr.addressable_shards if sh.device == writer)
    r0 = shard.index[0].indices(arr.shape[0])[0]
    out.append((s, pc, shard, g0 - r0))
  return out


def write_tables(engine, state, out_dir: str, quantize: str | None = None,
                 stores: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes every table of an engine state under `out_dir/tables`.

  With several processes, it is collective: every process calls it. Process 0
  creates the files. Then each process fills the rows its devices hold.

  Args:
    engine: the embedding engine.
    state: the engine state.
    out_dir: the export directory.
    quantize: None, 'fp16' or 'int8'.
    stores: the `cache.HostStore` of each cached table: those tables are
      read from their stores (flushed), chunk by chunk, and not from the
      engine, which holds only their caches. One process only.

  Returns:
    {table name: its files relative to out_dir}, as `file_names` gives them.

  Raises:
    ValueError: `quantize` is not one of QUANTIZE.
  """
  check_quantize(quantize)
  stores = stores or {}
  tables = [stores[t.name].table if t.name in stores else t
            for t in engine.tables]
  os.makedirs(os.path.join(out_dir, 'tables'), exist_ok=True)
  files = {t.name: file_names(t.name, quantize) for t in tables}
  if jax.process_index() == 0:
    for t in tables:
      structs = stored_structs(t, quantize)
      for rel, st in zip(jax.tree.leaves(files[t.name]),
                         jax.tree.leaves(structs)):
        m = np.lib.format.open_memmap(os.path.join(out_dir, rel), mode='w+',
                                      dtype=st.dtype, shape=st.shape)
        del m
  _sync('dlrm_jax.serving.tables.created')
  for t in tables:
    pieces = list(table_access.pieces(engine, t.name))
    split_cols = any(pc.width != t.dim for _, pc, _ in pieces)
    open_ = lambda rel: np.load(os.path.join(out_dir, rel), mmap_mode='r+')
    outs = jax.tree.map(open_, files[t.name])
    if t.name in stores:  # a cached table: every row is in its store
      weights = stores[t.name].arrays['weights']
      for a in range(0, t.num_rows, CHUNK_ROWS):
        b = min(a + CHUNK_ROWS, t.num_rows)
        _put(outs, slice(a, b), slice(None),
             quantize_rows(np.array(weights[a:b]), quantize))
        if (a // CHUNK_ROWS) % 64 == 63:  # keep the resident set small
          stores[t.name].release()
          for m in jax.tree.leaves(outs):
            _release(m)
      stores[t.name].release()
    elif quantize == 'int8' and split_cols:
      # Row-wise scales need whole rows; column pieces may sit on other
      # processes: read the table (collective), process 0 writes it.
      w = table_access.get_table(engine, state, t.name)
      if jax.process_index() == 0:
        for a in range(0, t.num_rows, CHUNK_ROWS):
          b = min(a + CHUNK_ROWS, t.num_rows)
          _put(outs, slice(a, b), slice(None), quantize_rows(w[a:b], quantize))
    else:
      for s, pc, shard, off in _writer_blocks(engine, state, t.name):
        for a in range(0, pc.rows, CHUNK_ROWS):
          b = min(a + CHUNK_ROWS, pc.rows)
          block = rounding.to_logical(np.asarray(shard.data[off + a:off + b]),
                                      s.dtype)
          rows = slice(pc.row_start + a, pc.row_start + b)
          cols = slice(pc.col_start, pc.col_start + pc.width)
          _put(outs, rows, cols, quantize_rows(block, quantize))
    for m in jax.tree.leaves(outs):
      m.flush()
    del outs
  _sync('dlrm_jax.serving.tables.written')
  return files


def _release(m: np.ndarray) -> None:
  """Writes a memmap's dirty pages and drops them from the resident set."""
  m.flush()
  mm = getattr(m, '_mmap', None)
  if mm is not None and hasattr(mmap, 'MADV_DONTNEED'):
    mm.madvise(mmap.MADV_DONTNEED)


def _put(outs, rows, cols, stored):
  if isinstance(stored, dict):
    outs['q'][rows, cols] = stored['q']
    outs['scale'][rows] = stored['scale']
    outs['bias'][rows] = stored['bias']
  else:
    outs[rows, cols] = stored


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
