"""Streaming reader of Criteo click logs in their raw text layout.

Kaggle `train.txt` and Terabyte `day_N`: one example per line, 40 tab-separated
fields: the label (0/1), 13 integer features I1..I13 (may be negative), 26
categorical features C1..C26 written as 8 hex digits; an empty field is a
missing value. The unlabeled Kaggle `test.txt` layout has 39 fields (no label).
Files may be plain or gzip (detected by their magic bytes, since `day_N` files
have no extension).

Files are parsed with pyarrow's streaming CSV reader, block by block, and
validated and converted with vectorized numpy: memory stays at a few chunks
whatever the file size. A malformed line (wrong field count, a label other
than 0/1, a non-integer, a categorical that is not 1..8 hex digits) either
stops the read with its file and line number (`bad_lines='error'`) or is
dropped and reported (`bad_lines='skip'`). Values are never silently wrong.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import os
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

NUM_INT = 13
NUM_CAT = 26
INT_NAMES = tuple(f'I{i + 1}' for i in range(NUM_INT))
CAT_NAMES = tuple(f'C{i + 1}' for i in range(NUM_CAT))
BAD_LINE_POLICIES = ('error', 'skip')

_BLOCK_BYTES = 8 << 20
_GZIP_MAGIC = b'\x1f\x8b'

# Hex digit value of each byte; 255 marks a byte that is not a hex digit.
_HEX = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b'0123456789abcdef'):
  _HEX[_c] = _i
for _i, _c in enumerate(b'ABCDEF'):
  _HEX[_c] = 10 + _i
_DIGIT = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b'0123456789'):
  _DIGIT[_c] = _i


class MalformedLineError(ValueError):
  """A malformed line, reported as `path:line: reason`."""


@dataclasses.dataclass
class BadLineReport:
  """Malformed lines dropped under `bad_lines='skip'`."""

  count: int = 0
  examples: list[str] = dataclasses.field(default_factory=list)
  max_examples: int = 10

  def add(self, path: str, line: int, reason: str) -> None:
    self.count += 1
    if len(self.examples) < self.max_examples:
      self.examples.append(f'{path}:{line}: {reason}')

  def summary(self) -> str:
    if not self.count:
      return 'no malformed lines'
    return (f'{self.count} malformed line(s) skipped; first: ' +
            '; '.join(self.examples))


def expand_paths(spec, *, field: str = 'data.train_path') -> list[str]:
  """Files named by a path, a glob, a comma-separated string or a list.

  Globs expand in sorted order; the order of the patterns is kept; repeated
  files are kept once.

  Raises:
    ValueError: naming `field` and the pattern, for a missing file or a glob
      that matches nothing.
  """
  if isinstance(spec, str):
    patterns = [p.strip() for p in spec.split(',') if p.strip()]
  else:
    patterns = [str(p).strip() for p in (spec or ()) if str(p).strip()]
  if not patterns:
    raise ValueError(f'{field} is empty; give a file, a glob or a list.')
  out: list[str] = []
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    if any(c in pattern for c in '*?['):
      matches = sorted(glob.glob(pattern))
      matches = [m for m in matches if os.path.isfile(m)]
      if not matches:
        raise ValueError(f'{field}: the pattern {pattern!r} matches no file.')
    else:
      if not os.path.isfile(pattern):
        raise ValueError(f'{field}: the file {pattern!r} does not exist.')
      matches = [pattern]
    for m in matches:
      if m not in out:
        out.append(m)
  return out


def _is_gzip(path: str) -> bool:
  with open(path, 'rb') as f:
    return f.read(2) == _GZIP_MAGIC


def _open_stream(path: str):
  return pa.input_stream(path, compression='gzip' if _is_gzip(path) else None)


def count_rows(paths: Sequence[str] | str) -> int:
  """Lines of the files (a last line without a newline counts)."""
  if isinstance(paths, str):
    paths = [paths]
  total = 0
  for path in paths:
    opener = gzip.open if _is_gzip(path) else open
    last = b'\n'
    with opener(path, 'rb') as f:
      while True:
        block = f.read(16 << 20)
        if not block:
          break
        total += block.count(b'\n')
        last = block[-1:]
    if last != b'\n':
      total += 1
  return total


def _fixed_bytes(col: pa.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
  """A string column -> (`[n, width]` uint8, right-aligned, 0-padded; lengths).

  Values longer than `width` keep their last `width` bytes; callers check the
  lengths.
  """
  col = col.cast(pa.string()) if col.type != pa.string() else col
  if isinstance(col, pa.ChunkedArray):
    col = col.combine_chunks()
  offsets = np.frombuffer(col.buffers()[1], np.int32,
                          count=len(col) + 1, offset=col.offset * 4)
  data = col.buffers()[2]
  data = (np.frombuffer(data, np.uint8) if data is not None
          else np.zeros(0, np.uint8))
  lengths = np.diff(offsets).astype(np.int64)
  n = len(col)
  out = np.zeros((n, width), np.uint8)
  ends = offsets[1:].astype(np.int64)
  for k in range(1, width + 1):
    has = lengths >= k
    if not has.any():
      break
    out[has, width - k] = data[ends[has] - k]
  return out, lengths


def _column_buffers(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
  """A string array's (int64 offsets `[n + 1]`, uint8 data)."""
  if isinstance(col, pa.ChunkedArray):
    col = col.combine_chunks()
  if col.type == pa.large_string():
    offsets = np.frombuffer(col.buffers()[1], np.int64, count=len(col) + 1,
                            offset=col.offset * 8)
  else:
    offsets = np.frombuffer(col.buffers()[1], np.int32, count=len(col) + 1,
                            offset=col.offset * 4).astype(np.int64)
  data = col.buffers()[2]
  data = (np.frombuffer(data, np.uint8) if data is not None
          else np.zeros(1, np.uint8))
  return offsets, data


