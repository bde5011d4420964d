"""DLRM's dot interaction.

Shapes: `[B, N, D]` in (batch, stacked features, embedding dim); `[B, N(N-1)/2]`
out, or `[B, N(N+1)/2]` with self-interaction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def triangle_indices(num_features: int, self_interaction: bool) -> np.ndarray:
  """Flat indices into an `[N, N]` matrix of its upper triangle, row major.

  Computed once per shape on the host, so they are static constants inside jit.
  """
  offset = 0 if self_interaction else 1
  rows, cols = np.triu_indices(num_features, k=offset)
  return (rows * num_features + cols).astype(np.int32)


def output_dim(num_features: int, self_interaction: bool = False) -> int:
  n = num_features
  return n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2


def dot_interaction(
    features: jax.Array, self_interaction: bool = False) -> jax.Array:
  """Pairwise dot products of the stacked features.

  Args:
    features: `[B, N, D]`.
    self_interaction: include each feature's dot product with itself.

  Returns:
    `[B, N(N-1)/2]` (`[B, N(N+1)/2]` with self-interaction): element
    `(i, j)`, `i < j` (`i <= j`), in row-major order of the upper triangle.
  """
  if features.ndim != 3:
    raise ValueError(
        f'dot_interaction expects [B, N, D] features, got shape'
        f' {features.shape}.')
  b, n, _ = features.shape
  gram = jnp.einsum('bnd,bmd->bnm', features, features)
  idx = triangle_indices(n, self_interaction)
  return jnp.take(gram.reshape(b, n * n), jnp.asarray(idx), axis=1)
