"""Preprocessing to the binary format, against the direct reader."""

import collections
import concurrent.futures
import gzip
import json
import os
import shutil

from absl.testing import absltest
import numpy as np

from dlrm_jax.data import features as features_lib
from dlrm_jax.data import binary
from dlrm_jax.data import criteo
from dlrm_jax.data import preprocess
from tests import shared_data

HEAD = 'kaggle_train_head_4000.tsv'
RANDOM = 'kaggle_train_random_1000.tsv'


def direct(path):
  chunks = list(criteo.read_criteo([path]))
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def run(train, out, **kw):
  kw.setdefault('workers', 2)
  kw.setdefault('range_bytes', 100_000)  # several units per sample file
  kw.setdefault('progress', False)
  return preprocess.run(train, out, **kw)


class PreprocessTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.head = shared_data.criteo_file(self, HEAD)
    self.random = shared_data.criteo_file(self, RANDOM)
    self.out = self.create_tempdir().full_path

  def test_modulo_gives_the_direct_readers_rows(self):
    buckets = [1000 + 7 * j for j in range(26)]
    meta = run([self.head], self.out, eval_paths=[self.random],
               id_scheme='modulo', num_buckets=buckets)
    self.assertGreater(len(meta.splits['train']), 3)  # it really split
    self.assertEqual(meta.num_buckets, buckets)
    for split, path in (('train', self.head), ('eval', self.random)):
      src = binary.BinarySource(self.out, split)
      want = direct(path)
      self.assertEqual(src.num_rows, len(want['label']))
      got = src.read(np.arange(src.num_rows))
      np.testing.assert_array_equal(got['label'], want['label'])
      np.testing.assert_array_equal(got['int'], want['int'])
      for j, nb in enumerate(buckets):
        f = features_lib.IdFeature(f'cat_{j}', f'cat_{j}', 4, num_buckets=nb)
        np.testing.assert_array_equal(
            got['ids'][:, j], features_lib.map_ids(want['cat'][:, j], f))

  def test_vocab_against_a_hand_count(self):
    threshold = 3
    meta = run([self.head], self.out, eval_paths=[self.random],
               id_scheme='vocab', vocab_threshold=threshold)
    lines = [l.rstrip('\n').split('\t') for l in open(self.head)]
    for j in range(26):
      counts = collections.Counter(f[14 + j] for f in lines if f[14 + j])
      kept = sorted((v for v, c in counts.items() if c >= threshold),
                    key=lambda v: (-counts[v], int(v, 16)))
      ids = {int(v, 16): 2 + i for i, v in enumerate(kept)}
      self.assertEqual(meta.num_buckets[j], 2 + len(kept), f'cat_{j}')
      with np.load(os.path.join(self.out, 'vocab', f'cat_{j}.npz')) as z:
        self.assertEqual([int(v) for v in z['values']],
                         [int(v, 16) for v in kept])
        self.assertEqual(list(z['counts']), [counts[v] for v in kept])
      for split, path in (('train', self.head), ('eval', self.random)):
        got = binary.BinarySource(self.out, split).read_range(0, 1000)['ids']
        raw = [l.rstrip('\n').split('\t')[14 + j]
               for l in open(path)][:1000]
        want = [0 if not v else ids.get(int(v, 16), 1) for v in raw]
        np.testing.assert_array_equal(got[:, j], want, err_msg=f'{split} {j}')

  def test_restart_redoes_only_missing_parts(self):
    run([self.head], self.out, id_scheme='vocab', vocab_threshold=2)
    meta = binary.Metadata.load(self.out)
    parts = [os.path.join(self.out, p['file']) for p in meta.splits['train']]
    before = {p: (os.path.getmtime(p), open(p, 'rb').read()) for p in parts}
    os.remove(parts[2])  # as if the run died while writing it
    counts = os.path.join(self.out, '_work', 'counts')
    count_files = {f: os.path.getmtime(os.path.join(counts, f))
                   for f in os.listdir(counts)}
    run([self.head], self.out, id_scheme='vocab', vocab_threshold=2)
    for p in parts:
      self.assertEqual(open(p, 'rb').read(), before[p][1])
      if p != parts[2]:
        self.assertEqual(os.path.getmtime(p), before[p][0], p)
    for f, t in count_files.items():
      self.assertEqual(os.path.getmtime(os.path.join(counts, f)), t)

  def test_gzip_input_and_line_numbers_in_later_ranges(self):
    lines = open(self.head).read().splitlines()
    lines.insert(3500, 'not\ta\tcriteo\tline')
    plain = os.path.join(self.create_tempdir().full_path, 'train.txt')
    with open(plain, 'w') as f:
      f.write('\n'.join(lines) + '\n')
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                r'train\.txt:3501: expected 40 fields, got 4'):
      run([plain], self.out)
    meta = run([plain], self.create_tempdir().full_path, bad_lines='skip')
    self.assertEqual(meta.bad_lines['count'], 1)
    self.assertIn('train.txt:3501:', meta.bad_lines['examples'][0])
    gz = os.path.join(self.create_tempdir().full_path, 'day_0')
    with open(self.head, 'rb') as src, gzip.open(gz, 'wb') as dst:
      dst.write(src.read())
    out = self.create_tempdir().full_path
    run([gz], out, num_buckets=5000)
    got = binary.BinarySource(out, 'train')
    self.assertEqual(got.num_rows, 4000)
    np.testing.assert_array_equal(got.read_range(0, 4000)['label'],
                                  direct(self.head)['label'])


