"""Streaming reader of Criteo click logs in their raw text layout.

Kaggle `train.txt` and Terabyte `day_N` hold one example per line, 40
tab-separated fields:
  the label (`0` or `1`),
  I1..I13: integers (may be negative; empty = missing),
  C1..C26: 32-bit hashes written as 8 hex digits (empty = missing).
The unlabeled Kaggle `test.txt` layout has the same 39 feature fields and no
label. Files may be plain or gzip; gzip is recognized by its magic bytes, not
by its name (Terabyte `day_N` files have no extension).

`read_criteo` streams the files block by block through pyarrow's CSV reader and
validates and converts each block with vectorized numpy, so memory stays at a
few blocks whatever the file size. A malformed line (a wrong field count, a
label other than 0/1, a non-integer or an integer that does not fit int64, a
categorical that is not 1..8 hex digits) either stops the read with its file,
line number and reason (`bad_lines='error'`) or is dropped and recorded in a
`BadLineReport` (`bad_lines='skip'`). No value is ever silently wrong.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
import re
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from dlrm_jax.data import rows as rows_lib

# The row rules and their reasons are `dlrm_jax.data.rows`' (shared with
# scoring); this module applies them vectorized.
NUM_INT = rows_lib.NUM_INT
NUM_CAT = rows_lib.NUM_CAT
INT_NAMES = rows_lib.INT_NAMES
CAT_NAMES = rows_lib.CAT_NAMES
BAD_LINE_POLICIES = ('error', 'skip')

# Bytes of text per pyarrow block (one parsed batch). Lines must be shorter.
_BLOCK_BYTES = 4 << 20
_READ_BYTES = 16 << 20  # Bytes per read when counting lines.
_GZIP_MAGIC = b'\x1f\x8b'
# Rows per chunk of the streamed reader (`read_criteo`) and of in-order reads
# of random-access sources; `config.data.chunk_rows` sets it for a run.
CHUNK_ROWS = 65536
_INT64_DIGITS = 18  # Decimal strings of up to this many digits fit in int64.

# True for every byte that is not an ASCII decimal digit.
_NOT_DIGIT = np.ones(256, bool)
_NOT_DIGIT[ord('0'):ord('9') + 1] = False


def _hex_pair_table() -> np.ndarray:
  """Value of two hex characters read as one little-endian uint16; -1: bad."""
  nibble = np.full(256, -1, np.int16)
  for i, c in enumerate(b'0123456789abcdef'):
    nibble[c] = i
  for i, c in enumerate(b'ABCDEF'):
    nibble[c] = 10 + i
  first = nibble[np.arange(65536) & 0xff]  # The first character: high nibble.
  second = nibble[np.arange(65536) >> 8]
  return np.where((first >= 0) & (second >= 0), first * 16 + second,
                  -1).astype(np.int16)


_HEX_PAIR = _hex_pair_table()


class MalformedLineError(ValueError):
  """A malformed line of a Criteo file. The message is `path:line: reason`."""


@dataclasses.dataclass
class BadLineReport:
  """Malformed lines dropped under `bad_lines='skip'`.

  Attributes:
    count: the lines dropped.
    examples: the first `max_examples` of them, as `'path:line: reason'`.
    max_examples: how many examples to keep.
  """

  count: int = 0
  examples: list[str] = dataclasses.field(default_factory=list)
  max_examples: int = 10

  def add(self, path: str, line: int, reason: str) -> None:
    """Records one dropped line.

    Args:
      path: the file.
      line: the line number.
      reason: why the line is malformed.
    """
    self.count += 1
    if len(self.examples) < self.max_examples:
      self.examples.append(f'{path}:{line}: {reason}')

  def summary(self) -> str:
    """A one-line summary of the dropped lines, for logs."""
    if not self.count:
      return 'no malformed lines'
    plural = 's' if self.count > 1 else ''
    more = '; ...' if self.count > len(self.examples) else ''
    return (f'{self.count} malformed line{plural} skipped; first: ' +
            '; '.join(self.examples) + more)


_BRACE_RANGE = re.compile(r'\{(\d+)\.\.(\d+)\}')


def brace_ranges(pattern: str) -> list[str]:
  """Expands the numeric ranges `{m..n}` of a pattern, as bash does.

  Args:
    pattern: such as `day_{0..22}`. Zero-padded bounds such as `{00..22}`
      pad.

  Returns:
    The patterns in order, such as `day_0` to `day_22`. A pattern without a
    range is returned alone.
  """
  m = _BRACE_RANGE.search(pattern)
  if m is None:
    return [pattern]
  lo, hi = int(m.group(1)), int(m.group(2))
  width = len(m.group(1)) if m.group(1).startswith('0') else 0
  step = 1 if hi >= lo else -1
  return [p for k in range(lo, hi + step, step) for p in brace_ranges(
      pattern[:m.start()] + str(k).zfill(width) + pattern[m.end():])]


def expand_paths(spec, *, field: str = 'data.train_path') -> list[str]:
  """Lists the files named by paths and globs.

  A glob may use `*`, `?`, `[...]` and bash's numeric ranges `{m..n}`.

  Args:
    spec: a path, a glob, a comma-separated string of paths and globs, or a
      list or tuple of those.
    field: the config field `spec` came from, for error messages.

  Returns:
    The files in the order given, each glob's matches sorted. Each file
    comes once, at its first place.

  Raises:
    ValueError: naming `field` and the pattern, when a path does not exist or
      is not a file, or when a glob matches no file.
  """
  if isinstance(spec, (str, os.PathLike)):
    items = [spec]
  elif isinstance(spec, (list, tuple)):
    items = list(spec)
  else:
    raise ValueError(
        f'{field} ({spec!r}) must be a path, a glob, a comma-separated string'
        ' or a list of those.')
  patterns = []
  for item in items:
    if not isinstance(item, (str, os.PathLike)):
      raise ValueError(f'{field}: {item!r} is not a path or a glob.')
    patterns += [p.strip() for p in os.fspath(item).split(',') if p.strip()]
  if not patterns:
    raise ValueError(f'{field} ({spec!r}) names no file.')
  patterns = [p for pattern in patterns for p in brace_ranges(pattern)]
  out, seen = [], set()
  for pattern in patterns:
    path = os.path.expanduser(pattern)
    if os.path.isfile(path):
      matches = [path]
    elif glob.has_magic(path):
      matches = [p for p in sorted(glob.glob(path)) if os.path.isfile(p)]
      if not matches:
        raise ValueError(f'{field}: the pattern {pattern!r} matches no file.')
    elif os.path.exists(path):
      raise ValueError(f'{field}: {pattern!r} is not a file.')
    else:
      raise ValueError(f'{field}: the file {pattern!r} does not exist.')
    for m in matches:
      if m not in seen:
        seen.add(m)
        out.append(m)
  return out


def is_gzip(path: str) -> bool:
  """Tells whether a file starts with the gzip magic bytes.

  Args:
    path: the file.

  Returns:
    True for a gzip file.
  """
  with open(path, 'rb') as f:
    return f.read(2) == _GZIP_MAGIC


def open_file(path: str) -> pa.NativeFile:
  """Opens a file as a byte stream.

  Args:
    path: the file, plain or gzip.

  Returns:
    A pyarrow stream of its bytes, gunzipped when it is gzip.
  """
  return pa.input_stream(path, compression='gzip' if is_gzip(path) else None)


# A malformed line or run of lines: (first file line, number of lines, reason).
_Event = tuple[int, int, str]


class _LineRecord:
  """Which file line each row of a stream came from, and the lines dropped.

  The one record of line numbers while one file or byte range is read.
  Lines are counted from 1 in the stream the parser reads. The lines the
  record hands out are file lines: `line_offset`, the file's lines before
  the stream's first, is added. Its writers, in stream lines:
    the guarded stream: the lines it passes on, by `pass_on`, and those it
      cuts for their length, by `cut_long`.
    pyarrow's invalid-row handler: the lines of a wrong field count that it
      drops, by `drop`. They are kept as runs until placed. A file of the
      wrong layout is one run. pyarrow parses a few blocks ahead, so they
      may lie past the rows of the batch at hand.
    the file reader: each batch of rows, placed in order after the dropped
      lines before it, by `line_of` then `place`.
  A cut line reaches pyarrow as the one-field line '?'. So it comes back
  among the dropped lines, where it gets its own reason.
  """

  def __init__(self, num_fields: int, line_offset: int = 0,
               counter: LineCounter | None = None):
    """Makes an empty record.

    Args:
      num_fields: the layout's field count.
      line_offset: the file's lines before the stream's first.
      counter: also counts the lines passed on, when given.
    """
    self.num_fields = num_fields
    self.line_offset = line_offset
    self.counter = counter
    self.passed = 0  # Stream lines passed on to the parser.
    self._placed = 0  # Stream lines 1.._placed are placed.
    self._runs: list[list[int]] = []  # [first line, lines, field count]
    self._long: set[int] = set()  # Stream lines cut for their length.

  def pass_on(self, lines: int) -> None:
    """The guarded stream passed on `lines` more lines."""
    self.passed += lines
    if self.counter is not None:
      self.counter.lines += lines

  def cut_long(self, line: int) -> None:
    """The guarded stream cut stream line `line` for its length."""
    self._long.add(line)

  def drop(self, line: int, fields: int) -> None:
    """pyarrow dropped stream line `line`, of `fields` fields."""
    runs = self._runs
    last = runs[-1] if runs else None
    if last and last[0] + last[1] == line and last[2] == fields:
      last[1] += 1
    else:
      runs.append([line, 1, fields])

  @property
  def next_line(self) -> int:
    """The file line of the first line not placed yet."""
    return self.line_offset + self._placed + 1

  def line_of(self, rows: np.ndarray) -> np.ndarray:
    """The file lines of rows `rows` (indices) of the next batch."""
    before, after = self._pending()
    return (self.line_offset + self._placed + rows + 1 +
            before[np.searchsorted(after, rows, side='right')])

  def place(self, num_rows: int, last: int, since: int) -> list[_Event]:
    """Places the next batch of `num_rows` rows.

    The dropped lines that come before its row `last` are placed too. Those
    from file line `since` on are returned as events. The ones before it are
    passed over.
    """
    before, after = self._pending()
    n_runs = int(np.searchsorted(after, last, side='right'))
    runs = self._runs[:n_runs]
    del self._runs[:n_runs]
    self._placed += num_rows + int(before[n_runs])
    return self._events(runs, since)

  def rest(self) -> list[_Event]:
    """The dropped lines not placed yet, those after the last row."""
    runs, self._runs = self._runs, []
    return self._events(runs, 0)

  def _pending(self) -> tuple[np.ndarray, np.ndarray]:
    """Counts around the pending runs of dropped lines.

    Returns `[R + 1]` dropped lines before each pending run and in all, and
    `[R]` rows of the next batch before each run.
    """
    # Row k of the next batch lies on stream line placed + k + 1 + (dropped
    # lines before it). All lines of run r come before row k exactly when
    # k >= after[r], with after[r] = (rows between line `placed` and run r).
    runs = np.array(self._runs, np.int64).reshape(-1, 3)
    before = np.concatenate([[0], np.cumsum(runs[:, 1])])
    return before, runs[:, 0] - self._placed - 1 - before[:-1]

  def _events(self, runs: list[list[int]], since: int) -> list[_Event]:
    """Turns runs of dropped lines from file line `since` on into events.

    The lines cut for their length are split out with their own reason.
    """
    offset, events = self.line_offset, []
    for line, count, fields in runs:
      if line + offset < since:
        continue
      reason = rows_lib.field_count_reason(self.num_fields, fields)
      for cut in sorted(l for l in self._long if line <= l < line + count):
        if cut > line:
          events.append((line + offset, cut - line, reason))
        events.append((cut + offset, 1, rows_lib.long_line_reason()))
        count -= cut + 1 - line
        line = cut + 1
      if count > 0:
        events.append((line + offset, count, reason))
    return events


class _GuardedStream(io.RawIOBase):
  """A file's text for pyarrow's CSV reader, guarded.

  Bytes >= 0x80 become '?'. No valid row holds one, as every valid field is
  ASCII. pyarrow decodes a line of a wrong field count as UTF-8 before the
  invalid-row handler sees it. With the bytes replaced it never fails on
  one. The line stays malformed, is reported at its line and can be skipped.
  A line longer than `rows_lib.MAX_LINE_BYTES` is passed on as the one-field
  line '?', and recorded as cut. pyarrow could only fail on it, naming no
  line, once it passes its block size. The lines passed on are recorded
  too, in the reader's `_LineRecord`. A damaged gzip stream is named with
  the file and the offset reached.
  """

  _MARK = b'?'

  def __init__(self, path: str, stream: pa.NativeFile | None = None, *,
               lines: _LineRecord | None = None):
    """Opens the guarded stream.

    Args:
      path: the file.
      stream: the bytes to read, or None to open `path`.
      lines: where the lines passed on and cut are recorded. None passes the
        bytes as they are, for counting lines. gzip errors are still named.
    """
    super().__init__()
    self._record = lines
    self._path = path
    self._gzip = stream is None and is_gzip(path)
    self._stream = stream if stream is not None else open_file(path)
    self._pos = 0
    self._out = bytearray()  # Ready for the reader.
    self._tail = b''  # The start of the current line (and a held '\r').
    self._long = False  # The current line is too long: dropped to its end.
    self._eof = False

  def readable(self) -> bool:
    return True

  def _raw_read(self, size: int) -> bytes:
    try:
      data = self._stream.read(size)
    except (OSError, pa.ArrowException) as e:
      where = (f'after {self._pos} bytes of decompressed text (the gzip file'
               f' has {os.path.getsize(self._path)} bytes)' if self._gzip
               else f'at byte {self._pos}')
      raise MalformedLineError(
          f'{self._path}: cannot be read {where}: {e}'
          + (' (a damaged or truncated gzip file?)' if self._gzip else '')
      ) from e
    self._pos += len(data)
    if self._record is None:
      return data
    view = np.frombuffer(data, np.uint8)
    if view.size and view.max() >= 0x80:
      data = np.where(view >= 0x80, np.uint8(ord('?')), view).tobytes()
    return data

  def _cut_long(self, complete: bytes) -> bytes:
    """Replaces the lines over the limit in `complete`, which is whole lines."""
    limit = rows_lib.MAX_LINE_BYTES
    view = np.frombuffer(complete, np.uint8)
    ends = np.flatnonzero((view == 10) | (view == 13))
    starts = np.concatenate([[0], ends[:-1] + 1])
    if not ((ends - starts) > limit).any():
      return complete
    pieces, lines = [], self._record.passed
    pos = 0
    for a, b in zip(starts.tolist(), ends.tolist()):
      # A '\n' right after a '\r' ends no line of its own.
      if not (b == a and complete[b:b + 1] == b'\n' and a and
              complete[a - 1:a] == b'\r'):
        lines += 1
      if b - a > limit:
        pieces += [complete[pos:a], self._MARK]
        pos = b
        self._record.cut_long(lines)
    pieces.append(complete[pos:])
    return b''.join(pieces)

  def _fill(self, size: int) -> None:
    data = self._raw_read(max(size, 1 << 16))
    if not data:
      self._eof = True
      last = bool(self._tail or self._long)  # (or a line ended by a '\r')
      if self._long:
        self._out += self._MARK
      else:
        self._out += self._cut_long(self._tail + b'\n')[:-1]
      if last:
        self._record.pass_on(1)
      self._tail, self._long = b'', False
      return
    if self._long:  # Drop to the end of the long line.
      ends = [i for i in (data.find(b'\n'), data.find(b'\r')) if i >= 0]
      if not ends:
        return
      self._out += self._MARK
      data = data[min(ends):]
      self._long = False
    buf = self._tail + data
    hold = b''
    if buf.endswith(b'\r'):  # Maybe a '\r\n' split by the read.
      buf, hold = buf[:-1], b'\r'
    k = max(buf.rfind(b'\n'), buf.rfind(b'\r'))
    complete, rest = buf[:k + 1], buf[k + 1:]
    if complete:
      self._out += self._cut_long(complete)
      self._record.pass_on(complete.count(b'\n') + complete.count(b'\r') -
                           complete.count(b'\r\n'))
    if len(rest) > rows_lib.MAX_LINE_BYTES:
      self._long = True
      self._record.cut_long(self._record.passed + 1)
      rest = b''
      if hold:  # The long line ended at this '\r'.
        self._out += self._MARK
        self._long = False
    self._tail = rest + hold

  def read(self, size: int = -1) -> bytes:
    if size is None or size < 0:
      size = 1 << 62
    if self._record is None:
      return self._raw_read(size)
    while not self._out and not self._eof:
      self._fill(min(size, 1 << 24))
    out = bytes(self._out[:size])
    del self._out[:size]
    return out

  def close(self) -> None:
    self._stream.close()
    super().close()


def count_rows(paths: Sequence[str | FileRange] | str | FileRange) -> int:
  """Counts the lines of files or file ranges, as the reader counts them.

  Nothing is parsed. It scans for line ends. gzip files are decompressed.

  Args:
    paths: a path or a `FileRange`, or a list of them.

  Returns:
    The lines, each ended by `\n`, `\r\n` or a bare `\r`. A last line
    without an end counts.

  Raises:
    MalformedLineError: naming the file, when a gzip file is damaged.
  """
  if isinstance(paths, (str, FileRange)):
    paths = [paths]
  total = 0
  for item in paths:
    part = item if isinstance(item, FileRange) else FileRange(item)
    last = b'\n'
    with _GuardedStream(part.name, part.stream()) as f:
      while block := f.read(_READ_BYTES):
        # '\r\n' counts once, also when a block boundary splits it.
        total += block.count(b'\n') - (last == b'\r' and block[:1] == b'\n')
        if b'\r' in block:  # (rare: a scan for it is cheaper than a count)
          total += block.count(b'\r') - block.count(b'\r\n')
        last = block[-1:]
    total += last not in (b'\n', b'\r')
  return total


@dataclasses.dataclass
class LineCounter:
  """Counts the lines handed to the parser by `read_criteo(..., counter=)`.

  Attributes:
    lines: the lines so far.
  """

  lines: int = 0


@dataclasses.dataclass(frozen=True)
class FileRange:
  """Bytes `[begin, end)` of a file, or a whole plain or gzip file.

  A byte range must be of a plain file and start at a line start, as
  `split_into_shares` cuts them. Messages about its lines name
  `'path[bytes begin..end]'` and count lines from the range's first one.

  Attributes:
    path: the file.
    begin: the first byte.
    end: the byte after the last. None means the file's end.
  """

  path: str
  begin: int = 0
  end: int | None = None

  @property
  def whole(self) -> bool:
    """Whether this is the whole file."""
    return self.begin == 0 and self.end is None

  @property
  def name(self) -> str:
    """The name messages give it: the path, then `[bytes begin..end]`."""
    return self.path if self.whole else (
        f'{self.path}[bytes {self.begin}..{self.end}]')

  def stream(self) -> '_RangeReader | None':
    """Opens a reader of the range's bytes.

    Returns:
      The reader, or None for a whole file, which the reader opens itself.
    """
    if self.whole:
      return None
    return _RangeReader(self.path, self.begin, self.end)


class _RangeReader:
  """Reads bytes `[begin, end)` of a plain file, a block at a time."""

  def __init__(self, path: str, begin: int, end: int | None):
    self._f = open(path, 'rb')  # pylint: disable=consider-using-with
    self._f.seek(begin)
    self._left = (os.path.getsize(path) if end is None else end) - begin

  def read(self, size: int = -1) -> bytes:
    n = self._left if size is None or size < 0 else min(size, self._left)
    data = self._f.read(max(n, 0))
    self._left -= len(data)
    return data

  def close(self) -> None:
    self._f.close()


def line_start(path: str, offset: int, size: int) -> int:
  """The first line start at or after byte `offset` of a plain file.

  This is the one place where byte cuts are aligned to lines. The shares of
  `split_into_shares` and the ranges of `dlrm_jax.data.preprocess` use it.

  Args:
    path: a plain file, not gzip.
    offset: a byte offset. 0 or less is the file's start.
    size: the file's size in bytes.

  Returns:
    The offset just after the first line end at or after byte
    `offset - 1`. A line ends in `\n`, `\r\n` or a bare `\r`. `size` when
    there is none.
  """
  if offset <= 0:
    return 0
  if offset >= size:
    return size
  with open(path, 'rb') as f:
    pos = offset - 1
    f.seek(pos)
    while block := f.read(1 << 16):
      ends = [i for i in (block.find(b'\n'), block.find(b'\r')) if i >= 0]
      if ends:
        end = pos + min(ends)
        f.seek(end)
        pair = f.read(2)
        return min(end + (2 if pair == b'\r\n' else 1), size)
      pos += len(block)
  return size


def split_into_shares(paths: Sequence[str], process_count: int, *,
                      span: tuple[float, float] = (0.0, 1.0)
                      ) -> list[list[FileRange]]:
  """Splits files over processes, one share of file ranges per process.

  The files are laid end to end, plain files by their bytes and gzip files
  by their compressed size. The fraction `span` of the whole is taken and
  cut into `process_count` equal byte spans. `(0.9, 1.0)`, say, is the last
  tenth, line-aligned like every cut. Process p's rows are a contiguous run
  of the whole. So the shares of processes 0, 1, ... concatenated are the
  files' rows in order.

  In a plain file, a cut at byte c moves to the first line start at or
  after c, just after the first line end at or after byte c - 1. A process
  reads the lines whose first byte lies in its span, through the line that
  straddles its end. No line is read twice or missed. Finding a cut reads
  one line. A gzip file has no random access. It goes whole to the process
  whose span holds its first byte. With fewer gzip files than processes,
  some processes get none, and `share_error` says so.

  Args:
    paths: the files, plain or gzip.
    process_count: how many shares.
    span: the fraction of the files' bytes to split, as `(start, end)`.

  Returns:
    Each process's `FileRange`s, in file order. A list may be empty.
  """
  sizes = [os.path.getsize(p) for p in paths]
  total = sum(sizes)
  lo, hi = (int(round(f * total)) for f in span)
  cuts = [lo + p * (hi - lo) // process_count
          for p in range(process_count + 1)]
  shares: list[list[FileRange]] = [[] for _ in range(process_count)]
  offset = 0
  for path, size in zip(paths, sizes):
    if is_gzip(path):
      if cuts[0] <= offset < cuts[-1]:
        owner = max(p for p in range(process_count) if cuts[p] <= offset)
        shares[owner].append(FileRange(path))
    else:
      for p in range(process_count):
        lo = min(max(cuts[p] - offset, 0), size)
        hi = min(max(cuts[p + 1] - offset, 0), size)
        begin, end = line_start(path, lo, size), line_start(path, hi, size)
        if begin < end:
          whole = begin == 0 and end == size
          shares[p].append(FileRange(path) if whole else
                           FileRange(path, begin, end))
    offset += size
  return shares


def share_error(shares: list[list[FileRange]], field: str) -> str | None:
  """Says why shares cannot be used: a process without data.

  Args:
    shares: what `split_into_shares` returned.
    field: the config field that named the files, for the message.

  Returns:
    The message, or None when every process has data.
  """
  empty = [p for p, s in enumerate(shares) if not s]
  if not empty:
    return None
  return (f'{field}: processes {empty} of {len(shares)} get no data. Plain'
          ' files are split over the processes by bytes, but a gzip file'
          ' cannot be (no random access): give at least as many gzip files'
          ' as processes, or decompress them.')


def count_valid_rows(paths: Sequence[str] | str, *, labeled: bool = True
                     ) -> int:
  """Counts the rows that `read_criteo(..., bad_lines='skip')` yields.

  It takes a full parse.

  Args:
    paths: the files, or one file.
    labeled: whether the files have a label field.

  Returns:
    The valid rows.
  """
  return sum(len(c['int']) for c in read_criteo(
      paths, labeled=labeled, bad_lines='skip', report=BadLineReport()))


def _buffers(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Splits a binary column into its buffers.

  Returns the offsets `[n + 1]`, the data bytes and the lengths `[n]`.

  Empty fields are nulls of length 0.
  """
  n = len(col)
  bufs = col.buffers()
  offsets = np.frombuffer(bufs[1], np.int32, count=n + 1,
                          offset=col.offset * 4).astype(np.int64)
  if bufs[2] is None or bufs[2].size == 0:
    data = np.zeros(0, np.uint8)
  else:
    data = np.frombuffer(bufs[2], np.uint8)
  return offsets, data, np.diff(offsets)


