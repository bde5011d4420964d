"""Integer hash finalizers, identical on numpy and jax.numpy.

  splitmix64   SplitMix64's 64-bit finalizer of a keyed value: the global
               shuffle (`data.loader.FeistelPermutation`) and the synthetic
               multi-hot bags (`data.multi_hot`).

Each takes `xp` (numpy or jax.numpy), so that the input pipeline and a
compiled function compute the same bits. The module imports numpy only and
belongs to neither the data nor the embedding package: both use it, and
neither needs the other for it.
"""

from __future__ import annotations

import numpy as np


def splitmix64(x, key, mask, xp=np):
  """SplitMix64's finalizer of `x ^ key`, truncated to `mask`.

  Args:
    x: a uint64 array.
    key: a uint64 scalar.
    mask: a uint64 scalar; the bits of the hash to keep.
    xp: numpy or jax.numpy (which needs 64-bit types enabled:
      `jax.enable_x64`).

  Returns:
    The uint64 hashes, of the shape of `x`.
  """
  with np.errstate(over='ignore'):  # uint64 products wrap around
    z = (x ^ key) * xp.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(0x94D049BB133111EB)
    z = z ^ (z >> xp.uint64(31))
  return z & mask