class RangesTest(absltest.TestCase):
  """Byte ranges of plain files, against the lines of Python's split."""

  def _check_ranges(self, text, range_bytes):
    path = self.create_tempfile(content=text, mode='wb').full_path
    lines = text.splitlines(keepends=True)  # '\n', '\r\n' and a bare '\r'
    line_starts = np.cumsum([0] + [len(l) for l in lines[:-1]]).tolist()
    # A range ends at the first line start after byte start + range_bytes.
    want = [0]
    while True:
      end = min([s for s in line_starts if s > want[-1] + range_bytes] +
                [len(text)])
      if end >= len(text):
        break
      want.append(end)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      units = preprocess.cut_into_units('train', [path], range_bytes, True,
                                        pool)
    self.assertEqual([(u.start, u.end) for u in units],
                     list(zip(want, want[1:] + [len(text)])), range_bytes)
    self.assertEqual([u.first_line for u in units],
                     [line_starts.index(s) + 1 for s in want])
    return path

  def test_ranges_of_a_file_with_cr_line_ends(self):
    lines = open(shared_data.criteo_file(self, RANDOM), 'rb').read(
        ).splitlines()
    lines.insert(700, b'not\ta\tcriteo\tline')
    text = b'\r'.join(lines) + b'\r'
    for range_bytes in (1, 50, 999, 20_000, 100_000, len(text)):
      path = self._check_ranges(text, range_bytes)
    mixed = b''.join(l + (b'\n', b'\r\n', b'\r')[i % 3]
                     for i, l in enumerate(lines[:300]))
    for range_bytes in (1, 333, 5_000, 40_000):
      self._check_ranges(mixed, range_bytes)
    # The rows and the line numbers of later ranges, as the direct reader.
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                r':701: expected 40 fields, got 4'):
      run([path], self.create_tempdir().full_path, range_bytes=50_000)
    out = self.create_tempdir().full_path
    meta = run([path], out, range_bytes=50_000, bad_lines='skip',
               num_buckets=5000)
    self.assertGreater(len(meta.splits['train']), 3)  # it really split
    self.assertEqual(meta.bad_lines['count'], 1)
    self.assertIn(':701:', meta.bad_lines['examples'][0])
    got = binary.BinarySource(out, 'train')
    want = {k: np.concatenate([c[k] for c in criteo.read_criteo(
        [path], bad_lines='skip')]) for k in ('label', 'int')}
    self.assertEqual(got.num_rows, 1000)
    rows = got.read_range(0, 1000)
    np.testing.assert_array_equal(rows['label'], want['label'])
    np.testing.assert_array_equal(rows['int'], want['int'])


class CorruptFileTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.out = self.create_tempdir().full_path
    run([shared_data.criteo_file(self, HEAD)], self.out, range_bytes=1 << 30)
    self.part = os.path.join(self.out, 'train', 'part-00000.bin')

  def test_truncated_file_is_rejected_by_name(self):
    with open(self.part, 'r+b') as f:
      f.truncate(os.path.getsize(self.part) - 100)
    with self.assertRaisesRegex(binary.CorruptFileError,
                                r'part-00000\.bin: .* truncated'):
      binary.BinarySource(self.out, 'train')

  def test_flipped_bytes_fail_the_checksum(self):
    with open(self.part, 'r+b') as f:
      f.seek(binary.HEADER_BYTES + 1000 * 160 + 17)
      f.write(b'\x7f\x7f')
    src = binary.BinarySource(self.out, 'train')
    with self.assertRaisesRegex(binary.CorruptFileError,
                                r'part-00000\.bin: records 0\.\.3999 fail'):
      src.read(np.array([5]))

  def test_not_a_part_file(self):
    with open(self.part, 'wb') as f:
      f.write(b'hello')
    with self.assertRaisesRegex(binary.CorruptFileError, 'bad header'):
      binary.BinarySource(self.out, 'train')

  def test_missing_metadata(self):
    os.remove(os.path.join(self.out, binary.METADATA))
    with self.assertRaisesRegex(ValueError, 'metadata.json is missing'):
      binary.BinarySource(self.out, 'train')


if __name__ == '__main__':
  absltest.main()
