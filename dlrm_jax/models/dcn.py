"""DCNv2's low-rank cross network, the interaction of DLRM-DCNv2.

Semantics of TorchRec's `torchrec.modules.crossnet.LowRankCrossNet`, which
TorchRec's `DLRM_DCN` and the MLPerf Training DLRM-DCNv2 reference
(`mlcommons/training` `recommendation_v2/torchrec_dlrm`) use as their
interaction; Wang et al., "DCN V2", arXiv:2008.13535, eq. (1) with the
low-rank `W = U V`:

  x_{l+1} = x_0 * (U_l (V_l x_l) + b_l) + x_l,    l = 0 .. num_layers - 1

with `*` the elementwise product, `V_l` an `[r, I]` and `U_l` an `[I, r]`
matrix, `b_l` an `[I]` bias added inside the product (not after it), and the
output the last `x_L` (no activation). As in TorchRec, `U_l` and `V_l` start
Xavier-normal (untruncated, std `sqrt(2 / (I + r))`) and `b_l` at zero.

Shapes: `[B, I]` in and out, with I the flattened input width; in DLRM-DCN
`I = (N + 1) * D`, the dense arch's output and the N pooled embeddings
concatenated (TorchRec's `InteractionDCNArch`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch.nn.init.xavier_normal_: normal (not truncated), variance
# 2 / (fan_in + fan_out).
XAVIER_NORMAL = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')


@dataclasses.dataclass(frozen=True)
class DCNSpec:
  """Typed description of a low-rank cross network.

  Attributes:
    num_layers: L, the number of cross layers. MLPerf DLRM-DCNv2 uses 3.
    rank: r, the rank of each layer's `U_l V_l`. MLPerf DLRM-DCNv2 uses 512.
  """

  num_layers: int
  rank: int

  @classmethod
  def create(cls, num_layers, rank, *, path: str = 'dcn') -> 'DCNSpec':
    """Builds a checked spec.

    Args:
      num_layers: L, the number of cross layers.
      rank: r, the rank of each layer.
      path: the config path named in errors.

    Returns:
      The spec.

    Raises:
      ValueError: if `num_layers` or `rank` is not a positive integer.
    """
    for name, value in (('num_layers', num_layers), ('rank', rank)):
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f'{path}.{name} ({value!r}) must be a positive integer.')
    return cls(num_layers=int(num_layers), rank=int(rank))

  def num_params(self, in_features: int) -> int:
    """Counts the parameters of the network.

    Args:
      in_features: I, the input width.

    Returns:
      The number of parameters, `L * (2 I r + I)`.
    """
    return self.num_layers * (2 * in_features * self.rank + in_features)


class LowRankCrossNet(nn.Module):
  """Low-rank cross network: `x_{l+1} = x_0 * (U_l (V_l x_l) + b_l) + x_l`.

  Attributes:
    spec: the number of layers and the rank.
    dtype: the compute dtype, such as bfloat16. The parameters stay float32.
  """

  spec: DCNSpec
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x0: jax.Array) -> jax.Array:
    """Applies the cross layers.

    Args:
      x0: `[B, I]` inputs.

    Returns:
      `[B, I]`, the output of the last layer, in `dtype`.

    Raises:
      ValueError: if `x0` is not two-dimensional.
    """
    if x0.ndim != 2:
      raise ValueError(
          f'LowRankCrossNet expects [B, I] inputs, got shape {x0.shape}.')
    width = x0.shape[-1]
    x0 = x0.astype(self.dtype)
    x = x0
    for layer in range(self.spec.num_layers):
      # V_l x_l: Flax kernels are [in, out], so this `v_l` kernel is V_lᵀ.
      low = nn.Dense(self.spec.rank, use_bias=False, dtype=self.dtype,
                     kernel_init=XAVIER_NORMAL, name=f'v_{layer}')(x)
      # U_l (.) + b_l: the bias sits inside the product with x_0.
      full = nn.Dense(width, use_bias=True, dtype=self.dtype,
                      kernel_init=XAVIER_NORMAL,
                      bias_init=nn.initializers.zeros, name=f'u_{layer}')(low)
      x = x0 * full + x
    return x
