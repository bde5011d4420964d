"""Tests of the Criteo text reader, on the real samples and on malformed lines.

The samples are read from `$DLRM_SHARED_DIR/data/criteo/` or else from
`<repo>/../shared/data/criteo/`; they are never copied into the repository.
Every expected value comes from a plain Python loop over the file's lines.
"""

from __future__ import annotations

import gzip
import os
from unittest import mock

from absl.testing import absltest
import numpy as np

from dlrm_jax.data import criteo
from tests import shared_data

KAGGLE_HEAD = 'kaggle_train_head_4000.tsv'
KAGGLE_RANDOM = 'kaggle_train_random_1000.tsv'
TERABYTE_HEAD = 'terabyte_day0_head_200.tsv'
SAMPLES = {KAGGLE_HEAD: 4000, KAGGLE_RANDOM: 1000, TERABYTE_HEAD: 200}


def _lines(path: str) -> list[str]:
  with open(path) as f:
    return f.read().splitlines()


def _plain_parse(lines: list[str], labeled: bool = True):
  """The reference: (labels, ints, cats) by a plain loop over the lines."""
  labels, ints, cats = [], [], []
  for line in lines:
    fields = line.split('\t')
    assert len(fields) == 40 if labeled else 39, line
    if labeled:
      labels.append(float(fields[0]))
      fields = fields[1:]
    ints.append([int(x) if x else 0 for x in fields[:13]])
    cats.append([int(x, 16) if x else -1 for x in fields[13:]])
  return (np.array(labels, np.float32),
          np.array(ints, np.int64).reshape(-1, 13),
          np.array(cats, np.int64).reshape(-1, 26))


def _read_all(paths, **kwargs) -> dict[str, np.ndarray]:
  chunks = list(criteo.read_criteo(paths, **kwargs))
  if not chunks:
    return {}
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _write(path: str, lines: list[str], newline_at_end: bool = True) -> str:
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + ('\n' if newline_at_end else ''))
  return path


class _SampleTestCase(absltest.TestCase):
  """Finds the samples, or skips saying where it looked."""

  def sample(self, name: str) -> str:
    return shared_data.criteo_file(self, name)

  def assert_rows_equal(self, got, want):
    self.assertEqual(sorted(got), sorted(want))
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