def _parse_label(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
  """Parses labels into float32 values and a bad mask."""
  offsets, data, lengths = _buffers(col)
  if len(col) and (lengths == 1).all():
    value = data[offsets[0]:offsets[-1]] - np.uint8(ord('0'))
    bad = value > 1  # Other bytes wrap around to large values.
  else:
    first = data[np.minimum(offsets[:-1], max(len(data) - 1, 0))] if len(
        data) else np.zeros(len(col), np.uint8)
    value = first - np.uint8(ord('0'))
    bad = (lengths != 1) | (value > 1)
  return np.where(bad, 0, value).astype(np.float32), bad


def _parse_int(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Parses decimal integers into int64 values, a bad mask and an overflow mask.

  Missing values are 0. Valid is `-?[0-9]+` within int64. Arrow's own cast
  also takes `0x1f`, so the bytes are checked first.
  """
  n = len(col)
  offsets, data, lengths = _buffers(col)
  bad = np.zeros(n, bool)
  overflow = np.zeros(n, bool)
  pos = np.flatnonzero(_NOT_DIGIT[data[offsets[0]:offsets[-1]]]) + offsets[0]
  if pos.size:
    # The only non-digit allowed is a leading '-' followed by a digit.
    row = np.searchsorted(offsets, pos, side='right') - 1
    ok = ((data[pos] == ord('-')) & (offsets[row] == pos) &
          (lengths[row] >= 2))
    bad[row[~ok]] = True
  if n and lengths.max() > _INT64_DIGITS:
    for i in np.flatnonzero(~bad & (lengths > _INT64_DIGITS)):
      if rows_lib.int64_overflows(col[int(i)].as_py()):
        overflow[i] = True
    bad |= overflow
  if bad.any():
    col = pc.if_else(pa.array(bad), pa.scalar(None, col.type), col)
  values = pc.cast(col, pa.int64()).fill_null(0)
  return values.to_numpy(), bad, overflow


def _parse_hex(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
  """Parses 1..8 hex digits into int64 values in [0, 2^32) and a bad mask.

  Missing values are -1.
  """
  n = len(col)
  offsets, data, lengths = _buffers(col)
  present = lengths > 0
  n_present = np.count_nonzero(present)
  values = np.full(n, -1, np.int64)
  bad = np.zeros(n, bool)
  if not n_present:
    return values, bad
  if lengths.max() == 8 and offsets[-1] - offsets[0] == 8 * n_present:
    # The usual case: every value has 8 digits, so they lie back to back.
    rows = present
    chars = data[offsets[0]:offsets[-1]]
  else:
    # Left-pad each value of 1..8 digits with '0' to 8 characters.
    bad = lengths > 8
    rows = np.flatnonzero(present & ~bad)
    k = np.arange(8)
    pad = k[None, :] < (8 - lengths[rows])[:, None]
    idx = np.where(pad, 0, offsets[rows + 1][:, None] - 8 + k[None, :])
    chars = np.where(pad, np.uint8(ord('0')), data[idx]).astype(np.uint8)
    chars = chars.ravel()
  # Two characters at a time: one byte of the big-endian 32-bit value.
  pairs = _HEX_PAIR[chars.view('<u2')].reshape(-1, 4)
  values[rows] = pairs.astype(np.uint8).view('>u4').ravel()
  if pairs.size and pairs.min() < 0:
    bad_value = np.zeros(n, bool)
    bad_value[rows] = (pairs < 0).any(axis=1)
    bad |= bad_value
  if bad.any():
    values[bad] = -1
  return values, bad


def _value(col: pa.Array, i: int) -> bytes:
  """Field `i` of a column, for messages. `rows_lib.show` cuts it."""
  raw = col[i].as_py()
  return b'' if raw is None else raw


class _Checks:
  """The failed checks of one batch, in column order, for reasons."""

  def __init__(self, n: int):
    self.bad = np.zeros(n, bool)
    self._checks: list[tuple[np.ndarray, Callable[[int], str]]] = []

  def add(self, mask: np.ndarray, reason: Callable[[int], str]) -> None:
    if mask.any():
      self.bad |= mask
      self._checks.append((mask, reason))

  def reason(self, i: int) -> str:
    for mask, reason in self._checks:
      if mask[i]:
        return reason(i)
    raise AssertionError(f'row {i} is not bad')


def _convert(batch: pa.RecordBatch, labeled: bool
             ) -> tuple[dict[str, np.ndarray], _Checks]:
  """Parses a batch of binary columns. Returns all rows and their checks."""
  n = batch.num_rows
  cols = batch.columns
  checks = _Checks(n)
  out = {}
  # An empty line comes out of pyarrow as a row of empty fields.
  empty = np.flatnonzero(_buffers(cols[0])[2] == 0)
  for col in cols[1:]:
    if not empty.size:
      break
    empty = empty[_buffers(col)[2][empty] == 0]
  empty_mask = np.zeros(n, bool)
  empty_mask[empty] = True
  checks.add(empty_mask, lambda i: rows_lib.NO_VALUES)
  if labeled:
    label_col = cols[0]
    label, bad = _parse_label(label_col)
    checks.add(bad, lambda i: rows_lib.label_reason(_value(label_col, i)))
    out['label'] = label
    cols = cols[1:]
  ints = np.empty((NUM_INT, n), np.int64)
  for j, name in enumerate(INT_NAMES):
    col = cols[j]
    ints[j], bad, overflow = _parse_int(col)
    checks.add(bad, lambda i, col=col, name=name, overflow=overflow: (
        rows_lib.int_reason(name, _value(col, i), bool(overflow[i]))))
  cats = np.empty((NUM_CAT, n), np.int64)
  for j, name in enumerate(CAT_NAMES):
    col = cols[NUM_INT + j]
    cats[j], bad = _parse_hex(col)
    checks.add(bad, lambda i, col=col, name=name: (
        rows_lib.hex_reason(name, _value(col, i))))
  out['int'] = np.ascontiguousarray(ints.T)
  out['cat'] = np.ascontiguousarray(cats.T)
  return out, checks


class _FileReader:
  """Valid rows of one file in line order, by `rows(limit)`.

  The first `skip` valid rows are passed over. They count in `limit`.
  `self.skip` is decremented as they are, and what is left carries over to
  the next file. Malformed lines before the first row returned are neither
  raised nor reported, since a resumed or split read has met them already.
  Malformed lines from there to the last row returned are raised or
  reported. With `stream`, the text comes from it. It is a byte range of
  `path` whose first line is line `line_offset + 1` of the file.
  """

  def __init__(self, path: str, labeled: bool, bad_lines: str,
               report: BadLineReport, skip: int = 0,
               stream: pa.NativeFile | None = None, line_offset: int = 0,
               counter: LineCounter | None = None):
    self.path = path
    self.labeled = labeled
    self.bad_lines = bad_lines
    self.report = report
    self.skip = skip
    self.stream = stream
    self.names = (('label',) if labeled else ()) + INT_NAMES + CAT_NAMES
    self.lines = _LineRecord(len(self.names), line_offset, counter)

  def rows(self, limit: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Yields the valid rows, stopping after `limit` of them. None reads all."""
    reader = self._open(
        _GuardedStream(self.path, self.stream, lines=self.lines))
    if reader is None:
      return
    produced = 0
    while True:
      try:
        batch = reader.read_next_batch()
      except StopIteration:
        break
      except pa.ArrowInvalid as e:
        raise MalformedLineError(
            f'{self.path}:{self.lines.next_line}: cannot be parsed (at or'
            f' after this line): {e}') from e
      if not batch.num_rows:
        continue
      out, n_good, done = self._take(batch, limit, produced)
      produced += n_good
      if len(out['int']):
        yield out
      if done:
        return
    self._emit(self.lines.rest())

  def _open(self, guard: _GuardedStream):
    """pyarrow's streaming reader over the guarded stream, or None if empty."""
    names = self.names
    try:
      return pa_csv.open_csv(
          guard,
          read_options=pa_csv.ReadOptions(
              column_names=names, block_size=_BLOCK_BYTES, use_threads=False),
          parse_options=pa_csv.ParseOptions(
              delimiter='\t', quote_char=False, double_quote=False,
              escape_char=False, newlines_in_values=False,
              ignore_empty_lines=False,
              invalid_row_handler=self._on_invalid_row),
          convert_options=pa_csv.ConvertOptions(
              column_types={name: pa.binary() for name in names},
              strings_can_be_null=True, null_values=['']))
    except pa.ArrowInvalid as e:
      if 'Empty CSV file' in str(e):
        return None
      raise MalformedLineError(
          f'{self.path}:{self.lines.next_line}: cannot be parsed: {e}') from e

  def _on_invalid_row(self, row) -> str:
    self.lines.drop(row.number, row.actual_columns)
    return 'skip'

  def _take(self, batch: pa.RecordBatch, limit: int | None, produced: int
            ) -> tuple[dict[str, np.ndarray], int, bool]:
    """Takes one batch.

    Raises or reports its malformed lines, and the dropped ones before its
    last row needed. Returns its rows to return, the valid rows used, and
    whether `limit` is reached.
    """
    n = batch.num_rows
    out, checks = _convert(batch, self.labeled)
    good = ~checks.bad
    last = n - 1  # The last row needed from this batch.
    done = False
    if limit is not None:
      need = limit - produced
      good_rows = np.flatnonzero(good)
      if len(good_rows) >= need:
        last = int(good_rows[need - 1])
        done = True
    n_good = int(np.count_nonzero(good[:last + 1]))
    first, quiet_before = self._skip_rows(good, last, n_good)
    events = []
    bad_rows = np.flatnonzero(checks.bad[first:last + 1]) + first
    if bad_rows.size:
      events += [(int(line), 1, checks.reason(int(k)))
                 for line, k in zip(self.lines.line_of(bad_rows), bad_rows)]
    # (After `line_of`: placing moves the record on to the next batch.)
    events += self.lines.place(n, last, since=quiet_before)
    self._emit(events)
    keep = good[first:last + 1]
    if first or last + 1 < n or not keep.all():
      out = {k: v[first:last + 1][keep] for k, v in out.items()}
    return out, n_good, done

  def _skip_rows(self, good, last, n_good) -> tuple[int, int]:
    """Passes over `self.skip` valid rows of `good[:last + 1]`.

    Returns the first row returned, and the file line before which
    malformed lines are passed over.
    """
    first = 0  # The first row returned from this batch.
    quiet_before = 0  # Malformed lines before this one are passed over.
    if self.skip:
      if n_good <= self.skip:
        self.skip -= n_good
        first, quiet_before = last + 1, np.iinfo(np.int64).max
      else:
        first = int(np.flatnonzero(good[:last + 1])[self.skip])
        self.skip = 0
        quiet_before = int(self.lines.line_of(np.array([first]))[0])
    return first, quiet_before

  def _emit(self, events: list[_Event]) -> None:
    """Raises or reports the events, in file lines."""
    events.sort()
    path, report = self.path, self.report
    if events and self.bad_lines == 'error':
      line, _, reason = events[0]
      raise MalformedLineError(f'{path}:{line}: {reason}')
    for line, count, reason in events:
      shown = min(count, max(report.max_examples - len(report.examples), 1))
      for i in range(shown):
        report.add(path, line + i, reason)
      report.count += count - shown


def read_criteo(
    paths: Sequence[str] | str,
    *,
    labeled: bool = True,
    bad_lines: str = 'error',
    report: BadLineReport | None = None,
    chunk_rows: int = CHUNK_ROWS,
    skip_rows: int = 0,
    max_rows: int | None = None,
    counter: LineCounter | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Streams the valid rows of Criteo text files, in file then line order.

  Args:
    paths: the files, plain or gzip, as from `expand_paths`. Or `FileRange`s,
      byte ranges of plain files from `split_into_shares`.
    labeled: True for the 40-field layout with a label. False for the
      39-field layout of Kaggle `test.txt`, without one.
    bad_lines: 'error' raises MalformedLineError at the first malformed line.
      'skip' drops malformed lines and records them in `report`.
    report: where skipped lines are recorded. None makes a new one.
    chunk_rows: the rows per chunk. Only the last chunk is smaller. Chunks
      span file boundaries.
    skip_rows: the valid rows to skip at the start of the stream, to resume
      or to read a held-out tail. Malformed lines among them are passed
      over.
    max_rows: stop after this many valid rows. None reads to the end. Lines
      after the last row returned are not checked.
    counter: if given, counts the lines handed to the parser.

  Yields:
    Chunks with 'label', 'int' and 'cat'. 'label' is float32 `[n]`, labeled
    only. 'int' is int64 `[n, 13]`, missing written as 0 and negatives kept.
    'cat' is int64 `[n, 26]`, the hash in [0, 2^32), missing written as -1.

  Raises:
    MalformedLineError: `'path:line: reason'`, for a malformed line under
      `bad_lines='error'`.
    ValueError: for a bad argument.
  """
  if bad_lines not in BAD_LINE_POLICIES:
    raise ValueError(
        f"data.bad_lines ({bad_lines!r}) must be 'error' or 'skip'.")
  if chunk_rows < 1:
    raise ValueError(f'chunk_rows ({chunk_rows}) must be at least 1.')
  if skip_rows < 0:
    raise ValueError(f'skip_rows ({skip_rows}) must be at least 0.')
  if max_rows is not None and max_rows < 0:
    raise ValueError(f'max_rows ({max_rows}) must be at least 0 or None.')
  if isinstance(paths, str):
    paths = [paths]
  if report is None:
    report = BadLineReport()
  yield from rechunk(_valid_rows(paths, labeled, bad_lines, report,
                                 int(skip_rows), max_rows, counter),
                     chunk_rows)


def _valid_rows(paths, labeled, bad_lines, report, skip, max_rows, counter
                ) -> Iterator[dict[str, np.ndarray]]:
  """`read_criteo`'s rows file after file, in the pieces the parser gives."""
  left = None if max_rows is None else int(max_rows)
  for item in paths:
    if left == 0:
      break
    limit = None if left is None else skip + left
    part = item if isinstance(item, FileRange) else FileRange(item)
    file_reader = _FileReader(part.name, labeled, bad_lines, report, skip,
                              stream=part.stream(), counter=counter)
    for rows in file_reader.rows(limit):
      if left is not None:
        left -= len(rows['int'])
      yield rows
    skip = file_reader.skip


def rechunk(pieces: Iterable[dict[str, np.ndarray]], size: int
            ) -> Iterator[dict[str, np.ndarray]]:
  """Re-cuts a stream of column dicts into chunks of `size` rows, in order.

  Only the last chunk may be shorter. Chunks span piece boundaries. Pieces
  are consumed lazily, as chunks are asked for.

  Args:
    pieces: dicts of equal-length column arrays.
    size: the rows per chunk.

  Yields:
    Column dicts of `size` rows, the last one possibly shorter.
  """
  buf: list[dict[str, np.ndarray]] = []
  have = 0
  for piece in pieces:
    n = len(next(iter(piece.values())))
    pos = 0
    while pos < n:
      take = min(size - have, n - pos)
      buf.append({k: v[pos:pos + take] for k, v in piece.items()})
      have += take
      pos += take
      if have == size:
        yield _concat(buf)
        buf, have = [], 0
  if have:
    yield _concat(buf)


def _concat(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  if len(pieces) == 1:
    return pieces[0]
  return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def read_criteo_range(path: str, start: int, end: int, first_line: int, *,
                      labeled: bool = True, bad_lines: str = 'error',
                      report: BadLineReport | None = None
                      ) -> Iterator[dict[str, np.ndarray]]:
  """Streams the valid rows of bytes `[start, end)` of a plain file.

  The file must not be gzip. The range must start at a line start. The range
  is held in memory, so keep ranges to a few hundred MB.

  Args:
    path: the file.
    start: the first byte.
    end: the byte after the last.
    first_line: the 1-based line number of the range's first line. So errors
      name the right line of the file.
    labeled: whether the file has a label field.
    bad_lines: 'error' or 'skip', as in `read_criteo`.
    report: where skipped lines are recorded. None makes a new one.

  Yields:
    Chunks of rows, as `read_criteo` yields.

  Raises:
    MalformedLineError: for a malformed line under `bad_lines='error'`.
    ValueError: if `bad_lines` is unknown.
  """
  if bad_lines not in BAD_LINE_POLICIES:
    raise ValueError(
        f"data.bad_lines ({bad_lines!r}) must be 'error' or 'skip'.")
  with open(path, 'rb') as f:
    f.seek(start)
    data = f.read(end - start)
  yield from _FileReader(
      path, labeled, bad_lines,
      report if report is not None else BadLineReport(),
      stream=pa.BufferReader(data), line_offset=first_line - 1).rows(None)
