"""Feature definitions and the raw-to-model transform, in TorchEasyRec's manner.

A *raw batch* is what the data readers produce, as numpy arrays:
  'label': `[B]` float32 (absent for unlabeled data),
  'int':   `[B, 13]` int64, Criteo's integer columns, missing written as 0,
  'cat':   `[B, 26]` int64, Criteo's categorical hashes, missing written as -1,
  or instead 'ids': `[B, 26]` int32 ids already mapped to table rows
  (preprocessed data),
  and optionally one `[B, L]` int64 array per multi-valued input column, keyed
  by the column name (padding -1).
Input columns are named `int_<i>` and `cat_<i>`.

A *model batch* is what the train step consumes:
  'label': `[B]` float32,
  'dense': `[B, F]` float32, the dense group, normalized,
  'ids':   `[B, T]` int32, the ids of the sparse group's features packed side by
           side (feature k takes `max_ids[k]` columns), padding -1.

`FeatureTransform.apply` runs on numpy in the input pipeline and on jax.numpy in
exported serving functions, so both compute exactly the same thing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from dlrm_jax import hashing

NORMALIZERS = ('none', 'log(x+1)', 'log(x+3)')
MISSING_ID = 0  # The row reserved for a missing categorical value.

_INPUT_RE = re.compile(r'^(int|cat)_(\d+)$')


@dataclasses.dataclass(frozen=True)
class RawFeature:
  """A numeric input column.

  Attributes:
    name: feature name, used in feature groups.
    input: input column (`int_<i>`).
    normalizer: one of NORMALIZERS, applied after negatives are set to 0.
    boundaries: if set, the (clamped) value is bucketized into
      `len(boundaries) + 1` ids with an embedding of its own, and the feature
      belongs in the sparse group.
    embedding_dim: embedding width when `boundaries` is set.
    embedding_name: optional name of a table shared with other features.
  """

  name: str
  input: str
  normalizer: str = 'log(x+1)'
  boundaries: tuple[float, ...] | None = None
  embedding_dim: int | None = None
  embedding_name: str | None = None

  @property
  def is_sparse(self) -> bool:
    return self.boundaries is not None

  @property
  def max_ids(self) -> int:
    return 1

  @property
  def num_rows(self) -> int:
    assert self.boundaries is not None
    return len(self.boundaries) + 1

  @property
  def combiner(self) -> str:
    return 'sum'


@dataclasses.dataclass(frozen=True)
class IdFeature:
  """A categorical input column looked up in an embedding table.

  Attributes:
    name: feature name, used in feature groups.
    input: input column (`cat_<i>`).
    embedding_dim: embedding width.
    num_buckets: table rows; a raw value v maps to `1 + v % (num_buckets-1)`
      (row 0 is kept for missing values), so num_buckets caps the table as
      `--max-ind-range` does in the reference DLRM.
    hash_bucket_size: table rows; the value is hashed (a 32-bit mix) before
      the modulo, which spreads structured ids. Exclusive with num_buckets.
    embedding_name: optional name of a table shared with other features.
    max_ids: most ids one example carries (1: single-hot).
    combiner: pooling of a multi-hot bag: one of `dlrm_jax.embedding.specs.COMBINERS`.
    managed_collision: eviction policy ('lru' or 'lfu') when the raw values
      are mapped to the `num_buckets` rows by a managed-collision remapper
      (each live value its own row) instead of by modulo; None otherwise.
  """

  name: str
  input: str
  embedding_dim: int
  num_buckets: int | None = None
  hash_bucket_size: int | None = None
  embedding_name: str | None = None
  max_ids: int = 1
  combiner: str = 'sum'
  managed_collision: str | None = None

  @property
  def is_sparse(self) -> bool:
    return True

  @property
  def num_rows(self) -> int:
    return int(self.num_buckets or self.hash_bucket_size)


@dataclasses.dataclass(frozen=True)
class SequenceIdFeature:
  """A sequence of ids (user history); DLRM groups cannot take these."""

  name: str
  input: str
  embedding_dim: int
  num_buckets: int | None = None
  hash_bucket_size: int | None = None
  embedding_name: str | None = None
  sequence_length: int = 1
  is_sparse: bool = False


Feature = RawFeature | IdFeature | SequenceIdFeature


def table_name(feature: RawFeature | IdFeature) -> str:
  """The embedding table a sparse feature reads."""
  return feature.embedding_name or feature.name


def parse_input(column: str, *, path: str) -> tuple[str, int]:
  m = _INPUT_RE.match(column or '')
  if not m:
    raise ValueError(
        f'{path} ({column!r}) must name an input column as int_<i> or'
        ' cat_<i>.')
  return m.group(1), int(m.group(2))


def normalize(x, normalizer: str, xp=np):
  """Clamps negatives (and missing, written 0) to 0, then normalizes."""
  x = xp.maximum(x.astype(xp.float32), 0.0)
  if normalizer == 'log(x+1)':
    return xp.log1p(x)
  if normalizer == 'log(x+3)':
    return xp.log(x + 3.0)
  return x


def map_ids(values, feature: IdFeature, xp=np, missing=None):
  """Raw categorical values to table rows, as int32.

  Args:
    values: raw 32-bit hashes; as int64 with -1 for missing, or (when
      `missing` is given) as uint32.
    feature: the id feature.
    xp: numpy or jax.numpy.
    missing: optional boolean mask of missing values.
  """
  if missing is None:
    missing = values < 0
    values = xp.where(missing, 0, values)
  u = values.astype(xp.uint32)
  if feature.hash_bucket_size:
    rows = feature.hash_bucket_size
    u = hashing.mix32(u, xp)
  else:
    rows = feature.num_buckets
  ids = (xp.uint32(1) + u % xp.uint32(rows - 1)).astype(xp.int32)
  return xp.where(missing, MISSING_ID, ids)


def bucketize(values, feature: RawFeature, xp=np):
  """A bucketized numeric feature's rows (int32): negatives (and missing,
  written 0) clamp to 0, then row i holds boundaries[i-1] <= x <
  boundaries[i] (`searchsorted(..., side='right')`, TorchRec/TorchEasyRec's
  bucketize)."""
  x = xp.maximum(values.astype(xp.float32), 0.0)
  return xp.searchsorted(xp.asarray(feature.boundaries, dtype=xp.float32), x,
                         side='right').astype(xp.int32)


def lookup_sorted(values, keys, rows, unknown: int, missing, xp=np):
  """Table rows (int32) of raw `values` by a sorted table `keys -> rows`:
  missing values read MISSING_ID, values not in the table `unknown`.

  The mapping of vocabulary features (preprocessing, `preprocess.map_vocab`;
  unknown: the out-of-vocabulary row) and of managed-collision remapper
  tables in the export (unknown: row 0), on numpy or jax.numpy.

  Args:
    values: raw values (uint32), `[B]`.
    keys: the table's sorted raw values, `[K]` (same dtype as `values`).
    rows: the row of each key, `[K]`.
    unknown: the row of values not in the table.
    missing: boolean mask of missing values, `[B]`.
    xp: numpy or jax.numpy.
  """
  if keys.shape[0] == 0:
    return xp.where(missing, MISSING_ID, unknown).astype(xp.int32)
  pos = xp.clip(xp.searchsorted(keys, values), 0, keys.shape[0] - 1)
  found = keys[pos] == values
  return xp.where(missing, MISSING_ID,
                  xp.where(found, rows[pos], unknown)).astype(xp.int32)


@dataclasses.dataclass(frozen=True)
class FeatureTransform:
  """Turns raw batches into model batches (see the module docstring)."""

  dense: tuple[RawFeature, ...]
  sparse: tuple[RawFeature | IdFeature, ...]

  @property
  def num_dense(self) -> int:
    return len(self.dense)

  @property
  def id_widths(self) -> tuple[int, ...]:
    return tuple(f.max_ids for f in self.sparse)

  @property
  def id_offsets(self) -> tuple[int, ...]:
    return tuple(int(o) for o in np.cumsum((0,) + self.id_widths)[:-1])

  @property
  def num_id_columns(self) -> int:
    return int(sum(self.id_widths))

  @staticmethod
  def _column(raw: Mapping[str, Any], column: str):
    if column in raw:
      return raw[column]
    kind, index = parse_input(column, path='input')
    return raw[kind][:, index]

  def apply(self, raw: Mapping[str, Any], xp=np) -> dict[str, Any]:
    """Maps a raw batch to a model batch, with numpy (`xp=np`) or jax.numpy."""
    out = {}
    if 'label' in raw:
      out['label'] = raw['label'].astype(xp.float32)
    if self.dense:
      cols = [normalize(self._column(raw, f.input), f.normalizer, xp)
              for f in self.dense]
      out['dense'] = xp.stack(cols, axis=1)
    id_cols = []
    for f in self.sparse:
      col = None if ('ids' in raw and isinstance(f, IdFeature)) else (
          self._column(raw, f.input))
      if isinstance(f, RawFeature):
        ids = bucketize(col, f, xp)
      elif f.managed_collision:
        # Raw values go to the remapper, which fills the ids in (in order,
        # outside the input threads: it keeps state).
        values = col if col.ndim == 2 else col[:, None]
        out.setdefault('mc_raw', {})[f.name] = values.astype(xp.int64)
        ids = xp.full(values.shape, -1, xp.int32)
      elif 'ids' in raw and f.input.startswith('cat_'):
        # Ids mapped ahead of time (preprocessed data): take them as they are.
        ids = raw['ids'][:, int(f.input[4:])].astype(xp.int32)
      else:
        ids = map_ids(col, f, xp)
        if col.ndim == 2:  # multi-valued: keep the padding marker
          ids = xp.where(col < 0, -1, ids)
      if ids.ndim == 1:
        ids = ids[:, None]
      if ids.shape[1] < f.max_ids:
        pad = xp.full((ids.shape[0], f.max_ids - ids.shape[1]), -1, xp.int32)
        ids = xp.concatenate([ids, pad], axis=1)
      elif ids.shape[1] > f.max_ids:
        raise ValueError(
            f'feature {f.name!r} got {ids.shape[1]} ids per example, more than'
            f' its max_ids ({f.max_ids}).')
      id_cols.append(ids)
    out['ids'] = xp.concatenate(id_cols, axis=1)
    return out

  def check_ids(self, ids: np.ndarray, num_rows: Sequence[int]) -> None:
    """Rejects ids outside their table, naming the feature and the value."""
    for f, off, width, rows in zip(
        self.sparse, self.id_offsets, self.id_widths, num_rows):
      col = ids[:, off:off + width]
      bad = (col >= rows) | (col < -1)
      if bad.any():
        value = int(col[bad][0])
        raise ValueError(
            f'feature {f.name!r} has id {value} outside its table of {rows}'
            ' rows (valid ids are 0..rows-1, -1 pads a bag).')
