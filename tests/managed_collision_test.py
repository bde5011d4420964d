"""Managed-collision remapping against a plain Python (dict + loop) reference.

The reference admits the new ids of a batch one at a time, in ascending raw-id
order, each taking the smallest free row or else evicting the live id not used
by the batch that the policy ranks first. The vectorized remapper must give the
same rows and resets, batch after batch, and survive a save/restore unchanged.
"""

import collections
import io

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from dlrm_jax.embedding.ids import managed_collision as mc


class ReferenceRemapper:
  """The policy written as a dict and a loop per id."""

  def __init__(self, num_rows, policy):
    self.num_rows = num_rows
    self.policy = policy
    self.owner = {}  # row -> raw id
    self.row_of = {}  # raw id -> row
    self.last_seen = {}  # row -> step
    self.count = {}  # row -> count

  def _rank(self, row):
    if self.policy == 'lru':
      return (self.last_seen[row], row)
    return (self.count[row], self.last_seen[row], row)

  def remap(self, raw, step):
    raw = np.asarray(raw)
    flat = [int(x) for x in raw.reshape(-1)]
    seen = collections.Counter(x for x in flat if x >= 0)
    used = {self.row_of[x] for x in seen if x in self.row_of}
    new = sorted(x for x in seen if x not in self.row_of)
    free = [r for r in range(1, self.num_rows) if r not in self.owner]
    evictable = sorted((r for r in self.owner if r not in used),
                       key=self._rank)
    available = free + evictable
    if len(new) > len(available):
      raise ValueError('too many new ids')
    reset = []
    for x, row in zip(new, available):
      if row in self.owner:
        del self.row_of[self.owner[row]]
      self.owner[row] = x
      self.row_of[x] = row
      self.count[row] = 0
      reset.append(row)
    for x, n in seen.items():
      row = self.row_of[x]
      self.last_seen[row] = step
      self.count[row] += n
    rows = [self.row_of[x] if x >= 0 else (0 if x == -1 else -1)
            for x in flat]
    return np.array(rows).reshape(raw.shape), np.array(sorted(reset))


def zipf_stream(seed, num_batches, shape, id_range=10**12, a=1.2,
                missing=0.05, padding=0.1):
  """Batches of Zipf-ranked ids scattered over a large range, with -1 and -2."""
  rng = np.random.default_rng(seed)
  perm_mul = 0x9E3779B97F4A7C15 % id_range | 1
  for _ in range(num_batches):
    rank = rng.zipf(a, size=shape).astype(np.int64)
    ids = (rank * perm_mul) % id_range
    u = rng.random(shape)
    ids[u < missing] = -1
    ids[(u >= missing) & (u < missing + padding)] = -2
    yield ids


def check_invariants(test, remapper, raw, rows):
  live = remapper.live_ids()
  live_rows = list(live.values())
  test.assertEqual(len(live_rows), len(set(live_rows)))
  if live_rows:
    test.assertGreaterEqual(min(live_rows), 1)
    test.assertLess(max(live_rows), remapper.num_rows)
  test.assertEqual(rows.dtype, np.int32)
  test.assertEqual(rows.shape, raw.shape)
  np.testing.assert_array_equal(rows[raw == -1], 0)
  np.testing.assert_array_equal(rows[raw == -2], -1)
  valid = raw >= 0
  expected = [live[int(x)] for x in raw[valid]]  # Batch ids are all live.
  np.testing.assert_array_equal(rows[valid], expected)


