"""Embedding table and feature specs (in the manner of keras-rs/TorchRec).

A `TableSpec` says how a table is stored and trained; a `FeatureSpec` says which
table a feature reads and how many ids it carries, so several features can share
one table.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from dlrm_jax.train.schedules import ScheduleSpec

COMBINERS = ('sum', 'mean', 'sqrtn')
INITIALIZERS = ('uniform', 'normal', 'truncated_normal', 'zeros')
SPARSE_OPTIMIZERS = ('sgd', 'adagrad', 'rowwise_adagrad', 'adam', 'ftrl')
WEIGHT_DECAY_MODES = ('l2', 'decoupled')
TABLE_DTYPES = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class SparseOptimizerSpec:
  """A sparse optimizer, which updates the touched rows only.

  The formulas and their sources are in `dlrm_jax.embedding.optimizers`.

  Attributes:
    kind: one of SPARSE_OPTIMIZERS. 'adagrad' is per element, as FBGEMM's
      EXACT_ADAGRAD and torch.optim.Adagrad. 'rowwise_adagrad' keeps one
      accumulator per row, as FBGEMM's EXACT_ROWWISE_ADAGRAD. 'adam' is lazy:
      the moments of untouched rows are not decayed. 'ftrl' is TensorFlow's
      FTRL-proximal.
    schedule: the learning-rate schedule.
    initial_accumulator_value: the start value of the adagrad and ftrl
      accumulators.
    eps: added to the denominator `sqrt(acc) + eps`.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    l1: FTRL's L1 regularization strength, >= 0.
    l2: FTRL's L2 regularization strength, >= 0. It is TensorFlow's l2, the
      penalty `l2 * w^2`.
    lr_power: FTRL's learning-rate power, <= 0. The paper uses -0.5.
    beta: FTRL's beta, >= 0.
    weight_decay: the weight decay of touched rows, >= 0. 0 turns it off.
    weight_decay_mode: 'l2' or 'decoupled'. 'l2' adds `wd * w` to the
      gradient, as FBGEMM's L2. 'decoupled' subtracts `lr * wd * w` from the
      weight, as FBGEMM's DECOUPLED.
    stochastic_rounding: round each updated row of a bfloat16 or float16
      table stochastically rather than to nearest. FBGEMM does so by default.
  """

  kind: str = 'sgd'
  schedule: ScheduleSpec = ScheduleSpec()
  initial_accumulator_value: float = 0.0
  eps: float = 1e-8
  b1: float = 0.9
  b2: float = 0.999
  l1: float = 0.0
  l2: float = 0.0
  lr_power: float = -0.5
  beta: float = 0.0
  weight_decay: float = 0.0
  weight_decay_mode: str = 'l2'
  stochastic_rounding: bool = True

  def check(self, path: str):
    """Checks that every field is in range.

    Args:
      path: the spec's config path, named in errors.

    Raises:
      ValueError: if a field is out of range, or if ftrl would divide by zero.
    """
    if self.kind not in SPARSE_OPTIMIZERS:
      raise ValueError(
          f'{path}.kind ({self.kind!r}) must be one of'
          f' {list(SPARSE_OPTIMIZERS)}.')
    for field in ('initial_accumulator_value', 'eps', 'l1', 'l2', 'beta',
                  'weight_decay'):
      value = getattr(self, field)
      if not value >= 0:
        raise ValueError(f'{path}.{field} ({value}) must be >= 0.')
    if not self.lr_power <= 0:
      raise ValueError(f'{path}.lr_power ({self.lr_power}) must be <= 0.')
    if self.weight_decay_mode not in WEIGHT_DECAY_MODES:
      raise ValueError(
          f'{path}.weight_decay_mode ({self.weight_decay_mode!r}) must be one'
          f' of {list(WEIGHT_DECAY_MODES)}.')
    if self.kind == 'ftrl' and self.lr_power != 0 and (
        self.initial_accumulator_value == 0 and self.beta == 0):
      raise ValueError(
          f'{path}: ftrl with initial_accumulator_value 0 and beta 0 divides'
          ' by zero on rows whose gradient is 0; set'
          f' {path}.initial_accumulator_value > 0 (TensorFlow uses 0.1) or'
          f' {path}.beta > 0.')


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """One embedding table.

  Attributes:
    name: unique table name.
    num_rows: rows (ids 0..num_rows-1).
    dim: embedding width.
    initializer: one of INITIALIZERS.
    init_scale: the uniform bound or the normal stddev. None means
      `sqrt(1/num_rows)` for 'uniform', as the reference DLRM and TorchRec.
      For the normal initializers None means `1/sqrt(dim)`.
    optimizer: how its rows are updated.
    combiner: the pooling of multi-hot bags, one of COMBINERS.
    dtype: the storage dtype, one of TABLE_DTYPES. The optimizer state is
      float32. Low-precision rows are updated in float32 and rounded once,
      stochastically by default.
  """

  name: str
  num_rows: int
  dim: int
  initializer: str = 'uniform'
  init_scale: float | None = None
  optimizer: SparseOptimizerSpec = SparseOptimizerSpec()
  combiner: str = 'sum'
  dtype: str = 'float32'

  @property
  def scale(self) -> float:
    """The initializer's scale: `init_scale`, or its default when None."""
    if self.init_scale is not None:
      return float(self.init_scale)
    if self.initializer == 'uniform':
      return (1.0 / self.num_rows) ** 0.5
    return 1.0 / self.dim ** 0.5


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """A sparse feature: which table it reads and its bag size.

  Attributes:
    name: unique feature name.
    table: the table's name.
    max_ids: the most ids one example carries. 1 means single-hot.
    dim: the embedding width the feature expects. None takes the table's.
  """

  name: str
  table: str
  max_ids: int = 1
  dim: int | None = None


