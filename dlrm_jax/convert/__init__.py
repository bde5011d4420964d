"""Weights in and out: facebookresearch/dlrm and TorchRec DLRM state dicts.

The whole converter lives in `peers` for now; the next change splits it.
"""

from dlrm_jax.convert.peers import *  # pylint: disable=wildcard-import
from dlrm_jax.convert.peers import _torch  # the tests ask it for torch
