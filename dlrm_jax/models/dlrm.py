"""The DLRM dense and over arches (TorchEasyRec `tzrec/models/dlrm.py` semantics).

Shape letters used in this package:
  B: batch size.
  F: number of dense (raw, normalized) inputs of the `dense` group.
  N: number of sparse features of the `sparse` group.
  D: embedding dim, shared by all sparse features (and the dense MLP's output).

The embedding tables are not part of this module: the embedding engine
(`dlrm_jax.embedding`) looks up the pooled `[B, N, D]` embeddings and applies
their sparse updates. The module holds the dense parameters only.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlrm_jax.models import interaction
from dlrm_jax.models.mlp import MLP, MLPSpec


@dataclasses.dataclass(frozen=True)
class DLRMSpec:
  """Typed description of a DLRM (validated by `dlrm_jax.config_lib`).

  Attributes:
    num_dense: F, the width of the dense group input (0: no dense group).
    num_sparse: N, the number of sparse features.
    embedding_dim: D.
    dense_mlp: the dense arch; None exactly when there is no dense group.
    final: the over arch MLP.
    arch_with_sparse: also feed the flattened sparse embeddings to `final`.
    interaction_self: include the diagonal of the interaction.
  """

  num_dense: int
  num_sparse: int
  embedding_dim: int
  dense_mlp: MLPSpec | None
  final: MLPSpec
  arch_with_sparse: bool = True
  interaction_self: bool = False

  def __post_init__(self):
    if self.num_sparse <= 0:
      raise ValueError(
          f'DLRM needs at least one sparse feature, got num_sparse='
          f'{self.num_sparse}.')
    if (self.dense_mlp is None) != (self.num_dense == 0):
      raise ValueError(
          f'dense_mlp ({self.dense_mlp}) must be given exactly when there are'
          f' dense inputs (num_dense={self.num_dense}).')
    if (self.dense_mlp is not None
        and self.dense_mlp.output_dim != self.embedding_dim):
      raise ValueError(
          f'dense_mlp.hidden_units[-1] ({self.dense_mlp.output_dim}) must equal'
          f' the sparse embedding dim ({self.embedding_dim}).')

  @property
  def num_interaction_features(self) -> int:
    return self.num_sparse + (1 if self.dense_mlp is not None else 0)

  @property
  def final_input_dim(self) -> int:
    dim = interaction.output_dim(
        self.num_interaction_features, self.interaction_self)
    if self.dense_mlp is not None:
      dim += self.dense_mlp.output_dim
    if self.arch_with_sparse:
      dim += self.num_sparse * self.embedding_dim
    return dim


class DLRM(nn.Module):
  """Dense arch, dot interaction and over arch of DLRM.

  Attributes:
    spec: the model description.
    dtype: compute dtype of the MLPs (e.g. bfloat16); logits come out float32.
  """

  spec: DLRMSpec
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      dense: jax.Array | None,
      sparse: jax.Array,
      *,
      train: bool,
  ) -> dict[str, jax.Array]:
    """Runs the model.

    Args:
      dense: `[B, F]` normalized dense inputs, or None without a dense group.
      sparse: `[B, N, D]` pooled sparse embeddings.
      train: training mode (batch statistics, dropout).

    Returns:
      {'logits': `[B]` float32, 'probs': `[B]` float32}.
    """
    spec = self.spec
    b = sparse.shape[0]
    if sparse.shape[1:] != (spec.num_sparse, spec.embedding_dim):
      raise ValueError(
          f'sparse embeddings have shape {sparse.shape}, expected'
          f' [B, {spec.num_sparse}, {spec.embedding_dim}].')
    sparse = sparse.astype(self.dtype)
    feats = sparse
    dense_out = None
    if spec.dense_mlp is not None:
      if dense is None or dense.shape[1:] != (spec.num_dense,):
        raise ValueError(
            f'dense inputs have shape {None if dense is None else dense.shape},'
            f' expected [B, {spec.num_dense}].')
      dense_out = MLP(spec.dense_mlp, dtype=self.dtype, name='dense_mlp')(
          dense.astype(self.dtype), train=train)
      feats = jnp.concatenate([dense_out[:, None, :], sparse], axis=1)
    parts = [interaction.dot_interaction(feats, spec.interaction_self)]
    if dense_out is not None:
      parts.append(dense_out)
    if spec.arch_with_sparse:
      parts.append(sparse.reshape(b, spec.num_sparse * spec.embedding_dim))
    x = jnp.concatenate(parts, axis=-1)
    x = MLP(spec.final, dtype=self.dtype, name='final')(x, train=train)
    logits = nn.Dense(1, dtype=self.dtype, name='output')(x)[:, 0]
    logits = logits.astype(jnp.float32)
    return {'logits': logits, 'probs': jax.nn.sigmoid(logits)}
