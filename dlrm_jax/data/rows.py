"""The rules of one Criteo text row, shared by every reader and scorer.

A row is a line of at most MAX_LINE_BYTES (1 MiB) of tab-separated fields: the label (`0` or `1`, labeled
layout only), I1..I13 (`-?[0-9]+` within int64, empty = missing) and C1..C26
(1 to 8 hex digits `[0-9a-fA-F]`, empty = missing). A line ends at `\\n`,
`\\r\\n` or a bare `\\r` (as pyarrow's CSV reader, which the training reader
uses, splits lines). Nothing else is a valid row: an empty line, a line of
spaces, a wrong number of fields, a sign or space inside a field, `0x`
prefixes, quotes, Unicode digits, underscores (all of which Python's `int`
would take), an integer beyond int64, a hash of 9 digits.

The training reader (`dlrm_jax.data.criteo`) applies these rules vectorized
with numpy; this module applies them to one row at a time, in plain Python,
for scoring (`dlrm_jax.serving.runtime.parse_rows`, `examples/serve_stdin.py`)
and states the reasons both give, so a row is accepted or rejected, and
explained, the same way everywhere. tests/rows_test.py checks both against a
plain reference on fuzzed lines.

This module imports only the standard library, so `export_runtime` (a
serving process) stays free of training code.
"""

from __future__ import annotations

import re
from typing import BinaryIO, Iterator

NUM_INT = 13
NUM_CAT = 26
INT_NAMES = tuple(f'I{i + 1}' for i in range(NUM_INT))
CAT_NAMES = tuple(f'C{i + 1}' for i in range(NUM_CAT))
NUM_FEATURE_FIELDS = NUM_INT + NUM_CAT  # 39: Kaggle test.txt's layout.
NUM_LABELED_FIELDS = 1 + NUM_FEATURE_FIELDS  # 40: train.txt, day_N.

# Field values longer than this are shown cut, with their length.
MAX_SHOWN = 40
# Lines longer than this (without the line end) are malformed: a valid row
# has under 500 bytes, and the training reader passes none longer on.
MAX_LINE_BYTES = 1 << 20

_INT_RE = re.compile(rb'-?[0-9]+')
_HEX_RE = re.compile(rb'[0-9a-fA-F]{1,8}')
_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1
_INT64_DIGITS = 19  # Nonzero-led decimal strings longer than this overflow.


def show(value: bytes | str | None) -> str:
  """Shows a field in an error message.

  The repr is cut after MAX_SHOWN characters, so a 5 MiB field is not echoed.

  Args:
    value: the field. None shows as empty.

  Returns:
    Its repr, cut and followed by its length when long.
  """
  if value is None:
    value = b''
  if isinstance(value, bytes):
    text = value[:4 * MAX_SHOWN].decode('utf-8', 'backslashreplace')
  else:
    text = value
  if len(value) <= MAX_SHOWN and len(text) <= MAX_SHOWN:
    return repr(text)
  unit = 'bytes' if isinstance(value, bytes) else 'characters'
  return f'{text[:MAX_SHOWN]!r}... ({len(value)} {unit})'


def field_count_reason(expected: int, got: int) -> str:
  """The reason for a row with the wrong number of fields.

  Args:
    expected: the fields of the layout.
    got: the fields of the row.

  Returns:
    The reason text.
  """
  return f'expected {expected} fields, got {got}'


def label_reason(value) -> str:
  """The reason for a label other than 0 or 1.

  Args:
    value: the label field.

  Returns:
    The reason text.
  """
  return f'label must be 0 or 1, got {show(value)}'


def int_reason(name: str, value, overflow: bool) -> str:
  """The reason for a bad integer field.

  Args:
    name: the field's name, such as 'I3'.
    value: the field.
    overflow: True when the field is an integer outside int64.

  Returns:
    The reason text.
  """
  if overflow:
    return f'{name} does not fit in int64: {show(value)}'
  return f'{name} is not an integer: {show(value)}'


def hex_reason(name: str, value) -> str:
  """The reason for a bad categorical field.

  Args:
    name: the field's name, such as 'C7'.
    value: the field.

  Returns:
    The reason text.
  """
  return f'{name} is not 1 to 8 hex digits: {show(value)}'


def long_line_reason() -> str:
  """The reason for a line longer than MAX_LINE_BYTES."""
  return f'line longer than {MAX_LINE_BYTES} bytes'


EMPTY_LINE = 'empty line'
# pyarrow gives a line of tabs only as it gives an empty line.
NO_VALUES = 'empty line, or every field empty'


def int64_value(digits: bytes) -> int | None:
  """Reads a `-?[0-9]+` string as an int64.

  Any length is taken. Leading zeros do not count, so no huge int is ever
  built.

  Args:
    digits: the string.

  Returns:
    Its value, or None outside int64.
  """
  body = digits[1:] if digits[:1] == b'-' else digits
  body = body.lstrip(b'0')
  if len(body) > _INT64_DIGITS:
    return None
  value = int(body or b'0')
  if digits[:1] == b'-':
    value = -value
  return value if _INT64_MIN <= value <= _INT64_MAX else None


