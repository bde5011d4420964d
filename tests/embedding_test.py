"""The embedding engine against dense references on one device.

Sparse updates must equal the same optimizer (written from its formula in
NumPy, tests/reference.py) applied to the dense autodiff gradient of the whole
table (SGD, Adagrad, row-wise Adagrad), including ids
repeated within a batch and across features of a shared table, and multi-hot
bags. Lazy Adam equals dense Adam on rows touched at every step and leaves
untouched rows alone.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from dlrm_jax.data import features as features_lib
from dlrm_jax.train import schedules
from dlrm_jax.embedding import EmbeddingEngine, FeatureSpec, SparseOptimizerSpec
from dlrm_jax.embedding import TableSpec
from dlrm_jax.embedding import table_access
from tests import reference

B = 16


def make_specs(kind, lr=0.1, dtype='float32', combiners=('sum', 'mean')):
  opt = SparseOptimizerSpec(
      kind, schedules.ScheduleSpec('constant', lr),
      initial_accumulator_value=0.1 if kind == 'adagrad' else 0.0)
  tables = (
      TableSpec('shared', 23, 8, optimizer=opt, dtype=dtype),
      TableSpec('bag', 37, 8, optimizer=opt, combiner=combiners[1],
                dtype=dtype, initializer='normal'),
      TableSpec('small', 5, 8, optimizer=opt, dtype=dtype),
  )
  features = (
      FeatureSpec('f_shared_a', 'shared'),
      FeatureSpec('f_bag', 'bag', max_ids=4),
      FeatureSpec('f_shared_b', 'shared', max_ids=2),
      FeatureSpec('f_small', 'small'),
  )
  return tables, features


def make_ids(rng, features, tables, batch=B):
  rows = {t.name: t.num_rows for t in tables}
  cols = []
  for f in features:
    # Few distinct ids, so they repeat within the batch and across features.
    c = rng.integers(0, min(rows[f.table], 6), (batch, f.max_ids))
    if f.max_ids > 1:
      c = np.where(rng.random(c.shape) < 0.3, -1, c)  # padding
      c[0] = -1  # an empty bag
    cols.append(c)
  return np.concatenate(cols, axis=1).astype(np.int32)


def loss_weights(features, tables, seed=7):
  dims = {t.name: t.dim for t in tables}
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(dims[f.table],)).astype(np.float32)
          for f in features]


def loss_of(embs, weights):
  return sum(jnp.sum(jnp.sin(e) * w) for e, w in zip(embs, weights)) / B


class EngineHarness:
  """Runs the engine and the dense reference side by side."""

  def __init__(self, tables, features, mesh, plan=None):
    self.tables, self.features = tables, features
    self.engine = EmbeddingEngine(tables, features, mesh, plan)
    self.lookup = jax.jit(self.engine.lookup)
    self.update = jax.jit(self.engine.apply_gradients, donate_argnums=0)
    self.weights = loss_weights(features, tables)

  def sparse_step(self, state, ids, step):
    ids = jax.device_put(ids, jax.sharding.NamedSharding(
        self.engine.mesh, self.engine.ids_spec()))
    embs, invalid = self.lookup(state['stacks'], ids)
    grads = jax.grad(loss_of)(embs, self.weights)
    return self.update(state, ids, grads, jnp.int32(step)), embs, invalid

  def dense_grads(self, tabs, ids):
    def f(tabs):
      return loss_of(reference.dense_lookup(tabs, self.tables, self.features,
                                            ids), self.weights)
    return jax.grad(f)(tabs)


class SparseEqualsDenseTest(parameterized.TestCase):

  @parameterized.parameters('sgd', 'adagrad', 'rowwise_adagrad')
  def test_matches_dense_gradient_optimizer(self, kind):
    tables, features = make_specs(kind)
    h = EngineHarness(tables, features, reference.single_device_mesh())
    state = h.engine.init(jax.random.key(0))
    tabs = {t.name: jnp.asarray(table_access.get_table(h.engine, state, t.name))
            for t in tables}
    dense_opts = {t.name: reference.dense_optimizer(t) for t in tables}
    opt_states = {n: dense_opts[n][0](tabs[n]) for n in tabs}
    rng = np.random.default_rng(0)
    for step in range(3):
      ids = make_ids(rng, features, tables)
      state, embs, invalid = h.sparse_step(state, ids, step)
      self.assertEqual(int(invalid), 0)
      want = reference.dense_lookup(tabs, tables, features, ids)
      for got, w in zip(embs, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-6,
                                   atol=1e-6)
      grads = h.dense_grads(tabs, ids)
      for n in tabs:
        tabs[n], opt_states[n] = dense_opts[n][1](tabs[n], opt_states[n],
                                                  grads[n])
      for t in tables:
        np.testing.assert_allclose(
            table_access.get_table(h.engine, state, t.name),
            np.asarray(tabs[t.name]),
            rtol=2e-5, atol=2e-6, err_msg=f'{kind} table {t.name} step {step}')
    if kind == 'rowwise_adagrad':
      acc = table_access.get_table(h.engine, state, 'shared', slot='acc')
      self.assertEqual(acc.shape, (23,))
      np.testing.assert_allclose(acc, opt_states['shared']['opt'].racc,
                                 rtol=1e-5, atol=1e-8)

  def test_lazy_adam(self):
    tables, features = make_specs('adam', lr=0.01)
    h = EngineHarness(tables, features, reference.single_device_mesh())
    state = h.engine.init(jax.random.key(1))
    tabs = {t.name: jnp.asarray(table_access.get_table(h.engine, state, t.name))
            for t in tables}
    init, update = reference.dense_optimizer(tables[0])
    opt_states = {n: init(tabs[n]) for n in tabs}
    rng = np.random.default_rng(3)
    ids1 = make_ids(rng, features, tables)
    ids2 = make_ids(rng, features, tables)
    # Row 5 of 'shared' is only touched in step 1 (ids are drawn below 6).
    ids1[:, 0] = np.where(np.arange(B) == 3, 5, ids1[:, 0])
    ids2[:, 0] = np.where(ids2[:, 0] == 5, 4, ids2[:, 0])
    ids2[:, 5:7] = np.where(ids2[:, 5:7] == 5, 4, ids2[:, 5:7])
    before = None
    for step, ids in enumerate((ids1, ids2)):
      grads = h.dense_grads(tabs, ids)
      for n in tabs:
        tabs[n], opt_states[n] = update(tabs[n], opt_states[n], grads[n])
      state, _, _ = h.sparse_step(state, ids, step)
      if step == 0:
        before = table_access.get_table(h.engine, state, 'shared')
        np.testing.assert_allclose(before, np.asarray(tabs['shared']),
                                   rtol=1e-5, atol=1e-6)
    got = table_access.get_table(h.engine, state, 'shared')
    touched1, touched2 = [
        (set(ids[:, 0]) | set(ids[:, 5:7].reshape(-1))) - {-1}
        for ids in (ids1, ids2)]
    want = np.asarray(tabs['shared'])
    for r in range(23):
      if r in touched1 and r in touched2:
        np.testing.assert_allclose(got[r], want[r], rtol=1e-5, atol=1e-6)
      elif r in touched1:  # untouched in step 2: lazy keeps it, dense moves it
        np.testing.assert_array_equal(got[r], before[r])
        self.assertGreater(np.abs(want[r] - got[r]).max(), 1e-6)
      elif r not in touched2:
        np.testing.assert_array_equal(got[r], want[r])
    self.assertIn(5, touched1 - touched2)


class PoolingTest(parameterized.TestCase):

  @parameterized.parameters('sum', 'mean', 'sqrtn')
  def test_multi_hot_pooling_against_loop(self, combiner):
    tables, features = make_specs('sgd', combiners=('sum', combiner))
    h = EngineHarness(tables, features, reference.single_device_mesh())
    state = h.engine.init(jax.random.key(2))
    ids = make_ids(np.random.default_rng(5), features, tables)
    embs, _ = h.lookup(state['stacks'], jnp.asarray(ids))
    bag = table_access.get_table(h.engine, state, 'bag')
    got = np.asarray(embs[1])
    for b in range(B):
      want = reference.loop_pool(bag, ids[b, 1:5], combiner)
      np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[0], 0.0)  # the empty bag

  def test_initial_values(self):
    tables, features = make_specs('sgd')
    engine = EmbeddingEngine(tables, features, reference.single_device_mesh())
    state = engine.init(jax.random.key(0))
    shared = table_access.get_table(engine, state, 'shared')
    bound = np.sqrt(1 / 23)
    self.assertLessEqual(np.abs(shared).max(), bound)
    self.assertGreater(np.abs(shared).max(), bound / 2)
    self.assertGreater(len(np.unique(shared)), 23 * 8 - 2)
    # Padding rows of the stack stay zero.
    stack = np.asarray(next(iter(state['stacks'].values())))
    used = sum(t.num_rows for t in tables)
    np.testing.assert_array_equal(stack[used:], 0.0)


class InvalidIdTest(absltest.TestCase):

  def test_out_of_range_ids_read_zero_write_nothing_and_are_counted(self):
    tables, features = make_specs('sgd')
    h = EngineHarness(tables, features, reference.single_device_mesh())
    state = h.engine.init(jax.random.key(0))
    before = {t.name: table_access.get_table(h.engine, state, t.name)
              for t in tables}
    ids = make_ids(np.random.default_rng(1), features, tables)
    ids[2, 0] = 23       # one past 'shared'
    ids[3, 7] = 1000     # far past 'small' (the stack holds other rows there)
    ids[4, 1] = -5       # negative, not the -1 padding
    state, embs, invalid = h.sparse_step(state, ids, 0)
    self.assertEqual(int(invalid), 3)
    np.testing.assert_array_equal(np.asarray(embs[0])[2], 0.0)
    np.testing.assert_array_equal(np.asarray(embs[3])[3], 0.0)
    tabs = {n: jnp.asarray(v) for n, v in before.items()}
    grads = h.dense_grads(tabs, ids)  # the reference ignores invalid ids too
    for t in tables:
      np.testing.assert_allclose(
          table_access.get_table(h.engine, state, t.name),
          before[t.name] - 0.1 * np.asarray(grads[t.name]), rtol=1e-5,
          atol=1e-6)

  def test_host_check_names_feature_and_value(self):
    transform = features_lib.FeatureTransform(
        dense=(), sparse=(
            features_lib.IdFeature('cat_0', 'cat_0', 4, num_buckets=10),
            features_lib.IdFeature('cat_1', 'cat_1', 4, num_buckets=10,
                                   max_ids=2)))
    ids = np.array([[1, 2, -1], [3, 12, 4]], np.int32)
    with self.assertRaisesRegex(ValueError,
                                "feature 'cat_1' has id 12 outside its table"
                                ' of 10 rows'):
      transform.check_ids(ids, [10, 10])
    transform.check_ids(np.array([[9, -1, -1]], np.int32), [10, 10])


class PrecisionTest(absltest.TestCase):

  def test_bfloat16_tables_float32_state(self):
    tables32, features = make_specs('rowwise_adagrad')
    tables16, _ = make_specs('rowwise_adagrad', dtype='bfloat16')
    mesh = reference.single_device_mesh()
    h32 = EngineHarness(tables32, features, mesh)
    h16 = EngineHarness(tables16, features, mesh)
    s32 = h32.engine.init(jax.random.key(0))
    s16 = h16.engine.init(jax.random.key(0))
    for leaf in jax.tree.leaves(s16['stacks']):  # bf16 bit patterns
      self.assertEqual(leaf.dtype, jnp.float16)
    for leaf in jax.tree.leaves(s16['slots']):
      self.assertEqual(leaf.dtype, jnp.float32)
    rng = np.random.default_rng(0)
    for step in range(3):
      ids = make_ids(rng, features, tables32)
      s32, _, _ = h32.sparse_step(s32, ids, step)
      s16, _, _ = h16.sparse_step(s16, ids, step)
    for t in tables32:
      a = table_access.get_table(h32.engine, s32, t.name)
      b = table_access.get_table(h16.engine, s16, t.name).astype(np.float32)
      np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-2)


class SpecValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('unknown_table', lambda t, f: (t, f + (FeatureSpec('x', 'nope'),)),
       "feature 'x' reads table 'nope'"),
      ('dim_mismatch',
       lambda t, f: (t, f + (FeatureSpec('x', 'shared', dim=4),)),
       "feature 'x' expects dim 4 but its table 'shared' has dim 8"),
      ('rows', lambda t, f: ((TableSpec('z', 0, 8),) + t, f),
       r"table 'z': num_rows \(0\) must be a positive integer"),
      ('dup_table', lambda t, f: (t + (t[0],), f),
       "table 'shared' is defined twice"),
      ('dup_feature', lambda t, f: (t, f + (f[0],)),
       "feature 'f_shared_a' is defined twice"),
      ('max_ids', lambda t, f: (t, f + (FeatureSpec('y', 'bag', 0),)),
       r"feature 'y': max_ids \(0\)"),
  )
  def test_errors(self, mutate, pattern):
    tables, features = mutate(*make_specs('sgd'))
    with self.assertRaisesRegex(ValueError, pattern):
      EmbeddingEngine(tables, features, reference.single_device_mesh())


if __name__ == '__main__':
  absltest.main()
