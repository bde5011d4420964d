"""Per-process input shares: byte ranges of Criteo files, lockstep training
epochs, eval runs per process (one process here; the real two-process run is
input_multiprocess_test)."""

import gzip
import os

from absl.testing import absltest
import numpy as np

from dlrm_jax.config import build as config_lib
from dlrm_jax.data import criteo
from dlrm_jax.data import inputs
from dlrm_jax.data import pipeline
from tests import pipeline_test
from tests import shared_data
from tests import train_test


def _lines(test, n):
  path = shared_data.criteo_file(test, 'kaggle_train_random_1000.tsv')
  with open(path, 'rb') as f:
    return f.read().splitlines()[:n]


def _rows(items):
  chunks = list(criteo.read_criteo(items))
  return np.concatenate([c['cat'] for c in chunks]) if chunks else (
      np.zeros((0, 26), np.int64))


class LineStartTest(absltest.TestCase):

  def test_every_offset_against_a_reference(self):
    text = b'a\r\nbb\ncc\rdd\n\neee'
    starts = [0, 3, 6, 9, 12, 13, len(text)]  # and the end of the file
    path = self.create_tempfile(content=text, mode='wb').full_path
    for offset in range(len(text) + 2):
      want = min(s for s in starts if s >= min(offset, len(text)))
      self.assertEqual(criteo.line_start(path, offset, len(text)), want,
                       offset)