def validate(tables: Sequence[TableSpec], features: Sequence[FeatureSpec]):
  """Checks tables and features for consistency.

  Args:
    tables: the table specs.
    features: the feature specs.

  Raises:
    ValueError: if a spec is invalid or disagrees with another. The message
      names the offending spec.
  """
  names = set()
  for t in tables:
    if t.name in names:
      raise ValueError(f'table {t.name!r} is defined twice.')
    names.add(t.name)
    for field in ('num_rows', 'dim'):
      value = getattr(t, field)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f'table {t.name!r}: {field} ({value!r}) must be a positive integer.')
    if t.initializer not in INITIALIZERS:
      raise ValueError(
          f'table {t.name!r}: initializer ({t.initializer!r}) must be one of'
          f' {list(INITIALIZERS)}.')
    if t.init_scale is not None and t.init_scale < 0:
      raise ValueError(
          f'table {t.name!r}: init_scale ({t.init_scale}) must be >= 0.')
    if t.combiner not in COMBINERS:
      raise ValueError(
          f'table {t.name!r}: combiner ({t.combiner!r}) must be one of'
          f' {list(COMBINERS)}.')
    if t.dtype not in TABLE_DTYPES:
      raise ValueError(
          f'table {t.name!r}: dtype ({t.dtype!r}) must be one of'
          f' {list(TABLE_DTYPES)}.')
    t.optimizer.check(f'table {t.name!r}: optimizer')
  by_name = {t.name: t for t in tables}
  fnames = set()
  for f in features:
    if f.name in fnames:
      raise ValueError(f'feature {f.name!r} is defined twice.')
    fnames.add(f.name)
    if f.table not in names:
      raise ValueError(
          f'feature {f.name!r} reads table {f.table!r}, which is not defined'
          f' (tables: {sorted(names)}).')
    if isinstance(f.max_ids, bool) or not isinstance(f.max_ids, int) or (
        f.max_ids <= 0):
      raise ValueError(
          f'feature {f.name!r}: max_ids ({f.max_ids!r}) must be a positive'
          ' integer.')
    if f.dim is not None and f.dim != by_name[f.table].dim:
      raise ValueError(
          f'feature {f.name!r} expects dim {f.dim} but its table {f.table!r}'
          f' has dim {by_name[f.table].dim}; features sharing a table must'
          ' use its dim.')