class RealSamplesTest(_SampleTestCase):

  def test_values_match_a_plain_loop(self):
    for name, rows in SAMPLES.items():
      with self.subTest(name):
        path = self.sample(name)
        got = _read_all([path])
        labels, ints, cats = _plain_parse(_lines(path))
        self.assertLen(labels, rows)
        self.assertEqual(got['label'].shape, (rows,))
        self.assertEqual(got['int'].shape, (rows, criteo.NUM_INT))
        self.assertEqual(got['cat'].shape, (rows, criteo.NUM_CAT))
        self.assertEqual(got['label'].dtype, np.float32)
        self.assertEqual(got['int'].dtype, np.int64)
        self.assertEqual(got['cat'].dtype, np.int64)
        self.assertEqual(set(np.unique(got['label'])), {0.0, 1.0})
        np.testing.assert_array_equal(got['label'], labels)
        np.testing.assert_array_equal(got['int'], ints)
        np.testing.assert_array_equal(got['cat'], cats)
        self.assertTrue(((got['cat'] >= -1) & (got['cat'] < 2**32)).all())
        self.assertEqual(criteo.count_rows([path]), rows)

  def test_kaggle_head_positives_and_missing_shares(self):
    path = self.sample(KAGGLE_HEAD)
    got = _read_all([path])
    self.assertEqual(int(got['label'].sum()), 831)  # As the README says.
    fields = [line.split('\t') for line in _lines(path)]
    # I12 (field 13): missing is written as 0, as is a real 0.
    i12_missing = np.mean([f[12] == '' for f in fields])
    i12_zero = np.mean([f[12] == '' or int(f[12]) == 0 for f in fields])
    self.assertBetween(i12_missing, 0.7, 0.85)  # README: about 78%.
    self.assertAlmostEqual(np.mean(got['int'][:, 11] == 0), i12_zero)
    # Every categorical column: missing is -1, and only missing is.
    for c in range(criteo.NUM_CAT):
      missing = np.mean([f[14 + c] == '' for f in fields])
      self.assertAlmostEqual(np.mean(got['cat'][:, c] == -1), missing,
                             msg=f'C{c + 1}')
    self.assertBetween(np.mean(got['cat'][:, 21] == -1), 0.7, 0.9)  # C22
    self.assertLess(got['int'][:, 1].min(), 0)  # I2 keeps its negatives.

  def test_terabyte_missing_shares(self):
    path = self.sample(TERABYTE_HEAD)
    got = _read_all([path])
    self.assertEqual(int(got['label'].sum()), 9)
    fields = [line.split('\t') for line in _lines(path)]
    for c in (13, 15, 16, 22):  # C14, C16, C17, C23: about 47% missing.
      missing = np.mean([f[14 + c] == '' for f in fields])
      self.assertBetween(missing, 0.3, 0.65)
      self.assertAlmostEqual(np.mean(got['cat'][:, c] == -1), missing)

  def test_chunks(self):
    path = self.sample(KAGGLE_HEAD)
    whole = _read_all([path], chunk_rows=1 << 20)
    chunks = list(criteo.read_criteo([path], chunk_rows=333))
    self.assertEqual([len(c['label']) for c in chunks],
                     [333] * 12 + [4000 - 12 * 333])
    for c in chunks:
      self.assertEqual(c['int'].shape[0], c['cat'].shape[0])
    self.assert_rows_equal(
        {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}, whole)

  def test_chunks_span_files(self):
    a, b = self.sample(KAGGLE_RANDOM), self.sample(TERABYTE_HEAD)
    chunks = list(criteo.read_criteo([a, b], chunk_rows=333))
    self.assertEqual([len(c['label']) for c in chunks], [333] * 3 + [201])
    got = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    _, _, cats_a = _plain_parse(_lines(a))
    _, _, cats_b = _plain_parse(_lines(b))
    np.testing.assert_array_equal(got['cat'], np.concatenate([cats_a, cats_b]))

  def test_skip_rows_and_max_rows(self):
    a, b = self.sample(KAGGLE_HEAD), self.sample(KAGGLE_RANDOM)
    whole = _read_all([a, b])
    for skip, limit in ((1234, 1000), (0, 1), (3999, 2), (3990, 500),
                        (4000, None), (4500, 10_000), (0, 5000)):
      with self.subTest(skip=skip, limit=limit):
        got = _read_all([a, b], skip_rows=skip, max_rows=limit, chunk_rows=97)
        stop = None if limit is None else skip + limit
        self.assert_rows_equal(got, {k: v[skip:stop] for k, v in whole.items()})
    self.assertEqual(_read_all([a, b], max_rows=0), {})
    self.assertEqual(_read_all([a, b], skip_rows=5000), {})
    self.assertEqual(_read_all([a, b], skip_rows=6000, max_rows=5), {})

  def test_glob_list_and_comma_separated_string(self):
    a, b = self.sample(KAGGLE_HEAD), self.sample(KAGGLE_RANDOM)
    folder = os.path.dirname(a)
    # The provenance file also starts with kaggle_train_; it must not match.
    pattern = os.path.join(folder, 'kaggle_train_*0.tsv')
    self.assertEqual(criteo.expand_paths(pattern), [a, b])
    self.assertEqual(criteo.expand_paths([b, a]), [b, a])
    self.assertEqual(criteo.expand_paths(f'{b}, {a}'), [b, a])
    self.assertEqual(criteo.expand_paths((f'{b},{a}', pattern, a)), [b, a])
    want = _read_all([a, b])
    self.assert_rows_equal(_read_all(criteo.expand_paths(pattern)), want)
    self.assert_rows_equal(_read_all(criteo.expand_paths(f'{a},{b}')), want)

  def test_glob_is_sorted(self):
    a, b = self.sample(KAGGLE_RANDOM), self.sample(TERABYTE_HEAD)
    tmp = self.create_tempdir()
    lines_a, lines_b = _lines(a), _lines(b)
    paths = [_write(os.path.join(tmp.full_path, f'part-{i:02d}'), part)
             for i, part in enumerate((lines_a[:500], lines_b, lines_a[500:]))]
    self.assertEqual(
        criteo.expand_paths(os.path.join(tmp.full_path, 'part-*')), paths)
    _, _, cats = _plain_parse(lines_a[:500] + lines_b + lines_a[500:])
    np.testing.assert_array_equal(
        _read_all(criteo.expand_paths(tmp.full_path + '/part-*'))['cat'], cats)

  def test_gzip_is_detected_by_content(self):
    path = self.sample(KAGGLE_HEAD)
    tmp = self.create_tempdir()
    gz = os.path.join(tmp.full_path, 'day_0')  # No extension, as in Terabyte.
    with open(path, 'rb') as src, gzip.open(gz, 'wb') as dst:
      dst.write(src.read())
    with open(gz, 'rb') as f:
      self.assertEqual(f.read(2), b'\x1f\x8b')
    plain = _read_all([path])
    self.assert_rows_equal(_read_all([gz], chunk_rows=1000), plain)
    self.assertEqual(criteo.count_rows([gz]), 4000)
    # Mixed with a plain file, with skip_rows across the boundary.
    both = _read_all([gz, path], skip_rows=3900, max_rows=200)
    self.assert_rows_equal(
        both,
        {k: np.concatenate([v[3900:], v[:100]]) for k, v in plain.items()})

  def test_unlabeled_layout(self):
    path = self.sample(KAGGLE_RANDOM)
    lines = _lines(path)
    tmp = self.create_tempdir()
    test_txt = _write(os.path.join(tmp.full_path, 'test.txt'),
                      [line.split('\t', 1)[1] for line in lines])
    got = _read_all([test_txt], labeled=False, chunk_rows=300)
    _, ints, cats = _plain_parse(lines)
    self.assertEqual(sorted(got), ['cat', 'int'])
    np.testing.assert_array_equal(got['int'], ints)
    np.testing.assert_array_equal(got['cat'], cats)
    self.assertEqual(criteo.count_rows([test_txt]), 1000)
    with_empty = _write(os.path.join(tmp.full_path, 'test_empty.txt'),
                        [line.split('\t', 1)[1] for line in lines[:9]] + [''])
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                r'test_empty\.txt:10: empty line'):
      _read_all([with_empty], labeled=False)
    # Each layout read as the other is malformed from line 1.
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                r'test\.txt:1: expected 40 fields, got 39'):
      _read_all([test_txt])
    with self.assertRaisesRegex(
        criteo.MalformedLineError,
        rf'{KAGGLE_RANDOM}:1: expected 39 fields, got 40'):
      _read_all([path], labeled=False)

  def test_count_rows(self):
    paths = [self.sample(name) for name in SAMPLES]
    self.assertEqual(criteo.count_rows(paths), sum(SAMPLES.values()))
    tmp = self.create_tempdir()
    lines = _lines(paths[2])[:7]
    no_newline = _write(os.path.join(tmp.full_path, 'a'), lines,
                        newline_at_end=False)
    self.assertEqual(criteo.count_rows([no_newline]), 7)
    self.assertLen(_read_all([no_newline])['label'], 7)
    empty = tmp.create_file('empty', '').full_path
    self.assertEqual(criteo.count_rows([empty]), 0)
    self.assertEqual(_read_all([empty]), {})
    self.assertEqual(criteo.count_rows(no_newline), 7)  # A single path.


