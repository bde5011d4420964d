"""Flax modules (pure: no I/O, no ConfigDict).

  embed      SparseEmbed: sharded embedding tables as a linen module, with
             the sparse row update in its backward pass
  nnx_embed  SparseEmbed for Flax NNX (import it from there)
  dlrm       DLRM (the dense arches) and DLRMModel (ids to logits)
  mlp, dcn, interaction: the arches' parts
"""

from dlrm_jax.models.dcn import DCNSpec, LowRankCrossNet
from dlrm_jax.models.dlrm import DLRM, DLRMModel, DLRMSpec
from dlrm_jax.models.embed import SparseEmbed
from dlrm_jax.models.interaction import dot_interaction
from dlrm_jax.models.mlp import MLP, MLPSpec

__all__ = ['DCNSpec', 'DLRM', 'DLRMModel', 'DLRMSpec', 'LowRankCrossNet', 'MLP',
           'MLPSpec', 'SparseEmbed', 'dot_interaction']
