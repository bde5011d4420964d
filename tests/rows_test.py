"""The shared row rules: scoring parser and training reader against a plain
reference on fuzzed lines; no malformed row scored, none moving another."""

import io
import os
import re

from absl.testing import absltest
import numpy as np

from dlrm_jax.serving import runtime as export_runtime
from dlrm_jax.data import criteo
from dlrm_jax.data import rows
from tests import row_fuzz

_LINES = row_fuzz.fuzzed_lines(1000, seed=0)


def _good_line(i=0):
  return b'\t'.join([b'1'] + [str(i + j).encode() for j in range(13)] +
                    [b'%08x' % (i * 26 + j) for j in range(26)])


class ScoringParserTest(absltest.TestCase):

  def check_against_reference(self, labeled):
    inputs, errors = export_runtime.parse_rows_checked(_LINES, labeled=labeled)
    self.assertLen(errors, len(_LINES))
    k = 0
    outcomes = {'ok': 0, 'bad': 0}
    for i, (line, err) in enumerate(zip(_LINES, errors)):
      want = row_fuzz.reference(line, labeled=True, int32=True)
      outcomes[want[0]] += 1
      if want[0] == 'ok':
        self.assertIsNone(err, f'line {i}: {line[:200]!r}')
        np.testing.assert_array_equal(inputs['int'][k], want[2])
        cats = np.array(want[3])
        np.testing.assert_array_equal(inputs['cat_present'][k], cats >= 0)
        np.testing.assert_array_equal(inputs['cat'][k],
                                      np.where(cats >= 0, cats, 0))
        k += 1
      else:
        # Never accepted; the error names the row and the field at fault.
        self.assertIsNotNone(err, f'accepted line {i}: {line[:200]!r}')
        self.assertTrue(err.startswith(f'row {i + 1}: '), err)
        if want[1]:
          self.assertRegex(err, rf'^row {i + 1}: {want[1]}\b')
        self.assertLess(len(err), 200)  # Long fields are cut.
    self.assertEqual(k, len(inputs['int']))
    # The generator makes both, in numbers.
    self.assertGreater(outcomes['ok'], 150)
    self.assertGreater(outcomes['bad'], 600)

  def test_fuzzed_lines_match_the_reference(self):
    self.check_against_reference(labeled=True)

  def test_inferred_layout_is_the_first_rows(self):
    self.assertEqual(row_fuzz.reference(_LINES[0])[0], 'ok')
    self.check_against_reference(labeled=None)

  def test_blank_lines_are_errors_and_move_no_row(self):
    lines = [_good_line(0), '', _good_line(2).decode(), '   ', _good_line(4)]
    inputs, errors = export_runtime.parse_rows_checked(lines)
    self.assertEqual(errors, [None, 'row 2: empty line', None,
                              'row 4: expected 40 fields, got 1', None])
    np.testing.assert_array_equal(inputs['int'][:, 0], [0, 2, 4])
    with self.assertRaisesRegex(export_runtime.RowError, 'row 2: empty line'):
      export_runtime.parse_rows(lines)

  def test_layout_mistakes(self):
    labeled, unlabeled = _good_line(1), _good_line(1)[2:]
    # A labeled row that lost a field is not taken as an unlabeled row.
    _, errors = export_runtime.parse_rows_checked([labeled, unlabeled])
    self.assertEqual(errors[1], 'row 2: expected 40 fields, got 39')
    inputs, errors = export_runtime.parse_rows_checked([unlabeled],
                                                       labeled=False)
    self.assertEqual(errors, [None])
    _, errors = export_runtime.parse_rows_checked([b'1\t2\t3'])
    self.assertRegex(errors[0], r'^row 1: expected 39 or 40 tab-separated')

  def test_score_lines_scores_the_others_in_order(self):

    class Fake:
      signature = {'batch_size': 4}
      calls = []

      def scores(self, a, b, c):
        self.calls.append(len(a))
        return a[:, 0].astype(np.float32)

    m = Fake()
    lines = [_good_line(i) for i in range(7)]
    lines[1] = b''
    lines[5] = lines[5].replace(b'\t5\t', b'\t5 \t', 1)
    out = export_runtime.score_lines(m, lines, first_row=11)
    self.assertEqual(out, [0.0, 'row 12: empty line', 2.0, 3.0, 4.0,
                           "row 16: I1 is not an integer: '5 '", 6.0])
    self.assertEqual(m.calls, [4, 4])  # 5 rows, padded to the fixed batch.

  def test_show_cuts_long_fields(self):
    self.assertEqual(rows.show(b'abc'), "'abc'")
    s = rows.show(b'9' * 5_000_000)
    self.assertEqual(s, repr('9' * 40) + '... (5000000 bytes)')
    self.assertEqual(rows.show(b'\xff'), repr('\\xff'))


class LinesTest(absltest.TestCase):

  def test_line_splitting_agrees_with_a_hand_split(self):
    data = b'\n'.join(_LINES) + b'\n'
    want = row_fuzz.file_lines(data)
    self.assertEqual(rows.split_lines(data), want)
    self.assertEqual(list(rows.iter_lines(io.BytesIO(data))), want)
    for d in (b'a\r\rb', b'\r\n\r\n', b'a\rb\r\nc\n\rd', b'x\r'):
      self.assertEqual(rows.split_lines(d), row_fuzz.file_lines(d), d)
      self.assertEqual(list(rows.iter_lines(io.BytesIO(d))),
                       row_fuzz.file_lines(d), d)


class TrainingReaderTest(absltest.TestCase):

  def test_fuzzed_file_matches_the_reference(self):
    data = b'\n'.join(_LINES) + b'\n'
    path = os.path.join(self.create_tempdir().full_path, 'fuzz.tsv')
    with open(path, 'wb') as f:
      f.write(data)
    report = criteo.BadLineReport(max_examples=10**6)
    chunks = list(criteo.read_criteo(path, bad_lines='skip', report=report))
    got = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    lines = row_fuzz.file_lines(data)
    want = [row_fuzz.reference(l) for l in lines]
    ok = [w for w in want if w[0] == 'ok']
    self.assertLen(got['int'], len(ok))
    np.testing.assert_array_equal(got['label'], [w[1] for w in ok])
    np.testing.assert_array_equal(got['int'], [w[2] for w in ok])
    np.testing.assert_array_equal(got['cat'], [w[3] for w in ok])
    # Every malformed line reported once, at its line, with its field.
    self.assertEqual(report.count, len(want) - len(ok))
    reported = {}
    for e in report.examples:
      m = re.match(r'^.*fuzz\.tsv:(\d+): (.*)$', e, re.S)
      reported[int(m.group(1))] = m.group(2)
    bad = {i + 1: w[1] for i, w in enumerate(want) if w[0] == 'bad'}
    self.assertEqual(set(reported), set(bad))
    for line, field in bad.items():
      if field:
        self.assertRegex(reported[line], rf'^{field}\b')
      self.assertLess(len(reported[line]), 200)

  def test_reader_and_scoring_parser_agree(self):
    lines = [l for l in row_fuzz.file_lines(b'\n'.join(_LINES))]
    for line in lines[:300]:
      want = row_fuzz.reference(line)
      try:
        label, ints, cats = rows.parse_line(line, labeled=True)
      except ValueError:
        self.assertEqual(want[0], 'bad', line[:200])
        continue
      self.assertEqual(('ok', label, ints, cats), want)


if __name__ == '__main__':
  absltest.main()
