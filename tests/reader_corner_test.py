"""Corner cases of the Criteo text reader: no valid rows, the eval split of
skipped lines, non-UTF-8, huge ints, bare CRs, damaged gzip, long fields."""

import gzip
import os

from absl.testing import absltest
import numpy as np

from dlrm_jax.config import build as config_lib
from dlrm_jax.data import criteo
from dlrm_jax.data import inputs
from dlrm_jax.data import pipeline
from tests import shared_data
from tests import train_test


class ReaderCornerTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.lines = None

  def good_lines(self, n=100):
    path = shared_data.criteo_file(self, 'kaggle_train_random_1000.tsv')
    return open(path, 'rb').read().splitlines()[:n]

  def write(self, data: bytes, name='train.txt'):
    path = os.path.join(self.create_tempdir().full_path, name)
    with open(path, 'wb') as f:
      f.write(data)
    return path

  def read_all(self, path, **kw):
    chunks = list(criteo.read_criteo(path, **kw))
    return sum(len(c['int']) for c in chunks)

  def test_no_valid_rows_under_skip_is_an_error(self):
    for data in (b'\n' * 1000, '\t'.join(['1'] * 40).encode('utf-16') * 50):
      path = self.write(data)
      config = train_test.tiny_config(**{'data.train_path': path,
                                         'data.bad_lines': 'skip',
                                         'data.eval_fraction': 0.0})
      with self.assertRaisesRegex(ValueError, 'fewer rows than one batch'):
        inputs.make_data(config_lib.resolve_data(config))

    class Empty:  # Counted rows that are not there: no endless loop.
      num_rows, description, report = 512, 'empty', criteo.BadLineReport()

      def iter_rows(self, offset):
        del offset
        return iter(())

    batches = pipeline.TrainBatches(Empty(), lambda b: b, 128)
    with self.assertRaisesRegex(ValueError,
                                'gave not one batch of 128 valid rows in'
                                ' epoch 0'):
      next(batches.iterate())

  def test_eval_split_is_of_valid_rows(self):
    good = self.good_lines(1000)
    lines = []
    for i, line in enumerate(good):
      lines.append(line)
      if i < 600 and i % 2:
        lines.append(b'1\t2\t3')  # 300 malformed lines in the train part.
    path = self.write(b'\n'.join(lines) + b'\n')
    config = train_test.tiny_config(**{'data.train_path': path,
                                       'data.bad_lines': 'skip',
                                       'data.eval_fraction': 0.2})
    data = inputs.make_data(config_lib.resolve_data(config))
    self.assertEqual(data.eval.source.num_rows, 200)
    self.assertEqual(sum(n for _, n in data.eval), 200)
    self.assertEqual(data.train.source.num_rows, 800)

  def test_non_utf8_line_is_reported_at_its_line_and_skippable(self):
    lines = self.good_lines(100)
    lines[59] = lines[59] + b'\t\xe9\xff'  # 41 fields, not UTF-8.
    lines[79] = lines[79].decode().encode('utf-16')
    path = self.write(b'\n'.join(lines) + b'\n')
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                r'train\.txt:60: expected 40 fields, got 41'):
      self.read_all(path)
    report = criteo.BadLineReport()
    self.assertEqual(self.read_all(path, bad_lines='skip', report=report), 98)
    self.assertEqual(report.count, 2)
    self.assertRegex(report.examples[1], r'train\.txt:80: ')

  def test_huge_int_names_file_and_line_and_is_cut(self):
    lines = self.good_lines(10)
    fields = lines[6].split(b'\t')
    fields[3] = b'9' * 100_000
    lines[6] = b'\t'.join(fields)
    path = self.write(b'\n'.join(lines) + b'\n')
    with self.assertRaises(criteo.MalformedLineError) as e:
      self.read_all(path)
    self.assertEqual(
        str(e.exception), f'{path}:7: I3 does not fit in int64: '
        + repr('9' * 40) + '... (100000 bytes)')
    fields[3] = b'0' * 100_000 + b'42'  # Leading zeros: a valid 42.
    lines[6] = b'\t'.join(fields)
    path = self.write(b'\n'.join(lines) + b'\n')
    rows = list(criteo.read_criteo(path))[0]
    self.assertEqual(rows['int'][6, 2], 42)

  def test_long_field_is_cut_in_the_message(self):
    lines = self.good_lines(10)
    fields = lines[2].split(b'\t')
    fields[20] = b'z' * 500_000
    lines[2] = b'\t'.join(fields)
    path = self.write(b'\n'.join(lines) + b'\n')
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                r'train\.txt:3: C7 is not 1 to 8 hex digits:'
                                r" 'z{40}'\.\.\. \(500000 bytes\)$"):
      self.read_all(path)

  def test_lines_longer_than_the_limit_are_named_and_skippable(self):
    lines = self.good_lines(60)
    for at, size, end in ((9, 9 << 20, b'\n'), (29, (1 << 20) + 1, b'\r\n'),
                          (49, 5 << 20, b'\r')):
      lines[at] = b'1\t' + b'7' * size  # Past pyarrow's block for 9 MiB.
    data = b''.join(l + (b'\r\n' if i == 29 else b'\r' if i == 49 else
                          b'\n') for i, l in enumerate(lines))
    path = self.write(data)
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                rf'^{path}:10: line longer than 1048576'
                                ' bytes$'):
      self.read_all(path)
    report = criteo.BadLineReport()
    chunks = list(criteo.read_criteo(path, bad_lines='skip', report=report))
    self.assertEqual(sum(len(c['int']) for c in chunks), 57)
    self.assertEqual([e.split(':', 1)[1] for e in report.examples],
                     [f'{n}: line longer than 1048576 bytes'
                      for n in (10, 30, 50)])
    keep = [l for i, l in enumerate(lines) if i not in (9, 29, 49)]
    want = list(criteo.read_criteo(self.write(b'\n'.join(keep) + b'\n')))
    np.testing.assert_array_equal(np.concatenate([c['cat'] for c in chunks]),
                                  np.concatenate([c['cat'] for c in want]))
    self.assertEqual(criteo.count_rows(path), 60)
    # A long last line without an end.
    path = self.write(b'\n'.join(lines[:5] + [b'1\t' + b'7' * (2 << 20)]))
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                rf'^{path}:6: line longer than'):
      self.read_all(path)

  def test_bare_cr_and_crlf_lines_are_counted_once(self):
    lines = self.good_lines(100)
    data = (b'\r'.join(lines[:50]) + b'\r' + b'\r\n'.join(lines[50:]) +
            b'\r\n')
    path = self.write(data)
    self.assertEqual(criteo.count_rows(path), 100)
    self.assertEqual(self.read_all(path), 100)
    want = np.concatenate([c['int'] for c in criteo.read_criteo(
        self.write(b'\n'.join(lines) + b'\n'))])
    got = np.concatenate([c['int'] for c in criteo.read_criteo(path)])
    np.testing.assert_array_equal(got, want)

  def test_damaged_gzip_is_named_with_file_and_offset(self):
    data = gzip.compress(b'\n'.join(self.good_lines(1000)) + b'\n')
    truncated = self.write(data[:len(data) // 2], 'day_0')
    garbled = bytearray(data)
    garbled[len(data) // 2:len(data) // 2 + 64] = b'\0' * 64
    garbled = self.write(bytes(garbled), 'day_1')
    for path in (truncated, garbled):
      with self.assertRaisesRegex(
          criteo.MalformedLineError,
          rf'^{path}: cannot be read after \d+ bytes of decompressed text'
          rf' \(the gzip file has {os.path.getsize(path)} bytes\): .*damaged'
          ' or truncated gzip'):
        self.read_all(path)
      with self.assertRaisesRegex(criteo.MalformedLineError,
                                  rf'^{path}: cannot be read after'):
        criteo.count_rows(path)


if __name__ == '__main__':
  absltest.main()
