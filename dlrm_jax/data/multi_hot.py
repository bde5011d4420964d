"""MLPerf-style synthetic multi-hot bags, on numpy or jax.numpy.

As in MLPerf's DLRM-DCNv2 benchmark, an id `i` of feature k becomes the bag
`[i, e_1(i), ..., e_{h-1}(i)]` of hotness h, where the extra ids are fixed
pseudo-random rows of the same table (R rows), uniform or Pareto (a = 0.25)
distributed. MLPerf keeps them in a table per feature seeded by k; here they
are a keyed hash of (k, i, j), so nothing is stored and every process and run
computes the same bags:

  key    = (seed * 1_000_003 + k) mod 2^63
  u_j    = splitmix64(i * h + j, key) mod 2^53 / 2^53      in [0, 1)
  e_j(i) = floor(u_j R)                                    (uniform)
         = floor(min((1 - u_j)^-4 - 1, 2^62)) mod R        (pareto: numpy's
                                                            pareto(a) taken
                                                            modulo the rows)

`bags` computes them with numpy (`dlrm_jax.data.loader.MultiHot.expand`, the
training input pipeline) or with jax.numpy (inside an exported function,
`dlrm_jax.serving.export`), so an export of a multi-hot model scores raw
rows exactly as the model was trained. The hash needs 64-bit integers and
float64: with jax.numpy it is traced under `jax.enable_x64(True)`, which only
changes the types inside; the function's inputs and outputs stay 32-bit.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from dlrm_jax import hashing


def _x64(xp):
  """The context the hash runs in: 64-bit types on for jax.numpy."""
  return jax.enable_x64(True) if xp is jnp else contextlib.nullcontext()


def bags(first, multi_hot, k: int, xp=jnp):
  """Expands single-hot ids of feature k into bags of its hotness h.

  Args:
    first: `[B]` integer table rows, the single-hot ids. -1 means none.
    multi_hot: the `loader.MultiHot` of the training data.
    k: the feature's index among the sparse features, in packed order.
    xp: jax.numpy for the export, or numpy for the input pipeline.

  Returns:
    `[B, h]` int32 bags: the id, then its h - 1 extra ids. The extra ids are
    -1 where the id is -1.
  """
  h, rows = multi_hot.hotness[k], multi_hot.num_rows[k]
  if h == 1:
    return first[:, None].astype(xp.int32)
  with _x64(xp):
    j = xp.arange(1, h, dtype=xp.uint64)[None, :]
    key = xp.uint64((multi_hot.seed * 1_000_003 + k) & (2**63 - 1))
    x = first.astype(xp.uint64)[:, None] * xp.uint64(h) + j
    u = hashing.splitmix64(x, key, xp.uint64(2**53 - 1), xp).astype(
        xp.float64) / 2.0**53
    if multi_hot.distribution == 'uniform':
      extra = xp.floor(u * rows).astype(xp.int64)
    else:
      extra = xp.floor(xp.minimum((1.0 - u) ** -4.0 - 1.0, 2.0**62))
      extra = extra.astype(xp.int64) % rows
    extra = xp.where(first[:, None] >= 0, extra, -1).astype(xp.int32)
  return xp.concatenate([first[:, None].astype(xp.int32), extra], axis=1)
