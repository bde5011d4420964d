"""Fuzzed Criteo lines and a plain reference of the row rules.

`fuzzed_lines` makes valid labeled rows and damages most of them (field
counts, signs, non-hex, overflows, blank and whitespace lines, non-UTF-8,
CR/CRLF, quotes, very long fields). `reference` decides each line with plain
Python written from the rules in `dlrm_jax/data/rows.py`'s docstring (no
regular expressions, no shared code), returning the values or the field at
fault. Used by tests/rows_test.py and benchmarks/row_parser_fuzz.py.
"""

from __future__ import annotations

import random

DIGITS = b'0123456789'
HEX = b'0123456789abcdefABCDEF'
N_INT, N_CAT = 13, 26


def _valid_fields(rng: random.Random) -> list[bytes]:
  f = [str(rng.randint(0, 1)).encode()]
  for _ in range(N_INT):
    r = rng.random()
    f.append(b'' if r < 0.2 else str(rng.randint(-3, 10**rng.randint(1, 6))
                                      ).encode())
  for _ in range(N_CAT):
    r = rng.random()
    f.append(b'' if r < 0.15 else (b'%08x' % rng.getrandbits(32)) if r < 0.9
             else (b'%x' % rng.getrandbits(rng.randint(1, 31))))
  return f


_BAD_INTS = [b'5 ', b' 5', b'+5', b'1_000', '\u0663'.encode(), b'3.5',
             b'1e5', b'-', b'--1', b'0x1f', b'"7"', str(2**31).encode(),
             str(2**63).encode(), str(-2**63 - 1).encode(),
             str(2**31 - 1).encode(), str(-2**31).encode(),
             str(2**63 - 1).encode(), b'9' * 100_000, b'0' * 100_000 + b'7',
             b'-0', b'007', b'\xff\xfe', 'é'.encode('latin-1'), b'NaN']
_BAD_CATS = [b'000000000', b'+abcdef1', b'-1', b'0x1f', b' ab', b'ab ',
             b'abcdefgh', b'"ab"', b'A1B2C3D4', b'0', b'ffffffff',
             b'\xff\xff', b'a' * (1 << 20), b'12345678\x00', b'g']
_BAD_LABELS = [b'2', b'', b' 1', b'1.0', b'01', b'-1', b'"1"', b'\xff']


