"""Sparse optimizers: the update of a set of touched rows and their state.

Each optimizer works on rows gathered from a table: `[U, D]` weights, their
`[U, D]` (deduplicated, summed) gradients and their slot rows, and returns the
new rows. Rows that are not touched are never read or written, which is what
makes a step's cost independent of the table size. There is one class per
kind (`SparseOptimizer` subclasses, in `REGISTRY` by kind); `slot_shapes` and
`update_rows` dispatch through it.

Formulas (g the summed gradient of a row in this step, lr the scheduled rate,
all state float32; `acc`, `m`, `v`, `z` are slots):

  sgd:             w -= lr * g
  adagrad:         acc += g^2;  w -= lr * g / (sqrt(acc) + eps)
      FBGEMM's `EXACT_ADAGRAD` (fbgemm_gpu split_embedding_configs), which is
      TorchRec's `EmbOptimType.EXACT_ADAGRAD` and `torch.optim.Adagrad`
      (`std = state_sum.sqrt().add_(eps); param.addcdiv_(grad, std, -lr)`;
      lr_decay 0). Not optax.adagrad, which divides by sqrt(acc + eps): with
      acc 0 and eps 1e-8 a first gradient of 1e-5 moves a row by 0.1 lr there
      and by lr * 1e-5 / (1e-5 + 1e-8) = 0.999 lr here.
  rowwise_adagrad: acc += mean_d(g^2);  w -= lr * g / (sqrt(acc) + eps)
      FBGEMM's `EXACT_ROWWISE_ADAGRAD` (one accumulator per row; the mean is
      over the row's full width even when a column piece updates part of it).
  adam (lazy):     m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
                   w -= lr * m_hat / (sqrt(v_hat) + eps),
                   m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t), t = step+1
      FBGEMM's `ADAM` on touched rows (bias correction by the global step).
      Untouched rows keep m and v undecayed: lazy Adam (TF's LazyAdam,
      tf.tpu.experimental.embedding.Adam(lazy_adam=True)).
  ftrl (FTRL-proximal, McMahan et al. 2013, "Ad click prediction: a view
      from the trenches", Algorithm 1, per coordinate), with the
      parameterization of TensorFlow's `tf.compat.v1.train.FtrlOptimizer` /
      Keras `Ftrl` / `tf.tpu.experimental.embedding.FTRL` (the one
      jax-tpu-embedding follows), p = lr_power (default -0.5):
                   n' = acc + g^2
                   z += g - (n'^(-p) - acc^(-p)) / lr * w;   acc = n'
                   w = 0                                   if |z| <= l1
                   w = (sign(z) l1 - z) / ((beta + n'^(-p)) / lr + 2 l2)
      With p = -0.5 that is the paper's w = -(z - sign(z) l1) /
      ((beta + sqrt(n)) / alpha + lambda2), lambda2 = 2 l2 (TF writes the L2
      penalty as l2 * w^2). L1 makes weak coordinates exactly 0. `acc` starts
      at `initial_accumulator_value` (TF's default is 0.1; ours is the
      spec's, 0.0 unless set).

Weight decay (`weight_decay` wd > 0), applied to the touched rows only as
FBGEMM does (`WeightDecayMode`):
  weight_decay_mode 'l2':        g += wd * w before the update (FBGEMM's L2:
                                 an L2 penalty on the loss, seen by the
                                 accumulators).
  weight_decay_mode 'decoupled': w -= lr * wd * w_old after the update
                                 (FBGEMM's DECOUPLED, AdamW-style).

The dense (MLP) parameters are not updated here: they use optax
(`dlrm_jax.train.optimizers`). Its kind 'optax_adagrad' is optax.adagrad
(`w -= lr * g / sqrt(acc + eps)`, acc starting at 0.1), whose first steps
differ from torch.optim.Adagrad's; kind 'exact_adagrad' is the formula above
(`train.optimizers.scale_by_exact_adagrad`), as peers use for MLPs.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from dlrm_jax.embedding import rounding
from dlrm_jax.embedding.specs import SparseOptimizerSpec

Slots = dict[str, jax.Array]
SlotShapes = dict[str, tuple[tuple[int, ...], float]]


class SparseOptimizer:
  """One kind of sparse optimizer.

  Subclasses set `kind` and implement `slots` and `_step`. `_step` is the
  update before weight decay. `update` adds the spec's weight decay around
  `_step`.

  Args:
    spec: the optimizer spec.

  Attributes:
    kind: the spec kind that this class implements, a key of REGISTRY.
    linear: True when the update of a row is linear in its gradient, with no
      state.
    spec: the optimizer spec.
  """

  kind: ClassVar[str]
  # True when the update of a row is linear in its gradient with no state.
  # A scatter-add of `-lr * g` then sums repeated ids itself.
  linear: ClassVar[bool] = False

  def __init__(self, spec: SparseOptimizerSpec):
    self.spec = spec

  def slots(self, rows: int, dim: int) -> SlotShapes:
    """Gives the optimizer slots of a stack.

    Args:
      rows: the rows of the stack.
      dim: the width of the stack.

    Returns:
      A dict from slot name to `(shape, initial value)`.
    """
    raise NotImplementedError

  def _step(self, lr, step, w, g, slots, row_msq):
    raise NotImplementedError

  def update(self, lr: jax.Array, step: jax.Array, weights: jax.Array,
             grads: jax.Array, slots: Slots, row_msq: jax.Array | None = None
             ) -> tuple[jax.Array, Slots]:
    """Takes one step on gathered rows, weight decay included.

    Args:
      lr: `[U]` or scalar learning rate.
      step: the 0-based step being taken.
      weights: `[U, D]` float32 rows.
      grads: `[U, D]` float32 summed gradients of those rows.
      slots: slot name -> `[U, D]` or `[U]` float32 rows.
      row_msq: `[U]` mean square of each row's gradient over its full width.
        Only rowwise_adagrad uses it. See `update_rows`.

    Returns:
      The new float32 weights and slots.
    """
    lr = jnp.asarray(lr, jnp.float32)
    if lr.ndim == 1:
      lr = lr[:, None]
    wd, mode = self.spec.weight_decay, self.spec.weight_decay_mode
    if wd and mode == 'l2':
      # (A row-wise Adagrad column piece's `row_msq` is of the loss
      # gradient over the full row, without the decay term.)
      grads = grads + wd * weights
    new, slots = self._step(lr, step, weights, grads, slots, row_msq)
    if wd and mode == 'decoupled':
      new = new - lr * wd * weights
    return new, slots


REGISTRY: dict[str, type[SparseOptimizer]] = {}


def register(cls: type[SparseOptimizer]) -> type[SparseOptimizer]:
  """Adds an optimizer class to REGISTRY under its `kind`.

  Args:
    cls: the `SparseOptimizer` subclass.

  Returns:
    `cls`, so that this works as a class decorator.
  """
  REGISTRY[cls.kind] = cls
  return cls


@register
class SGD(SparseOptimizer):
  """Plain SGD: `w -= lr * g`."""
  kind = 'sgd'
  linear = True

  def slots(self, rows, dim):
    """Gives SGD's slots, which are none.

    Args:
      rows: the rows of the stack.
      dim: the width of the stack.

    Returns:
      An empty dict.
    """
    return {}

  def _step(self, lr, step, w, g, slots, row_msq):
    return w - lr * g, {}


@register
class Adagrad(SparseOptimizer):
  """Per-element Adagrad, as FBGEMM's EXACT_ADAGRAD and torch.optim.Adagrad."""
  kind = 'adagrad'

  def slots(self, rows, dim):
    """Gives Adagrad's slot, one accumulator per element.

    Args:
      rows: the rows of the stack.
      dim: the width of the stack.

    Returns:
      `{'acc': ((rows, dim), initial_accumulator_value)}`.
    """
    return {'acc': ((rows, dim), self.spec.initial_accumulator_value)}

  def _step(self, lr, step, w, g, slots, row_msq):
    acc = slots['acc'] + g * g
    return w - lr * g / (jnp.sqrt(acc) + self.spec.eps), {'acc': acc}


