"""The tabular source's text conversions (`table.encode`, `hash_strings`)
against Python.

`encode` casts a text column with Arrow first and sends to its rule only
what the cast cannot judge (see `dlrm_jax.data.table`); each value here is
encoded alone, inside a clean column (the cast path), beside a 'nan' (the
non-finite path) and beside junk (the rule's path), and must come out as
Python's `re` and `float` / `int` say, every time.
"""

import re

import numpy as np
import pyarrow as pa
from absl.testing import absltest

from dlrm_jax.data import table

_BLANK = ' \t\n\f\r'  # RE2's \s
_FLOAT = re.compile(
    rf'[{_BLANK}]*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?[{_BLANK}]*')
# The rule also takes a leading '+', which Arrow's cast of the trimmed text
# then refuses with an error of its own; INTS leaves it out.
_INT = re.compile(rf'[{_BLANK}]*-?[0-9]{{1,18}}[{_BLANK}]*')
_HEX = re.compile('[0-9a-fA-F]{1,16}')

FLOATS = ['0', '1', '-1', '+1', '1.', '.5', '-.5', '+.5', '007', '1e5', '1E5',
          '1e+5', '1e-5', '1.5e3', '1e500', '-1e500', '1e-500', ' 1', '1 ',
          '\t2.5\t', '', '.', '1e', 'e5', 'nan', 'NaN', '-nan', 'inf', '-inf',
          '+inf', 'Infinity', 'nan(1)', '0x10', '1_000', '1,5', '1d5',
          '1.2.3', '--1', '+-1', '\u0663', '\uff11', '1e5.0', '1' * 400]
INTS = ['0', '7', '-7', '-0', '0007', '1' * 18, '-' + '1' * 18, '1' * 19,
        '9223372036854775807', '-9223372036854775808', ' 12', '12 ', '',
        '-', '1.0', '1e3', '0x1f', '0X1F', '1-2', '--1', 'x', '\u0663']
HEXES = ['0', 'f', 'F', 'deadbeef', 'DEADBEEF', '0123456789abcdef',
         'ffffffffffffffff', '1' + 'f' * 16, '123456789', '00000000', '',
         'g', ' 1', '1 ', '0x1', '-1', '\u00e9', 'abcdefgh']


def fold(v: int) -> int:
  """`table.fold64` of one Python int."""
  v &= (1 << 64) - 1
  return (v ^ (v >> 32)) & 0xFFFFFFFF


def reference(text: str | None, kind: str) -> tuple[float, bool]:
  """`(value, bad)` of one value by the rule, in Python."""
  if kind == 'float':
    if text is None:
      return 0.0, False
    if not _FLOAT.fullmatch(text):
      return 0.0, True
    return float(text.strip(_BLANK)), False
  if text is None or not text:
    return -1, False
  if kind == 'int':
    if not _INT.fullmatch(text):
      return -1, True
    return fold(int(text.strip(_BLANK))), False
  if not _HEX.fullmatch(text):
    return -1, True
  return fold(int(text, 16)), False


class EncodeTest(absltest.TestCase):

  def check(self, kind: str, values: list[str], clean: str, junk: str):
    for v in values:
      for column in ([v], [clean, v, None, clean], [clean, 'nan', v, 'inf'],
                     [clean, junk, v, None]):
        got, bad, _ = table.encode(pa.array(column, pa.string()), kind)
        for i, text in enumerate(column):
          want_value, want_bad = reference(text, kind)
          with self.subTest(kind=kind, value=v, column=column, i=i):
            self.assertEqual(bool(bad[i]), want_bad)
            if kind == 'float':
              np.testing.assert_equal(got[i], want_value)
            else:
              self.assertEqual(int(got[i]), want_value)

  def test_float(self):
    self.check('float', FLOATS, '2.5', 'abc')

  def test_int(self):
    self.check('int', INTS, '12', 'abc')

  def test_hex(self):
    self.check('hex', HEXES, 'deadbeef', 'xyz')

  def test_columns_of_many_widths(self):
    rng = np.random.default_rng(0)
    widths = rng.integers(1, 17, 300)
    texts = [format(int(rng.integers(0, 1 << 62)), '016x')[-w:]
             for w in widths]
    for column in (texts, [t.zfill(8)[-8:] for t in texts],
                   [t[:8] if i % 3 else None for i, t in enumerate(texts)]):
      got, bad, _ = table.encode(pa.array(column, pa.string()), 'hex')
      self.assertFalse(bad.any())
      self.assertEqual(got.tolist(), [reference(t, 'hex')[0] for t in column])


  def test_hash_strings_of_one_few_and_many_lengths(self):
    rng = np.random.default_rng(1)

    def fnv(text: str) -> int:
      h = 2166136261
      for b in text.encode('utf-8'):
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
      return h

    def texts(lengths, letters='ab\u00e9\u6f22'):
      return [''.join(rng.choice(list(letters), int(k))) for k in lengths]

    for full in (texts([8] * 50, 'xyz'), texts(rng.choice([1, 3, 8], 50),
                                               'xyz'),
                 texts(rng.integers(0, 40, 200))):
      holed = [None if i % 7 == 3 else t for i, t in enumerate(full)]
      for arr in (pa.array(full, pa.string()), pa.array(holed, pa.string()),
                  pa.array(holed, pa.string()).slice(5)):
        want = [-1 if t is None else fnv(t) for t in arr.to_pylist()]
        self.assertEqual(table.hash_strings(arr).tolist(), want)


if __name__ == '__main__':
  absltest.main()
