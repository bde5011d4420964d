"""The tabular source: CSV, TSV and Parquet logs whose columns features name.

`config.data.source = 'table'` reads any click log whose columns the feature
configs name (`config.features.<f>.input`), as TorchEasyRec's CSV and
Parquet datasets do, instead of Criteo's 13 + 26 columns by position.

Formats (`TableFormat`): CSV or TSV, plain or gzip, with a header line or
with the column names in the config; Parquet (row groups). Files are
streamed as pyarrow record batches, never loaded whole. Text is read as
strings and each column is converted by what its feature needs
(`ColumnRead.kind`), so the same rows give the same batches from CSV, TSV
and Parquet:

  float   a number (raw features): float64, missing 0.
  int     a decimal integer, folded to 32 bits: `v ^ (v >> 32)` of its
          64-bit two's complement, so values below 2^32 are unchanged.
  hex     a hexadecimal integer (Criteo's categorical columns), folded so.
  string  the text itself, hashed by 32-bit FNV-1a over its UTF-8 bytes
          (`hash_strings`). Parquet integers are hashed as their decimal
          text, as a CSV holds them.
  flags   several 0/1 columns (`ColumnRead.flags`) read as one bag: the
          indexes of the columns that are non-zero.
Encoded values are int64 in [0, 2^32) with -1 for a missing (empty or
null) value; `features.FeatureTransform` maps them to rows, the one id
mapping of training, export and serving. A column with a `separator` (or a
Parquet list column) is a bag: `[B, max_ids]`, padding -1.

Text numbers are parsed by Arrow's cast of a whole column, much quicker
than matching their rule (`_FLOAT_RE`, `_INT_RE`), and the rule judges
only where the two may differ: a float column's non-finite values (Arrow
also takes 'nan', 'inf', 'infinity' and 'nan(...)', any case, and '1e999'
overflows to inf, which the rule takes), and a column that does not cast
whole (blanks, junk); an int column casts only when its bytes are digits
and '-' and no value is over 18 bytes long (Arrow also takes '0x1f' and
19 digits). Hex is read from the string buffers two digits at a time
(`_parse_hex`). A text file is read one pyarrow batch ahead in a thread
(`_ReadAhead`), so pyarrow parses the next block while this one is
encoded; each batch comes with the rows pyarrow had dropped by then, so
line numbers, reports and errors are those of a reader in one thread.

The label is a column (`config.data.table.label`), 0 or 1, or any number
with a rule such as `>= 4` (`LabelRule`).

Side tables (`SideTable`): small files joined on a key column, e.g.
MovieLens' movies by `item_id`. They are read whole, once; their columns are
then addressed like the main table's. A row whose key is absent from the
side table gets missing values.

Bad input: a row with the wrong number of fields, a value that does not
parse for its column's kind, a label outside its rule, a bag longer than
its max_ids: `bad_lines='error'` raises one line naming the file, line (or
Parquet row) and column; `'skip'` drops the row and reports it, as Criteo
rows are. A missing column or a Parquet column of the wrong type is always
an error.

Several processes: `shares` cuts text files by line-aligned byte ranges
(`criteo.split_into_shares`) and Parquet files by row groups; each process
streams its own share.
"""

from __future__ import annotations

from concurrent import futures
import dataclasses
import io
import operator
import re
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from dlrm_jax.data import criteo

FORMATS = ('auto', 'csv', 'tsv', 'parquet')
KINDS = ('float', 'int', 'hex', 'string')
_RULE_RE = re.compile(r'^\s*(>=|<=|==|!=|>|<)\s*([-+0-9.eE]+)\s*$')
_OPS = {'>=': operator.ge, '<=': operator.le, '==': operator.eq,
        '!=': operator.ne, '>': operator.gt, '<': operator.lt}
_FLOAT_RE = r'^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$'
_INT_RE = r'^\s*[-+]?\d{1,18}\s*$'
_HEX_RE = r'^[0-9a-fA-F]{1,16}$'
_BLOCK_BYTES = 4 << 20  # as criteo._BLOCK_BYTES: fewer, larger batches
_FNV_OFFSET, _FNV_PRIME = np.uint32(2166136261), np.uint32(16777619)


class TableError(ValueError):
  """A file or row that cannot be read as the config describes."""


@dataclasses.dataclass(frozen=True)
class TableFormat:
  """How a table's files are laid out (`config.data.table`).

  Attributes:
    format: 'csv', 'tsv', 'parquet' or 'auto' (by the file name: .parquet
      or .pq, .tsv, else csv; `.gz` is looked through).
    delimiter: the field separator of text; '' for the format's own.
    header: whether text files start with a line of column names.
    columns: the column names of text files without a header (with one,
      they must match it when given).
    encoding: the text encoding, e.g. 'utf8' or 'latin-1'.
    quote_char: the quote character of text; '' for none.
  """

  format: str = 'auto'
  delimiter: str = ''
  header: bool = True
  columns: tuple[str, ...] = ()
  encoding: str = 'utf8'
  quote_char: str = '"'

  def kind_of(self, path: str) -> str:
    """The format of one file: 'csv', 'tsv' or 'parquet'."""
    if self.format != 'auto':
      return self.format
    name = path[:-3] if path.endswith('.gz') else path
    if name.endswith(('.parquet', '.pq')):
      return 'parquet'
    return 'tsv' if name.endswith('.tsv') else 'csv'

  def sep(self, path: str) -> str:
    """The field separator of a text file."""
    return self.delimiter or ('\t' if self.kind_of(path) == 'tsv' else ',')


@dataclasses.dataclass(frozen=True)
class ColumnRead:
  """One column as the features read it.

  Attributes:
    name: the column (or, for flags, the name the bag is keyed by).
    kind: one of KINDS, or 'flags'.
    separator: splits a text value into a bag; None: single-valued.
    max_len: the most values of a bag (the feature's max_ids).
    flags: for kind 'flags', the 0/1 columns of the bag.
    feature: the feature that reads it, for messages.
  """

  name: str
  kind: str
  separator: str | None = None
  max_len: int = 1
  flags: tuple[str, ...] | None = None
  feature: str = ''

  @property
  def sources(self) -> tuple[str, ...]:
    """The file columns it reads."""
    return self.flags if self.kind == 'flags' else (self.name,)

  @property
  def is_bag(self) -> bool:
    """Whether it gives `[B, max_len]` values."""
    return self.separator is not None or self.kind == 'flags' or (
        self.max_len > 1)


