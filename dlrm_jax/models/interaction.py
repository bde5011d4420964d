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
  concatenation rather than a scatter, which XLA runs slowly on CPU, or a
  gather (on XLA:CPU a gather that no elementwise op follows is emitted
  without vectorising).
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


def _triangle(x: jax.Array, self_interaction: bool) -> jax.Array:
  """`[B, N, D]` -> `[B, P]`: the upper triangle of each `X Xᵀ`, row major."""
  b, n, _ = x.shape
  # Both operands read in place. A materialized Xᵀ (as before issue 24)
  # suits XLA:CPU's batched matmul better, but its copy re-fuses the
  # embedding gather's mask and leaves the gather bare and slow
  # (`exchange.gather_rows`), which cost more than it saved.
  gram = jnp.einsum('bnd,bmd->bnm', x, x)
  idx = triangle_indices(n, self_interaction)
  return jnp.take(gram.reshape(b, n * n), jnp.asarray(idx), axis=1,
                  mode='clip')


def _triangle_bwd(x: jax.Array, z_bar: jax.Array, self_interaction: bool
                  ) -> jax.Array:
  """The gradient of `_triangle` at `x` for the `[B, P]` cotangent `z_bar`.

  d/dX of sum_{i<=j} zbar_ij <x_i, x_j> = (G + Gᵀ) X, G the upper triangle
  of zbar: one batched matmul instead of autodiff's two plus a scatter-add
  through the gather.
  """
  g = _upper_from_flat(z_bar.astype(x.dtype), x.shape[1], self_interaction)
  g = g + jnp.swapaxes(g, 1, 2)
  return jnp.einsum('bnm,bmd->bnd', g, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _interact(features: jax.Array, self_interaction: bool) -> jax.Array:
  return _triangle(features, self_interaction)


def _interact_fwd(features, self_interaction):
  return _interact(features, self_interaction), features


def _interact_bwd(self_interaction, features, z_bar):
  return (_triangle_bwd(features, z_bar, self_interaction),)


_interact.defvjp(_interact_fwd, _interact_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _interact_lead(lead: jax.Array, features: jax.Array,
                   self_interaction: bool) -> jax.Array:
  # Row 0 of the stacked triangle is <lead, x_j>, j = 1..N (and <lead, lead>
  # first with the diagonal); the rows after it are the features' own
  # triangle. A multiply-reduce per pair, not a matmul of one row.
  first = jnp.sum(lead[:, None, :] * features, axis=-1)
  parts = [first, _triangle(features, self_interaction)]
  if self_interaction:
    parts.insert(0, jnp.sum(lead * lead, axis=-1, keepdims=True))
  return jnp.concatenate(parts, axis=1)


def _interact_lead_fwd(lead, features, self_interaction):
  return _interact_lead(lead, features, self_interaction), (lead, features)


def _interact_lead_bwd(self_interaction, residuals, z_bar):
  lead, features = residuals
  n = features.shape[1]
  z_bar = z_bar.astype(features.dtype)
  k = 1 if self_interaction else 0
  z_first = z_bar[:, k:k + n]
  features_bar = (_triangle_bwd(features, z_bar[:, k + n:], self_interaction)
                  + z_first[:, :, None] * lead[:, None, :])
  lead_bar = jnp.sum(z_first[:, :, None] * features, axis=1)
  if self_interaction:
    lead_bar = lead_bar + 2.0 * z_bar[:, :1] * lead
  return lead_bar, features_bar


_interact_lead.defvjp(_interact_lead_fwd, _interact_lead_bwd)


def dot_interaction(
    features: jax.Array, self_interaction: bool = False, *,
    lead: jax.Array | None = None) -> jax.Array:
  """Pairwise dot products of the stacked features.

  Args:
    features: `[B, N, D]`.
    self_interaction: include each feature's dot product with itself.
    lead: an optional `[B, D]` feature stacked before `features` (DLRM's
      dense arch output). The result is that of `[B, N + 1, D]`
      `concatenate([lead[:, None], features], 1)`, computed without forming
      the concatenation: on XLA:CPU that concatenation, with the embedding
      gather fused into it, took a sixth of the train step
      (`benchmarks.step_breakdown`).

  Returns:
    `[B, M(M-1)/2]`, or `[B, M(M+1)/2]` with self-interaction, for the M
    stacked features (N, or N + 1 with `lead`). It holds the elements
    `(i, j)` with `i < j` of `X Xᵀ`, or `i <= j` with self-interaction.
    They come in row-major order of the upper triangle. The static indices
    of `triangle_indices` gather them.

  Raises:
    ValueError: if `features` is not three-dimensional, or `lead` is not
      `[B, D]` of the same B and D.
  """
  if features.ndim != 3:
    raise ValueError(
        f'dot_interaction expects [B, N, D] features, got shape'
        f' {features.shape}.')
  if lead is None:
    return _interact(features, self_interaction)
  if lead.shape != (features.shape[0], features.shape[2]):
    raise ValueError(
        f'dot_interaction expects a [B, D] lead of B={features.shape[0]},'
        f' D={features.shape[2]}, got shape {lead.shape}.')
  return _interact_lead(lead.astype(features.dtype), features,
                        self_interaction)