@register
class RowwiseAdagrad(SparseOptimizer):
  """Row-wise Adagrad, as FBGEMM's EXACT_ROWWISE_ADAGRAD."""
  kind = 'rowwise_adagrad'

  def slots(self, rows, dim):
    """Gives row-wise Adagrad's slot, one accumulator per row.

    Args:
      rows: the rows of the stack.
      dim: the width of the stack.

    Returns:
      `{'acc': ((rows,), initial_accumulator_value)}`.
    """
    return {'acc': ((rows,), self.spec.initial_accumulator_value)}

  def _step(self, lr, step, w, g, slots, row_msq):
    if row_msq is None:
      row_msq = jnp.mean(g * g, axis=-1)
    acc = slots['acc'] + row_msq
    scale = 1.0 / (jnp.sqrt(acc) + self.spec.eps)
    return w - lr * g * scale[:, None], {'acc': acc}


@register
class LazyAdam(SparseOptimizer):
  """FBGEMM's ADAM on touched rows. Untouched rows' moments are not decayed."""
  kind = 'adam'

  def slots(self, rows, dim):
    """Gives Adam's slots, the two moments.

    Args:
      rows: the rows of the stack.
      dim: the width of the stack.

    Returns:
      `{'m': ((rows, dim), 0.0), 'v': ((rows, dim), 0.0)}`.
    """
    return {'m': ((rows, dim), 0.0), 'v': ((rows, dim), 0.0)}

  def _step(self, lr, step, w, g, slots, row_msq):
    o = self.spec
    t = (jnp.asarray(step) + 1).astype(jnp.float32)
    m = o.b1 * slots['m'] + (1.0 - o.b1) * g
    v = o.b2 * slots['v'] + (1.0 - o.b2) * g * g
    m_hat = m / (1.0 - o.b1 ** t)
    v_hat = v / (1.0 - o.b2 ** t)
    return w - lr * m_hat / (jnp.sqrt(v_hat) + o.eps), {'m': m, 'v': v}