class ValuesTest(_SampleTestCase):
  """Edge values, written into real rows."""

  def test_hex_and_int_edge_values(self):
    row = _lines(self.sample(KAGGLE_HEAD))[0].split('\t')
    cases = [  # (I1, I2, C1, C2)
        ('0', '-2', 'ffffffff', '00000000'),
        ('-9223372036854775808', '9223372036854775807', 'ABCDEF01', 'aBc'),
        ('007', '', '1', ''),
        ('', '-0', '0000001f', '7'),
    ]
    lines = []
    for i1, i2, c1, c2 in cases:
      fields = list(row)
      fields[1], fields[2], fields[14], fields[15] = i1, i2, c1, c2
      lines.append('\t'.join(fields))
    tmp = self.create_tempdir()
    got = _read_all([_write(os.path.join(tmp.full_path, 'x.tsv'), lines)])
    np.testing.assert_array_equal(
        got['int'][:, :2],
        [[0, -2], [-2**63, 2**63 - 1], [7, 0], [0, 0]])
    np.testing.assert_array_equal(
        got['cat'][:, :2],
        [[2**32 - 1, 0], [0xabcdef01, 0xabc], [1, -1], [31, 7]])
    _, ints, cats = _plain_parse(lines)
    np.testing.assert_array_equal(got['int'], ints)
    np.testing.assert_array_equal(got['cat'], cats)