class SplitIntoSharesTest(absltest.TestCase):

  def test_shares_partition_the_rows_for_every_line_end(self):
    lines = _lines(self, 300)
    for end in (b'\n', b'\r\n', b'\r'):
      path = self.create_tempfile(content=end.join(lines) + end,
                                  mode='wb').full_path
      whole = _rows([path])
      for pc in (1, 2, 3, 7):
        shares = criteo.split_into_shares([path], pc)
        self.assertIsNone(criteo.share_error(shares, 'f'))
        counts = [criteo.count_rows(s) for s in shares]
        self.assertEqual(sum(counts), 300)
        self.assertLessEqual(max(counts) - min(counts), 300 // pc // 2 + 2)
        counter = criteo.LineCounter()
        parts = [_rows(s) for s in shares]
        for s in shares:
          list(criteo.read_criteo(s, counter=counter))
        self.assertEqual(counter.lines, 300)
        np.testing.assert_array_equal(np.concatenate(parts), whole)

  def test_several_files_gzip_whole_and_a_tail_span(self):
    lines = _lines(self, 400)
    text = [b'\n'.join(lines[i:i + 100]) + b'\n' for i in range(0, 400, 100)]
    paths = []
    for i, t in enumerate(text):
      if i == 1:
        p = self.create_tempfile(f'f{i}.gz').full_path
        with gzip.open(p, 'wb') as f:
          f.write(t)
      else:
        p = self.create_tempfile(f'f{i}', content=t, mode='wb').full_path
      paths.append(p)
    whole = _rows(paths)
    shares = criteo.split_into_shares(paths, 3)
    gz = [s for share in shares for s in share if s.path == paths[1]]
    self.assertEqual(gz, [criteo.FileRange(paths[1])])  # whole, in one share
    np.testing.assert_array_equal(
        np.concatenate([_rows(s) for s in shares]), whole)
    # Train and eval spans: the head and the tail, no row in both.
    head = criteo.split_into_shares(paths, 2, span=(0.0, 0.8))
    tail = criteo.split_into_shares(paths, 2, span=(0.8, 1.0))
    parts = [_rows(s) for s in head + tail]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    self.assertBetween(sum(len(p) for p in parts[2:]), 50, 110)

  def test_too_few_gzip_files(self):
    path = self.create_tempfile('one.gz').full_path
    with gzip.open(path, 'wb') as f:
      f.write(b'\n'.join(_lines(self, 10)) + b'\n')
    shares = criteo.split_into_shares([path], 2)
    self.assertEqual(shares, [[criteo.FileRange(path)], []])
    self.assertRegex(criteo.share_error(shares, 'config.data.train_path'),
                     r'config.data.train_path.*processes \[1\].*gzip')


class TsvSharesTest(absltest.TestCase):

  def test_two_processes_split_train_and_eval_tail(self):
    path = shared_data.criteo_file(self, 'kaggle_train_head_4000.tsv')
    config = config_lib.resolve_data(train_test.tiny_config(**{
        'data.source': 'criteo_tsv', 'data.train_path': path,
        'data.eval_fraction': 0.1, 'batch_size': 64}))
    trainer = train_test.shared_trainer()
    local = {}

    def make(p, table):
      def gather(values):
        local[p] = values
        return np.asarray(table if table is not None else [values] * 2)
      return inputs.make_data(config, process_index=p,
                              process_count=2, gather=gather)

    for p in range(2):  # What each process would send ...
      make(p, None)
    table = [local[0], local[1]]  # ... and what the collective returns.
    data = [make(p, table) for p in range(2)]
    parts = []
    for d in data:
      parts.append(np.concatenate([c['cat'] for c in d.train.source.iter_rows()
                                   ]))
      self.assertEqual(d.train_lines.lines, len(parts[-1]))
    for d in data:
      parts.append(np.concatenate([c['cat'] for c in d.eval.source.iter_rows()
                                   ]))
      self.assertEqual(d.eval_lines.lines, len(parts[-1]))
    np.testing.assert_array_equal(np.concatenate(parts), _rows([path]))
    self.assertBetween(len(parts[2]) + len(parts[3]), 380, 420)  # ~10%
    self.assertEqual(data[0].train.batches_per_epoch,
                     min(len(parts[0]), len(parts[1])) // 32)
    self.assertEqual(data[0].eval.num_batches, data[1].eval.num_batches)


class LockstepTest(absltest.TestCase):

  def test_epoch_is_refilled_from_the_start(self):
    _, src = pipeline_test.small_source(num_train=100)
    make = pipeline.ModelBatchMaker(pipeline_test.transform(), None)
    tb = pipeline.TrainBatches(src, make, 32, batches_per_epoch=5)
    it = tb.iterate(0)
    got = [next(it) for _ in range(6)]
    self.assertEqual([s for s, _ in got], [1, 2, 3, 4, 5, 6])
    want = pipeline_test.small_source(num_train=100)[0].rows
    order = np.concatenate([np.arange(100), np.arange(100)])
    ids = lambda rows: make(rows)['ids']
    for k in (3, 4):  # rows 96..99 then 0..27; then 28..59
      rows = {key: v[order[k * 32:(k + 1) * 32]] for key, v in
              want('train', 0, 100).items() if key != 'teacher_prob'}
      np.testing.assert_array_equal(got[k][1]['ids'], ids(rows))
    np.testing.assert_array_equal(got[5][1]['ids'], got[0][1]['ids'])


class EvalRunsTest(absltest.TestCase):

  def test_runs_in_process_order_padded_to_the_same_batches(self):
    gen, _ = pipeline_test.small_source()
    src = pipeline.SyntheticSource(gen, 'eval')  # 300 rows
    make = pipeline.ModelBatchMaker(pipeline_test.transform(), None)
    ranges = inputs.split_rows(src.num_rows, 2)
    counts = [hi - lo for lo, hi in ranges]
    outs = [list(pipeline.EvalBatches(inputs.RandomAccessRows(src, r), make,
                                      128, process_count=2, counts=counts))
            for r in ranges]
    self.assertEqual([[n for _, n in o] for o in outs],
                     [[64, 64, 22], [64, 64, 22]])
    self.assertTrue(all(len(b['label']) == 64 for o in outs for b, _ in o))
    labels = np.concatenate([b['label'][:n] for o in outs for b, n in o])
    np.testing.assert_array_equal(labels, gen.rows('eval', 0, 300)['label'])
    uneven = list(pipeline.EvalBatches(
        inputs.RandomAccessRows(src, (0, 10)), make, 128, process_count=2,
        counts=[10, 200]))
    self.assertEqual([n for _, n in uneven], [10, 0, 0, 0])
    with self.assertRaisesRegex(ValueError, 'more rows than counted'):
      list(pipeline.EvalBatches(src, make, 128, process_count=2,
                                counts=[10, 10]))

  def test_make_data_gives_each_process_its_run(self):
    config = config_lib.resolve_data(train_test.tiny_config())
    trainer = train_test.shared_trainer()
    runs = [inputs.make_data(config, process_index=p,
                             process_count=2).eval for p in range(2)]
    whole = inputs.make_data(config).eval
    n = config.data.synthetic.num_eval
    self.assertEqual([r.source.num_rows for r in runs], [n // 2, n // 2])
    for key in ('label', 'ids'):
      got = np.concatenate([b[key][:k] for r in runs for b, k in r])
      want = np.concatenate([b[key][:k] for b, k in whole])
      np.testing.assert_array_equal(got, want)


if __name__ == '__main__':
  absltest.main()
