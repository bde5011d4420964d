"""The dense optimizer: optax, for the MLPs' parameters (`config.optimizer`).

The embedding tables have optimizers of their own, applied to the touched
rows in the lookup's backward (`dlrm_jax.embedding.optimizers`).

Kinds (`DenseOptimizerSpec.kind`; g the gradient, lr the scheduled rate):
  sgd:            optax.sgd, with `momentum` when it is not 0.
  optax_adagrad:  optax.adagrad: acc += g^2; w -= lr * g / sqrt(acc + eps),
                  acc starting at `initial_accumulator_value` (optax's 0.1).
  exact_adagrad:  torch.optim.Adagrad's (and FBGEMM EXACT_ADAGRAD's, the
                  tables' 'adagrad'): acc += g^2; w -= lr * g / (sqrt(acc) +
                  eps), acc starting at 0.
(The two differ most on the first steps: with acc 0 and eps 1e-8, a first
gradient of 1e-5 moves a weight by 0.1 lr under optax_adagrad and by 0.999
lr under exact_adagrad. The config has no plain 'adagrad' for the MLPs.)
  adam:           optax.adam.
  adamw:          optax.adamw, with decoupled `weight_decay`.
A `grad_clip_norm` above 0 clips the gradients' global norm first.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dlrm_jax.config import spec as spec_lib
from dlrm_jax.train import schedules

Spec = spec_lib.DenseOptimizerSpec
Transform = optax.GradientTransformation


def scale_by_exact_adagrad(eps: float = 1e-8,
                           initial_accumulator_value: float = 0.0
                           ) -> Transform:
  """Scales as torch.optim.Adagrad does: `g / (sqrt(acc) + eps)`.

  The accumulator grows by g^2 each step. optax.adagrad scales by
  `1 / sqrt(acc + eps)` instead, with acc starting at 0.1.

  Args:
    eps: added to sqrt(acc).
    initial_accumulator_value: where acc starts. torch starts at 0.

  Returns:
    The transformation. It does not apply the learning rate.
  """
  def init(params):
    """Makes the accumulators.

    Args:
      params: the parameters.

    Returns:
      A float32 accumulator per parameter.
    """
    return jax.tree.map(
        lambda p: jnp.full_like(p, initial_accumulator_value, jnp.float32),
        params)

  def update(updates, state, params=None):
    """Scales the updates and grows the accumulators.

    Args:
      updates: the gradients.
      state: the accumulators.
      params: unused.

    Returns:
      The scaled updates and the new accumulators.
    """
    del params
    acc = jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)),
                       state, updates)
    out = jax.tree.map(
        lambda g, a: (g / (jnp.sqrt(a) + eps)).astype(g.dtype), updates, acc)
    return out, acc

  return optax.GradientTransformation(init, update)


def _sgd(spec: Spec, lr) -> Transform:
  return optax.sgd(lr, momentum=spec.momentum or None)


def _optax_adagrad(spec: Spec, lr) -> Transform:
  return optax.adagrad(
      lr, initial_accumulator_value=spec.initial_accumulator_value,
      eps=spec.eps)


def _exact_adagrad(spec: Spec, lr) -> Transform:
  return optax.chain(scale_by_exact_adagrad(spec.eps),
                     optax.scale_by_learning_rate(lr))


def _adam(spec: Spec, lr) -> Transform:
  return optax.adam(lr, b1=spec.b1, b2=spec.b2, eps=spec.eps)


def _adamw(spec: Spec, lr) -> Transform:
  return optax.adamw(lr, b1=spec.b1, b2=spec.b2, eps=spec.eps,
                     weight_decay=spec.weight_decay)


# Kind -> the optax optimizer of a spec and its learning-rate schedule.
KINDS: dict[str, Callable[[Spec, optax.Schedule], Transform]] = {
    'sgd': _sgd,
    'optax_adagrad': _optax_adagrad,
    'exact_adagrad': _exact_adagrad,
    'adam': _adam,
    'adamw': _adamw,
}


def build_dense_optimizer(spec: Spec) -> Transform:
  """The optax optimizer of the dense (MLP) parameters.

  Args:
    spec: the dense optimizer (`RunSpec.dense_optimizer`).

  Returns:
    The optimizer, with its schedule and gradient clipping.

  Raises:
    ValueError: if `spec.kind` is not one of KINDS.
  """
  if spec.kind not in KINDS:
    raise ValueError(f'dense optimizer kind {spec.kind!r} must be one of'
                     f' {list(KINDS)}.')
  tx = KINDS[spec.kind](spec, schedules.build(spec.schedule))
  if spec.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(spec.grad_clip_norm), tx)
  return tx