def _bad_lines(good: list[str]) -> list[tuple[str, str, str]]:
  """(kind, bad line, expected reason) built from real rows."""

  def set_field(line: str, index: int, value: str) -> str:
    fields = line.split('\t')
    fields[index] = value
    return '\t'.join(fields)

  return [
      ('41 fields', good[0] + '\t1', 'expected 40 fields, got 41'),
      ('39 fields', good[1].split('\t', 1)[1], 'expected 40 fields, got 39'),
      ('empty line', '', 'empty line, or every field empty'),
      ('label 2', set_field(good[2], 0, '2'), "label must be 0 or 1, got '2'"),
      ('float int', set_field(good[3], 5, '3.5'),
       "I5 is not an integer: '3.5'"),
      ('text int', set_field(good[4], 9, 'abc'),
       "I9 is not an integer: 'abc'"),
      ('hex int', set_field(good[5], 1, '0x1f'),
       "I1 is not an integer: '0x1f'"),
      ('bare minus', set_field(good[6], 2, '-'), "I2 is not an integer: '-'"),
      ('bad hex', set_field(good[7], 16, 'zz12'),
       "C3 is not 1 to 8 hex digits: 'zz12'"),
      ('9 hex digits', set_field(good[8], 39, '123456789'),
       "C26 is not 1 to 8 hex digits: '123456789'"),
      ('short bad hex', set_field(good[9], 20, 'zz'),
       "C7 is not 1 to 8 hex digits: 'zz'"),
      ('overflow', set_field(good[10], 13, '9223372036854775808'),
       "I13 does not fit in int64: '9223372036854775808'"),
      ('negative overflow', set_field(good[11], 7, '-99999999999999999999'),
       "I7 does not fit in int64: '-99999999999999999999'"),
      ('no label', set_field(good[12], 0, ''), "label must be 0 or 1, got ''"),
      # A field-count error after value errors (reports must stay in order).
      ('2 fields', '1\t2', 'expected 40 fields, got 2'),
  ]


