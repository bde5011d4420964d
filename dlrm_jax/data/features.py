"""Feature definitions and the raw-to-model transform, in TorchEasyRec's manner.

A *raw batch* is what the data readers produce, as numpy arrays:
  'label': `[B]` float32 (absent for unlabeled data),
  'int':   `[B, 13]` int64, Criteo's integer columns, missing written as 0,
  'cat':   `[B, 26]` int64, Criteo's categorical hashes, missing written as -1,
  or instead 'ids': `[B, 26]` int32 ids already mapped to table rows
  (preprocessed data),
  and optionally one `[B, L]` int64 array per multi-valued input column, keyed
  by the column name (padding -1).
Input columns are named `int_<i>` and `cat_<i>` for Criteo's sources. The
tabular source (`dlrm_jax.data.table`) keys each column by its own name
instead: float64 `[B]` for raw features, int64 `[B]` encoded values for id
features (in [0, 2^32), -1 missing) and `[B, L]` for bags (padding -1).

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
    name: the feature name, used in feature groups.
    input: the input column, `int_<i>`.
    normalizer: one of NORMALIZERS, applied after negatives are set to 0.
    boundaries: if set, the clamped value is bucketized into
      `len(boundaries) + 1` ids with an embedding of its own. The feature
      then belongs in the sparse group.
    embedding_dim: the embedding width when `boundaries` is set.
    embedding_name: the optional name of a table shared with other features.
  """

  name: str
  input: str
  normalizer: str = 'log(x+1)'
  boundaries: tuple[float, ...] | None = None
  embedding_dim: int | None = None
  embedding_name: str | None = None

  @property
  def is_sparse(self) -> bool:
    """Whether the feature is bucketized, which makes it sparse."""
    return self.boundaries is not None

  @property
  def max_ids(self) -> int:
    """The ids per example: always 1."""
    return 1

  @property
  def num_rows(self) -> int:
    """The rows of its bucket table, `len(boundaries) + 1`."""
    assert self.boundaries is not None
    return len(self.boundaries) + 1

  @property
  def combiner(self) -> str:
    """The pooling of its single id: 'sum'."""
    return 'sum'


