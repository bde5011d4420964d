"""The DLRM dense and over arches (TorchEasyRec `tzrec/models/dlrm.py` semantics).

Shape letters used in this package:
  B: batch size.
  F: number of dense (raw, normalized) inputs of the `dense` group.
  N: number of sparse features of the `sparse` group.
  D: embedding dim, shared by all sparse features (and the dense MLP's output).

Interactions: 'dot' (DLRM's pairwise dot products, the default) or 'dcn'
(DLRM-DCNv2: TorchRec's `DLRM_DCN` and the MLPerf Training reference, whose
over arch sees only the output of a low-rank cross network on the flattened
`[B, (N + 1) * D]` concatenation of the dense arch output and the N pooled
embeddings; see `dlrm_jax.models.dcn`).

`DLRM` holds the dense parameters only: it takes the pooled `[B, N, D]`
embeddings. `DLRMModel` is the whole model, from ids to logits: a
`SparseEmbed` (the sharded tables, `dlrm_jax.models.embed`) and `DLRM`
(named 'arches'), the model that `dlrm_jax.train.Trainer` trains.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlrm_jax.models import interaction
from dlrm_jax.models.dcn import DCNSpec, LowRankCrossNet
from dlrm_jax.models.embed import SparseEmbed
from dlrm_jax.models.mlp import MLP, MLPSpec


INTERACTIONS = ('dot', 'dcn')


@dataclasses.dataclass(frozen=True)
class DLRMSpec:
  """Typed description of a DLRM.

  `__post_init__` checks what the module needs of it: consistent widths and
  arches. The config's own rules live in `dlrm_jax.config.checks.check_model`.

  Attributes:
    num_dense: F, the width of the dense group input. 0 means no dense group.
    num_sparse: N, the number of sparse features.
    embedding_dim: D.
    dense_mlp: the dense arch. It is None exactly when there is no dense group.
    final: the over arch MLP.
    arch_with_sparse: also feed the flattened sparse embeddings to `final`.
      Used by the dot interaction only.
    interaction_self: include the diagonal of the dot interaction.
    interaction: 'dot' or 'dcn', one of INTERACTIONS.
    dcn: the cross network. It is given exactly when interaction is 'dcn'.

  Raises:
    ValueError: if the fields disagree with each other.
  """

  num_dense: int
  num_sparse: int
  embedding_dim: int
  dense_mlp: MLPSpec | None
  final: MLPSpec
  arch_with_sparse: bool = True
  interaction_self: bool = False
  interaction: str = 'dot'
  dcn: DCNSpec | None = None

  def __post_init__(self):
    if self.interaction not in INTERACTIONS:
      raise ValueError(
          f'interaction ({self.interaction!r}) must be one of'
          f' {list(INTERACTIONS)}.')
    if (self.dcn is not None) != (self.interaction == 'dcn'):
      raise ValueError(
          f'dcn ({self.dcn}) must be given exactly when interaction is'
          f" 'dcn' (interaction={self.interaction!r}).")
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
    """The number of features that interact: N, plus one with a dense group."""
    return self.num_sparse + (1 if self.dense_mlp is not None else 0)

  @property
  def final_input_dim(self) -> int:
    """The input width of the over arch `final`."""
    if self.interaction == 'dcn':
      return self.num_interaction_features * self.embedding_dim
    dim = interaction.output_dim(
        self.num_interaction_features, self.interaction_self)
    if self.dense_mlp is not None:
      dim += self.dense_mlp.output_dim
    if self.arch_with_sparse:
      dim += self.num_sparse * self.embedding_dim
    return dim


class DLRM(nn.Module):
  """Dense arch, interaction (dot or DCNv2 cross) and over arch of DLRM.

  Attributes:
    spec: the model description.
    dtype: the compute dtype of the MLPs and the cross network, such as
      bfloat16. The parameters stay float32 master weights. The logits come
      out float32.
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
      train: training mode. It turns on batch statistics and dropout.

    Returns:
      A dict with `[B]` float32 'logits' and `[B]` float32 'probs'.

    Raises:
      ValueError: if `sparse` or `dense` has the wrong shape.
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
    if spec.interaction == 'dcn':
      if dense_out is not None:
        feats = jnp.concatenate([dense_out[:, None, :], sparse], axis=1)
      # TorchRec InteractionDCNArch: cross net on [B, (N + 1) * D], its
      # output alone feeds the over arch.
      x = LowRankCrossNet(spec.dcn, dtype=self.dtype, name='crossnet')(
          feats.reshape(b, -1))
    else:
      # [dense_out, sparse...] interact without being stacked.
      parts = [interaction.dot_interaction(sparse, spec.interaction_self,
                                           lead=dense_out)]
      if dense_out is not None:
        parts.append(dense_out)
      if spec.arch_with_sparse:
        parts.append(sparse.reshape(b, spec.num_sparse * spec.embedding_dim))
      x = jnp.concatenate(parts, axis=-1)
    x = MLP(spec.final, dtype=self.dtype, name='final')(x, train=train)
    logits = nn.Dense(1, dtype=self.dtype, name='output')(x)[:, 0]
    logits = logits.astype(jnp.float32)
    return {'logits': logits, 'probs': jax.nn.sigmoid(logits)}


class DLRMModel(nn.Module):
  """The whole DLRM, from packed ids to logits.

  Parameters: `embed/sparse_state` (the tables and their optimizer slots,
  see `SparseEmbed`) and `arches/...` (the dense arches of `DLRM`). A
  `jax.grad` of the loss over them gives the dense gradients and the new
  tables; `dlrm_jax.train.table_updates` applies both.

  Attributes:
    spec: the dense arches.
    embed: the embedding tables. Its features give the N pooled `[B, D]`
      inputs of the interaction, in their order.
    dtype: the compute dtype of the arches (`DLRM.dtype`).
  """

  spec: DLRMSpec
  embed: SparseEmbed
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      ids: jax.Array,
      dense: jax.Array | None,
      *,
      train: bool,
      step: jax.Array | int = 0,
      resets: jax.Array | None = None,
  ) -> dict[str, jax.Array]:
    """Runs the model.

    Args:
      ids: `[B, T]` int32 packed ids, batch-sharded.
      dense: `[B, F]` normalized dense inputs, or None without a dense group.
      train: training mode (batch statistics, dropout).
      step: the 0-based training step, for the table optimizers.
      resets: `[B, T]` managed-collision rows to zero first, or None.

    Returns:
      A dict with `[B]` float32 'logits' and `[B]` float32 'probs'.
    """
    pooled = self.embed(ids, step=step, resets=resets)
    return DLRM(self.spec, dtype=self.dtype, name='arches')(
        dense, pooled, train=train)