def fuzzed_lines(n: int = 1000, seed: int = 0) -> list[bytes]:
  """n lines (bytes, possibly with a line end at the end), about 1 in 7
  valid as generated."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    f = _valid_fields(rng)
    kind = rng.randrange(16) if i else 0
    if kind == 0:
      pass  # Valid.
    elif kind == 1:  # Wrong field counts.
      k = rng.choice([-1, -1, 1, 2, -39, -20])
      for _ in range(-k):
        del f[rng.randrange(len(f))]
      for _ in range(max(k, 0)):
        f.insert(rng.randrange(len(f) + 1), b'1')
    elif kind == 2:
      f[1 + rng.randrange(N_INT)] = rng.choice(_BAD_INTS)
    elif kind == 3:
      f[1 + N_INT + rng.randrange(N_CAT)] = rng.choice(_BAD_CATS)
    elif kind == 4:
      f[0] = rng.choice(_BAD_LABELS)
    elif kind == 5:  # Blank and whitespace lines.
      out.append(rng.choice([b'', b' ', b'  \t', b'\t' * 39, b'\t' * 38,
                             b'\r', b'\r\n', b'\t']))
      continue
    elif kind == 6:  # Line ends.
      line = b'\t'.join(f)
      out.append(line + rng.choice([b'\r\n', b'\r', b'\n', b'\r\r\n']))
      continue
    elif kind == 7:  # A CR inside.
      line = b'\t'.join(f)
      cut = rng.randrange(1, len(line))
      out.append(line[:cut] + b'\r' + line[cut:])
      continue
    elif kind == 8:  # Quoted fields.
      i = rng.randrange(40)
      f[i] = b'"' + f[i] + b'"'
    elif kind == 9:  # Non-UTF-8, sometimes with a wrong field count too.
      line = b'\t'.join(f)
      if rng.random() < 0.5:
        out.append(line.decode().encode('utf-16'))
      else:
        i = rng.randrange(40)
        f[i] = f[i] + b'\xc3\x28'
        if rng.random() < 0.5:
          f.append(b'\xfe')
        out.append(b'\t'.join(f))
      continue
    elif kind == 10:  # Very long lines.
      i = 1 + rng.randrange(39)
      f[i] = rng.choice([b'1' * 200_000, b'0' * 300_000 + b'5',
                         b'f' * 100_000, b'9' * 100_000])
    elif kind == 11:  # Spaces around the line or fields.
      line = b'\t'.join(f)
      out.append(rng.choice([b' ' + line, line + b' ', line + b'\t']))
      continue
    elif kind == 12:  # The label dropped (39 fields in a labeled stream).
      f = f[1:]
    elif kind == 13:  # Ints at int32/int64 edges.
      f[1 + rng.randrange(N_INT)] = str(rng.choice(
          [2**31, 2**31 - 1, -2**31, -2**31 - 1, 2**63 - 1, -2**63, 2**63,
           -2**63 - 1, 10**30])).encode()
    elif kind == 14:  # Lower/upper/short hex (valid).
      f[1 + N_INT + rng.randrange(N_CAT)] = rng.choice(
          [b'A', b'ABCDEF01', b'00000000', b'7'])
    else:  # Two damages.
      f[1 + rng.randrange(N_INT)] = rng.choice(_BAD_INTS)
      f[1 + N_INT + rng.randrange(N_CAT)] = rng.choice(_BAD_CATS)
    out.append(b'\t'.join(f))
  return out


def _strip_end(line: bytes) -> bytes:
  if line[-2:] == b'\r\n':
    return line[:-2]
  if line[-1:] in (b'\n', b'\r'):
    return line[:-1]
  return line


def _int_value(field: bytes) -> int | None:
  """A decimal field's value, None if malformed or outside int64."""
  body = field[1:] if field[:1] == b'-' else field
  if not body or any(c not in DIGITS for c in body):
    return None
  significant = body.lstrip(b'0')
  if len(significant) > 19:
    return None
  value = int(significant or b'0')
  value = -value if field[:1] == b'-' else value
  return value if -2**63 <= value < 2**63 else None


def reference(line: bytes, labeled: bool = True, int32: bool = False):
  """('ok', label, ints, cats) with -1 for a missing hash, or ('bad', the
  first field at fault: 'label', 'I3', 'C7', or '' for the whole line)."""
  line = _strip_end(line)
  if not line or b'\r' in line or b'\n' in line or len(line) > (1 << 20):
    return ('bad', '')
  fields = line.split(b'\t')
  if len(fields) != (40 if labeled else 39):
    return ('bad', '')
  if all(not f for f in fields):
    return ('bad', '')
  label = None
  if labeled:
    if fields[0] != b'0' and fields[0] != b'1':
      return ('bad', 'label')
    label = fields[0][0] - ord('0')
    fields = fields[1:]
  ints = []
  for j in range(N_INT):
    if not fields[j]:
      ints.append(0)
      continue
    v = _int_value(fields[j])
    if v is None:
      return ('bad', f'I{j + 1}')
    ints.append(v)
  cats = []
  for j in range(N_CAT):
    s = fields[N_INT + j]
    if not s:
      cats.append(-1)
      continue
    if len(s) > 8 or any(c not in HEX for c in s):
      return ('bad', f'C{j + 1}')
    v = 0
    for c in s.lower():
      v = v * 16 + b'0123456789abcdef'.index(c)
    cats.append(v)
  # The export's int32 input, checked once the row is valid.
  for j, v in enumerate(ints):
    if int32 and not -2**31 <= v < 2**31:
      return ('bad', f'I{j + 1}')
  return ('ok', label, ints, cats)


def file_lines(data: bytes) -> list[bytes]:
  """A file's lines: ends at CRLF, LF or a bare CR (pyarrow's rule), by
  hand."""
  lines, i = [], 0
  while i < len(data):
    ends = [j for j in (data.find(b'\r', i), data.find(b'\n', i)) if j >= 0]
    if not ends:
      lines.append(data[i:])
      break
    j = min(ends)
    lines.append(data[i:j])
    i = j + (2 if data[j:j + 2] == b'\r\n' else 1)
  return lines
