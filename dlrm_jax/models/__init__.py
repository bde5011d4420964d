"""Flax modules of the DLRM (pure: no I/O, no ConfigDict)."""

from dlrm_jax.models.dcn import DCNSpec, LowRankCrossNet
from dlrm_jax.models.dlrm import DLRM, DLRMSpec
from dlrm_jax.models.interaction import dot_interaction
from dlrm_jax.models.mlp import MLP, MLPSpec

__all__ = ['DCNSpec', 'DLRM', 'DLRMSpec', 'LowRankCrossNet', 'MLP', 'MLPSpec',
           'dot_interaction']