@dataclasses.dataclass(frozen=True)
class LabelRule:
  """The label: a column, 0/1 or any number with a rule (`>= 4`).

  Attributes:
    column: the label column.
    rule: '' (the value must be 0 or 1) or `<op> <number>` with op one of
      >=, >, <=, <, ==, !=; the label is 1 where it holds.
  """

  column: str
  rule: str = ''

  def parse(self) -> tuple[Any, float] | None:
    """The rule's (operator, threshold), or None without a rule."""
    if not self.rule:
      return None
    m = _RULE_RE.match(self.rule)
    if not m:
      raise ValueError(
          f"config.data.table.label_rule ({self.rule!r}) must be '<op>"
          " <number>', op one of >=, >, <=, <, ==, != (e.g. '>= 4').")
    return _OPS[m.group(1)], float(m.group(2))


@dataclasses.dataclass(frozen=True)
class SideTable:
  """A small table joined to each row on a key (TorchEasyRec's lookups).

  Attributes:
    name: its name in `config.data.table.side_tables`.
    path: its file.
    key: its key column.
    join_on: the main table's column holding the key.
    format: its layout.
  """

  name: str
  path: str
  key: str
  join_on: str
  format: TableFormat


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """What the tabular source reads: `config.data.table` and the features.

  Attributes:
    format: the main files' layout.
    label: the label column and rule; None for unlabeled data.
    reads: the columns the features read.
    side_tables: tables joined on a key.
  """

  format: TableFormat
  label: LabelRule | None
  reads: tuple[ColumnRead, ...]
  side_tables: tuple[SideTable, ...] = ()


def column_reads(features) -> tuple[ColumnRead, ...]:
  """The columns that a model's features read, and how.

  Args:
    features: the features of the dense and sparse groups.

  Returns:
    One `ColumnRead` per column, in first-use order.

  Raises:
    ValueError: if two features read one column in different ways.
  """
  from dlrm_jax.data import features as features_lib  # pylint: disable=g-import-not-at-top
  out: dict[str, ColumnRead] = {}

  def add(read: ColumnRead):
    old = out.get(read.name)
    if old is None:
      out[read.name] = read
    elif (old.kind, old.separator, old.flags) != (
        read.kind, read.separator, read.flags):
      raise ValueError(
          f'config.features.{read.feature}: reads column {read.name!r} as'
          f' {read.kind}{_sep_text(read)}, but config.features.{old.feature}'
          f' reads it as {old.kind}{_sep_text(old)}; a column is read one'
          ' way (set value_dtype alike).')
    elif read.max_len > old.max_len:
      out[read.name] = dataclasses.replace(old, max_len=read.max_len)

  for f in features:
    if isinstance(f, features_lib.RawFeature):
      add(ColumnRead(f.input, 'float', feature=f.name))
    elif isinstance(f, features_lib.ComboFeature):
      for c in f.inputs:
        add(ColumnRead(c, f.value_dtype or 'string', feature=f.name))
    elif isinstance(f, features_lib.IdFeature):
      if f.flag_columns:
        add(ColumnRead(f.input, 'flags', max_len=f.max_ids,
                       flags=tuple(f.flag_columns), feature=f.name))
        continue
      kind = f.value_dtype or default_kind(f)
      add(ColumnRead(f.input, kind, separator=f.separator,
                     max_len=f.max_ids, feature=f.name))
  return tuple(out.values())


def default_kind(feature) -> str:
  """An id feature's value_dtype when unset: 'string' for hashed and
  vocabulary features, 'int' for num_buckets."""
  return 'string' if (feature.hash_bucket_size or feature.vocab_list) else (
      'int')


def _sep_text(read: ColumnRead) -> str:
  return f' split by {read.separator!r}' if read.separator else ''


# ----- Encoding ---------------------------------------------------------------


