"""Batching, shuffling windows, resume positions and process slices."""

import json
import threading
import time

from absl.testing import absltest
import numpy as np

from dlrm_jax.data import features as features_lib
from dlrm_jax.data import pipeline
from dlrm_jax.data import synthetic
from tests import shared_data


def transform():
  return features_lib.FeatureTransform(
      dense=(features_lib.RawFeature('int_0', 'int_0'),),
      sparse=tuple(features_lib.IdFeature(f'cat_{i}', f'cat_{i}', 4,
                                          num_buckets=1000) for i in range(26)))


def small_source(num_train=1000):
  gen = synthetic.SyntheticCriteo(synthetic.SyntheticSpec(
      num_train=num_train, num_eval=300))
  return gen, pipeline.SyntheticSource(gen, 'train')


class TrainBatchesTest(absltest.TestCase):

  def _batches(self, window=0, pi=0, pc=1, start=0, n=30):
    _, src = small_source()
    tb = pipeline.TrainBatches(src, pipeline.ModelBatchMaker(transform(), None),
                               64, seed=3, shuffle_window=window,
                               process_index=pi, process_count=pc)
    it = tb.iterate(start)
    return [next(it) for _ in range(n)], tb

  def test_in_order_epochs_and_positions(self):
    out, tb = self._batches()
    self.assertEqual(tb.batches_per_epoch, 15)  # 1000 // 64, rest dropped
    gen, _ = small_source()
    want = pipeline.ModelBatchMaker(transform(), None)(gen.rows('train', 0, 64))
    np.testing.assert_array_equal(out[0][1]['ids'], want['ids'])
    # Epoch 2 starts over at row 0.
    np.testing.assert_array_equal(out[15][1]['ids'], want['ids'])
    self.assertEqual([p for p, _ in out], list(range(1, 31)))

  def test_resume_at_any_position_repeats_the_stream(self):
    for window in (0, 256):
      full, _ = self._batches(window=window)
      for start in (1, 7, 15, 22):
        resumed, _ = self._batches(window=window, start=start, n=30 - start)
        for (pa, a), (pb, b) in zip(full[start:], resumed):
          self.assertEqual(pa, pb)
          np.testing.assert_array_equal(a['ids'], b['ids'])

  def test_shuffle_windows_permute_rows_within_each_window(self):
    plain, _ = self._batches(n=15)
    shuffled, _ = self._batches(window=256, n=15)
    a = np.concatenate([b['ids'] for _, b in plain])
    b = np.concatenate([b['ids'] for _, b in shuffled])
    self.assertFalse(np.array_equal(a, b))
    for w in range(0, 768, 256):  # whole windows hold the same rows
      self.assertEqual(sorted(map(tuple, a[w:w + 256])),
                       sorted(map(tuple, b[w:w + 256])))
    # A new epoch shuffles differently.
    two, _ = self._batches(window=256, n=30)
    e1 = np.concatenate([b['ids'] for _, b in two[:15]])
    e2 = np.concatenate([b['ids'] for _, b in two[15:]])
    self.assertFalse(np.array_equal(e1, e2))

  def test_processes_split_every_batch(self):
    whole, _ = self._batches(n=5)
    halves = [self._batches(pi=i, pc=2, n=5)[0] for i in range(2)]
    for k in range(5):
      joined = np.concatenate([halves[0][k][1]['ids'], halves[1][k][1]['ids']])
      np.testing.assert_array_equal(joined, whole[k][1]['ids'])


def _prefetch_threads():
  return [t for t in threading.enumerate()
          if t.name == pipeline.Prefetcher.THREAD_NAME and t.is_alive()]