def int64_overflows(digits: bytes) -> bool:
  """Tells whether a `-?[0-9]+` string lies outside int64.

  Args:
    digits: the string.

  Returns:
    True when it overflows int64.
  """
  return int64_value(digits) is None


def parse_int(name: str, field: bytes) -> int:
  """Parses one integer field.

  Args:
    name: the field's name, for the reason.
    field: the field's bytes.

  Returns:
    Its value. An empty field gives 0.

  Raises:
    ValueError: with the reason, if the field is not an int64 integer.
  """
  if not field:
    return 0
  if _INT_RE.fullmatch(field) is None:
    raise ValueError(int_reason(name, field, False))
  value = int64_value(field)
  if value is None:
    raise ValueError(int_reason(name, field, True))
  return value


def parse_hex(name: str, field: bytes) -> int:
  """Parses one categorical field.

  Args:
    name: the field's name, for the reason.
    field: the field's bytes.

  Returns:
    Its hash in [0, 2^32). An empty field gives -1.

  Raises:
    ValueError: with the reason, if the field is not 1 to 8 hex digits.
  """
  if not field:
    return -1
  if _HEX_RE.fullmatch(field) is None:
    raise ValueError(hex_reason(name, field))
  return int(field, 16)


def to_bytes(line: bytes | str) -> bytes:
  """Turns text back into the bytes it came from.

  Args:
    line: bytes or text. Surrogate-escaped bytes are restored.

  Returns:
    The bytes.
  """
  if isinstance(line, str):
    return line.encode('utf-8', 'surrogateescape')
  return bytes(line)


def strip_terminator(line: bytes) -> bytes:
  """Removes one line end: `\\r\\n`, `\\n` or `\\r`.

  Args:
    line: the line.

  Returns:
    The line without its end.
  """
  if line.endswith(b'\r\n'):
    return line[:-2]
  if line.endswith((b'\n', b'\r')):
    return line[:-1]
  return line


def parse_line(line: bytes | str, labeled: bool
               ) -> tuple[int | None, list[int], list[int]]:
  """Parses one row.

  A line end at the end is allowed. One inside is not, as it would be two
  lines in a file.

  Args:
    line: the row, as bytes or text.
    labeled: whether the row starts with a label.

  Returns:
    `(label, ints, cats)`. `label` is None when not labeled. `ints` holds
    the 13 integers. `cats` holds the 26 hashes, -1 for missing.

  Raises:
    ValueError: with the reason, naming the field and showing its value.
      The caller adds the row or line.
  """
  line = strip_terminator(to_bytes(line))
  if not line:
    raise ValueError(EMPTY_LINE)
  if b'\n' in line or b'\r' in line:
    raise ValueError('holds a line break inside the row (two lines?)')
  if len(line) > MAX_LINE_BYTES:
    raise ValueError(long_line_reason())
  fields = line.split(b'\t')
  expected = NUM_LABELED_FIELDS if labeled else NUM_FEATURE_FIELDS
  if len(fields) != expected:
    raise ValueError(field_count_reason(expected, len(fields)))
  if not line.strip(b'\t'):
    raise ValueError(NO_VALUES)
  label = None
  if labeled:
    if fields[0] not in (b'0', b'1'):
      raise ValueError(label_reason(fields[0]))
    label = int(fields[0])
    fields = fields[1:]
  ints = [parse_int(name, f) for name, f in zip(INT_NAMES, fields)]
  cats = [parse_hex(name, f) for name, f in zip(CAT_NAMES, fields[NUM_INT:])]
  return label, ints, cats


def layout_of(line: bytes | str) -> bool | None:
  """Tells a line's layout from its field count.

  Args:
    line: the line, as bytes or text.

  Returns:
    True for 40 fields, which is labeled. False for 39. None otherwise.
  """
  n = strip_terminator(to_bytes(line)).count(b'\t') + 1
  return {NUM_LABELED_FIELDS: True, NUM_FEATURE_FIELDS: False}.get(n)


def split_lines(data: bytes) -> list[bytes]:
  """Splits bytes into lines, as pyarrow does.

  A line ends at `\\r\\n`, `\\n` or a bare `\\r`. A last line without an
  end counts. An end at the end starts no new line.

  Args:
    data: the bytes.

  Returns:
    The lines, without their ends.
  """
  lines = re.split(rb'\r\n|\r|\n', data)
  if lines and lines[-1] == b'':
    lines.pop()
  return lines


def iter_lines(stream: BinaryIO) -> Iterator[bytes]:
  """Splits a binary stream such as stdin into lines, as `split_lines` does.

  Args:
    stream: the binary stream.

  Yields:
    The lines, one at a time, without their ends.
  """
  # A binary stream splits at '\n' only, so a '\r\n' never straddles two
  # of its lines.
  for raw in stream:
    parts = re.split(rb'\r\n|\r|\n', raw)
    if parts[-1] == b'':
      parts.pop()
    yield from parts