def _string_buffers(arr: pa.Array
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`criteo._buffers` of a string column, its data at least one byte long
  (so that a gather at offset 0 stays in bounds when every value is empty)."""
  offsets, data, lengths = criteo._buffers(arr)  # pylint: disable=protected-access
  return offsets, data if data.size else np.zeros(1, np.uint8), lengths


def hash_strings(values) -> np.ndarray:
  """32-bit FNV-1a of each string's UTF-8 bytes, vectorized.

  Args:
    values: a pyarrow string array or a list of str. Nulls hash to -1.

  Returns:
    `[n]` int64 hashes in [0, 2^32), -1 for null.
  """
  arr = values if isinstance(values, pa.Array) else pa.array(
      values, pa.string())
  if pa.types.is_large_string(arr.type) or pa.types.is_string_view(
      arr.type):
    arr = arr.cast(pa.string())
  n = len(arr)
  out = np.full(n, -1, np.int64)
  if not n:
    return out
  offsets, data, lengths = _string_buffers(arr)
  sizes = np.flatnonzero(np.bincount(lengths))
  if len(sizes) > _HASH_GROUPS:
    h = _fnv_by_position(offsets[:-1], data, lengths)
  elif len(sizes) == 1:
    h = _fnv_of_width(offsets[:-1], data, int(sizes[0]))
  else:
    h = np.empty(n, np.uint32)
    for size in sizes:
      rows = np.flatnonzero(lengths == size)
      h[rows] = _fnv_of_width(offsets[:-1][rows], data, int(size))
  valid = _valid(arr)
  out[valid] = h[valid]
  return out


# hash_strings hashes the strings of each length together (a few lengths:
# ids of fixed width, small integers), else byte position by position.
_HASH_GROUPS = 8


def _fnv_of_width(start: np.ndarray, data: np.ndarray, width: int
                  ) -> np.ndarray:
  """FNV-1a of the `width` bytes at each of `start` in `data`."""
  h = np.full(len(start), _FNV_OFFSET, np.uint32)
  if not width:
    return h
  if start[-1] - start[0] == (len(start) - 1) * width:
    # Back to back (each string takes `width` bytes after the last one).
    chars = data[start[0]:start[0] + len(start) * width].reshape(-1, width)
  else:
    chars = data[start[:, None] + np.arange(width)]
  with np.errstate(over='ignore'):
    for j in range(width):
      h ^= chars[:, j]
      h *= _FNV_PRIME
  return h


def _fnv_by_position(start: np.ndarray, data: np.ndarray,
                     lengths: np.ndarray) -> np.ndarray:
  """FNV-1a of strings of many lengths, one byte position at a time."""
  h = np.full(len(start), _FNV_OFFSET, np.uint32)
  with np.errstate(over='ignore'):
    for j in range(int(lengths.max(initial=0))):
      live = lengths > j
      byte = data[np.where(live, start + j, 0)].astype(np.uint32)
      h = np.where(live, (h ^ byte) * _FNV_PRIME, h)
  return h


def fold64(values: np.ndarray) -> np.ndarray:
  """Folds int64 values to 32 bits: `v ^ (v >> 32)` of the 64-bit pattern."""
  u = values.astype(np.int64).view(np.uint64)
  return ((u ^ (u >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(
      np.int64)


def _is_text(t: pa.DataType) -> bool:
  return pa.types.is_string(t) or pa.types.is_large_string(t) or (
      pa.types.is_binary(t))


def _bad_mask(arr: pa.Array, pattern: str) -> np.ndarray:
  """Where a present text value does not match `pattern`."""
  ok = pc.match_substring_regex(arr, pattern).fill_null(True)
  return ~np.asarray(ok)


# Text to numbers: Arrow's cast first, the rule at its edges (module
# docstring).


def _cast_floats(arr: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
  """`_floats_by_rule` of a string column by Arrow's cast; None if it fails."""
  try:
    cast = pc.cast(arr, pa.float64())
  except pa.ArrowInvalid:
    return None
  values = cast.fill_null(0.0).to_numpy(zero_copy_only=False)
  bad = np.zeros(len(values), bool)
  odd = np.flatnonzero(~np.isfinite(values))
  if odd.size:
    values = values.copy()
    values[odd], bad[odd] = _floats_by_rule(arr.take(pa.array(odd)))
  return values, bad


def _floats_by_rule(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
  """float64 values of a string column (missing 0) and where it is bad."""
  bad = _bad_mask(arr, _FLOAT_RE)
  arr = pc.if_else(pa.array(bad), pa.scalar(None, pa.string()), arr)
  return (pc.cast(pc.utf8_trim_whitespace(arr), pa.float64())
          .fill_null(0.0).to_numpy(zero_copy_only=False), bad)


_INT_BYTES = np.zeros(256, bool)
_INT_BYTES[np.frombuffer(b'-0123456789', np.uint8)] = True


def _cast_ints(arr: pa.Array) -> np.ndarray | None:
  """Encoded 'int' values of a string column by Arrow's cast (missing -1),
  or None when the rule must judge it."""
  if not len(arr):
    return None
  offsets, data, lengths = criteo._buffers(arr)  # pylint: disable=protected-access
  if lengths.max() > 18 or not _INT_BYTES[data[offsets[0]:offsets[-1]]].all():
    return None
  try:
    cast = pc.cast(arr, pa.int64())
  except pa.ArrowInvalid:
    return None
  missing = np.asarray(cast.is_null())
  values = fold64(cast.fill_null(0).to_numpy(zero_copy_only=False))
  values[missing] = -1
  return values


def encode(arr: pa.Array, kind: str) -> tuple[np.ndarray, np.ndarray, str]:
  """Encodes one single-valued column.

  Args:
    arr: the column, text or a Parquet type.
    kind: one of KINDS.

  Returns:
    `(values, bad, reason)`: float64 values (missing 0) for 'float', else
    int64 encoded values (missing -1); a `[n]` mask of values that do not
    parse; what a bad value is not.

  Raises:
    TableError: if the column's type cannot hold the kind (a Parquet float
      column for an integer id, say). The caller names the file.
  """
  t = arr.type
  if pa.types.is_dictionary(t):
    arr, t = arr.dictionary_decode(), t.value_type
  n = len(arr)
  bad = np.zeros(n, bool)
  if kind == 'float':
    if _is_text(t):
      arr = arr.cast(pa.string())
      fast = _cast_floats(arr)
      if fast is not None:
        return fast[0], fast[1], 'a number'
      values, bad = _floats_by_rule(arr)
      return values, bad, 'a number'
    if pa.types.is_integer(t) or pa.types.is_floating(t) or (
        pa.types.is_boolean(t)):
      return (pc.cast(arr, pa.float64()).fill_null(0.0)
              .to_numpy(zero_copy_only=False), bad, 'a number')
    raise TableError(f'has type {t}, not a number or text')
  if kind == 'string':
    if pa.types.is_integer(t):
      arr = pc.cast(arr, pa.string())
    elif not _is_text(t):
      raise TableError(f'has type {t}, not text or an integer')
    arr = arr.cast(pa.string())
    empty = np.asarray(pc.equal(arr, '').fill_null(False))
    values = hash_strings(arr)
    values[empty] = -1
    return values, bad, 'text'
  if kind == 'int':
    if pa.types.is_integer(t):
      v = pc.cast(arr, pa.int64(), safe=False)
      missing = np.asarray(v.is_null())
      values = fold64(v.fill_null(0).to_numpy(zero_copy_only=False))
      values[missing] = -1
      return values, bad, 'an integer'
    if not _is_text(t):
      raise TableError(f'has type {t}, not an integer or text')
    arr = arr.cast(pa.string())
    fast = _cast_ints(arr)
    if fast is not None:
      return fast, bad, 'a decimal integer'
    arr = pc.if_else(pc.equal(arr, ''), pa.scalar(None, pa.string()), arr)
    bad = _bad_mask(arr, _INT_RE)
    missing = np.asarray(arr.is_null())
    arr = pc.if_else(pa.array(bad), pa.scalar(None, pa.string()), arr)
    v = pc.cast(pc.utf8_trim_whitespace(arr), pa.int64()).fill_null(0)
    values = fold64(v.to_numpy(zero_copy_only=False))
    values[missing | bad] = -1
    return values, bad, 'a decimal integer'
  if kind == 'hex':
    if not _is_text(t):
      raise TableError(f'has type {t}, not text of hex digits')
    values, bad = _parse_hex(arr.cast(pa.string()))
    return values, bad, '1 to 16 hex digits'
  raise ValueError(f'unknown column kind {kind!r}')


def _valid(arr: pa.Array) -> np.ndarray:
  """`[n]` where a value is not null, from the validity bitmap."""
  n = len(arr)
  bitmap = arr.buffers()[0]
  if not arr.null_count or bitmap is None:
    return np.ones(n, bool)
  bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), count=arr.offset + n,
                       bitorder='little')
  return bits[arr.offset:].view(bool)