class TextBatchIteratorTest(absltest.TestCase):
  """The checkpointable text stream against plainly iterating the schedule
  (`TrainBatches.iterate(0)`)."""

  def setUp(self):
    super().setUp()
    _, src = small_source()
    maker = pipeline.ModelBatchMaker(transform(), None)
    self.made = []  # one entry per batch made

    def make_batch(raw):
      self.made.append(1)
      return maker(raw)

    self.tb = pipeline.TrainBatches(src, make_batch, 64, seed=3,
                                    shuffle_window=256)
    plain = self.tb.iterate(0)
    self.want = [next(plain)[1] for _ in range(24)]  # 15 batches an epoch
    plain.close()
    self.made.clear()

  def assert_next(self, it, first, n):
    for k in range(first, first + n):
      np.testing.assert_array_equal(next(it)['ids'], self.want[k]['ids'],
                                    err_msg=f'batch {k + 1}')

  def test_state_counts_the_batches_handed_out(self):
    it = self.tb.iterator(prefetch=4)
    self.assert_next(it, 0, 5)
    deadline = time.time() + 30  # 4 more batches made ahead, not handed out
    while len(self.made) < 5 + 4 and time.time() < deadline:
      time.sleep(0.01)
    self.assertGreaterEqual(len(self.made), 9)
    state = it.get_state()
    self.assertEqual(json.loads(state), {'kind': 'text_stream',
                                         'position': 5})
    resumed = self.tb.iterator(prefetch=2)
    resumed.set_state(state)
    resumed.start_prefetch()
    self.assert_next(resumed, 5, 14)  # across the epoch boundary
    self.assert_next(it, 5, 3)  # the one read ahead goes on as well
    self.assertEqual(json.loads(it.get_state())['position'], 8)
    it.close()
    resumed.close()
    self.assertEqual(_prefetch_threads(), [])

  def test_set_state_after_drawing_restarts_at_the_new_position(self):
    for prefetch in (0, 3):
      it = self.tb.iterator(prefetch=prefetch)
      self.assert_next(it, 0, 4)
      it.set_state(pipeline.TextBatchIterator.state_at(10))  # ahead
      self.assert_next(it, 10, 3)
      it.set_state(pipeline.TextBatchIterator.state_at(2))  # back
      self.assert_next(it, 2, 2)
      self.assertLessEqual(len(_prefetch_threads()), 1)
      it.close()
      self.assertEqual(_prefetch_threads(), [])

  def test_a_dropped_iterator_stops_its_thread(self):
    it = self.tb.iterator(prefetch=2)
    next(it)
    self.assertLen(_prefetch_threads(), 1)
    del it
    deadline = time.time() + 30
    while _prefetch_threads() and time.time() < deadline:
      time.sleep(0.01)
    self.assertEqual(_prefetch_threads(), [])

  def test_bad_states_are_refused(self):
    it = self.tb.iterator()
    for state in (b'{"next_index": 3}', b'not json', b'[1]',
                  b'{"kind": "text_stream", "position": -1}'):
      with self.assertRaisesRegex(ValueError, 'not the state of a text'):
        it.set_state(state)

  def test_reader_errors_reach_the_consumer(self):

    class Failing:
      num_rows = 1000
      description = 'failing rows'

      def iter_rows(self, offset=0):
        del offset
        raise OSError('disk gone')
        yield  # pylint: disable=unreachable

    it = pipeline.TrainBatches(Failing(), lambda b: b, 64).iterator(
        prefetch=2)
    with self.assertRaisesRegex(OSError, 'disk gone'):
      next(it)
    with self.assertRaisesRegex(OSError, 'disk gone'):  # and stays failed
      next(it)
    it.close()


class EvalBatchesTest(absltest.TestCase):

  def test_pads_the_last_batch_and_counts_rows(self):
    gen, _ = small_source()
    src = pipeline.SyntheticSource(gen, 'eval')
    eb = pipeline.EvalBatches(src, pipeline.ModelBatchMaker(transform(), None),
                              128)
    out = list(eb)
    self.assertLen(out, eb.num_batches)
    self.assertEqual([n for _, n in out], [128, 128, 44])
    self.assertTrue(all(len(b['label']) == 128 for b, _ in out))
    labels = np.concatenate([b['label'][:n] for b, n in out])
    np.testing.assert_array_equal(labels, gen.rows('eval', 0, 300)['label'])


class TsvSourceTest(absltest.TestCase):

  def test_row_ranges(self):
    path = shared_data.criteo_file(self, 'kaggle_train_head_4000.tsv')
    head = pipeline.TsvSource([path], stop=3600, chunk_rows=500)
    tail = pipeline.TsvSource([path], start=3600, chunk_rows=500)
    self.assertEqual((head.num_rows, tail.num_rows), (3600, 400))
    rows = [c for c in head.iter_rows(100)]
    self.assertEqual(sum(len(c['label']) for c in rows), 3500)
    all_rows = np.concatenate([c['cat'] for c in pipeline.TsvSource(
        [path]).iter_rows()])
    np.testing.assert_array_equal(np.concatenate([c['cat'] for c in rows]),
                                  all_rows[100:3600])
    np.testing.assert_array_equal(
        np.concatenate([c['cat'] for c in tail.iter_rows()]), all_rows[3600:])


class SyntheticTest(absltest.TestCase):

  def test_rows_are_a_function_of_their_index(self):
    gen, _ = small_source(num_train=20_000)
    a = gen.rows('train', 5000, 3000)
    b = synthetic.SyntheticCriteo(gen.spec).rows('train', 7000, 100)
    np.testing.assert_array_equal(a['cat'][2000:2100], b['cat'])
    self.assertBetween(float(gen.rows('train', 0, 20_000)['label'].mean()),
                       0.2, 0.3)
    self.assertGreater(gen.teacher_auc(), 0.75)


if __name__ == '__main__':
  absltest.main()
