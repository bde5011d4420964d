"""Sparse optimizers: the update of a set of touched rows and their state.

Each optimizer works on rows gathered from a table: `[U, D]` weights, their
`[U, D]` (deduplicated, summed) gradients and their slot rows, and returns the
new rows. Rows that are not touched are never read or written, which is what
makes a step's cost independent of the table size.

The formulas follow the dense optimizers they replace:
  sgd:             w -= lr * g
  adagrad:         a += g^2;          w -= lr * g / sqrt(a + eps)   (optax.adagrad)
  rowwise_adagrad: a += mean_d(g^2);  w -= lr * g / (sqrt(a) + eps) (FBGEMM)
  adam (lazy):     m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
                   w -= lr * m_hat / (sqrt(v_hat) + eps), bias correction by
                   the global step; untouched rows keep m and v undecayed,
                   which is where lazy Adam differs from dense Adam.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dlrm_jax.embedding.specs import SparseOptimizerSpec


def slot_shapes(opt: SparseOptimizerSpec, rows: int, dim: int
                ) -> dict[str, tuple[tuple[int, ...], float]]:
  """Slot name -> (shape, initial value) for a stack of `rows` x `dim`."""
  if opt.kind == 'sgd':
    return {}
  if opt.kind == 'adagrad':
    return {'acc': ((rows, dim), opt.initial_accumulator_value)}
  if opt.kind == 'rowwise_adagrad':
    return {'acc': ((rows,), opt.initial_accumulator_value)}
  if opt.kind == 'adam':
    return {'m': ((rows, dim), 0.0), 'v': ((rows, dim), 0.0)}
  raise ValueError(f'unknown sparse optimizer {opt.kind!r}')


def update_rows(
    opt: SparseOptimizerSpec,
    lr: jax.Array,
    step: jax.Array,
    weights: jax.Array,
    grads: jax.Array,
    slots: dict[str, jax.Array],
    row_msq: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One optimizer step on gathered rows.

  Args:
    opt: the optimizer.
    lr: `[U]` (per row, as rows of one stack may have different schedules) or
      scalar learning rate.
    step: the 0-based step being taken (Adam's bias correction uses step + 1).
    weights: `[U, D]` float32 rows.
    grads: `[U, D]` float32 summed gradients of those rows.
    slots: slot name -> `[U, D]` or `[U]` float32 rows.
    row_msq: rowwise_adagrad only: `[U]` mean square of each row's gradient
      over the row's full width, when `grads` holds only some of its columns.

  Returns:
    The new weights and slots (float32).
  """
  lr = jnp.asarray(lr, jnp.float32)
  if lr.ndim == 1:
    lr = lr[:, None]
  if opt.kind == 'sgd':
    return weights - lr * grads, {}
  if opt.kind == 'adagrad':
    acc = slots['acc'] + grads * grads
    scale = jnp.where(acc > 0, jax.lax.rsqrt(acc + opt.eps), 0.0)
    return weights - lr * grads * scale, {'acc': acc}
  if opt.kind == 'rowwise_adagrad':
    if row_msq is None:
      row_msq = jnp.mean(grads * grads, axis=-1)
    acc = slots['acc'] + row_msq
    scale = 1.0 / (jnp.sqrt(acc) + opt.eps)
    return weights - lr * grads * scale[:, None], {'acc': acc}
  if opt.kind == 'adam':
    t = (step + 1).astype(jnp.float32)
    m = opt.b1 * slots['m'] + (1.0 - opt.b1) * grads
    v = opt.b2 * slots['v'] + (1.0 - opt.b2) * grads * grads
    m_hat = m / (1.0 - opt.b1 ** t)
    v_hat = v / (1.0 - opt.b2 ** t)
    return weights - lr * m_hat / (jnp.sqrt(v_hat) + opt.eps), {'m': m, 'v': v}
  raise ValueError(f'unknown sparse optimizer {opt.kind!r}')


def dense_reference(opt: SparseOptimizerSpec, lr_fn: Callable) -> Callable:
  """The same optimizer applied to a whole table and its dense gradient.

  Used by the tests as the plain reference: for sgd and both adagrads the
  sparse update must match it exactly; for Adam it differs on untouched rows.

  Returns:
    `step_fn(table, slots, grad, step) -> (table, slots)` on `[R, D]` arrays.
  """
  def step_fn(table, slots, grad, step):
    lr = lr_fn(step)
    new, slots = update_rows(opt, lr, step, table.astype(jnp.float32),
                             grad.astype(jnp.float32), slots)
    return new.astype(table.dtype), slots
  return step_fn
