"""Counter-based hashing and stochastic rounding of low-precision table rows.

A bfloat16 weight near 0.01 has an ulp of about 6e-5: round-to-nearest drops
every update smaller than half of it (3e-5 at lr 0.05 is a gradient of 6e-4,
common for rare ids under a batch-mean loss). Stochastic rounding rounds `x`
up to the next representable value with probability (x - lo) / (hi - lo) and
down otherwise, so the stored value is unbiased (E[round(x)] = x) and small
updates move the table on average as far as in float32. FBGEMM's
table-batched embeddings do the same for fp16/bf16 weights
(`stochastic_rounding=True`, the default of
`SplitTableBatchedEmbeddingBagsCodegen`).

The random bits are a hash of (seed, step, row, column), not a PRNG state:
the result is reproducible, needs no state in the checkpoint, and every
replica of a row draws the same bits, so replicas stay identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dlrm_jax import hashing

LOW_PRECISION = ('bfloat16', 'float16')


def _mix(z: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer (a bijection on uint32)."""
  return hashing.mix32(z, jnp)


def hash_bits(seed: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
  """Hashes a position with two rounds of MurmurHash3's finalizer.

  Args:
    seed: uint32 seeds.
    row: integer row numbers.
    col: integer column numbers.

  Returns:
    uint32 hashes, of the broadcast shape of the inputs.
  """
  seed = jnp.asarray(seed, jnp.uint32)
  z = _mix(seed ^ (row.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)))
  return _mix(z ^ (col.astype(jnp.uint32) * jnp.uint32(0x85EBCA77) +
                   jnp.uint32(0x165667B1)))


def step_seed(seed: int | jax.Array, step: jax.Array) -> jax.Array:
  """Derives a per-step seed.

  Args:
    seed: the base uint32 seed, or an array of them.
    step: the 0-based step.

  Returns:
    uint32 seeds, of the broadcast shape of `seed` and `step`.
  """
  s = jnp.asarray(step).astype(jnp.uint32)
  return _mix(jnp.asarray(seed, jnp.uint32) ^ _mix(s + jnp.uint32(0x6A09E667)))


def _bf16_from_bits(x: jax.Array, add: jax.Array) -> jax.Array:
  """Casts f32 to bf16 by adding `add` to the bits and truncating.

  `add` is a uint32 below 2^16. `0x7FFF + lsb` rounds to nearest. A uniform
  16-bit `add` rounds stochastically. Only integer ops are used, because
  XLA:CPU's bf16 convert is slow.
  """
  u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  u = (u + add) >> 16
  # NaN stays NaN (the quiet bit survives); +-inf and overflow give +-inf.
  return jax.lax.bitcast_convert_type(u.astype(jnp.uint16), jnp.bfloat16)


def stochastic_round(x: jax.Array, dtype, seed: int | jax.Array,
                     row_ids: jax.Array, step: jax.Array,
                     col_ids: jax.Array | None = None) -> jax.Array:
  """Rounds `[U, D]` float32 rows to `dtype`, stochastically and reproducibly.

  Args:
    x: `[U, D]` float32 values.
    dtype: bfloat16 or float16. float32 returns `x` unchanged.
    seed: a uint32 seed, or `[U]` of them, such as one per table.
    row_ids: `[U]` integer row numbers. They are an input of the hash.
    step: the training step. Every step draws new bits.
    col_ids: `[U, D]` or `[D]` column numbers. The default is 0..D-1.

  Returns:
    `[U, D]` values of `dtype`. Each element is one of its two neighbours in
    `dtype`. The upper one comes with probability `(x - lo) / (hi - lo)`.

  Raises:
    ValueError: if `dtype` is not float32, bfloat16 or float16.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return x
  x = x.astype(jnp.float32)
  cols = (jnp.arange(x.shape[-1], dtype=jnp.uint32)[None, :]
          if col_ids is None else jnp.asarray(col_ids))
  seed = jnp.asarray(seed, jnp.uint32)
  if seed.ndim:
    seed = seed.reshape(-1, 1)
  bits = hash_bits(step_seed(seed, step), row_ids.reshape(-1, 1), cols)
  if dtype == jnp.bfloat16:
    # The low 16 bits of a float32's mantissa are the fraction of a bf16 ulp
    # (in sign-magnitude, so this rounds away from zero with that
    # probability, for both signs).
    return _bf16_from_bits(x, bits >> 16)
  if dtype == jnp.float16:
    lo = x.astype(jnp.float16)  # the nearest; `other` is the other neighbour
    lo_f = lo.astype(jnp.float32)
    toward = jnp.where(x > lo_f, jnp.inf, -jnp.inf).astype(jnp.float16)
    other = jnp.nextafter(lo, toward)
    other_f = other.astype(jnp.float32)
    gap = other_f - lo_f
    p = jnp.where((gap != 0) & jnp.isfinite(gap), (x - lo_f) / gap, 0.0)
    u = (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
    return jnp.where(u < p, other, lo)
  raise ValueError(f'stochastic rounding to {dtype} is not supported; table'
                   f' dtypes are float32 and {list(LOW_PRECISION)}.')


def round_nearest(x: jax.Array, dtype) -> jax.Array:
  """Casts to `dtype`, rounding to nearest even.

  bfloat16 goes through integer ops, as in `stochastic_round`.

  Args:
    x: the values.
    dtype: the target dtype.

  Returns:
    `x` cast to `dtype`.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16:
    x = x.astype(jnp.float32)
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    lsb = (u >> 16) & jnp.uint32(1)
    out = _bf16_from_bits(x, jnp.uint32(0x7FFF) + lsb)
    return jnp.where(jnp.isnan(x), jnp.bfloat16(jnp.nan), out)
  return x.astype(dtype)


