"""Multi-layer perceptron with TorchEasyRec's per-layer options.

Shapes: `[B, I]` in, `[B, hidden_units[-1]]` out, where B is the batch size and I
the input width.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array] | None] = {
    'relu': nn.relu,
    'gelu': nn.gelu,
    'silu': nn.silu,
    'swish': nn.silu,
    'sigmoid': nn.sigmoid,
    'tanh': nn.tanh,
    'leaky_relu': nn.leaky_relu,
    'elu': nn.elu,
    'none': None,
}


def _normalize_activation(name: str | None) -> str:
  # TorchEasyRec writes activations as 'nn.ReLU'; accept that spelling too.
  if name is None or name == '':
    return 'none'
  key = name.strip()
  if key.startswith('nn.'):
    key = key[3:]
  key = key.lower()
  return key


@dataclasses.dataclass(frozen=True)
class MLPSpec:
  """Typed, validated description of an MLP.

  Attributes:
    hidden_units: the width of each layer. The last one is the output width.
    activation: one of ACTIVATIONS. It is applied after every layer, the last
      one included.
    use_bn: batch norm after each linear layer. Eval uses running statistics.
    use_ln: layer norm after each linear layer. Exclusive with `use_bn`.
    dropout_ratio: one ratio per layer, in [0, 1).
    bias: whether the linear layers have a bias. It is always off under batch
      norm.
  """

  hidden_units: tuple[int, ...]
  activation: str = 'relu'
  use_bn: bool = False
  use_ln: bool = False
  dropout_ratio: tuple[float, ...] = ()
  bias: bool = True

  @classmethod
  def create(
      cls,
      hidden_units: Sequence[int],
      activation: str | None = 'relu',
      use_bn: bool = False,
      use_ln: bool = False,
      dropout_ratio: float | Sequence[float] | None = 0.0,
      bias: bool = True,
      *,
      path: str = 'mlp',
  ) -> 'MLPSpec':
    """Builds a checked spec.

    Args:
      hidden_units: the width of each layer.
      activation: an activation name. TorchEasyRec's 'nn.ReLU' spelling is
        accepted. None or '' means no activation.
      use_bn: batch norm after each linear layer.
      use_ln: layer norm after each linear layer.
      dropout_ratio: one ratio for all layers, or one per layer. None means 0.
      bias: whether the linear layers have a bias.
      path: the config path named in errors.

    Returns:
      The spec.

    Raises:
      ValueError: if a width, the activation, the normalization or a dropout
        ratio is invalid.
    """
    if hidden_units is None or len(hidden_units) == 0:
      raise ValueError(
          f'{path}.hidden_units ({hidden_units!r}) must list at least one layer'
          ' width.')
    units = []
    for i, u in enumerate(hidden_units):
      if isinstance(u, bool) or not isinstance(u, int) or u <= 0:
        raise ValueError(
            f'{path}.hidden_units[{i}] ({u!r}) must be a positive integer.')
      units.append(int(u))
    act = _normalize_activation(activation)
    if act not in ACTIVATIONS:
      raise ValueError(
          f'{path}.activation ({activation!r}) is not a known activation; '
          f'choose one of {sorted(ACTIVATIONS)}.')
    if use_bn and use_ln:
      raise ValueError(
          f'{path}.use_bn and {path}.use_ln are both true; choose at most one'
          ' normalization.')
    if dropout_ratio is None:
      ratios = (0.0,) * len(units)
    elif isinstance(dropout_ratio, (int, float)):
      ratios = (float(dropout_ratio),) * len(units)
    else:
      ratios = tuple(float(r) for r in dropout_ratio)
      if len(ratios) == 0:
        ratios = (0.0,) * len(units)
      elif len(ratios) == 1:
        ratios = ratios * len(units)
      elif len(ratios) != len(units):
        raise ValueError(
            f'{path}.dropout_ratio has {len(ratios)} values but'
            f' {path}.hidden_units has {len(units)} layers; give one value or'
            ' one per layer.')
    for i, r in enumerate(ratios):
      if not 0.0 <= r < 1.0:
        raise ValueError(
            f'{path}.dropout_ratio[{i}] ({r}) must be in [0, 1).')
    return cls(
        hidden_units=tuple(units),
        activation=act,
        use_bn=bool(use_bn),
        use_ln=bool(use_ln),
        dropout_ratio=ratios,
        bias=bool(bias),
    )

  @property
  def output_dim(self) -> int:
    """The output width, `hidden_units[-1]`."""
    return self.hidden_units[-1]


class MLP(nn.Module):
  """Stack of layers: linear, optional batch or layer norm, activation, dropout.

  Attributes:
    spec: the validated layer description.
    dtype: the compute dtype of the linear layers. The parameters stay float32.
  """

  spec: MLPSpec
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Applies the MLP.

    Args:
      x: `[B, I]` inputs.
      train: batch statistics and dropout on when true.

    Returns:
      `[B, hidden_units[-1]]` outputs.
    """
    spec = self.spec
    act = ACTIVATIONS[spec.activation]
    for i, units in enumerate(spec.hidden_units):
      x = nn.Dense(
          units,
          use_bias=spec.bias and not spec.use_bn,
          dtype=self.dtype,
          name=f'dense_{i}',
      )(x)
      if spec.use_bn:
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            name=f'bn_{i}',
        )(x)
      if spec.use_ln:
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=f'ln_{i}')(x)
      if act is not None:
        x = act(x)
      if spec.dropout_ratio[i] > 0.0:
        x = nn.Dropout(rate=spec.dropout_ratio[i], deterministic=not train)(x)
    return x
