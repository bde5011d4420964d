"""The Criteo text reader on the real samples and on malformed lines."""

import gzip
import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from dlrm_jax.data import criteo
from tests import shared_data

KAGGLE = 'kaggle_train_head_4000.tsv'
RANDOM = 'kaggle_train_random_1000.tsv'
TERABYTE = 'terabyte_day0_head_200.tsv'


def plain_parse(path, labeled=True):
  """The reference: a Python loop over the lines."""
  labels, ints, cats = [], [], []
  with open(path) as f:
    for line in f:
      fields = line.rstrip('\n').split('\t')
      if labeled:
        labels.append(float(fields[0]))
        fields = fields[1:]
      ints.append([int(x) if x else 0 for x in fields[:13]])
      cats.append([int(x, 16) if x else -1 for x in fields[13:]])
  return np.array(labels, np.float32), np.array(ints), np.array(cats)


def read_all(paths, **kw):
  chunks = list(criteo.read_criteo(paths, **kw))
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


class RealSamplesTest(parameterized.TestCase):

  @parameterized.parameters((KAGGLE, 4000), (RANDOM, 1000), (TERABYTE, 200))
  def test_matches_a_plain_loop(self, name, rows):
    path = shared_data.criteo_file(self, name)
    got = read_all([path], chunk_rows=333)
    labels, ints, cats = plain_parse(path)
    self.assertLen(got['label'], rows)
    self.assertEqual(got['int'].shape, (rows, 13))
    self.assertEqual(got['cat'].shape, (rows, 26))
    np.testing.assert_array_equal(got['label'], labels)
    np.testing.assert_array_equal(got['int'], ints)
    np.testing.assert_array_equal(got['cat'], cats)
    self.assertEqual(criteo.count_rows([path]), rows)

  def test_kaggle_head_facts(self):
    path = shared_data.criteo_file(self, KAGGLE)
    got = read_all([path])
    self.assertEqual(int(got['label'].sum()), 831)  # the README's count
    # Missing shares, against a plain count over the file's fields.
    lines = [l.rstrip('\n').split('\t') for l in open(path)]
    i12_missing = sum(1 for f in lines if f[12] == '') / len(lines)
    c22_missing = sum(1 for f in lines if f[14 + 21] == '') / len(lines)
    self.assertAlmostEqual(float(np.mean(got['cat'][:, 21] == -1)),
                           c22_missing)
    self.assertGreater(i12_missing, 0.5)
    self.assertTrue(((got['cat'] >= -1) & (got['cat'] < 2**32)).all())
    self.assertLess(got['int'][:, 1].min(), 0)  # I2 keeps negatives

  def test_chunking_skip_and_max_rows(self):
    path = shared_data.criteo_file(self, KAGGLE)
    whole = read_all([path], chunk_rows=1 << 20)
    chunks = list(criteo.read_criteo([path], chunk_rows=333))
    self.assertEqual([len(c['label']) for c in chunks[:-1]],
                     [333] * (len(chunks) - 1))
    part = read_all([path], skip_rows=1234, max_rows=1000, chunk_rows=100)
    np.testing.assert_array_equal(part['cat'], whole['cat'][1234:2234])

  def test_several_files_glob_list_and_comma(self):
    a = shared_data.criteo_file(self, KAGGLE)
    b = shared_data.criteo_file(self, RANDOM)
    want = np.concatenate([read_all([a])['cat'], read_all([b])['cat']])
    for spec in ([a, b], f'{a},{b}'):
      paths = criteo.expand_paths(spec)
      self.assertEqual(paths, [a, b])
      np.testing.assert_array_equal(read_all(paths, chunk_rows=777)['cat'],
                                    want)
    pattern = os.path.join(os.path.dirname(a), 'kaggle_train_*_[0-9]*[0-9].tsv')
    self.assertEqual(criteo.expand_paths(pattern), sorted([a, b]))

  def test_gzip_without_extension(self):
    path = shared_data.criteo_file(self, TERABYTE)
    tmp = os.path.join(self.create_tempdir().full_path, 'day_0')
    with open(path, 'rb') as src, gzip.open(tmp, 'wb') as dst:
      dst.write(src.read())
    np.testing.assert_array_equal(read_all([tmp])['cat'],
                                  read_all([path])['cat'])
    self.assertEqual(criteo.count_rows([tmp]), 200)

  def test_unlabeled_test_layout(self):
    path = shared_data.criteo_file(self, RANDOM)
    tmp = os.path.join(self.create_tempdir().full_path, 'test.txt')
    with open(path) as src, open(tmp, 'w') as dst:
      for line in src:
        dst.write(line.split('\t', 1)[1])
    got = read_all([tmp], labeled=False)
    self.assertNotIn('label', got)
    want = read_all([path])
    np.testing.assert_array_equal(got['int'], want['int'])
    np.testing.assert_array_equal(got['cat'], want['cat'])
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                r'test\.txt:1: expected 40 .* got 39'):
      read_all([tmp])


class MalformedTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    good = open(shared_data.criteo_file(self, KAGGLE)).read().splitlines()
    self.good = good[:12]
    f = good[2].split('\t')
    bad = {}
    bad[4] = '\t'.join(f + ['x'])
    bad[6] = '\t'.join(f[:-1])
    bad[8] = ''
    g = list(f); g[0] = '2'; bad[10] = '\t'.join(g)
    g = list(f); g[5] = '3.5'; bad[12] = '\t'.join(g)
    g = list(f); g[20] = 'zz12'; bad[13] = '\t'.join(g)
    g = list(f); g[3] = '99999999999999999999'; bad[14] = '\t'.join(g)
    g = list(f); g[16] = '123456789'; bad[17] = '\t'.join(g)
    lines, it = [], iter(self.good)
    for n in range(1, len(self.good) + len(bad) + 1):
      lines.append(bad[n] if n in bad else next(it))
    self.bad = bad
    d = self.create_tempdir().full_path
    self.path = os.path.join(d, 'mixed.tsv')
    with open(self.path, 'w') as out:
      out.write('\n'.join(lines) + '\n')
    self.good_path = os.path.join(d, 'good.tsv')
    with open(self.good_path, 'w') as out:
      out.write('\n'.join(self.good) + '\n')

  def test_error_policy_names_file_and_first_line(self):
    with self.assertRaisesRegex(
        criteo.MalformedLineError,
        r'mixed\.tsv:4: expected 40 tab-separated fields, got 41'):
      read_all([self.path])

  def test_error_policy_value_errors(self):
    lines = open(self.path).read().splitlines()
    lines = [l for n, l in enumerate(lines, 1) if n not in (4, 6, 8, 10)]
    with open(self.path, 'w') as out:
      out.write('\n'.join(lines) + '\n')
    # Line 12 of the original is now line 8.
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                r"mixed\.tsv:8: I5 is not an integer: '3\.5'"):
      read_all([self.path])

  def test_skip_policy_keeps_good_rows_and_reports_each_line(self):
    report = criteo.BadLineReport()
    got = read_all([self.path], bad_lines='skip', report=report, chunk_rows=5)
    want = read_all([self.good_path])
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
    self.assertEqual(report.count, len(self.bad))
    lines = [int(e.split(':')[1]) for e in report.examples]
    self.assertEqual(lines, sorted(self.bad))
    text = '\n'.join(report.examples)
    for pattern in ('got 41', 'got 39', ':8: empty line',
                    "label must be 0 or 1, got '2'",
                    "I5 is not an integer: '3.5'",
                    "C7 is not 8 hex digits: 'zz12'",
                    "I3 is not an integer: '99999999999999999999'",
                    "C3 is not 8 hex digits: '123456789'"):
      self.assertIn(pattern, text)
    self.assertIn('8 malformed line(s) skipped', report.summary())

  def test_bad_policy_name(self):
    with self.assertRaisesRegex(ValueError, r"data\.bad_lines \('ignore'\)"):
      read_all([self.path], bad_lines='ignore')


class PathsTest(absltest.TestCase):

  def test_missing_file_and_empty_glob(self):
    with self.assertRaisesRegex(ValueError,
                                r"config\.data\.train_path: the file"
                                r" '/nonexistent/train\.txt' does not exist"):
      criteo.expand_paths('/nonexistent/train.txt',
                          field='config.data.train_path')
    with self.assertRaisesRegex(ValueError, 'matches no file'):
      criteo.expand_paths(os.path.join(self.create_tempdir().full_path,
                                       'day_*'))


if __name__ == '__main__':
  absltest.main()