def _parse_hex(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
  """Encodes a string array of hex numbers from its Arrow buffers.

  The rule is `_HEX_RE`'s (1 to 16 ASCII hex digits, nothing else); null and
  empty values are missing. As `criteo._parse_hex` does for 8 digits, each
  value is left-padded with '0' to W = 8 (or 16) characters, read two at a
  time through `criteo._HEX_PAIR` (-1: not a hex pair), and the W / 2 bytes
  are one big-endian number, folded by `fold64` (a no-op below 2^32). When
  every present value has W digits they lie back to back in the data buffer
  and are read in place.

  Args:
    arr: a pyarrow string array.

  Returns:
    `(values, bad)`: `[n]` int64 encoded values, -1 where bad or missing,
    and the mask of present values that are not hex.
  """
  n = len(arr)
  out = np.full(n, -1, np.int64)
  bad = np.zeros(n, bool)
  if not n:
    return out, bad
  offsets, data, lengths = _string_buffers(arr)
  present = lengths > 0
  if arr.null_count:
    present &= _valid(arr)
  m = int(np.count_nonzero(present))
  if not m:
    return out, bad
  top = int(lengths.max())
  width = 8 if top <= 8 else 16
  if top == width and offsets[-1] - offsets[0] == width * m and (
      np.count_nonzero(lengths == width) == m):
    # Every present value has W digits and every other is empty.
    rows = present
    chars = data[offsets[0]:offsets[-1]]
  else:
    bad = present & (lengths > 16)
    rows = np.flatnonzero(present & ~bad)
    if not rows.size:
      return out, bad
    k = np.arange(width)
    pad = k[None, :] < (width - lengths[rows])[:, None]
    idx = np.where(pad, 0, offsets[rows + 1][:, None] - width + k[None, :])
    chars = np.where(pad, np.uint8(ord('0')), data[idx]).astype(
        np.uint8).reshape(-1)
  pairs = criteo._HEX_PAIR.take(chars.view('<u2')).reshape(-1, width // 2)  # pylint: disable=protected-access
  number = pairs.astype(np.uint8).view(f'>u{width // 2}').reshape(-1)
  values = number.astype(np.int64) if width == 8 else fold64(
      number.astype(np.uint64).view(np.int64))
  if pairs.min() < 0:
    wrong = (pairs < 0).any(axis=1)
    values[wrong] = -1
    bad[rows] |= wrong
  out[rows] = values
  return out, bad


def encode_bag(arr: pa.Array, read: ColumnRead
               ) -> tuple[np.ndarray, np.ndarray, str]:
  """Encodes a multi-valued column into `[n, max_len]` values, padding -1.

  Args:
    arr: a text column split by `read.separator`, or a Parquet list.
    read: the column.

  Returns:
    `(values, bad, reason)` as `encode`; a row with more values than
    `read.max_len` is bad.
  """
  t = arr.type
  n = len(arr)
  if pa.types.is_list(t) or pa.types.is_large_list(t):
    lists = arr
  elif _is_text(t) and read.separator is not None:
    lists = pc.split_pattern(arr.cast(pa.string()), read.separator)
  elif _is_text(t) or pa.types.is_integer(t):
    lists = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32)), arr)
  else:
    raise TableError(f'has type {t}, not text or a list')
  lengths = np.asarray(pc.list_value_length(lists).fill_null(0))
  flat = pc.list_flatten(lists)
  values, bad_flat, reason = encode(flat, read.kind)
  if read.kind == 'float':
    raise TableError('is a bag; raw features take one number')
  row = np.repeat(np.arange(n), lengths)
  bad = np.zeros(n, bool)
  bad[row[bad_flat]] = True
  keep = values >= 0  # empty elements ("a||b") are dropped
  row, values = row[keep], values[keep]
  counts = np.bincount(row, minlength=n)
  long = counts > read.max_len
  if long.any():
    bad |= long
    reason = f'{reason}, at most {read.max_len} of them (max_ids)'
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  slot = np.arange(len(row)) - starts[row]
  out = np.full((n, read.max_len), -1, np.int64)
  fits = slot < read.max_len
  out[row[fits], slot[fits]] = values[fits]
  return out, bad, reason


def encode_flags(columns: Sequence[pa.Array], read: ColumnRead
                 ) -> tuple[np.ndarray, np.ndarray, str]:
  """Encodes 0/1 columns as a bag of the indexes of the non-zero ones."""
  vals, bads = [], []
  for arr in columns:
    v, b, _ = encode(arr, 'float')
    vals.append(v)
    bads.append(b)
  on = np.stack(vals, axis=1) != 0
  n = on.shape[0]
  order = np.argsort(~on, axis=1, kind='stable')  # set flags first
  idx = np.where(np.take_along_axis(on, order, 1), order, -1)
  width = read.max_len
  out = np.full((n, width), -1, np.int64)
  out[:, :min(width, idx.shape[1])] = idx[:, :width]
  bad = np.any(np.stack(bads, 1), axis=1) | (on.sum(1) > width)
  return out, bad, f'numbers, at most {width} of them non-zero (max_ids)'