@dataclasses.dataclass(frozen=True)
class IdFeature:
  """A categorical input column looked up in an embedding table.

  Attributes:
    name: the feature name, used in feature groups.
    input: the input column, `cat_<i>`.
    embedding_dim: the embedding width.
    num_buckets: the table rows. A raw value v maps to
      `1 + v % (num_buckets-1)`. Row 0 is kept for missing values. So
      num_buckets caps the table as `--max-ind-range` does in the reference
      DLRM.
    hash_bucket_size: the table rows. The value is hashed with a 32-bit mix
      before the modulo, which spreads structured ids. Exclusive with
      num_buckets.
    embedding_name: the optional name of a table shared with other features.
    max_ids: the most ids one example carries. 1 means single-hot.
    combiner: the pooling of a multi-hot bag, one of
      `dlrm_jax.embedding.specs.COMBINERS`.
    managed_collision: the eviction policy, 'lru' or 'lfu', when a
      managed-collision remapper maps the raw values to the `num_buckets`
      rows instead of the modulo. Each live value then has its own row. None
      otherwise.
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
  value_dtype: str | None = None
  separator: str | None = None
  vocab_list: tuple[str, ...] | None = None
  default_bucketize_value: int = 0
  flag_columns: tuple[str, ...] | None = None

  @property
  def is_sparse(self) -> bool:
    """Always True: an id feature is sparse."""
    return True

  @property
  def num_rows(self) -> int:
    """The rows of its table: `num_buckets`, `hash_bucket_size` or the
    vocabulary's length (TorchEasyRec's `IdFeature.num_embeddings`)."""
    if self.vocab_list:
      return len(self.vocab_list)
    return int(self.num_buckets or self.hash_bucket_size)


@dataclasses.dataclass(frozen=True)
class ComboFeature:
  """A cross of two or more columns, TorchEasyRec's `ComboFeature`.

  The encoded values of `inputs` (see `dlrm_jax.data.table`: strings
  hashed, integers folded to 32 bits) are chained through `cross_values`
  and mapped to rows as an id feature's are. A missing input makes the
  cross missing (row MISSING_ID). Inputs are single-valued.

  Attributes:
    name: the feature name, used in feature groups.
    inputs: the input columns, two or more.
    embedding_dim: the embedding width.
    hash_bucket_size: the table rows, by hash.
    num_buckets: the table rows, by modulo.
    embedding_name: the optional name of a table shared with other features.
    value_dtype: how the inputs are read: 'string' (the default), 'int' or
      'hex'.
  """

  name: str
  inputs: tuple[str, ...]
  embedding_dim: int
  hash_bucket_size: int | None = None
  num_buckets: int | None = None
  embedding_name: str | None = None
  value_dtype: str | None = None

  input = property(lambda self: self.inputs[0])
  is_sparse = property(lambda self: True)
  max_ids = property(lambda self: 1)
  combiner = property(lambda self: 'sum')
  managed_collision = property(lambda self: None)
  vocab_list = property(lambda self: None)

  @property
  def num_rows(self) -> int:
    """The rows of its table, `num_buckets` or `hash_bucket_size`."""
    return int(self.num_buckets or self.hash_bucket_size)


@dataclasses.dataclass(frozen=True)
class SequenceIdFeature:
  """A sequence of ids, such as a user history. DLRM groups cannot take these.

  Attributes:
    name: the feature name.
    input: the input column.
    embedding_dim: the embedding width.
    num_buckets: the table rows, by modulo.
    hash_bucket_size: the table rows, by hash.
    embedding_name: the optional name of a shared table.
    sequence_length: the ids per example.
    is_sparse: always False. A sequence is in neither DLRM group.
  """

  name: str
  input: str
  embedding_dim: int
  num_buckets: int | None = None
  hash_bucket_size: int | None = None
  embedding_name: str | None = None
  sequence_length: int = 1
  is_sparse: bool = False


Feature = RawFeature | IdFeature | ComboFeature | SequenceIdFeature


def table_name(feature: RawFeature | IdFeature | ComboFeature) -> str:
  """Names the embedding table that a sparse feature reads.

  Args:
    feature: the sparse feature.

  Returns:
    Its `embedding_name`, or its own name when that is unset.
  """
  return feature.embedding_name or feature.name


def parse_input(column: str, *, path: str) -> tuple[str, int]:
  """Parses an input column name, `int_<i>` or `cat_<i>`.

  Args:
    column: the column name.
    path: the config path named in errors.

  Returns:
    `(kind, i)`, with kind 'int' or 'cat'.

  Raises:
    ValueError: if the name has another form.
  """
  m = _INPUT_RE.match(column or '')
  if not m:
    raise ValueError(
        f'{path} ({column!r}) must name an input column as int_<i> or'
        ' cat_<i>.')
  return m.group(1), int(m.group(2))


def normalize(x, normalizer: str, xp=np):
  """Clamps negatives to 0, then normalizes. Missing values are written 0.

  Args:
    x: the raw values.
    normalizer: one of NORMALIZERS.
    xp: numpy or jax.numpy.

  Returns:
    float32 values of the shape of `x`.
  """
  x = xp.maximum(x.astype(xp.float32), 0.0)
  if normalizer == 'log(x+1)':
    return xp.log1p(x)
  if normalizer == 'log(x+3)':
    return xp.log(x + 3.0)
  return x


def cross_values(columns, xp=np):
  """Chains the encoded values of a cross's columns into one uint32 value.

  `h = mix32(h * 0x9E3779B1 + v + 1)` over the columns in order, from
  `h = 0`: order matters, and equal values in different columns differ.

  Args:
    columns: the columns' raw values, int64 in [0, 2^32), -1 missing.
    xp: numpy or jax.numpy.

  Returns:
    int64 values in [0, 2^32), -1 where any column is missing.
  """
  h = xp.zeros(columns[0].shape, xp.uint32)
  missing = xp.zeros(columns[0].shape, bool)
  for v in columns:
    missing = missing | (v < 0)
    u = xp.where(v < 0, 0, v).astype(xp.uint32)
    h = hashing.mix32(h * xp.uint32(0x9E3779B1) + u + xp.uint32(1), xp)
  return xp.where(missing, -1, h.astype(xp.int64))


def vocab_keys(vocab: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """The sorted hashes of a vocabulary and the row of each.

  Args:
    vocab: the vocabulary, row i for entry i.

  Returns:
    `(keys, rows)`: `[V]` sorted uint32 string hashes and their rows.

  Raises:
    ValueError: if two entries hash alike.
  """
  from dlrm_jax.data import table  # pylint: disable=g-import-not-at-top
  hashes = table.hash_strings(list(vocab))
  order = np.argsort(hashes, kind='stable')
  keys = hashes[order]
  if len(keys) > 1 and (keys[1:] == keys[:-1]).any():
    raise ValueError('two vocabulary entries hash to the same 32-bit value.')
  return keys, order.astype(np.int32)


def map_vocab_ids(values, feature: IdFeature, xp=np):
  """Maps string hashes to vocabulary rows (TorchEasyRec's vocab_list).

  The table has `len(vocab_list)` rows, entry i in row i. Values not in
  the vocabulary, and missing ones, get `default_bucketize_value`.

  Args:
    values: int64 string hashes, -1 missing; `[B]` or `[B, L]`.
    feature: the id feature with a vocab_list.
    xp: numpy or jax.numpy.

  Returns:
    int32 rows of the shape of `values`.
  """
  keys, rows = vocab_keys(feature.vocab_list)
  missing = values < 0
  u = xp.where(missing, 0, values).astype(xp.uint32)
  flat = lookup_sorted(u.reshape(-1), xp.asarray(keys), xp.asarray(rows),
                       feature.default_bucketize_value, missing.reshape(-1),
                       xp)
  flat = xp.where(missing.reshape(-1), feature.default_bucketize_value, flat)
  return flat.reshape(values.shape).astype(xp.int32)


def map_ids(values, feature: IdFeature, xp=np, missing=None):
  """Maps raw categorical values to table rows.

  Args:
    values: raw 32-bit hashes, as int64 with -1 for missing. When `missing`
      is given they may be uint32.
    feature: the id feature.
    xp: numpy or jax.numpy.
    missing: an optional boolean mask of missing values.

  Returns:
    int32 rows of the shape of `values`. Missing values get MISSING_ID.
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
  """Maps a numeric feature's values to bucket rows.

  Negatives clamp to 0, and missing values are written 0. Row i then holds
  `boundaries[i-1] <= x < boundaries[i]`. That is
  `searchsorted(..., side='right')`, the bucketize of TorchRec and
  TorchEasyRec.

  Args:
    values: the raw values.
    feature: the bucketized feature.
    xp: numpy or jax.numpy.

  Returns:
    int32 rows of the shape of `values`.
  """
  x = xp.maximum(values.astype(xp.float32), 0.0)
  return xp.searchsorted(xp.asarray(feature.boundaries, dtype=xp.float32), x,
                         side='right').astype(xp.int32)


def lookup_sorted(values, keys, rows, unknown: int, missing, xp=np):
  """Maps raw values to table rows by a sorted table `keys -> rows`.

  It maps vocabulary features in preprocessing, `preprocess.map_vocab`.
  There `unknown` is the out-of-vocabulary row. It also maps the
  managed-collision remapper tables in the export, with `unknown` row 0.

  Args:
    values: `[B]` uint32 raw values.
    keys: `[K]` sorted raw values of the table, of the dtype of `values`.
    rows: `[K]` row of each key.
    unknown: the row of values not in the table.
    missing: `[B]` boolean mask of missing values.
    xp: numpy or jax.numpy.

  Returns:
    `[B]` int32 rows. Missing values get MISSING_ID.
  """
  if keys.shape[0] == 0:
    return xp.where(missing, MISSING_ID, unknown).astype(xp.int32)
  pos = xp.clip(xp.searchsorted(keys, values), 0, keys.shape[0] - 1)
  found = keys[pos] == values
  return xp.where(missing, MISSING_ID,
                  xp.where(found, rows[pos], unknown)).astype(xp.int32)


@dataclasses.dataclass(frozen=True)
class FeatureTransform:
  """Turns raw batches into model batches, as the module docstring describes.

  Attributes:
    dense: the features of the dense group, in column order.
    sparse: the features of the sparse group, in packed id order.
  """

  dense: tuple[RawFeature, ...]
  sparse: tuple[RawFeature | IdFeature | ComboFeature, ...]

  @property
  def num_dense(self) -> int:
    """F, the width of the dense group."""
    return len(self.dense)

  @property
  def id_widths(self) -> tuple[int, ...]:
    """The packed id columns of each sparse feature, its `max_ids`."""
    return tuple(f.max_ids for f in self.sparse)

  @property
  def id_offsets(self) -> tuple[int, ...]:
    """The first packed id column of each sparse feature."""
    return tuple(int(o) for o in np.cumsum((0,) + self.id_widths)[:-1])

  @property
  def num_id_columns(self) -> int:
    """T, the packed id columns of all sparse features."""
    return int(sum(self.id_widths))

  @staticmethod
  def _column(raw: Mapping[str, Any], column: str):
    if column in raw:
      return raw[column]
    kind, index = parse_input(column, path='input')
    return raw[kind][:, index]

  def apply(self, raw: Mapping[str, Any], xp=np) -> dict[str, Any]:
    """Maps a raw batch to a model batch.

    Args:
      raw: the raw batch.
      xp: numpy or jax.numpy.

    Returns:
      The model batch, with 'label' when `raw` has one, 'dense' when there is
      a dense group, and 'ids'. A raw batch that is already a model batch
      (its '_model_batch' key, preprocessed table data) is given back
      without that key. Managed-collision features add their raw
      values under 'mc_raw' and leave -1 ids for the remapper to fill.

    Raises:
      ValueError: if a feature gets more ids per example than its max_ids.
    """
    if '_model_batch' in raw:
      # Model batches written ahead of time (preprocessed table configs,
      # `binary.MODEL_BATCH`): passed through as they are.
      return {k: v for k, v in raw.items() if k != '_model_batch'}
    out = {}
    if 'label' in raw:
      out['label'] = raw['label'].astype(xp.float32)
    if self.dense:
      cols = [normalize(self._column(raw, f.input), f.normalizer, xp)
              for f in self.dense]
      out['dense'] = xp.stack(cols, axis=1)
    id_cols = []
    for f in self.sparse:
      col = None if ('ids' in raw and isinstance(f, IdFeature)) or (
          isinstance(f, ComboFeature)) else self._column(raw, f.input)
      if isinstance(f, RawFeature):
        ids = bucketize(col, f, xp)
      elif isinstance(f, ComboFeature):
        ids = map_ids(cross_values([self._column(raw, c) for c in f.inputs],
                                   xp), f, xp)
      elif f.vocab_list:
        ids = map_vocab_ids(col, f, xp)
        if col.ndim == 2:
          ids = xp.where(col < 0, -1, ids)
      elif f.managed_collision:
        # Raw values go to the remapper, which fills the ids in. It keeps
        # state, so it runs in order, outside the input threads.
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
    """Rejects ids outside their table.

    Args:
      ids: `[B, T]` packed ids.
      num_rows: the table rows of each sparse feature.

    Raises:
      ValueError: naming the feature and the value, if an id is >= its
        table's rows or below -1.
    """
    for f, off, width, rows in zip(
        self.sparse, self.id_offsets, self.id_widths, num_rows):
      col = ids[:, off:off + width]
      bad = (col >= rows) | (col < -1)
      if bad.any():
        value = int(col[bad][0])
        raise ValueError(
            f'feature {f.name!r} has id {value} outside its table of {rows}'
            ' rows (valid ids are 0..rows-1, -1 pads a bag).')
