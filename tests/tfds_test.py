"""Tests of the TFDS Criteo builders and of `TfdsCriteoSource`, without TF.

The samples are read from the shared folder (see `tests/shared_data.py`) and
copied at test time into temporary manual_dirs, never into the repository.
Every expected row comes from `criteo.read_criteo` on the same file.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import shutil
import sys
import tempfile
import unittest
from unittest import mock

from absl.testing import absltest
from array_record.python import array_record_module
import numpy as np
import tensorflow_datasets as tfds

from dlrm_jax.data import criteo
from dlrm_jax.data import loader
from dlrm_jax.data import riegeli
from dlrm_jax.data import tfds_criteo
from tests import shared_data

KAGGLE_HEAD = 'kaggle_train_head_4000.tsv'
TERABYTE_HEAD = 'terabyte_day0_head_200.tsv'
TEST_ROWS = 300  # Rows of the unlabeled Kaggle test.txt made from the sample.
SHARD_ROWS = 1500  # 4000 train rows -> shards of 1500, 1500 and 1000 rows.


def _sample(name: str) -> str:
  """Path of a shared Criteo sample; skips the class when there is none."""
  d = shared_data.shared_dir()
  if d is None:
    raise unittest.SkipTest(
        'the Criteo samples are not available: set DLRM_SHARED_DIR to the'
        " 'shared' folder, or put it beside the checkout (../shared).")
  return os.path.join(d, 'data', 'criteo', name)


def _reference(path: str, labeled: bool = True) -> dict[str, np.ndarray]:
  """All rows of a file by `criteo.read_criteo`; label -1 when unlabeled."""
  chunks = list(criteo.read_criteo(path, labeled=labeled))
  rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  if not labeled:
    rows['label'] = np.full(len(rows['int']), -1, np.float32)
  return rows


def _prepare(name: str, data_dir: str, manual_dir: str,
             **kwargs) -> tfds.core.DatasetBuilder:
  builder = tfds.builder(name, data_dir=data_dir, **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """TFDS examples as arrays in the layout of `read_criteo`."""
  return {'label': np.array([e['label'] for e in examples], np.float32),
          'int': np.stack([e['int'] for e in examples]),
          'cat': np.stack([e['cat'] for e in examples])}


class KaggleTest(absltest.TestCase):
  """One prepared `criteo_kaggle` (train 4000 rows, test 300) for all tests."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.source_path = _sample(KAGGLE_HEAD)
    cls.root = tempfile.mkdtemp()
    cls.manual_dir = os.path.join(cls.root, 'manual')
    os.makedirs(cls.manual_dir)
    shutil.copy(cls.source_path, os.path.join(cls.manual_dir, 'train.txt'))
    # An unlabeled test.txt: the first rows without their label field.
    with open(cls.source_path) as f:
      lines = [line.split('\t', 1)[1] for line in f.readlines()[:TEST_ROWS]]
    cls.test_path = os.path.join(cls.manual_dir, 'test.txt')
    with open(cls.test_path, 'w') as f:
      f.writelines(lines)
    cls.data_dir = os.path.join(cls.root, 'data')
    cls.builder = _prepare('criteo_kaggle', cls.data_dir, cls.manual_dir,
                           shard_rows=SHARD_ROWS)
    cls.train = _reference(cls.source_path)
    cls.test = _reference(cls.test_path, labeled=False)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def assertRowsEqual(self, got, want):
    self.assertEqual(set(got), {'label', 'int', 'cat'})
    for key in ('label', 'int', 'cat'):
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)

  def test_splits_shards_and_metadata(self):
    info = self.builder.info
    self.assertEqual(info.splits['train'].num_examples, 4000)
    self.assertEqual(info.splits['test'].num_examples, TEST_ROWS)
    self.assertEqual(info.splits['train'].shard_lengths, [1500, 1500, 1000])
    self.assertEqual(info.file_format, tfds.core.FileFormat.ARRAY_RECORD)
    files = sorted(f for f in os.listdir(self.builder.data_dir)
                   if 'array_record' in f)
    self.assertEqual(files, [
        'criteo_kaggle-test.array_record-00000-of-00001',
        'criteo_kaggle-train.array_record-00000-of-00003',
        'criteo_kaggle-train.array_record-00001-of-00003',
        'criteo_kaggle-train.array_record-00002-of-00003',
    ])
    # Read back from disk, as a new process would.
    reloaded = tfds.builder('criteo_kaggle', data_dir=self.data_dir)
    self.assertEqual(reloaded.info.metadata['bad_lines'],
                     {'train': 0, 'test': 0})
    self.assertEqual(reloaded.info.metadata['source_files'],
                     {'train': ['train.txt'], 'test': ['test.txt']})
    self.assertEqual(reloaded.info.features.shape,
                     {'label': (), 'int': (13,), 'cat': (26,)})

  def test_data_source_keeps_file_order(self):
    source = tfds.data_source('criteo_kaggle', data_dir=self.data_dir,
                              split='train')
    self.assertLen(source, 4000)
    rows = source.__getitems__(list(range(4000)))
    self.assertEqual(rows[0]['int'].dtype, np.int64)
    self.assertEqual(rows[0]['cat'].shape, (26,))
    self.assertRowsEqual(_stack(rows), self.train)
    self.assertRowsEqual(_stack([source[i] for i in (3999, 0, 1234)]),
                         {k: v[[3999, 0, 1234]] for k, v in self.train.items()})

  def test_source_reads_rows_in_the_order_given(self):
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train',
                                          self.data_dir)
    self.assertLen(source, 4000)
    self.assertEqual(source.num_rows, 4000)
    self.assertIn('criteo_kaggle', source.description)
    order = np.random.default_rng(0).permutation(4000)
    order = np.concatenate([order, order[:100]])  # Repeats are fine too.
    got = source.read(order)
    self.assertEqual(got['label'].dtype, np.float32)
    self.assertEqual(got['int'].dtype, np.int64)
    self.assertEqual(got['cat'].shape, (4100, 26))
    self.assertRowsEqual(got, {k: v[order] for k, v in self.train.items()})
    empty = source.read(np.zeros(0, np.int64))
    self.assertEqual(empty['cat'].shape, (0, 26))

  def _per_record(self, data_dir: str, split: str,
                  rows: np.ndarray) -> dict[str, np.ndarray]:
    """The plain reference: one ArrayRecord read and TFDS decode per row."""
    builder = tfds.builder('criteo_kaggle', data_dir=data_dir)
    files = [(os.fspath(f.filename), f.take)
             for f in builder.info.splits[split].file_instructions]
    examples = []
    for row in rows.tolist():
      for path, size in files:
        if row < size:
          reader = array_record_module.ArrayRecordReader(path)
          examples.append(builder.info.features.deserialize_example_np(
              reader.read([row])[0]))
          reader.close()
          break
        row -= size
    return _stack(examples)

  def test_block_reads_match_per_record_reads(self):
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train',
                                          self.data_dir)
    rows = np.random.default_rng(2).permutation(4000)[:700]
    got = source.read(rows)
    self.assertRowsEqual(got, self._per_record(self.data_dir, 'train', rows))
    # Every shard was read directly; ArrayRecord's readers were closed.
    self.assertEqual([source._direct[f].num_direct for f in range(3)],
                     [1500, 1500, 1000])
    self.assertEqual(source._readers, {})
    # Some of those chunks straddle a block header.
    chunk = riegeli.CHUNK_HEADER + source._direct[0]._data_size
    stream = riegeli.CHUNK_HEADER + (rows % 1500) * chunk
    self.assertGreater(
        np.sum(stream % (riegeli.BLOCK - riegeli.BLOCK_HEADER) + chunk >
               riegeli.BLOCK - riegeli.BLOCK_HEADER), 0)
    # A copy in another process (grain workers) reads the same.
    self.assertRowsEqual(pickle.loads(pickle.dumps(source)).read(rows), got)
    test = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'test', self.data_dir)
    self.assertRowsEqual(test.read(np.arange(TEST_ROWS)[::-1]),
                         {k: v[::-1] for k, v in self.test.items()})
    self.assertIsNotNone(test._direct[0])

  def test_grain_batches_shares_and_resume(self):
    # Through the grain loader: each process's batch k holds its rows of
    # the epoch's shuffle, over epochs, and a restored iterator goes on.
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train',
                                          self.data_dir)
    for process in (0, 1):
      data = loader.GrainTrainData(source, lambda raw: raw, 500,
                                   num_batches=10, seed=4,
                                   process_index=process, process_count=2)
      it = data.iterator()
      for k in range(4):
        self.assertRowsEqual(next(it), {key: v[data.elements.rows_of(k)]
                                        for key, v in self.train.items()})
      state = it.get_state()
      rest = [next(it) for _ in range(6)]  # Into the second epoch.
      resumed = data.iterator()
      resumed.set_state(state)
      for k, want in enumerate(rest, 4):
        self.assertRowsEqual(next(resumed), want)
        self.assertRowsEqual(want, {key: v[data.elements.rows_of(k)]
                                    for key, v in self.train.items()})

  def test_compressed_shards_are_read_by_array_record(self):
    data_dir = self.create_tempdir().full_path
    tfds.builder('criteo_kaggle', data_dir=data_dir, shard_rows=400,
                 compression='snappy').download_and_prepare(
                     download_config=tfds.download.DownloadConfig(
                         manual_dir=self.manual_dir,
                         max_examples_per_split=1000))
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train', data_dir)
    rows = np.random.default_rng(3).permutation(1000)
    self.assertRowsEqual(source.read(rows),
                         {k: v[rows] for k, v in self.train.items()})
    self.assertEqual(source._direct, {0: None, 1: None, 2: None})

  def test_a_damaged_value_names_the_file_and_row(self):
    data_dir, shard = self._copy_data()
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train', data_dir)
    chunk = riegeli.CHUNK_HEADER + source._direct_shard(1)._data_size
    with open(shard, 'r+b') as f:  # A value byte of the shard's record 5.
      f.seek(riegeli.BLOCK_HEADER + riegeli.CHUNK_HEADER + 5 * chunk +
             chunk - 20)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0x5a]))
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train', data_dir)
    with self.assertRaisesRegex(tfds_criteo.CorruptDataError,
                                os.path.basename(shard)):
      source.read(np.array([3, 1505, 2000]))
    self.assertRowsEqual(source.read(np.array([3, 1504, 1506])), {
        k: v[[3, 1504, 1506]] for k, v in self.train.items()})

  def test_source_reads_a_slice_of_a_split(self):
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train[2000:3600]',
                                          self.data_dir)
    self.assertLen(source, 1600)
    got = source.read(np.arange(1600)[::-1])
    self.assertRowsEqual(
        got, {k: v[2000:3600][::-1] for k, v in self.train.items()})

  def test_unlabeled_test_split(self):
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'test',
                                          self.data_dir)
    self.assertLen(source, TEST_ROWS)
    self.assertRowsEqual(source.read(np.arange(TEST_ROWS)), self.test)
    ds = tfds.data_source('criteo_kaggle', data_dir=self.data_dir,
                          split='test')
    self.assertEqual(int(ds[5]['label']), -1)
    np.testing.assert_array_equal(ds[5]['cat'], self.test['cat'][5])

  def test_no_tensorflow(self):
    tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train',
                                 self.data_dir).read(np.arange(10))
    tfds.data_source('criteo_kaggle', data_dir=self.data_dir,
                     split='train')[0]
    self.assertNotIn('tensorflow', sys.modules)
    self.assertIsNone(importlib.util.find_spec('tensorflow'))

  def test_records_of_tfds_own_writer_are_read_too(self):
    # TFDS's generator path (`_generate_examples`, one example at a time)
    # writes the map entries in another order: the reader falls back to TFDS's
    # decoder for such records, with the same values.
    data_dir = self.create_tempdir().full_path
    tfds_writer = tfds.core.GeneratorBasedBuilder._download_and_prepare
    with mock.patch.object(tfds_criteo.CriteoKaggle, '_download_and_prepare',
                           tfds_writer):
      _prepare('criteo_kaggle', data_dir, self.manual_dir)
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train', data_dir)
    order = np.random.default_rng(1).permutation(4000)[:1000]
    self.assertRowsEqual(source.read(order),
                         {k: v[order] for k, v in self.train.items()})
    test = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'test', data_dir)
    self.assertRowsEqual(test.read(np.arange(TEST_ROWS)), self.test)

  def _copy_data(self) -> tuple[str, str]:
    """A copy of the prepared data; returns it and its second train shard."""
    data_dir = os.path.join(self.create_tempdir().full_path, 'data')
    shutil.copytree(self.data_dir, data_dir)
    shard = os.path.join(data_dir, 'criteo_kaggle', '1.0.0',
                         'criteo_kaggle-train.array_record-00001-of-00003')
    self.assertTrue(os.path.isfile(shard))
    return data_dir, shard

  def test_truncated_shard_names_the_file(self):
    data_dir, shard = self._copy_data()
    with open(shard, 'rb') as f:
      data = f.read()
    for size in (len(data) // 2, len(data) - 1, 100):
      with open(shard, 'wb') as f:
        f.write(data[:size])
      source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train', data_dir)
      with self.assertRaisesRegex(tfds_criteo.CorruptDataError,
                                  os.path.basename(shard)):
        source.read(np.arange(4000))
    # Rows of the other shards still read.
    self.assertRowsEqual(source.read(np.arange(1000)),
                         {k: v[:1000] for k, v in self.train.items()})

  def test_flipped_bytes_name_the_file(self):
    data_dir, shard = self._copy_data()
    with open(shard, 'rb') as f:
      data = f.read()
    for pos in (len(data) // 2, len(data) // 4):
      flipped = bytearray(data)
      flipped[pos] ^= 0x5a
      with open(shard, 'wb') as f:
        f.write(bytes(flipped))
      source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train', data_dir)
      with self.assertRaisesRegex(tfds_criteo.CorruptDataError,
                                  os.path.basename(shard)):
        source.read(np.random.default_rng(0).permutation(4000))

  def test_records_are_checked_byte_for_byte(self):
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train',
                                          self.data_dir)
    chunk = {k: v[:4] for k, v in self.train.items()}
    records = tfds_criteo._serialize(chunk, tfds_criteo._LAYOUTS[True])
    indices = np.arange(4)
    self.assertRowsEqual(source._decode(records, indices), chunk)
    # A value out of range (a hash of 2^32) is an error, not a row.
    wide = dict(chunk, cat=chunk['cat'].copy())
    wide['cat'][2, 3] = 1 << 32
    with self.assertRaisesRegex(tfds_criteo.CorruptDataError,
                                'train.array_record-00000-of-00003'):
      source._decode(tfds_criteo._serialize(wide, tfds_criteo._LAYOUTS[True]),
                     indices)
    # A record that is not a tf.Example is an error naming the shard.
    broken = list(records)
    broken[1] = b'\xff' + records[1][1:]
    with self.assertRaisesRegex(tfds_criteo.CorruptDataError,
                                'train.array_record-00000-of-00003.*row 1'):
      source._decode(broken, indices)
    # A record of the right length with another layout goes to TFDS's decoder.
    features = self.builder.info.features
    own = [features.serialize_example(
        {'label': int(chunk['label'][i]), 'int': chunk['int'][i],
         'cat': chunk['cat'][i]}) for i in range(4)]
    self.assertRowsEqual(source._decode(own, indices), chunk)

  def test_read_errors(self):
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train',
                                          self.data_dir)
    with self.assertRaisesRegex(ValueError, r'\[0, 4000\)'):
      source.read(np.array([0, 4000]))
    with self.assertRaisesRegex(ValueError, r'\[0, 4000\)'):
      source.read(np.array([-1]))
    with self.assertRaisesRegex(ValueError, '1-D integer'):
      source.read(np.array([0.5]))
    with self.assertRaisesRegex(ValueError, "no split 'eval'.*test, train"):
      tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'eval', self.data_dir)
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(
        ValueError, f"'criteo_kaggle' in data_dir '{empty}' is not prepared"):
      tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train', empty)
    with self.assertRaisesRegex(ValueError, 'no_such_dataset'):
      tfds_criteo.TfdsCriteoSource('no_such_dataset', 'train', empty)

  def test_missing_manual_files(self):
    root = self.create_tempdir().full_path
    absent = os.path.join(root, 'absent')
    with self.assertRaisesRegex(FileNotFoundError,
                                f'(?s){absent}.*train.txt'):
      _prepare('criteo_kaggle', os.path.join(root, 'data'), absent)
    other = os.path.join(root, 'other')
    os.makedirs(other)
    with open(os.path.join(other, 'readme.txt'), 'w') as f:
      f.write('not the data\n')
    with self.assertRaisesRegex(
        FileNotFoundError, f'(?s){other} holds no train.txt.*readme.txt.*'
        'https://'):
      _prepare('criteo_kaggle', os.path.join(root, 'data'), other)
    shutil.copy(self.source_path, os.path.join(other, 'train.txt'))
    shutil.copy(self.source_path, os.path.join(other, 'train.txt.gz'))
    with self.assertRaisesRegex(ValueError, 'both train.txt and train.txt.gz'):
      _prepare('criteo_kaggle', os.path.join(root, 'data'), other)
    self.assertFalse(tfds.builder(
        'criteo_kaggle', data_dir=os.path.join(root, 'data')).is_prepared())

  def test_bad_lines(self):
    root = self.create_tempdir().full_path
    with open(self.source_path) as f:
      lines = f.readlines()[:100]
    lines.insert(50, '1\tnot\ta\tcriteo\tline\n')
    manual_dir = os.path.join(root, 'manual')
    os.makedirs(manual_dir)
    with open(os.path.join(manual_dir, 'train.txt'), 'w') as f:
      f.writelines(lines)
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                'train.txt:51: expected 40 fields, got 5'):
      _prepare('criteo_kaggle', os.path.join(root, 'strict'), manual_dir)
    builder = _prepare('criteo_kaggle', os.path.join(root, 'skip'), manual_dir,
                       bad_lines='skip')
    self.assertEqual(builder.info.splits['train'].num_examples, 100)
    self.assertEqual(builder.info.metadata['bad_lines'], {'train': 1})
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train',
                                          os.path.join(root, 'skip'))
    self.assertRowsEqual(source.read(np.arange(100)),
                         {k: v[:100] for k, v in self.train.items()})

  def test_max_examples_per_split(self):
    root = self.create_tempdir().full_path
    builder = tfds.builder('criteo_kaggle', data_dir=root,
                           compression='uncompressed')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=self.manual_dir, max_examples_per_split=250))
    self.assertEqual(builder.info.splits['train'].num_examples, 250)
    source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train', root)
    self.assertRowsEqual(source.read(np.arange(250)),
                         {k: v[:250] for k, v in self.train.items()})

  def test_builder_options_are_checked(self):
    root = self.create_tempdir().full_path
    with self.assertRaisesRegex(ValueError, "bad_lines \\('drop'\\)"):
      tfds_criteo.CriteoKaggle(data_dir=root, bad_lines='drop')
    with self.assertRaisesRegex(ValueError, r'shard_rows \(0\)'):
      tfds_criteo.CriteoKaggle(data_dir=root, shard_rows=0)
    with self.assertRaisesRegex(ValueError, "compression \\('lz4'\\)"):
      tfds_criteo.CriteoKaggle(data_dir=root, compression='lz4')
    builder = tfds_criteo.CriteoKaggle(data_dir=root, file_format='tfrecord')
    with self.assertRaisesRegex(ValueError, "must be 'array_record'"):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=self.manual_dir))


class TerabyteTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.source_path = _sample(TERABYTE_HEAD)
    cls.root = tempfile.mkdtemp()
    cls.manual_dir = os.path.join(cls.root, 'manual')
    os.makedirs(cls.manual_dir)
    with open(cls.source_path, 'rb') as f:
      data = f.read()
    # day_0 gzip (named without .gz, as in the original release), day_23 plain.
    with gzip.open(os.path.join(cls.manual_dir, 'day_0'), 'wb') as f:
      f.write(data)
    shutil.copy(cls.source_path, os.path.join(cls.manual_dir, 'day_23'))
    cls.data_dir = os.path.join(cls.root, 'data')
    cls.builder = _prepare('criteo_terabyte', cls.data_dir, cls.manual_dir)
    cls.rows = _reference(cls.source_path)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_train_and_eval_splits(self):
    info = self.builder.info
    self.assertEqual(sorted(info.splits), ['eval', 'train'])
    self.assertEqual(info.splits['train'].num_examples, 200)
    self.assertEqual(info.splits['eval'].num_examples, 200)
    self.assertEqual(info.metadata['source_files'],
                     {'train': ['day_0'], 'eval': ['day_23']})
    for split in ('train', 'eval'):
      source = tfds_criteo.TfdsCriteoSource('criteo_terabyte', split,
                                            self.data_dir)
      order = np.random.default_rng(0).permutation(200)
      got = source.read(order)
      for key in ('label', 'int', 'cat'):
        np.testing.assert_array_equal(got[key], self.rows[key][order])
      ds = tfds.data_source('criteo_terabyte', data_dir=self.data_dir,
                            split=split)
      np.testing.assert_array_equal(ds[7]['cat'], self.rows['cat'][7])
    self.assertNotIn('tensorflow', sys.modules)

  def test_days_in_order_and_gz_names(self):
    root = self.create_tempdir().full_path
    manual_dir = os.path.join(root, 'manual')
    os.makedirs(manual_dir)
    with open(self.source_path) as f:
      lines = f.readlines()
    # day_10 sorts before day_2 as text; the split keeps day order.
    for day, part in ((10, lines[100:]), (2, lines[:100])):
      with gzip.open(os.path.join(manual_dir, f'day_{day}.gz'), 'wt') as f:
        f.writelines(part)
    builder = _prepare('criteo_terabyte', os.path.join(root, 'data'),
                       manual_dir)
    self.assertEqual(list(builder.info.splits), ['train'])
    self.assertEqual(builder.info.metadata['source_files'],
                     {'train': ['day_2.gz', 'day_10.gz']})
    source = tfds_criteo.TfdsCriteoSource('criteo_terabyte', 'train',
                                          os.path.join(root, 'data'))
    np.testing.assert_array_equal(source.read(np.arange(200))['cat'],
                                  self.rows['cat'])

  def test_missing_days(self):
    root = self.create_tempdir().full_path
    manual_dir = os.path.join(root, 'manual')
    os.makedirs(manual_dir)
    shutil.copy(self.source_path, os.path.join(manual_dir, 'day0.tsv'))
    with self.assertRaisesRegex(FileNotFoundError,
                                f'(?s){manual_dir} holds no day_0 .. day_23'
                                '.*day0.tsv'):
      _prepare('criteo_terabyte', os.path.join(root, 'data'), manual_dir)


if __name__ == '__main__':
  absltest.main()
