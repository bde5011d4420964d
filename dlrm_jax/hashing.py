"""Integer hash finalizers, identical on numpy and jax.numpy.

  mix32        MurmurHash3's 32-bit finalizer, a bijection on uint32: hashed
               id features (`data.features.map_ids`), the synthetic click
               logs, the admission filter's count-min sketch and the random
               bits of stochastic rounding (`embedding.rounding`).
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


def mix32(x, xp=np):
  """MurmurHash3's 32-bit finalizer.

  Args:
    x: an integer array, taken as uint32.
    xp: numpy or jax.numpy.

  Returns:
    The uint32 hashes, of the shape of `x`.
  """
  z = x.astype(xp.uint32)
  z = (z ^ (z >> xp.uint32(16))) * xp.uint32(0x85EBCA6B)
  z = (z ^ (z >> xp.uint32(13))) * xp.uint32(0xC2B2AE35)
  return z ^ (z >> xp.uint32(16))


def splitmix64(x, key, mask, xp=np):
  """SplitMix64's finalizer of `x ^ key`, truncated to `mask`.

  Args:
    x: a uint64 array.
    key: a uint64 scalar.
    mask: a uint64 scalar. It selects the bits of the hash to keep.
    xp: numpy or jax.numpy. jax.numpy needs 64-bit types enabled with
      `jax.enable_x64`.

  Returns:
    The uint64 hashes, of the shape of `x`.
  """
  with np.errstate(over='ignore'):  # uint64 products wrap around
    z = (x ^ key) * xp.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(0x94D049BB133111EB)
    z = z ^ (z >> xp.uint64(31))
  return z & mask
