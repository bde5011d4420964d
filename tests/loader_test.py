"""The grain pipeline: permutation, process shards, resume, multi-hot."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from dlrm_jax.data import loader


class RowNumbers:
  """A source whose rows are their own numbers (to see who reads what)."""

  def __init__(self, n):
    self.num_rows = n
    self.description = f'{n} numbered rows'

  def read(self, indices):
    idx = np.asarray(indices, np.int64)
    return {'label': np.zeros(len(idx), np.float32), 'row': idx}


def data(n=1000, batch=64, **kw):
  return loader.GrainTrainData(RowNumbers(n), lambda raw: raw, batch,
                               num_batches=1 << 20, **kw)


class PermutationTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 7, 1000, 4097, 65536)
  def test_bijection(self, n):
    p = loader.FeistelPermutation(n, seed=3)
    out = p(np.arange(n))
    np.testing.assert_array_equal(np.sort(out), np.arange(n))
    if n > 10:
      self.assertFalse(np.array_equal(out, np.arange(n)))
      other = loader.FeistelPermutation(n, seed=4)(np.arange(n))
      self.assertFalse(np.array_equal(out, other))


class GrainTrainDataTest(absltest.TestCase):

  def test_epochs_are_global_shuffles(self):
    d = data(seed=1)
    it = d.iterator()
    per_epoch = d.batches_per_epoch
    epoch1 = np.concatenate([next(it)['row'] for _ in range(per_epoch)])
    epoch2 = np.concatenate([next(it)['row'] for _ in range(per_epoch)])
    self.assertLen(set(epoch1), per_epoch * 64)  # no row twice in an epoch
    self.assertFalse(np.array_equal(epoch1, epoch2))  # re-shuffled
    self.assertGreater(epoch1[:64].max() - epoch1[:64].min(), 500)  # global

  def test_two_processes_cover_every_row_once_per_epoch(self):
    shards = [data(seed=5, process_index=i, process_count=2) for i in (0, 1)]
    whole = data(seed=5)
    per_epoch = whole.batches_per_epoch
    its = [s.iterator() for s in shards]
    rows = [np.concatenate([next(it)['row'] for _ in range(per_epoch)])
            for it in its]
    self.assertEmpty(set(rows[0]) & set(rows[1]))
    both = np.concatenate(rows)
    self.assertLen(set(both), per_epoch * 64)
    # Together they read exactly the rows of the one-process epoch.
    it = whole.iterator()
    self.assertEqual(
        set(both),
        set(np.concatenate([next(it)['row'] for _ in range(per_epoch)])))

  def test_restored_iterator_repeats_the_stream(self):
    d = data(seed=2)
    it = d.iterator()
    for _ in range(7):
      next(it)
    state = it.get_state()
    rest = [next(it)['row'] for _ in range(30)]
    resumed = d.iterator()
    resumed.set_state(state)
    for want in rest:
      np.testing.assert_array_equal(next(resumed)['row'], want)

  def test_in_order_without_shuffle(self):
    it = data(shuffle=False).iterator()
    np.testing.assert_array_equal(next(it)['row'], np.arange(64))
    np.testing.assert_array_equal(next(it)['row'], np.arange(64, 128))

  def test_too_few_rows(self):
    with self.assertRaisesRegex(ValueError, 'fewer rows than one batch'):
      data(n=10)


class MultiHotTest(parameterized.TestCase):

  @parameterized.parameters('uniform', 'pareto')
  def test_bags(self, distribution):
    hotness = (3, 1, 100)
    rows = (50, 7, 100_000)
    mh = loader.MultiHot(hotness, rows, distribution, seed=0)
    rng = np.random.default_rng(0)
    single = np.stack([rng.integers(0, r, 256) for r in rows], 1)
    single[5, 0] = -1  # an invalid/absent id stays absent
    packed = -np.ones((256, sum(hotness)), np.int64)
    packed[:, 0], packed[:, 3], packed[:, 4] = single.T
    out = mh.expand(packed)
    again = loader.MultiHot(hotness, rows, distribution, seed=0).expand(packed)
    np.testing.assert_array_equal(out, again)  # deterministic
    np.testing.assert_array_equal(out[:, 0], single[:, 0])  # the id first
    np.testing.assert_array_equal(out[:, 4], single[:, 2])
    self.assertTrue((out[5, 1:3] == -1).all())
    bags = [out[:, 0:3], out[:, 3:4], out[:, 4:104]]
    for bag, r in zip(bags, rows):
      valid = bag[bag >= 0]
      self.assertTrue((valid < r).all())
    # The same id always gets the same bag; different ids differ.
    same = single[:, 2] == single[0, 2]
    self.assertTrue((bags[2][same] == bags[2][0]).all())
    self.assertGreater(len(np.unique(bags[2][:, 1])), 50)
    other = loader.MultiHot(hotness, rows, distribution, seed=1).expand(packed)
    self.assertFalse(np.array_equal(out, other))

  @parameterized.parameters('uniform', 'pareto')
  def test_numpy_and_jax_bags_are_identical(self, distribution):
    import jax  # pylint: disable=g-import-not-at-top
    from dlrm_jax.data import multi_hot  # pylint: disable=g-import-not-at-top
    mh = loader.MultiHot((4, 1, 30), (50, 7, 40_000_000), distribution,
                         seed=5)
    ids = np.arange(-1, 120)
    for k, rows in enumerate(mh.num_rows):
      first = np.where(ids >= 0, ids % rows, -1).astype(np.int32)
      want = multi_hot.bags(first, mh, k, np)
      got = jax.jit(lambda x, k=k: multi_hot.bags(x, mh, k))(first)
      self.assertEqual(want.dtype, np.int32)
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(k))
      self.assertTrue((want[0] == -1).all())  # no id, no extra ids
      self.assertTrue((want[1:] >= 0).all() and (want < rows).all())

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'hotness has 2 values'):
      loader.MultiHot((1, 2), (5, 5, 5))
    with self.assertRaisesRegex(ValueError, "distribution \\('zipf'\\)"):
      loader.MultiHot((1,), (5,), 'zipf')


if __name__ == '__main__':
  absltest.main()