def encode_label(arr: pa.Array, label: LabelRule
                 ) -> tuple[np.ndarray, np.ndarray, str]:
  """The label as float32 0/1, a bad mask and the reason."""
  values, bad, _ = encode(arr, 'float')
  missing = np.asarray(arr.is_null()) | (
      np.asarray(pc.equal(arr, '').fill_null(False)) if _is_text(arr.type)
      else False)
  bad = bad | missing
  rule = label.parse()
  if rule is None:
    bad |= (values != 0) & (values != 1)
    return values.astype(np.float32), bad, 'a label, 0 or 1'
  op, threshold = rule
  return op(values, threshold).astype(np.float32), bad, 'a number'


# ----- Files --------------------------------------------------------------------


def expand(spec, field: str) -> list[str]:
  """The files of a path spec: a path, glob, comma list or list of them.

  Raises:
    ValueError: naming `field` when nothing matches.
  """
  return criteo.expand_paths(spec, field=field)


@dataclasses.dataclass(frozen=True)
class ParquetPiece:
  """Row groups of a Parquet file.

  Attributes:
    path: the file.
    row_groups: the row groups, None for all.
  """

  path: str
  row_groups: tuple[int, ...] | None = None

  @property
  def name(self) -> str:
    """The name messages give it."""
    if self.row_groups is None:
      return self.path
    return f'{self.path}[row groups {list(self.row_groups)}]'


Piece = criteo.FileRange | ParquetPiece


def pieces(paths: Sequence[str], fmt: TableFormat) -> list[Piece]:
  """Whole-file pieces of the files."""
  return [ParquetPiece(p) if fmt.kind_of(p) == 'parquet' else
          criteo.FileRange(p) for p in paths]


def shares(paths: Sequence[str], fmt: TableFormat, process_count: int, *,
           span: tuple[float, float] = (0.0, 1.0)) -> list[list[Piece]]:
  """Cuts files into one share per process, in order.

  Text files are cut by line-aligned bytes (`criteo.split_into_shares`);
  Parquet files by row groups, laid end to end by rows: a row group goes to
  the process whose span holds its first row.

  Args:
    paths: the files, all text or all Parquet.
    fmt: their layout.
    process_count: the processes.
    span: the fraction of the files to cut, `(start, end)`.

  Returns:
    Each process's pieces.
  """
  kinds = {fmt.kind_of(p) == 'parquet' for p in paths}
  if kinds != {True}:
    return criteo.split_into_shares(paths, process_count, span=span)
  groups = []
  for p in paths:
    meta = pq.ParquetFile(p).metadata
    groups += [(p, g, meta.row_group(g).num_rows)
               for g in range(meta.num_row_groups)]
  total = sum(g[2] for g in groups)
  lo, hi = (int(round(f * total)) for f in span)
  cuts = [lo + k * (hi - lo) // process_count
          for k in range(process_count + 1)]
  out: list[dict[str, list[int]]] = [{} for _ in range(process_count)]
  first = 0
  for path, g, rows in groups:
    if cuts[0] <= first < cuts[-1]:
      owner = max(k for k in range(process_count) if cuts[k] <= first)
      out[owner].setdefault(path, []).append(g)
    first += rows
  return [[ParquetPiece(p, tuple(gs)) for p, gs in share.items()]
          for share in out]


def _header(path: str, fmt: TableFormat) -> tuple[str, ...]:
  """The column names of a text file: its header line, or the config's."""
  if not fmt.header:
    if not fmt.columns:
      raise ValueError(
          f'config.data.table.columns: {path} has no header'
          ' (config.data.table.header=False), so the config must name its'
          ' columns.')
    return tuple(fmt.columns)
  with criteo.open_file(path) as f:
    raw = f.read(1 << 16)
  line = raw.splitlines()[0] if raw else b''
  text = line.decode(fmt.encoding.replace('utf8', 'utf-8'))
  names = tuple(s.strip().strip(fmt.quote_char or '"')
                for s in text.split(fmt.sep(path)))
  if fmt.columns and tuple(fmt.columns) != names:
    raise ValueError(
        f'config.data.table.columns ({list(fmt.columns)}) do not match the'
        f' header of {path} ({list(names)}).')
  return names


def file_columns(path: str, fmt: TableFormat) -> tuple[str, ...]:
  """The column names of a file."""
  if fmt.kind_of(path) == 'parquet':
    return tuple(pq.ParquetFile(path).schema_arrow.names)
  return _header(path, fmt)


class _Rows:
  """Tracks the file line of each valid row of a text piece.

  pyarrow counts lines from the piece's first (the header included), and
  its invalid-row handler gives the lines it drops.
  """

  def __init__(self, header_lines: int):
    self.header_lines = header_lines
    self.dropped: list[tuple[int, int, str]] = []  # (line, fields, text)
    self.valid = 0  # valid rows before the current batch

  def lines(self, k: np.ndarray) -> np.ndarray:
    """The lines of valid rows k (counted from the piece's first row)."""
    if not self.dropped:
      return self.header_lines + k + 1
    d = np.array([x[0] for x in self.dropped], np.int64)
    before = d - self.header_lines - np.arange(len(d)) - 1
    return self.header_lines + k + 1 + np.searchsorted(before, k, 'right')


