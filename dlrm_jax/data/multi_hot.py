"""MLPerf-style synthetic multi-hot bags inside an exported function.

`dlrm_jax.data.loader.MultiHot.expand` (NumPy, the training input pipeline)
turns a feature's single id `i` into the bag `[i, e_1(i), .., e_{h-1}(i)]`
from a keyed SplitMix64 hash; `bags` below is the same computation in
jax.numpy, so an export of a multi-hot model scores raw rows exactly as the
model was trained. The hash needs 64-bit integers and float64: it is traced
under `jax.enable_x64(True)`, which only changes the types inside; the
function's inputs and outputs stay 32-bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mix(x, key, mask):
  """SplitMix64's finalizer (`loader._mix`), uint64 in and out."""
  z = (x ^ key) * jnp.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> jnp.uint64(30))) * jnp.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> jnp.uint64(27))) * jnp.uint64(0x94D049BB133111EB)
  z = z ^ (z >> jnp.uint64(31))
  return z & mask


def bags(first: jax.Array, multi_hot, k: int) -> jax.Array:
  """`[B, h]` int32 bag of feature k (hotness h) from its `[B]` ids >= 0.

  Args:
    first: `[B]` int32 table rows (the single-hot ids).
    multi_hot: the `loader.MultiHot` of the training data.
    k: the feature's index among the sparse features (the packed order).
  """
  h, rows = multi_hot.hotness[k], multi_hot.num_rows[k]
  if h == 1:
    return first[:, None]
  with jax.enable_x64(True):
    j = jnp.arange(1, h, dtype=jnp.uint64)[None, :]
    key = jnp.uint64((multi_hot.seed * 1_000_003 + k) & (2**63 - 1))
    x = first.astype(jnp.uint64)[:, None] * jnp.uint64(h) + j
    u = _mix(x, key, jnp.uint64(2**53 - 1)).astype(jnp.float64) / 2.0**53
    if multi_hot.distribution == 'uniform':
      extra = jnp.floor(u * rows).astype(jnp.int64)
    else:
      extra = jnp.floor(jnp.minimum((1.0 - u) ** -4.0 - 1.0, 2.0**62))
      extra = extra.astype(jnp.int64) % rows
    extra = extra.astype(jnp.int32)
  return jnp.concatenate([first[:, None].astype(jnp.int32), extra], axis=1)