@register
class FTRL(SparseOptimizer):
  """FTRL-proximal in TensorFlow's parameterization, given in the module doc."""
  kind = 'ftrl'

  def slots(self, rows, dim):
    """Gives FTRL's slots, the accumulator and the linear term.

    Args:
      rows: the rows of the stack.
      dim: the width of the stack.

    Returns:
      `{'acc': ((rows, dim), initial_accumulator_value),
      'linear': ((rows, dim), 0.0)}`.
    """
    return {'acc': ((rows, dim), self.spec.initial_accumulator_value),
            'linear': ((rows, dim), 0.0)}

  def _step(self, lr, step, w, g, slots, row_msq):
    o = self.spec
    acc = slots['acc']
    new_acc = acc + g * g
    if o.lr_power == -0.5:
      p_new, p_old = jnp.sqrt(new_acc), jnp.sqrt(acc)
    else:
      p_new, p_old = new_acc ** -o.lr_power, acc ** -o.lr_power
    z = slots['linear'] + g - (p_new - p_old) / lr * w
    quadratic = (o.beta + p_new) / lr + 2.0 * o.l2
    new_w = jnp.where(jnp.abs(z) > o.l1,
                      (jnp.sign(z) * o.l1 - z) / quadratic, 0.0)
    return new_w, {'acc': new_acc, 'linear': z}


def get(spec: SparseOptimizerSpec) -> SparseOptimizer:
  """Makes the optimizer object of a spec.

  Args:
    spec: the optimizer spec.

  Returns:
    An instance of the REGISTRY class of `spec.kind`.

  Raises:
    ValueError: if `spec.kind` is not in REGISTRY.
  """
  cls = REGISTRY.get(spec.kind)
  if cls is None:
    raise ValueError(f'unknown sparse optimizer kind {spec.kind!r}; known:'
                     f' {sorted(REGISTRY)}.')
  return cls(spec)


def slot_shapes(opt: SparseOptimizerSpec, rows: int, dim: int) -> SlotShapes:
  """Gives the optimizer slots of a stack.

  Args:
    opt: the optimizer spec.
    rows: the rows of the stack.
    dim: the width of the stack.

  Returns:
    A dict from slot name to `(shape, initial value)`.
  """
  return get(opt).slots(rows, dim)


def update_rows(
    opt: SparseOptimizerSpec,
    lr: jax.Array,
    step: jax.Array,
    weights: jax.Array,
    grads: jax.Array,
    slots: Slots,
    row_msq: jax.Array | None = None,
) -> tuple[jax.Array, Slots]:
  """One optimizer step on gathered rows.

  Args:
    opt: the optimizer.
    lr: `[U]` or scalar learning rate. It is per row because rows of one stack
      may have different schedules.
    step: the 0-based step being taken. Adam's bias correction uses step + 1.
    weights: `[U, D]` float32 rows.
    grads: `[U, D]` float32 summed gradients of those rows.
    slots: slot name -> `[U, D]` or `[U]` float32 rows.
    row_msq: `[U]` mean square of each row's gradient over the row's full
      width. Only rowwise_adagrad uses it. It is needed when `grads` holds
      only some of the row's columns.

  Returns:
    The new float32 weights and slots.
  """
  return get(opt).update(lr, step, weights, grads, slots, row_msq)


def scatter_add_ok(opt: SparseOptimizerSpec, table_dtype) -> bool:
  """Tells whether a plain scatter-add of `-lr * g` per id is the exact update.

  That holds for a stateless, linear optimizer without weight decay, on a
  float32 table. Low-precision tables need the summed update rounded once.

  Args:
    opt: the optimizer spec.
    table_dtype: the table's logical dtype.

  Returns:
    True when the scatter-add is exact.
  """
  return (get(opt).linear and not opt.weight_decay and
          jnp.dtype(table_dtype) == jnp.float32)


def cast_rows(opt: SparseOptimizerSpec, rows: jax.Array, table_dtype,
              seed: int | jax.Array, row_ids: jax.Array, step: jax.Array,
              col_ids: jax.Array | None = None) -> jax.Array:
  """Casts updated float32 rows to the table's dtype.

  bfloat16 and float16 rows are rounded stochastically when
  `opt.stochastic_rounding` is set, else to nearest.

  Args:
    opt: the optimizer spec.
    rows: `[U, D]` float32 rows.
    table_dtype: the table's logical dtype.
    seed: the rounding seed, as in `rounding.stochastic_round`.
    row_ids: `[U]` row numbers, hashed for the random bits.
    step: the training step.
    col_ids: the column numbers, or None for 0..D-1.

  Returns:
    `[U, D]` rows in `table_dtype`.
  """
  dtype = jnp.dtype(table_dtype)
  if dtype == jnp.float32:
    return rows
  if opt.stochastic_rounding:
    return rounding.stochastic_round(rows, dtype, seed, row_ids, step,
                                     col_ids)
  return rounding.round_nearest(rows, dtype)