class TableSource:
  """Valid rows `start .. stop` of a table's files, streamed, as raw batches.

  It has the interface of `pipeline.TsvSource` (`num_rows`, `description`,
  `iter_rows(offset)`), so `pipeline.TrainBatches` and `EvalBatches` take
  it: batches resume by position.

  Args:
    paths: the files, or pieces of them (`shares`).
    spec: what to read.
    start: the first valid row.
    stop: the row after the last; None counts them.
    labeled: whether to read the label.
    bad_lines: 'error' or 'skip'.
    chunk_rows: rows per Parquet batch.
    report: where skipped rows are recorded.
    field: the config field naming the files, for messages.
    side: the loaded side tables (`load_side_tables`); None loads them.
    counter: counts the rows (lines) read, valid or not, as
      `criteo.LineCounter` does for Criteo files.
  """

  def __init__(self, paths: Sequence[str | Piece], spec: TableSpec, *,
               start: int = 0, stop: int | None = None, labeled: bool = True,
               bad_lines: str = 'error', chunk_rows: int = 65536,
               report: criteo.BadLineReport | None = None,
               field: str = 'config.data.train_path',
               side: dict[str, Any] | None = None,
               counter: criteo.LineCounter | None = None):
    self.counter = counter
    self.pieces = [p if not isinstance(p, str) else pieces([p], spec.format)[0]
                   for p in paths]
    self.spec = spec
    self.labeled = labeled and spec.label is not None
    self.bad_lines = bad_lines
    self.chunk_rows = chunk_rows
    self.report = report if report is not None else criteo.BadLineReport()
    self.field = field
    self.side = side if side is not None else load_side_tables(
        spec, bad_lines)
    self._check_columns()
    self.start = start
    if stop is None:
      stop = self.count(valid=bad_lines != 'error')
    self.stop = stop
    self.num_rows = max(0, stop - start)
    names = ', '.join(p.name for p in self.pieces[:3]) + (
        ' ...' if len(self.pieces) > 3 else '')
    self.description = f'{names} (rows {start:,}..{stop:,})'

  @property
  def paths(self) -> list[Piece]:
    """The pieces read, as `pipeline.TsvSource.paths`."""
    return self.pieces

  # -- columns

  def _check_columns(self) -> None:
    first = self.pieces[0].path if self.pieces else None
    self._names = file_columns(first, self.spec.format) if first else ()
    for p in self.pieces[1:]:
      names = file_columns(p.path, self.spec.format)
      if names != self._names:
        raise ValueError(
            f'{self.field}: {p.path} has columns {list(names)}, but'
            f' {first} has {list(self._names)}; the files of one table'
            ' share their columns.')
    have = set(self._names)
    side_have = {c: t.name for t in self.side.values() for c in t.columns}
    needed = [(r.feature, c) for r in self.spec.reads for c in r.sources]
    if self.labeled:
      needed.append(('(label)', self.spec.label.column))
    for t in self.spec.side_tables:
      needed.append(('(side table ' + t.name + ')', t.join_on))
    for feature, c in needed:
      if c not in have and c not in side_have:
        where = (f'config.features.{feature}' if not feature.startswith('(')
                 else 'config.data.table.label' if feature == '(label)'
                 else 'config.data.table.side_tables')
        raise ValueError(
            f'{where}: column {c!r} is not in {first} (its columns:'
            f' {", ".join(self._names)})' + (
                f' nor in a side table ({", ".join(sorted(side_have))})'
                if side_have else '') + '.')

  def _columns_to_read(self) -> list[str]:
    have = set(self._names)
    cols = [c for r in self.spec.reads for c in r.sources if c in have]
    if self.labeled:
      cols.append(self.spec.label.column)
    cols += [t.join_on for t in self.spec.side_tables]
    return list(dict.fromkeys(cols))

  # -- counting

  def count(self, valid: bool) -> int:
    """Rows of the pieces: lines less headers, or valid rows (a parse)."""
    if valid:
      return sum(len(b['_n']) for b in self._batches(quiet=True))
    total = 0
    for p in self.pieces:
      if isinstance(p, ParquetPiece):
        meta = pq.ParquetFile(p.path).metadata
        groups = p.row_groups or range(meta.num_row_groups)
        total += sum(meta.row_group(g).num_rows for g in groups)
      else:
        total += criteo.count_rows(p) - self._header_lines(p)
    return total

  def _header_lines(self, p) -> int:
    return int(self.spec.format.header and isinstance(p, criteo.FileRange)
               and p.begin == 0)

  # -- reading

  def iter_rows(self, offset: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Reads the rows in order, from an offset (counted from `start`).

    Yields:
      Raw batches: 'label' and one array per column (`features`).

    Raises:
      criteo.MalformedLineError: on a bad row under bad_lines='error'.
    """
    if offset >= self.num_rows:
      return
    skip = self.start + offset
    left = self.num_rows - offset
    for batch in self._batches(quiet=False):
      n = len(batch['_n'])
      if skip >= n:
        skip -= n
        continue
      if skip or n - skip > left:
        batch = {k: v[skip:skip + left] for k, v in batch.items()}
        skip = 0
      batch.pop('_n')
      left -= len(next(iter(batch.values())))
      yield batch
      if left <= 0:
        return

  def _batches(self, quiet: bool) -> Iterator[dict[str, np.ndarray]]:
    """Valid rows of every piece, as encoded batches with '_n' (row count)."""
    for p in self.pieces:
      if isinstance(p, ParquetPiece):
        yield from self._parquet(p, quiet)
      else:
        yield from self._text(p, quiet)

  def text_reader(self, p: criteo.FileRange, on_invalid=None):
    """pyarrow's streaming CSV reader of a text piece, as `iter_rows` reads
    it: the columns to read, as strings, one thread.

    Args:
      p: the piece.
      on_invalid: pyarrow's invalid-row handler; None: pyarrow's error.

    Returns:
      The reader.

    Raises:
      pa.ArrowInvalid: if pyarrow cannot start reading (an empty file, say).
    """
    fmt = self.spec.format
    stream = p.stream()
    source = stream if stream is not None else criteo.open_file(p.path)
    return pa_csv.open_csv(
        _Readable(source),
        read_options=pa_csv.ReadOptions(
            column_names=list(self._names), skip_rows=self._header_lines(p),
            block_size=_BLOCK_BYTES, use_threads=False,
            encoding=fmt.encoding),
        parse_options=pa_csv.ParseOptions(
            delimiter=fmt.sep(p.path), quote_char=fmt.quote_char or False,
            newlines_in_values=False, ignore_empty_lines=False,
            invalid_row_handler=on_invalid),
        convert_options=pa_csv.ConvertOptions(
            column_types={c: pa.string() for c in self._names},
            include_columns=self._columns_to_read(), strings_can_be_null=True,
            null_values=['']))

  def _text(self, p: criteo.FileRange, quiet: bool):
    rows = _Rows(self._header_lines(p))
    dropped = []  # by pyarrow's handler, in the reading thread

    def on_invalid(row):
      dropped.append((row.number, row.actual_columns, row.text))
      return 'skip'

    try:
      reader = self.text_reader(p, on_invalid)
    except pa.ArrowInvalid as e:
      if 'Empty CSV file' in str(e):
        return
      raise criteo.MalformedLineError(f'{p.name}: cannot be read: {e}') from e
    ahead = _ReadAhead(reader, dropped)
    try:
      yield from self._text_batches(p, quiet, rows, ahead, dropped)
    finally:
      ahead.close()

  def _text_batches(self, p, quiet, rows, ahead, dropped):
    """`_text`'s loop: each batch with the drops known when pyarrow gave
    it, as if read in this thread."""
    reported = 0
    self._counted_drops = 0
    while True:
      batch, error, known = ahead.next()
      rows.dropped.extend(dropped[len(rows.dropped):known])
      if isinstance(error, StopIteration):
        break
      if isinstance(error, pa.ArrowInvalid):
        raise criteo.MalformedLineError(
            f'{p.name}: cannot be parsed near line'
            f' {int(rows.lines(np.array([rows.valid]))[0])}: {error}'
        ) from error
      if error is not None:
        raise error
      # Rows dropped for their field count, up to this batch's end.
      n = batch.num_rows
      if self.counter is not None and not quiet:
        self.counter.lines += n + len(rows.dropped) - self._counted_drops
        self._counted_drops = len(rows.dropped)
      if not quiet:
        last_line = int(rows.lines(np.array([rows.valid + n]))[0]) if n else (
            1 << 62)
        for line, fields, _ in rows.dropped[reported:]:
          if line >= last_line:
            break
          reported += 1
          self._bad(p.name, line, None,
                    f'has {fields} fields, not {len(self._names)}')
      if not n:
        continue
      out, bad, why = self._encode(batch, p.name)
      k = np.arange(n) + rows.valid
      rows.valid += n
      if bad.any():
        lines = rows.lines(k[bad])
        if not quiet:
          for line, (col, reason) in zip(lines, (why[i] for i in
                                                 np.flatnonzero(bad))):
            self._bad(p.name, int(line), col, reason)
        out = {key: v[~bad] for key, v in out.items()}
      out['_n'] = np.zeros(int((~bad).sum()), np.int8)
      yield out
    if self.counter is not None and not quiet:
      self.counter.lines += len(rows.dropped) - self._counted_drops
    if not quiet:
      for line, fields, _ in rows.dropped[reported:]:
        self._bad(p.name, line, None,
                  f'has {fields} fields, not {len(self._names)}')

  def _parquet(self, p: ParquetPiece, quiet: bool):
    f = pq.ParquetFile(p.path)
    cols = self._columns_to_read()
    meta = f.metadata
    groups = list(p.row_groups) if p.row_groups is not None else list(
        range(meta.num_row_groups))
    first_row = {}
    r = 0
    for g in range(meta.num_row_groups):
      first_row[g] = r
      r += meta.row_group(g).num_rows
    for g in groups:
      row0 = first_row[g]
      for batch in f.iter_batches(batch_size=self.chunk_rows,
                                  row_groups=[g], columns=cols):
        n = batch.num_rows
        if self.counter is not None and not quiet:
          self.counter.lines += n
        out, bad, why = self._encode(batch, p.path)
        if bad.any():
          if not quiet:
            for i in np.flatnonzero(bad):
              col, reason = why[i]
              self._bad(p.path, None, col, reason, row=row0 + int(i) + 1)
          out = {key: v[~bad] for key, v in out.items()}
        row0 += n
        out['_n'] = np.zeros(int((~bad).sum()), np.int8)
        yield out

  def _bad(self, name, line, column, reason, row=None) -> None:
    where = f'{name}:{line}' if row is None else f'{name}: row {row}'
    text = f'{where}: ' + (f'column {column!r} ' if column else '') + (
        reason if column is None else f'is not {reason}')
    if self.bad_lines == 'error':
      raise criteo.MalformedLineError(text)
    self.report.add(name, line if row is None else row,
                    (f'column {column!r} ' if column else '') + (
                        reason if column is None else f'is not {reason}'))

  def _encode(self, batch: pa.RecordBatch, name: str):
    """Encodes a batch: its raw dict, a bad-row mask, and per row the
    (column, reason) of its first bad value."""
    n = batch.num_rows
    out: dict[str, np.ndarray] = {}
    bad = np.zeros(n, bool)
    why: dict[int, tuple[str, str]] = {}

    def note(mask, column, reason):
      nonlocal bad
      if not mask.any():
        return
      for i in np.flatnonzero(mask & ~bad):
        why[int(i)] = (column, reason)
      bad = bad | mask

    names = batch.schema.names
    col = lambda c: batch.column(names.index(c))
    if self.labeled:
      c = self.spec.label.column
      out['label'], m, reason = self._guard(
          lambda: encode_label(col(c), self.spec.label), name, c)
      note(m, c, reason)
    for r in self.spec.reads:
      if not set(r.sources) <= set(names):
        continue
      values, m, reason = self._guard(lambda r=r: self._encode_read(
          r, [col(c) for c in r.sources]), name, r.sources[0])
      out[r.name] = values
      note(m, r.sources[0], reason)
    for t in self.spec.side_tables:
      side = self.side[t.name]
      out.update(side.join(col(t.join_on)))
    return out, bad, why

  @staticmethod
  def _guard(fn, name, column):
    try:
      return fn()
    except TableError as e:
      raise ValueError(f'{name}: column {column!r} {e}.') from e

  @staticmethod
  def _encode_read(r: ColumnRead, arrays):
    if r.kind == 'flags':
      return encode_flags(arrays, r)
    if r.is_bag or pa.types.is_list(arrays[0].type):
      return encode_bag(arrays[0], r)
    return encode(arrays[0], r.kind)


class _ReadAhead:
  """Reads a pyarrow batch reader one batch ahead, in a worker thread.

  pyarrow parses the next block (without the GIL) while the caller encodes
  this one. Each batch comes with the number of rows the invalid-row
  handler had dropped when pyarrow returned it, so the caller sees the
  drops as a reader in its own thread would; an error or the end comes in
  its place in the order. The worker is a `concurrent.futures` thread, which
  the interpreter waits for at exit (one read at most), never leaving
  pyarrow mid-parse.

  Args:
    reader: the pyarrow reader.
    dropped: the list that the reader's invalid-row handler appends to.
  """

  def __init__(self, reader, dropped: list):
    self._reader, self._dropped = reader, dropped
    self._pool = futures.ThreadPoolExecutor(
        1, thread_name_prefix='table-read-ahead')
    self._next = self._pool.submit(self._read)

  def _read(self) -> tuple[pa.RecordBatch | None, BaseException | None, int]:
    try:
      batch, error = self._reader.read_next_batch(), None
    except BaseException as e:  # pylint: disable=broad-except
      batch, error = None, e  # StopIteration at the end
    return batch, error, len(self._dropped)

  def next(self) -> tuple[pa.RecordBatch | None, BaseException | None, int]:
    """The next `(batch, error, rows dropped so far)`; error or batch None."""
    item = self._next.result()
    if item[1] is None:
      self._next = self._pool.submit(self._read)
    return item

  def close(self) -> None:
    """Stops reading ahead (a read under way ends in the worker)."""
    self._pool.shutdown(wait=False, cancel_futures=True)


class _Readable(io.RawIOBase):
  """A file-like view of a pyarrow stream or range reader, for open_csv."""

  def __init__(self, source):
    super().__init__()
    self._source = source

  def readable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    data = self._source.read(len(b))
    b[:len(data)] = data
    return len(data)

  def close(self) -> None:
    self._source.close()
    super().close()


@dataclasses.dataclass
class LoadedSide:
  """A side table in memory: its encoded columns by key.

  Attributes:
    name: its name.
    keys: `[K]` its keys, as text.
    columns: its column names (less the key).
    values: column -> `[K]` or `[K, L]` encoded values.
    reads: the reads of its columns.
  """

  name: str
  keys: pa.Array
  columns: tuple[str, ...]
  values: dict[str, np.ndarray]
  reads: dict[str, ColumnRead]

  def join(self, keys: pa.Array) -> dict[str, np.ndarray]:
    """The side values of each main row, missing where its key is absent."""
    keys = keys.cast(pa.string()) if not pa.types.is_string(keys.type) else (
        keys)
    if pa.types.is_integer(keys.type):
      keys = pc.cast(keys, pa.string())
    idx = pc.index_in(keys, value_set=self.keys)
    found = np.asarray(idx.is_valid())
    pos = np.asarray(idx.fill_null(0))
    out = {}
    for c, v in self.values.items():
      got = v[pos]
      fill = 0.0 if self.reads[c].kind == 'float' else -1
      got[~found] = fill
      out[c] = got
    return out


def load_side_tables(spec: TableSpec, bad_lines: str = 'error'
                     ) -> dict[str, LoadedSide]:
  """Reads every side table whole, once.

  Raises:
    ValueError: naming the side table's file, a missing key column or a
      key that repeats.
  """
  out = {}
  for t in spec.side_tables:
    names = file_columns(t.path, t.format)
    if t.key not in names:
      raise ValueError(
          f'config.data.table.side_tables.{t.name}.key ({t.key!r}) is not a'
          f' column of {t.path} (its columns: {", ".join(names)}).')
    reads = {r.name: r for r in spec.reads if set(r.sources) <= set(names)
             and r.name != t.key}
    sub = TableSpec(t.format, LabelRule(t.key), tuple(reads.values()))
    src = TableSource([t.path], sub, labeled=False, bad_lines=bad_lines,
                      field=f'config.data.table.side_tables.{t.name}.path',
                      side={})
    key_chunks, value_chunks = [], {c: [] for c in reads}
    keys = _read_keys(t)
    for batch in src.iter_rows():
      for c in reads:
        value_chunks[c].append(batch[c])
    values = {c: np.concatenate(v) if v else np.zeros(0) for c, v in
              value_chunks.items()}
    del key_chunks
    uniq = pc.unique(keys)
    if len(uniq) != len(keys):
      raise ValueError(
          f'config.data.table.side_tables.{t.name}: key column {t.key!r} of'
          f' {t.path} repeats a key; a side table holds one row per key.')
    if values and len(next(iter(values.values()))) != len(keys):
      raise ValueError(
          f'config.data.table.side_tables.{t.name}: {t.path} has rows that'
          ' cannot be read; side tables take bad_lines=error.')
    out[t.name] = LoadedSide(t.name, keys, tuple(c for c in names
                                                 if c != t.key),
                             values, reads)
  return out


def _read_keys(t: SideTable) -> pa.Array:
  """The key column of a side table, as text."""
  if t.format.kind_of(t.path) == 'parquet':
    col = pq.read_table(t.path, columns=[t.key]).column(0).combine_chunks()
    return pc.cast(col, pa.string())
  names = _header(t.path, t.format)
  with criteo.open_file(t.path) as f:
    tab = pa_csv.read_csv(
        _Readable(f),
        read_options=pa_csv.ReadOptions(
            column_names=list(names), skip_rows=int(t.format.header),
            encoding=t.format.encoding),
        parse_options=pa_csv.ParseOptions(
            delimiter=t.format.sep(t.path),
            quote_char=t.format.quote_char or False),
        convert_options=pa_csv.ConvertOptions(
            column_types={c: pa.string() for c in names},
            include_columns=[t.key]))
  return tab.column(0).combine_chunks()