# ----------------------------------------------------------------------------
# Storage: bfloat16 and float16 tables are kept in float16 arrays. A float16
# table holds its values; a bfloat16 table holds its bit patterns, the
# bfloat16 bits read as float16 (the same two bytes, never a float16 value).
#
# Why float16, not bfloat16: XLA:CPU has no native bf16 scatter or
# dynamic-update. It normalizes one to float32, converting the WHOLE table
# there and back on every step (0.9 s for a 2.6M x 64 table), and a bitcast
# of the whole table to another dtype inside the step copies it too (0.44 s).
# Its float16 scatter is native: 0.3 ms for the same 4096 rows. So only rows
# are bitcast, at the boundaries: gathered rows -> `rows_to_float32`; updated
# rows -> rounded -> `to_storage`.
#
# Why a float type, not uint16 (the earlier carrier): the tables are
# variables of a Flax module (`dlrm_jax.models.embed`), and the sparse
# update reaches them as the cotangent of a `jax.custom_vjp`, which must
# have its primal's dtype. An integer primal has float0 cotangents, which
# carry nothing; a float16 one carries the new table. The carrier is only
# copied and scattered, never computed with, so every bit pattern survives:
# and a bfloat16 value read as float16 is a float16 NaN or infinity only
# when its magnitude is at least 2^121 (the bfloat16 bits 14..10 are then
# all ones), far beyond any trained weight.

CARRIER = jnp.dtype(jnp.float16)


def storage_dtype(dtype) -> np.dtype:
  """Gives the dtype that a table of logical `dtype` is stored in.

  Args:
    dtype: the logical table dtype.

  Returns:
    float16 for bfloat16 and float16 (bfloat16 as its bit patterns).
    Otherwise `dtype` itself.
  """
  dtype = jnp.dtype(dtype)
  return CARRIER if dtype.name in LOW_PRECISION else dtype


def to_storage(x, dtype):
  """Converts values to their stored form, `storage_dtype(dtype)`.

  numpy in gives numpy out.

  Args:
    x: values of the logical `dtype`, or float32 values. float32 values are
      rounded to nearest.
    dtype: the logical table dtype.

  Returns:
    The values in the stored dtype.
  """
  dtype = jnp.dtype(dtype)
  if storage_dtype(dtype) == dtype:
    if isinstance(x, np.ndarray):
      return np.asarray(x, dtype)
    if x.dtype != dtype and dtype == jnp.float16:
      return round_nearest(x, dtype)
    return x.astype(dtype)
  if isinstance(x, np.ndarray):
    return np.asarray(x, dtype).view(np.float16)
  if x.dtype != dtype:
    x = round_nearest(x, dtype)
  return jax.lax.bitcast_convert_type(x, CARRIER)


def to_logical(x, dtype):
  """Converts stored values to the logical `dtype`.

  A bfloat16 table takes a bitcast. Anything else is returned as is. numpy
  in gives numpy out.

  Args:
    x: stored values.
    dtype: the logical table dtype.

  Returns:
    The values in the logical dtype.
  """
  dtype = jnp.dtype(dtype)
  if storage_dtype(dtype) == dtype or x.dtype != CARRIER:
    return x
  if isinstance(x, np.ndarray):
    return x.view(dtype)
  return jax.lax.bitcast_convert_type(x, dtype)


def rows_to_float32(x: jax.Array, dtype) -> jax.Array:
  """Converts stored rows to their exact float32 values.

  bfloat16 takes a shift of its bits, with no bf16 op at all.

  Args:
    x: stored rows.
    dtype: the logical table dtype.

  Returns:
    float32 rows, of the shape of `x`.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16 and x.dtype == CARRIER:
    u = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(u, jnp.float32)
  return to_logical(x, dtype).astype(jnp.float32)