class MalformedLinesTest(_SampleTestCase):

  def setUp(self):
    super().setUp()
    self.good = _lines(self.sample(KAGGLE_HEAD))[:600]
    self.tmp = self.create_tempdir()

  def _mixed(self, gap: int = 37):
    """A file of good rows with every kind of bad line in between.

    Returns:
      (path, good lines in order, [(line number, reason)] of the bad lines).
    """
    lines, good, bad = [], [], []
    pos = 0
    for _, line, reason in _bad_lines(self.good):
      for g in self.good[pos:pos + gap]:
        lines.append(g)
        good.append(g)
      pos += gap
      lines.append(line)
      bad.append((len(lines), reason))
    lines += self.good[pos:]
    good += self.good[pos:]
    path = _write(os.path.join(self.tmp.full_path, f'mixed_{gap}.tsv'), lines)
    return path, good, bad

  def test_error_names_file_line_and_reason(self):
    for kind, line, reason in _bad_lines(self.good):
      for at in (0, 1, 150):
        with self.subTest(kind=kind, at=at):
          lines = self.good[:at] + [line] + self.good[at:300]
          path = _write(os.path.join(self.tmp.full_path, 'one.tsv'), lines)
          with self.assertRaises(criteo.MalformedLineError) as e:
            _read_all([path])
          self.assertEqual(str(e.exception), f'{path}:{at + 1}: {reason}')
          self.assertIsInstance(e.exception, ValueError)

  def test_error_reports_the_first_bad_line(self):
    path, _, bad = self._mixed()
    with self.assertRaises(criteo.MalformedLineError) as e:
      _read_all([path])
    self.assertEqual(str(e.exception), f'{path}:{bad[0][0]}: {bad[0][1]}')
    # Bad lines among the rows passed over by skip_rows were met by the read
    # that got there: the first one after the first row returned is raised.
    skip = 300
    first_kept_line = skip + 1 + sum(1 for line, _ in bad if line <= skip + 1)
    after = [(line, reason) for line, reason in bad if line > first_kept_line]
    with self.assertRaises(criteo.MalformedLineError) as e:
      _read_all([path], skip_rows=skip, chunk_rows=50)
    self.assertEqual(str(e.exception), f'{path}:{after[0][0]}: {after[0][1]}')

  def test_skip_drops_exactly_the_bad_lines(self):
    for gap in (37, 1, 0):
      with self.subTest(gap=gap):
        path, good, bad = self._mixed(gap)
        report = criteo.BadLineReport(max_examples=100)
        got = _read_all([path], bad_lines='skip', report=report, chunk_rows=64)
        want = _read_all(
            [_write(os.path.join(self.tmp.full_path, 'good.tsv'), good)])
        self.assert_rows_equal(got, want)
        self.assertEqual(report.count, len(bad))
        self.assertEqual(report.examples,
                         [f'{path}:{line}: {reason}' for line, reason in bad])

  def test_line_numbers_across_blocks(self):
    # Small pyarrow blocks: bad lines fall in many different blocks.
    path, good, bad = self._mixed()
    with mock.patch.object(criteo, '_BLOCK_BYTES', 3000):
      report = criteo.BadLineReport(max_examples=100)
      got = _read_all([path], bad_lines='skip', report=report, chunk_rows=100)
      self.assertEqual(report.examples,
                       [f'{path}:{line}: {reason}' for line, reason in bad])
      labels, ints, cats = _plain_parse(good)
      np.testing.assert_array_equal(got['label'], labels)
      np.testing.assert_array_equal(got['int'], ints)
      np.testing.assert_array_equal(got['cat'], cats)
      # Under 'error', each bad line in turn as the first one.
      all_lines, good_set = _lines(path), set(good)
      for line, reason in bad:
        before = [l for l in all_lines[:line - 1] if l in good_set]
        cut = _write(os.path.join(self.tmp.full_path, 'cut.tsv'),
                     before + all_lines[line - 1:])
        with self.assertRaises(criteo.MalformedLineError) as e:
          _read_all([cut])
        self.assertEqual(str(e.exception), f'{cut}:{len(before) + 1}: {reason}')

  def test_skip_a_file_of_the_other_layout(self):
    lines = [line.split('\t', 1)[1] for line in self.good]
    path = _write(os.path.join(self.tmp.full_path, 'test.txt'),
                  lines[:300] + self.good[:3] + lines[300:] + ['1\t2'] * 2)
    with mock.patch.object(criteo, '_BLOCK_BYTES', 5000):
      report = criteo.BadLineReport(max_examples=5)
      got = _read_all([path], bad_lines='skip', report=report, chunk_rows=2)
    self.assert_rows_equal(got, _read_all(
        [_write(os.path.join(self.tmp.full_path, 'g.tsv'), self.good[:3])]))
    self.assertEqual(report.count, 602)
    self.assertEqual(report.examples, [
        f'{path}:{i}: expected 40 fields, got 39' for i in range(1, 6)])
    report = criteo.BadLineReport(max_examples=1000)
    _read_all([path], bad_lines='skip', report=report)
    self.assertEqual(
        report.examples,
        [f'{path}:{i}: expected 40 fields, got 39' for i in range(1, 301)] +
        [f'{path}:{i}: expected 40 fields, got 39' for i in range(304, 604)] +
        [f'{path}:{i}: expected 40 fields, got 2' for i in (604, 605)])

  def test_skip_rows_and_max_rows_count_valid_rows(self):
    path, good, bad = self._mixed()
    want = _read_all([_write(os.path.join(self.tmp.full_path, 'g.tsv'), good)])
    report = criteo.BadLineReport(max_examples=100)
    got = _read_all([path], bad_lines='skip', skip_rows=100, max_rows=300,
                    report=report)
    self.assert_rows_equal(got, {k: v[100:400] for k, v in want.items()})
    # Only the bad lines between the first and the last row returned count.
    bad_lines = {line for line, _ in bad}
    good_lines = [n for n in range(1, len(good) + len(bad) + 1)
                  if n not in bad_lines]
    first, last = good_lines[100], good_lines[399]
    want_lines = [n for n in sorted(bad_lines) if first < n < last]
    self.assertNotEmpty(want_lines)
    self.assertEqual(report.count, len(want_lines))
    self.assertEqual(
        [int(e[len(path) + 1:].split(':')[0]) for e in report.examples],
        want_lines)
    # Rows before the first bad line can be read under 'error'.
    first_bad = bad[0][0]
    got = _read_all([path], max_rows=first_bad - 1)
    self.assert_rows_equal(
        got, {k: v[:first_bad - 1] for k, v in want.items()})
    # Lines after the last row are not checked; the lines before it are.
    for max_rows, count in ((37, 0), (38, 1), (74, 1), (75, 2)):
      report = criteo.BadLineReport()
      _read_all([path], bad_lines='skip', report=report, max_rows=max_rows)
      self.assertEqual(report.count, count, msg=f'max_rows={max_rows}')

  def test_bad_last_line_without_newline(self):
    lines = self.good[:5] + ['1\t2']
    path = _write(os.path.join(self.tmp.full_path, 'tail.tsv'), lines,
                  newline_at_end=False)
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                r'tail\.tsv:6: expected 40 fields, got 2'):
      _read_all([path])
    report = criteo.BadLineReport()
    self.assertLen(_read_all([path], bad_lines='skip', report=report)['int'], 5)
    self.assertEqual(report.count, 1)

  def test_gzip_bad_line(self):
    lines = self.good[:50] + ['0\tx'] + self.good[50:100]
    path = os.path.join(self.tmp.full_path, 'day_1')
    with gzip.open(path, 'wt') as f:
      f.write('\n'.join(lines) + '\n')
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                r'day_1:51: expected 40 fields, got 2'):
      _read_all([path])

  def test_report_summary(self):
    report = criteo.BadLineReport(max_examples=2)
    self.assertEqual(report.summary(), 'no malformed lines')
    report.add('a.tsv', 7, 'expected 40 fields, got 39')
    report.add('a.tsv', 9, 'empty line')
    report.add('b.tsv', 1, 'label must be 0 or 1')
    self.assertEqual(report.count, 3)
    self.assertEqual(report.examples, ['a.tsv:7: expected 40 fields, got 39',
                                       'a.tsv:9: empty line'])
    self.assertEqual(
        report.summary(),
        '3 malformed lines skipped; first: a.tsv:7: expected 40 fields, got'
        ' 39; a.tsv:9: empty line; ...')

  def test_bad_lines_policy_is_checked(self):
    with self.assertRaisesRegex(ValueError, r"data\.bad_lines.*'warn'"):
      next(criteo.read_criteo([self.sample(KAGGLE_HEAD)], bad_lines='warn'))