class ManagedCollisionTest(parameterized.TestCase):

  def assert_remap(self, remapper, raw, step, rows, reset):
    got_rows, got_reset = remapper.remap(np.array(raw, np.int64), step)
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_array_equal(got_reset, reset)
    self.assertEqual(got_reset.dtype, np.int32)

  def test_lru_eviction_order(self):
    r = mc.ManagedCollisionRemapper(4, 'lru')
    self.assert_remap(r, [10, 20, -1, 10], 0, [1, 2, 0, 1], [1, 2])
    self.assert_remap(r, [[30, -2]], 1, [[3, -1]], [3])
    self.assert_remap(r, [10], 2, [1], [])
    # 20 (seen at 0) is the least recent.
    self.assert_remap(r, [40], 3, [2], [2])
    # 30 (1) goes, then 10 (2); 50 < 60 takes the first.
    self.assert_remap(r, [60, 50, 60], 4, [1, 3, 1], [1, 3])
    # 20 comes back as a new id: 40 (3) is the least recent.
    self.assert_remap(r, [20], 5, [2], [2])
    self.assertEqual(r.live_ids(), {50: 3, 60: 1, 20: 2})
    # Ties on last_seen (50 and 60 at 4): the smaller row goes first.
    self.assert_remap(r, [70], 6, [1], [1])

  def test_lfu_eviction_order(self):
    r = mc.ManagedCollisionRemapper(4, 'lfu')
    self.assert_remap(r, [10, 10, 10, 20, 20, 30], 0, [1, 1, 1, 2, 2, 3],
                      [1, 2, 3])
    self.assert_remap(r, [30, 30, 30, 30], 1, [3, 3, 3, 3], [])
    # Counts 10: 3, 20: 2, 30: 5.
    self.assert_remap(r, [40], 2, [2], [2])
    # Counts 10: 3, 30: 5, 40: 1 (LRU would evict 10 here).
    self.assert_remap(r, [50], 3, [2], [2])
    # Counts 10: 3, 30: 5, 50: 1: 50 goes, then 10.
    self.assert_remap(r, [70, 60], 4, [1, 2], [1, 2])
    # 60 and 70: count 1, seen at 4: the smaller row (70's) goes.
    self.assert_remap(r, [80], 5, [1], [1])
    # 60 (count 1, seen 4) before 80 (count 1, seen 5).
    self.assert_remap(r, [90], 6, [2], [2])
    self.assertEqual(r.live_ids(), {30: 3, 80: 1, 90: 2})

  @parameterized.parameters('lru', 'lfu')
  def test_batch_ids_are_not_evicted(self, policy):
    r = mc.ManagedCollisionRemapper(4, policy)
    r.remap(np.array([1, 2, 3]), 0)
    r.remap(np.array([3, 3, 3]), 1)  # 1 and 2 are now first to go.
    rows, reset = r.remap(np.array([1, 2, 4]), 2)
    np.testing.assert_array_equal(rows, [1, 2, 3])
    np.testing.assert_array_equal(reset, [3])

  @parameterized.parameters('lru', 'lfu')
  def test_too_many_new_ids(self, policy):
    r = mc.ManagedCollisionRemapper(4, policy, name='f7')
    with self.assertRaisesRegex(ValueError, "'f7'.*4 distinct new ids"):
      r.remap(np.array([5, 6, 7, 8]), 0)
    r.remap(np.array([1, 2, 3]), 1)
    before = r.state_dict()
    with self.assertRaisesRegex(ValueError, "'f7'.*1 distinct new ids.*0 free"):
      r.remap(np.array([[1, 2], [3, 4]]), 2)
    with self.assertRaisesRegex(ValueError, '2 distinct new ids'):
      r.remap(np.array([1, 2, 4, 5]), 2)
    for key, value in r.state_dict().items():  # Unchanged by the failures.
      np.testing.assert_array_equal(value, before[key], err_msg=key)
    rows, _ = r.remap(np.array([1, 4, 5]), 2)  # Two may be evicted here.
    np.testing.assert_array_equal(rows, [1, 2, 3])

  @parameterized.parameters(
      ('lru', (37,), 64), ('lfu', (37,), 64), ('lru', (16, 5), 90),
      ('lfu', (16, 5), 90), ('lfu', (8, 3), 1000), ('lru', (16, 5), 50),
      ('lfu', (16, 5), 50),
      # Steps so large that the packed int64 eviction keys would overflow.
      ('lru', (37,), 64, 2**60), ('lfu', (16, 5), 50, 2**56))
  def test_matches_reference_on_random_stream(self, policy, shape, num_rows,
                                              first_step=0):
    r = mc.ManagedCollisionRemapper(num_rows, policy)
    ref = ReferenceRemapper(num_rows, policy)
    num_reset = num_failed = 0
    for step, raw in enumerate(zipf_stream(1, 150, shape)):
      step = first_step + 3 * step + step % 2  # Increasing, not consecutive.
      before = r.live_ids()
      try:
        ref_rows, ref_reset = ref.remap(raw, step)
      except ValueError:
        with self.assertRaisesRegex(ValueError, 'distinct new ids'):
          r.remap(raw, step)
        self.assertEqual(r.live_ids(), before)
        num_failed += 1
        continue
      rows, reset = r.remap(raw, step)
      np.testing.assert_array_equal(rows, ref_rows, err_msg=f'step {step}')
      np.testing.assert_array_equal(reset, ref_reset, err_msg=f'step {step}')
      check_invariants(self, r, raw, rows)
      # reset: exactly the rows whose owner changed or that were taken.
      before_owner = {row: x for x, row in before.items()}
      after_owner = {row: x for x, row in r.live_ids().items()}
      changed = sorted(row for row, x in after_owner.items()
                       if before_owner.get(row) != x)
      np.testing.assert_array_equal(reset, changed)
      self.assertEqual(set(before_owner) - set(after_owner), set())
      num_reset += reset.size
    self.assertEqual(r.live_ids(), ref.row_of)
    self.assertGreater(num_reset, num_rows)  # Evictions did happen.
    if num_rows < np.prod(shape):  # Some batches overflow, most do not.
      self.assertBetween(num_failed, 1, 75)
    else:
      self.assertEqual(num_failed, 0)

  @parameterized.parameters('lru', 'lfu')
  def test_long_stream_invariants(self, policy):
    num_rows = 500
    r = mc.ManagedCollisionRemapper(num_rows, policy)
    for step, raw in enumerate(zipf_stream(2, 300, (64, 4), id_range=2**62,
                                           a=1.1)):
      rows, reset = r.remap(raw, step)
      check_invariants(self, r, raw, rows)
      self.assertTrue(np.all(np.diff(reset) > 0))
      np.testing.assert_array_equal(r.lookup(raw), rows)
    self.assertEqual(len(r.live_ids()), num_rows - 1)

  @parameterized.parameters('lru', 'lfu')
  def test_save_restore(self, policy):
    stream = list(zipf_stream(3, 60, (24, 2)))
    whole = mc.ManagedCollisionRemapper(40, policy)
    first = mc.ManagedCollisionRemapper(40, policy)
    for step, raw in enumerate(stream[:30]):
      whole.remap(raw, step)
      first.remap(raw, step)
    state = first.state_dict()
    for key, value in state.items():
      self.assertIsInstance(value, np.ndarray, msg=key)
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf) as loaded:
      from_file = dict(loaded)
    resumed = [mc.ManagedCollisionRemapper.from_state_dict(state, name='a'),
               mc.ManagedCollisionRemapper.from_state_dict(from_file)]
    into = mc.ManagedCollisionRemapper(40, policy)
    into.load_state_dict(from_file)
    resumed.append(into)
    for r in resumed:
      self.assertEqual(r.live_ids(), first.live_ids())
      self.assertEqual(r.policy, policy)
    for step, raw in enumerate(stream[30:], start=30):
      rows, reset = whole.remap(raw, step)
      for r in resumed:
        got_rows, got_reset = r.remap(raw, step)
        np.testing.assert_array_equal(got_rows, rows)
        np.testing.assert_array_equal(got_reset, reset)
    for r in resumed:
      for key, value in r.state_dict().items():
        np.testing.assert_array_equal(value, whole.state_dict()[key])

  def test_state_shapes_are_fixed(self):
    r = mc.ManagedCollisionRemapper(10, 'lfu')
    empty = r.state_dict()
    r.remap(np.array([5, 6, 7]), 0)
    full = r.state_dict()
    for key in empty:
      self.assertEqual(empty[key].shape, full[key].shape, msg=key)
      self.assertEqual(empty[key].dtype, full[key].dtype, msg=key)

  def test_load_state_dict_rejects_mismatch(self):
    state = mc.ManagedCollisionRemapper(10, 'lru').state_dict()
    with self.assertRaisesRegex(ValueError, 'num_rows=10.*num_rows=11'):
      mc.ManagedCollisionRemapper(11, 'lru').load_state_dict(state)
    with self.assertRaisesRegex(ValueError, "policy='lru'.*policy='lfu'"):
      mc.ManagedCollisionRemapper(10, 'lfu').load_state_dict(state)
    bad = dict(state, owner=np.array([-1, 4, 4, -1, -1, -1, -1, -1, -1, -1]))
    with self.assertRaisesRegex(ValueError, 'several rows'):
      mc.ManagedCollisionRemapper(10, 'lru').load_state_dict(bad)
    del bad['count']
    with self.assertRaisesRegex(ValueError, 'lacks'):
      mc.ManagedCollisionRemapper(10, 'lru').load_state_dict(bad)
    r = mc.ManagedCollisionRemapper(10, 'lru')
    r.remap(np.array([3]), 7)
    behind = dict(r.state_dict(), step=np.asarray(6, np.int64))
    with self.assertRaisesRegex(ValueError, r'last_seen.*step=6.*\[7, 7\]'):
      mc.ManagedCollisionRemapper(10, 'lru').load_state_dict(behind)

  def test_lookup_does_not_change_state(self):
    r = mc.ManagedCollisionRemapper(5, 'lfu')
    r.remap(np.array([7, 8, 9]), 0)
    before = r.state_dict()
    rows = r.lookup(np.array([[9, 100, -1], [7, -2, 8]], np.int32))
    np.testing.assert_array_equal(rows, [[3, 0, 0], [1, -1, 2]])
    self.assertEqual(rows.dtype, np.int32)
    for key, value in r.state_dict().items():
      np.testing.assert_array_equal(value, before[key], err_msg=key)
    self.assertEqual(r.live_ids(), {7: 1, 8: 2, 9: 3})

  def test_sorted_unique(self):
    rng = np.random.default_rng(4)
    spread = rng.integers(0, 4, 3000) * 2**61 + rng.integers(0, 3, 3000)
    cases = [
        np.array([7]),
        np.array([2**63 - 1, 0, 2**63 - 1, 5]),
        rng.integers(0, 50, 3000),  # Packed exactly.
        rng.integers(0, 2**63 - 1, 3000, dtype=np.int64),  # Shifted.
        spread,  # Shifted, and distinct ids share keys: runs re-sorted.
        np.concatenate([spread, rng.integers(0, 2**40, 300)]),
    ]
    for ids in cases:
      ids = ids.astype(np.int64)
      order, uniq, counts = mc._sorted_unique(ids)
      want_uniq, want_counts = np.unique(ids, return_counts=True)
      np.testing.assert_array_equal(uniq, want_uniq)
      np.testing.assert_array_equal(counts, want_counts)
      np.testing.assert_array_equal(ids[order], np.repeat(uniq, counts))
      np.testing.assert_array_equal(np.sort(order), np.arange(ids.size))

  def test_missing_and_padding_only(self):
    r = mc.ManagedCollisionRemapper(3)
    rows, reset = r.remap(np.array([[-1, -2], [-2, -1]]), 0)
    np.testing.assert_array_equal(rows, [[0, -1], [-1, 0]])
    self.assertEqual(reset.shape, (0,))
    self.assertEqual(reset.dtype, np.int32)
    rows, reset = r.remap(np.zeros((0, 3), np.int64), 1)
    self.assertEqual(rows.shape, (0, 3))
    self.assertEqual(r.live_ids(), {})

  def test_invalid_arguments(self):
    with self.assertRaisesRegex(ValueError, "'t'.*num_rows.*got 1"):
      mc.ManagedCollisionRemapper(1, name='t')
    with self.assertRaisesRegex(ValueError, "policy.*'fifo'"):
      mc.ManagedCollisionRemapper(4, 'fifo')
    r = mc.ManagedCollisionRemapper(4, name='f')
    with self.assertRaisesRegex(ValueError, "'f'.*got -3"):
      r.remap(np.array([1, -3]), 0)
    with self.assertRaisesRegex(ValueError, 'dtype float'):
      r.remap(np.array([1.0]), 0)
    r.remap(np.array([1]), 5)
    r.remap(np.array([1]), 5)
    with self.assertRaisesRegex(ValueError, 'got 4 after 5'):
      r.remap(np.array([1]), 4)


if __name__ == '__main__':
  absltest.main()