def _parse_hex(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
  """Hex strings -> (int64 values, -1 when empty; bad mask).

  The common case, 8 hex digits or empty, takes one gather and a table
  lookup; shorter values (1..7 digits) go through a slower general path.
  """
  offsets, data = _column_buffers(col)
  lengths = np.diff(offsets)
  n = len(lengths)
  full = lengths == 8
  idx = np.minimum(offsets[:-1, None] + np.arange(8),
                   max(len(data) - 1, 0))
  digits = _HEX[data[idx]]
  digits[~full] = 0
  bad = (digits == 255).any(axis=1) | (lengths > 8)
  digits[bad] = 0
  packed = (digits[:, 0::2] << 4) | digits[:, 1::2]
  values = np.ascontiguousarray(packed).view('>u4').reshape(n).astype(
      np.int64)
  values[lengths == 0] = -1
  short = np.flatnonzero((lengths > 0) & (lengths < 8))
  if short.size:
    raw, _ = _fixed_bytes(col.take(pa.array(short)), 8)
    d = _HEX[raw]
    pad = np.arange(8)[None, :] < (8 - lengths[short])[:, None]
    d = np.where(pad, 0, d)
    b = (d == 255).any(axis=1)
    d = np.where(b[:, None], 0, d)
    p2 = (d[:, 0::2] << 4) | d[:, 1::2]
    values[short] = np.ascontiguousarray(p2).view('>u4').reshape(-1)
    bad[short] = b
  values[bad] = -1
  return values, bad


def _parse_int(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
  """Decimal integer strings -> (int64 values, 0 when empty; bad mask)."""
  try:  # Fast path: arrow's checked cast, when the whole column is valid.
    filled = pc.if_else(pc.equal(col, ''), '0', col)
    values = pc.cast(filled, pa.int64()).to_numpy(zero_copy_only=False)
    return values.astype(np.int64, copy=False), np.zeros(len(col), bool)
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    pass
  raw, lengths = _fixed_bytes(col, 20)
  first = raw[np.arange(len(raw)), np.clip(20 - lengths, 0, 19)]
  neg = (first == ord('-')) & (lengths > 1)
  pos_sign = (first == ord('+')) & (lengths > 1)
  n_digits = lengths - (neg | pos_sign)
  body = raw.copy()
  sign_col = 20 - lengths
  rows = np.flatnonzero(neg | pos_sign)
  body[rows, sign_col[rows]] = ord('0')
  digits = _DIGIT[body]
  pad = np.arange(20)[None, :] < (20 - np.minimum(lengths, 20))[:, None]
  digits = np.where(pad, 0, digits)
  bad = (lengths > 20) | (digits == 255).any(axis=1) | (
      (lengths > 0) & (n_digits == 0))
  # Anything over 18 digits may not fit int64: check those exactly.
  long = np.flatnonzero(~bad & (n_digits > 18))
  values = np.zeros(len(raw), np.int64)
  small = ~bad & (n_digits <= 18) & (lengths > 0)
  weights = (10 ** np.arange(17, -1, -1)).astype(np.int64)
  values[small] = (digits[small, 2:].astype(np.int64) * weights).sum(axis=1)
  values = np.where(neg, -values, values)
  for i in long:
    v = int(col[int(i)].as_py())
    if -2**63 <= v < 2**63:
      values[i] = v
    else:
      bad[i] = True
  return np.where(bad, 0, values), bad


@dataclasses.dataclass
class _Skipped:
  lines: list[int] = dataclasses.field(default_factory=list)
  reasons: list[str] = dataclasses.field(default_factory=list)


def _read_file(path: str, labeled: bool, bad_lines: str,
               report: BadLineReport) -> Iterator[dict[str, np.ndarray]]:
  """Validated chunks of one file, in line order."""
  n_fields = 1 + NUM_INT + NUM_CAT if labeled else NUM_INT + NUM_CAT
  names = ((['label'] if labeled else []) + list(INT_NAMES) + list(CAT_NAMES))
  skipped = _Skipped()

  def on_invalid(row):
    # Raising here would be swallowed by pyarrow: record the line and let the
    # batch loop report it (or stop on it) in line order.
    reason = (f'expected {n_fields} tab-separated fields, got'
              f' {row.actual_columns}')
    skipped.lines.append(int(row.number))
    skipped.reasons.append(reason)
    return 'skip'

  try:
    reader = pa_csv.open_csv(
        _open_stream(path),
        read_options=pa_csv.ReadOptions(
            column_names=names, block_size=_BLOCK_BYTES, use_threads=False),
        parse_options=pa_csv.ParseOptions(
            delimiter='\t', quote_char=False, double_quote=False,
            escape_char=False, newlines_in_values=False,
            ignore_empty_lines=False, invalid_row_handler=on_invalid),
        convert_options=pa_csv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            strings_can_be_null=False, quoted_strings_can_be_null=False))
  except MalformedLineError:
    raise
  except pa.ArrowInvalid as e:
    if 'Empty CSV file' in str(e):
      return
    raise MalformedLineError(f'{path}: cannot be parsed: {e}') from e
  rows_before = 0   # rows of earlier batches
  skipped_seen = 0  # skipped lines already placed before earlier batches
  while True:
    try:
      batch = reader.read_next_batch()
    except StopIteration:
      break
    except MalformedLineError:
      raise
    except pa.ArrowInvalid as e:
      raise MalformedLineError(f'{path}: cannot be parsed: {e}') from e
    n = batch.num_rows
    # Line number of each row: its index plus the lines skipped before it.
    # Skipped lines so far are sorted; those past this batch's rows belong to
    # the next batch.
    skip_lines = np.asarray(skipped.lines[skipped_seen:], np.int64)
    idx = np.arange(n, dtype=np.int64) + rows_before + skipped_seen + 1
    if skip_lines.size:
      # The k-th row is on line idx + (skipped lines before it).
      lines = idx.copy()
      for s in skip_lines:
        lines[lines >= s] += 1
    else:
      lines = idx
    cols = {name: batch.column(i) for i, name in enumerate(names)}
    bad = np.zeros(n, bool)
    reasons: dict[int, str] = {}

    def flag(mask, reason_fn):
      new = np.flatnonzero(mask & ~bad)
      for i in new[:64]:
        reasons[int(i)] = reason_fn(int(i))
      bad[new] = True

    out = {}
    if labeled:
      lab = cols['label']
      is0 = np.asarray(pc.equal(lab, '0'))
      is1 = np.asarray(pc.equal(lab, '1'))

      def label_reason(i):
        if all(cols[name][i].as_py() == '' for name in names):
          return 'empty line'
        return f'label must be 0 or 1, got {lab[i].as_py()!r}'
      flag(~(is0 | is1), label_reason)
      out['label'] = is1.astype(np.float32)
    ints = np.zeros((n, NUM_INT), np.int64)
    for j, name in enumerate(INT_NAMES):
      v, b = _parse_int(cols[name])
      ints[:, j] = v
      flag(b, lambda i, name=name: (
          f'{name} is not an integer: {cols[name][i].as_py()!r}'))
    cats = np.zeros((n, NUM_CAT), np.int64)
    for j, name in enumerate(CAT_NAMES):
      v, b = _parse_hex(cols[name])
      cats[:, j] = v
      flag(b, lambda i, name=name: (
          f'{name} is not 8 hex digits: {cols[name][i].as_py()!r}'))
    out['int'] = ints
    out['cat'] = cats
    # Merge the field-count errors of this batch's span with the value errors,
    # in line order, for the report.
    span_end = lines[-1] if n else np.iinfo(np.int64).max
    in_span = [k for k, s in enumerate(skip_lines) if s <= span_end]
    events = [(int(skip_lines[k]), skipped.reasons[skipped_seen + k])
              for k in in_span]
    events += [(int(lines[i]), reasons.get(int(i), 'malformed'))
               for i in np.flatnonzero(bad)]
    events.sort()
    if events and bad_lines == 'error':
      raise MalformedLineError(f'{path}:{events[0][0]}: {events[0][1]}')
    for line, reason in events:
      report.add(path, line, reason)
    skipped_seen += len(in_span)
    rows_before += n
    if bad.any():
      keep = ~bad
      out = {k: v[keep] for k, v in out.items()}
    if len(out['int']):
      yield out
  # Field-count errors after the last batch's rows.
  for line, reason in zip(skipped.lines[skipped_seen:],
                          skipped.reasons[skipped_seen:]):
    if bad_lines == 'error':
      raise MalformedLineError(f'{path}:{line}: {reason}')
    report.add(path, line, reason)


def read_criteo(
    paths: Sequence[str] | str,
    *,
    labeled: bool = True,
    bad_lines: str = 'error',
    report: BadLineReport | None = None,
    chunk_rows: int = 65536,
    skip_rows: int = 0,
    max_rows: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Streams valid rows of the files, in file then line order.

  Args:
    paths: files (plain or gzip).
    labeled: 40-field layout with a label; False for the 39-field test layout.
    bad_lines: 'error' raises MalformedLineError at the first malformed line;
      'skip' drops it and records it in `report`.
    report: where skipped lines are recorded.
    chunk_rows: rows per yielded chunk (the last may be smaller).
    skip_rows: valid rows to skip first (resuming).
    max_rows: stop after this many valid rows.

  Yields:
    {'label': float32 `[n]` (labeled only), 'int': int64 `[n, 13]` (missing
    written 0), 'cat': int64 `[n, 26]` (values in [0, 2^32), missing -1)}.
  """
  if bad_lines not in BAD_LINE_POLICIES:
    raise ValueError(
        f"data.bad_lines ({bad_lines!r}) must be 'error' or 'skip'.")
  if isinstance(paths, str):
    paths = [paths]
  if report is None:
    report = BadLineReport()
  to_skip = int(skip_rows)
  left = None if max_rows is None else int(max_rows)
  buf: list[dict[str, np.ndarray]] = []
  have = 0

  def flush():
    merged = {k: np.concatenate([c[k] for c in buf]) for k in buf[0]}
    return merged

  for path in paths:
    for chunk in _read_file(path, labeled, bad_lines, report):
      n = len(chunk['int'])
      if to_skip:
        if to_skip >= n:
          to_skip -= n
          continue
        chunk = {k: v[to_skip:] for k, v in chunk.items()}
        n -= to_skip
        to_skip = 0
      if left is not None:
        if left <= 0:
          break
        if n > left:
          chunk = {k: v[:left] for k, v in chunk.items()}
          n = left
        left -= n
      pos = 0
      while pos < n:
        take = min(chunk_rows - have, n - pos)
        buf.append({k: v[pos:pos + take] for k, v in chunk.items()})
        have += take
        pos += take
        if have == chunk_rows:
          yield flush()
          buf, have = [], 0
    if left is not None and left <= 0:
      break
  if have:
    yield flush()