class ExpandPathsTest(absltest.TestCase):

  def test_missing_file(self):
    tmp = self.create_tempdir()
    missing = os.path.join(tmp.full_path, 'nope.tsv')
    with self.assertRaises(ValueError) as e:
      criteo.expand_paths(missing, field='config.data.train_path')
    self.assertNotIsInstance(e.exception, FileNotFoundError)
    self.assertIn('config.data.train_path', str(e.exception))
    self.assertIn(missing, str(e.exception))

  def test_glob_matching_nothing(self):
    tmp = self.create_tempdir()
    tmp.create_file('day_0', 'x')
    pattern = os.path.join(tmp.full_path, 'part-*')
    with self.assertRaises(ValueError) as e:
      criteo.expand_paths([os.path.join(tmp.full_path, 'day_0'), pattern],
                          field='config.data.eval_path')
    self.assertIn('config.data.eval_path', str(e.exception))
    self.assertIn(pattern, str(e.exception))

  def test_directory_and_empty_spec(self):
    tmp = self.create_tempdir()
    with self.assertRaisesRegex(ValueError, 'data.train_path'):
      criteo.expand_paths(tmp.full_path)
    with self.assertRaisesRegex(ValueError, 'data.train_path'):
      criteo.expand_paths(' , ')
    with self.assertRaisesRegex(ValueError, 'data.train_path'):
      criteo.expand_paths([])

  def test_order_and_duplicates(self):
    tmp = self.create_tempdir()
    paths = [tmp.create_file(name, 'x').full_path
             for name in ('b-2', 'b-1', 'a')]
    self.assertEqual(
        criteo.expand_paths([paths[2], os.path.join(tmp.full_path, 'b-*'),
                             paths[1]]),
        [paths[2], paths[1], paths[0]])


if __name__ == '__main__':
  absltest.main()
