"""Managed collisions in training: row resets, batch remapping, resume."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.data import features as features_lib
from dlrm_jax.train import loop as train_loop
from dlrm_jax.train import trainer as trainer_lib
from dlrm_jax.embedding import EmbeddingEngine
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding.ids import remapping
from dlrm_jax.embedding import table_access
from tests import embedding_test
from tests import reference


class ResetRowsTest(parameterized.TestCase):

  @parameterized.parameters((1, 1, None), (2, 4, None),
                            (2, 4, 'table_wise'), (1, 8, 'row_wise'),
                            (2, 4, 'table_row_wise'))
  def test_resets_exactly_the_named_rows(self, data, model, strategy):
    tables, features = embedding_test.make_specs('adagrad')
    mesh = reference.mesh_of(data, model)
    plan = None if strategy is None else plan_lib.auto_plan(
        tables, model, overrides={t.name: strategy for t in tables},
        row_group_size=2)
    engine = EmbeddingEngine(tables, features, mesh, plan)
    state = engine.init(jax.random.key(0))
    h = embedding_test.EngineHarness(tables, features, mesh, plan)
    rng = np.random.default_rng(0)
    state, _, _ = h.sparse_step(state, embedding_test.make_ids(
        rng, features, tables), 0)  # accumulators move away from 0.1
    before = {t.name: (table_access.get_table(engine, state, t.name),
                       table_access.get_table(engine, state, t.name, 'acc'))
              for t in tables}
    rows = -np.ones((16, engine.num_id_columns), np.int32)
    rows[0, 0] = 3    # f_shared_a -> table 'shared' row 3
    rows[13, 6] = 7   # f_shared_b (second id column) -> 'shared' row 7
    # (an example of the second data replica, with mesh.data = 2)
    rows[2, 7] = 4    # f_small -> 'small' row 4
    rows = jax.device_put(rows, jax.sharding.NamedSharding(
        mesh, engine.ids_spec()))
    state = jax.jit(engine.reset_rows)(state, rows)
    for t in tables:
      w, acc = before[t.name]
      want_w, want_acc = w.copy(), acc.copy()
      for r in {'shared': [3, 7], 'small': [4]}.get(t.name, []):
        want_w[r] = 0.0
        want_acc[r] = 0.1  # the initial accumulator value
      np.testing.assert_array_equal(
          table_access.get_table(engine, state, t.name), want_w)
      np.testing.assert_array_equal(
          table_access.get_table(engine, state, t.name, 'acc'), want_acc)


class BatchRemapperTest(absltest.TestCase):

  def test_fills_ids_and_resets(self):
    transform = features_lib.FeatureTransform(dense=(), sparse=(
        features_lib.IdFeature('a', 'cat_0', 4, num_buckets=50),
        features_lib.IdFeature('b', 'cat_1', 4, num_buckets=4,
                               managed_collision='lru')))
    remapper = remapping.BatchRemapper(transform)
    self.assertEqual(remapper.feature_names, ('b',))
    raw = {'label': np.zeros(4, np.float32),
           'cat': np.array([[1, 10], [2, 20], [3, -1], [4, 10]])}
    batch = remapper.train(transform.apply(raw), step=0)
    ids = batch['ids'][:, 1]
    self.assertEqual(ids[2], 0)  # missing
    self.assertEqual(ids[0], ids[3])  # the same value, the same row
    self.assertNotEqual(ids[0], ids[1])
    self.assertEqual(sorted(batch['reset'][:, 1][batch['reset'][:, 1] >= 0]),
                     sorted({ids[0], ids[1]}))
    self.assertTrue((batch['reset'][:, 0] == -1).all())
    self.assertNotIn('mc_raw', batch)
    # A new value evicts the least recently used one (20 at step 0 vs 10 and
    # 30 at step 1), whose row is reset.
    raw['cat'][:, 1] = [10, 30, 10, 30]
    batch = remapper.train(transform.apply(raw), step=1)
    raw['cat'][:, 1] = [40, 10, 30, 10]
    batch = remapper.train(transform.apply(raw), step=2)
    live = remapper.remappers['b'].live_ids()
    self.assertNotIn(20, live)
    self.assertEqual(batch['ids'][0, 1], live[40])
    self.assertIn(live[40], batch['reset'][:, 1])
    # Eval lookups change nothing; unknown values read the missing row.
    raw['cat'][:, 1] = [10, 99, -1, 40]
    out = remapper.eval(transform.apply(raw))
    self.assertEqual(list(out['ids'][:, 1]), [live[10], 0, 0, live[40]])
    self.assertEqual(remapper.remappers['b'].live_ids(), live)


def mc_config(steps):
  config = criteo_config.get_config('tiny')
  config.features.cat_2.managed_collision.num_rows = 300
  config.features.cat_3.managed_collision.num_rows = 400
  config.features.cat_3.managed_collision.policy = 'lfu'
  config.num_train_steps = steps
  return config


class ManagedCollisionTrainingTest(absltest.TestCase):

  def test_resumed_run_maps_ids_as_an_uninterrupted_one(self):
    trainer = trainer_lib.Trainer(mc_config(40), mesh=reference.single_device_mesh())
    self.assertEqual(trainer.new_host_state().remapper.feature_names,
                     ('cat_2', 'cat_3'))
    straight = self.create_tempdir().full_path
    a = train_loop.train_and_evaluate(mc_config(40), straight, trainer)
    resumed = self.create_tempdir().full_path
    train_loop.train_and_evaluate(mc_config(20), resumed, trainer)
    b = train_loop.train_and_evaluate(mc_config(40), resumed, trainer)
    self.assertEqual(a['eval'], b['eval'])
    ckpts = []
    for d in (straight, resumed):
      from dlrm_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
      c = ckpt_lib.Checkpointer(d)
      state, _ = trainer.restore(c, 40)
      ckpts.append((state, c.restore_remappers(40)))
      c.close()
    (sa, ra), (sb, rb) = ckpts
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for name in ('cat_2', 'cat_3'):
      for k in ra[name]:
        np.testing.assert_array_equal(np.asarray(ra[name][k]),
                                      np.asarray(rb[name][k]))


if __name__ == '__main__':
  absltest.main()
