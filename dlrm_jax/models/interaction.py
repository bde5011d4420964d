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
  """Flat indices of the upper triangle of an `[N, N]` matrix, row major.

  They are computed once per shape on the host. Inside jit they are static
  constants.

  Args:
    num_features: N.
    self_interaction: include the diagonal.

  Returns:
    An int32 array of flat indices into the `N * N` entries.
  """
  offset = 0 if self_interaction else 1
  rows, cols = np.triu_indices(num_features, k=offset)
  return (rows * num_features + cols).astype(np.int32)


def output_dim(num_features: int, self_interaction: bool = False) -> int:
  """Gives the output width of `dot_interaction`.

  Args:
    num_features: N.
    self_interaction: include the diagonal.

  Returns:
    `N(N-1)/2`, or `N(N+1)/2` with self-interaction.
  """
  n = num_features
  return n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2


def _upper_from_flat(z: jax.Array, n: int, self_interaction: bool
                     ) -> jax.Array:
  """`[B, P]` triangle values -> `[B, N, N]` upper-triangular matrices.

  The inverse placement of `triangle_indices`. It is built from pads and a
  concatenation rather than a scatter, which XLA runs slowly on CPU.
  """
  b = z.shape[0]
  k = 0 if self_interaction else 1
  rows, start = [], 0
  for i in range(n):
    width = n - i - k
    row = z[:, start:start + width]
    start += width
    rows.append(jnp.pad(row, ((0, 0), (n - width, 0))))
  return jnp.stack(rows, axis=1).reshape(b, n, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _interact(features: jax.Array, self_interaction: bool) -> jax.Array:
  b, n, _ = features.shape
  # X (Xᵀ materialized): XLA:CPU multiplies [N, D] x [D, N] faster than
  # it contracts two minor dims; elsewhere the transpose is noise.
  xt = jax.lax.optimization_barrier(jnp.swapaxes(features, 1, 2))
  gram = jnp.einsum('bnd,bdm->bnm', features, xt)
  idx = triangle_indices(n, self_interaction)
  return jnp.take(gram.reshape(b, n * n), jnp.asarray(idx), axis=1)


def _interact_fwd(features, self_interaction):
  return _interact(features, self_interaction), features


def _interact_bwd(self_interaction, features, z_bar):
  # d/dX of sum_{i<=j} zbar_ij <x_i, x_j> = (G + G^T) X, G the upper
  # triangle of zbar: one batched matmul instead of autodiff's two plus a
  # scatter-add through the gather.
  n = features.shape[1]
  g = _upper_from_flat(z_bar.astype(features.dtype), n, self_interaction)
  g = g + jnp.swapaxes(g, 1, 2)
  return (jnp.einsum('bnm,bmd->bnd', g, features),)


_interact.defvjp(_interact_fwd, _interact_bwd)


def dot_interaction(
    features: jax.Array, self_interaction: bool = False) -> jax.Array:
  """Pairwise dot products of the stacked features.

  Args:
    features: `[B, N, D]`.
    self_interaction: include each feature's dot product with itself.

  Returns:
    `[B, N(N-1)/2]`, or `[B, N(N+1)/2]` with self-interaction. It holds the
    elements `(i, j)` with `i < j` of `X Xᵀ`, or `i <= j` with
    self-interaction. They come in row-major order of the upper triangle.
    The static indices of `triangle_indices` gather them.

  Raises:
    ValueError: if `features` is not three-dimensional.
  """
  if features.ndim != 3:
    raise ValueError(
        f'dot_interaction expects [B, N, D] features, got shape'
        f' {features.shape}.')
  return _interact(features, self_interaction)
