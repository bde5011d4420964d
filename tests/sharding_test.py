"""Sharded embeddings on 8 fake CPU devices against one device.

For every strategy (replicated, table-wise, row-wise, column-wise), a plan
mixing them, and the auto planner: lookups, updated tables and optimizer state
equal the single-device engine over several steps; the trainer's losses,
dense parameters (hence their gradients) and tables equal the single-device
trainer's; shards hold only their share of a table.
"""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import comm_volume
from configs import criteo as criteo_config
from dlrm_jax.train import trainer as trainer_lib
from dlrm_jax.embedding import EmbeddingEngine
from dlrm_jax.embedding.sharding import exchange as exchange_lib
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding import table_access
from tests import embedding_test
from tests import reference

STRATEGIES = ('replicated', 'table_wise', 'row_wise', 'column_wise')


def uniform_plan(tables, strategy, num_shards):
  """Every table `strategy`; 'row_wise/every_holder' fixes the row exchange."""
  strategy, _, exchange = strategy.partition('/')
  plan = plan_lib.auto_plan(
      tables, num_shards, overrides={t.name: strategy for t in tables},
      row_group_size=num_shards // 2 if strategy == 'table_row_wise' else 0)
  if not exchange:
    return plan
  return dataclasses.replace(plan, placements=tuple(
      dataclasses.replace(p, exchange=exchange)
      if p.strategy in plan_lib.ROW_SPLIT else p for p in plan.placements))


def mixed_plan(tables, num_shards):
  """'shared' row-wise, 'bag' column-wise on 4 shards, 'small' replicated."""
  return plan_lib.Plan(num_shards, (
      plan_lib.TablePlacement('shared', 'row_wise', tuple(range(num_shards))),
      plan_lib.TablePlacement('bag', 'column_wise', (1, 2, 3, 0)),
      plan_lib.TablePlacement('small', 'table_wise', (num_shards - 1,)),
  ))


_SINGLE = {}


def single_device_harness(kind):
  """One single-device engine (and its compiled steps) per optimizer."""
  if kind not in _SINGLE:
    tables, features = embedding_test.make_specs(kind)
    _SINGLE[kind] = embedding_test.EngineHarness(
        tables, features, reference.single_device_mesh())
  return _SINGLE[kind]


_CASES = (
    [(s, 'rowwise_adagrad', (2, 4)) for s in STRATEGIES + ('mixed',)] +
    [(s, 'adagrad', (1, 8)) for s in STRATEGIES + ('mixed',)] +
    [('mixed', 'adam', (1, 8)), ('mixed', 'sgd', (2, 4))] +
    # Rows split over half the model axis (bags of mean-pooled ids included).
    [('table_row_wise', 'adagrad', (1, 8)),
     ('table_row_wise', 'rowwise_adagrad', (2, 4))] +
    # Row-split tables whose ids go to every holder (the planner's choice
    # for bags of many ids on few shards) rather than bucketized.
    [('row_wise/every_holder', 'adagrad', (1, 8)),
     ('table_row_wise/every_holder', 'adagrad', (1, 8))])


class EngineShardingTest(parameterized.TestCase):

  @parameterized.parameters(*_CASES)
  def test_matches_single_device(self, strategy, kind, mesh_shape):
    tables, features = embedding_test.make_specs(kind)
    mesh = reference.mesh_of(*mesh_shape)
    s = mesh_shape[1]
    plan = (mixed_plan(tables, s) if strategy == 'mixed'
            else uniform_plan(tables, strategy, s))
    sharded = embedding_test.EngineHarness(tables, features, mesh, plan)
    single = single_device_harness(kind)
    a = sharded.engine.init(jax.random.key(4))
    b = single.engine.init(jax.random.key(4))
    for t in tables:  # the same logical tables, whatever the layout
      np.testing.assert_array_equal(
          table_access.get_table(sharded.engine, a, t.name),
          table_access.get_table(single.engine, b, t.name))
    rng = np.random.default_rng(0)
    for step in range(3):
      ids = embedding_test.make_ids(rng, features, tables)
      a, emb_a, _ = sharded.sparse_step(a, ids, step)
      b, emb_b, _ = single.sparse_step(b, ids, step)
      for x, y in zip(emb_a, emb_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6,
                                   atol=1e-6)
    for t in tables:
      np.testing.assert_allclose(
          table_access.get_table(sharded.engine, a, t.name),
          table_access.get_table(single.engine, b, t.name),
          rtol=1e-5, atol=1e-6, err_msg=t.name)
      for slot in a['slots'][next(iter(a['slots']))]:
        np.testing.assert_allclose(
            table_access.get_table(sharded.engine, a, t.name, slot),
            table_access.get_table(single.engine, b, t.name, slot), rtol=1e-5,
            atol=1e-6, err_msg=f'{t.name} {slot}')

  def test_shards_hold_their_share(self):
    tables, features = embedding_test.make_specs('rowwise_adagrad')
    mesh = reference.mesh_of(1, 8)
    for strategy in ('row_wise', 'column_wise', 'table_wise'):
      engine = EmbeddingEngine(tables, features, mesh,
                               uniform_plan(tables, strategy, 8))
      state = engine.init(jax.random.key(0))
      for name, arr in state['stacks'].items():
        shards = arr.addressable_shards
        self.assertLen(shards, 8)
        shapes = {sh.data.shape for sh in shards}
        self.assertLen(shapes, 1, name)  # every device the same block
        rows, width = shapes.pop()
        total_elems = sum(t.num_rows * t.dim for t in tables)
        if strategy == 'row_wise':
          # Each device holds about 1/8 of every table (rounded up to 8).
          self.assertLessEqual(rows, sum(-(-t.num_rows // 8) for t in tables)
                               + 8)
          self.assertLess(rows, max(t.num_rows for t in tables))
        if strategy == 'column_wise':
          self.assertEqual(width, 1)  # dim 8 over 8 devices
        self.assertLess(rows * width, total_elems)  # no full copy anywhere

  def test_auto_plan_mixes_strategies_and_prints(self):
    tables = [dataclasses.replace(t, num_rows=r) for t, r in zip(
        embedding_test.make_specs('adagrad')[0], (50_000, 900, 7))]
    plan = plan_lib.auto_plan(tables, 8, replicate_bytes=10_000)
    got = {p.table: p.strategy for p in plan.placements}
    self.assertEqual(got, {'shared': 'row_wise', 'bag': 'table_wise',
                           'small': 'replicated'})
    text = plan_lib.describe(plan, tables)
    for word in ('table', 'rows', 'dim', 'strategy', 'model shards',
                 'bytes/device', 'row_wise', '50,000'):
      self.assertIn(word, text)
    with self.assertRaisesRegex(ValueError, 'device_memory_gb'):
      plan_lib.auto_plan(tables, 8, device_memory_bytes=1000)
    self.assertEqual(plan_lib.Plan.from_json(plan.to_json()), plan)

  def test_auto_plan_row_groups(self):
    tables = [dataclasses.replace(t, num_rows=r) for t, r in zip(
        embedding_test.make_specs('adagrad')[0], (50_000, 900, 7))]
    plan = plan_lib.auto_plan(tables, 8, replicate_bytes=10_000,
                              row_group_size=4)
    shared = plan.placement('shared')
    self.assertEqual(shared.strategy, 'table_row_wise')
    self.assertIn(shared.devices, ((0, 1, 2, 3), (4, 5, 6, 7)))
    self.assertIn('table_row_wise', plan_lib.describe(plan, tables))
    with self.assertRaisesRegex(ValueError, 'row_group_size'):
      plan_lib.auto_plan(tables, 8, row_group_size=3)

  def test_plan_errors(self):
    tables, _ = embedding_test.make_specs('sgd')
    bad = plan_lib.Plan(4, (
        plan_lib.TablePlacement('shared', 'column_wise', (0, 1, 2)),
        plan_lib.TablePlacement('bag', 'table_wise', (0,)),
        plan_lib.TablePlacement('small', 'table_wise', (0,))))
    with self.assertRaisesRegex(ValueError, 'dim 8 does not split evenly'):
      plan_lib.validate_plan(bad, tables)
    with self.assertRaisesRegex(ValueError, 'must be one of'):
      plan_lib.auto_plan(tables, 4, overrides={'shared': 'diagonal'})


# Bucketized row-split exchanges: tables large enough, and a per-device batch
# B_l of 32 on 8 devices, for capacity blocks smaller than the worst case.
_BUCKET_B_L = 32


def bucket_specs(kind):
  """make_specs' tables and features (bags of 1, 2 and 4 ids), more rows."""
  tables, features = embedding_test.make_specs(kind)
  return tuple(dataclasses.replace(t, num_rows=r)
               for t, r in zip(tables, (203, 157, 61))), features


def uniform_ids(rng, features, tables, batch):
  """Ids drawn uniformly over each table's rows; bags padded at random."""
  rows = {t.name: t.num_rows for t in tables}
  cols = []
  for f in features:
    c = rng.integers(0, rows[f.table], (batch, f.max_ids))
    if f.max_ids > 1:
      c = np.where(rng.random(c.shape) < 0.3, -1, c)
    cols.append(c)
  return np.concatenate(cols, axis=1).astype(np.int32)


def first_block_ids(rng, features, tables, batch, plan):
  """Every id in its table's first row block: all on one shard per table."""
  ids = []
  for f in features:
    t = next(t for t in tables if t.name == f.table)
    rps = -(-t.num_rows // len(plan.placement(t.name).devices))
    ids.append(rng.integers(0, rps, (batch, f.max_ids)))
  return np.concatenate(ids, axis=1).astype(np.int32)


def bucketized_parts(engine):
  return [p for ex in engine.exchanges.values() for p in ex.parts
          if isinstance(p, exchange_lib.BucketizedExchange)]


def most_ids_to_one_shard(part, ids, b_l):
  """The most ids one device sends one shard, as `part` routes them."""
  r = part.routing
  cols = ids[:, r.cols]
  valid = (cols >= 0) & (cols < r.num_rows)
  block = np.minimum(np.where(valid, cols, 0) // r.rps, r.owner.shape[1] - 1)
  dest = r.owner[np.arange(len(r.cols)), block]
  return max(np.bincount(dest[k:k + b_l][valid[k:k + b_l]],
                         minlength=part.num_shards).max()
             for k in range(0, ids.shape[0], b_l))


_SINGLE_BUCKET = {}


class BucketizedShardingTest(parameterized.TestCase):
  """Bucketized row-split tables on 8 devices equal one device.

  Steps 0 and 2 draw ids uniformly (capacity blocks); step 1 sends every id
  of a table to one shard, which overflows the blocks and takes the
  worst-case branch (on a 2 x 4 mesh only the first data row's examples
  overflow, and the mesh-wide flag sends both model groups to the worst
  case). Single-id
  bags are bit-for-bit equal (with data replicas, until the first update).
  """

  @parameterized.parameters(
      ('row_wise', 'sgd', (1, 8)), ('row_wise', 'adagrad', (1, 8)),
      ('table_row_wise', 'sgd', (1, 8)), ('table_row_wise', 'adagrad', (1, 8)),
      ('row_wise', 'adagrad', (2, 4)))
  def test_matches_single_device(self, strategy, kind, mesh_shape):
    tables, features = bucket_specs(kind)
    plan = uniform_plan(tables, strategy, mesh_shape[1])
    sharded = embedding_test.EngineHarness(
        tables, features, reference.mesh_of(*mesh_shape), plan)
    parts = bucketized_parts(sharded.engine)
    self.assertLen(parts, 1)
    cap, _, worst, _ = parts[0].capacities(_BUCKET_B_L)
    self.assertLess(cap, worst)
    if kind not in _SINGLE_BUCKET:
      _SINGLE_BUCKET[kind] = embedding_test.EngineHarness(
          tables, features, reference.single_device_mesh())
    single = _SINGLE_BUCKET[kind]
    a = sharded.engine.init(jax.random.key(4))
    b = single.engine.init(jax.random.key(4))
    rng = np.random.default_rng(0)
    batch = 8 * _BUCKET_B_L
    for step in range(3):
      ids = uniform_ids(rng, features, tables, batch)
      if step == 1:  # the first data row's examples (all of them on 1 x 8)
        rows = batch // mesh_shape[0]
        ids[:rows] = first_block_ids(rng, features, tables, batch, plan)[:rows]
      most = most_ids_to_one_shard(parts[0], ids, _BUCKET_B_L)
      if step == 1:
        self.assertGreater(most, cap)  # the worst-case branch
        if mesh_shape[0] > 1:  # the other group alone would fit
          self.assertLessEqual(
              most_ids_to_one_shard(parts[0], ids[rows:], _BUCKET_B_L), cap)
      else:
        self.assertLessEqual(most, cap)  # the capacity branch
      a, emb_a, _ = sharded.sparse_step(a, ids, step)
      b, emb_b, _ = single.sparse_step(b, ids, step)
      for f, x, y in zip(features, emb_a, emb_b):
        # Data replicas sum a row's gradients in another order, so after an
        # update only the unreplicated tables stay bit-for-bit equal.
        if f.max_ids == 1 and (step == 0 or mesh_shape[0] == 1):
          np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                        err_msg=f'{f.name} step {step}')
        else:
          np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6,
                                     atol=1e-6, err_msg=f'{f.name} {step}')
    for t in tables:
      np.testing.assert_allclose(
          table_access.get_table(sharded.engine, a, t.name),
          table_access.get_table(single.engine, b, t.name),
          rtol=1e-5, atol=1e-6, err_msg=t.name)
      for slot in a['slots'].get(next(iter(a['slots']), ''), {}):
        np.testing.assert_allclose(
            table_access.get_table(sharded.engine, a, t.name, slot),
            table_access.get_table(single.engine, b, t.name, slot),
            rtol=1e-5, atol=1e-6, err_msg=f'{t.name} {slot}')

  def test_planner_chooses_row_exchange_by_bytes(self):
    # Bucketized sends each id once and a partial bag per shard the bag
    # reaches; every holder, each id and a partial bag to each holder. Only
    # long bags of wide rows (every shard reached: no saving on the bags)
    # make the bucketized blocks' slack cost more than the ids it saves.
    self.assertEqual(plan_lib.choose_row_exchange(8, 128, 2, 2),
                     'every_holder')
    for args in ((1, 8, 8, 8), (4, 8, 4, 8), (16, 8, 2, 2)):
      self.assertEqual(plan_lib.choose_row_exchange(*args), 'bucketized')
    cost = plan_lib.row_exchange_bytes(1, 16, 8, 8)  # single ids, S = 8
    self.assertLess(cost['bucketized'], cost['every_holder'] / 7)
    tables, features = bucket_specs('sgd')
    ways = {}
    for exchange in ('', 'every_holder'):
      plan = uniform_plan(tables, 'row_wise/' + exchange, 4)
      self.assertEqual(plan_lib.Plan.from_json(plan.to_json()), plan)
      stacks = plan_lib.build_layout(plan, tables, features)
      ways[exchange] = {g.row_exchange for st in stacks for g in st.segments}
    self.assertEqual(ways, {'': {'bucketized'},
                            'every_holder': {'every_holder'}})
    plan = uniform_plan(tables, 'table_wise', 2)
    with self.assertRaisesRegex(ValueError, 'exchange'):
      plan_lib.validate_plan(dataclasses.replace(plan, placements=tuple(
          dataclasses.replace(p, exchange='bucketized')
          for p in plan.placements)), tables)


def step_hlo(engine, mesh, b_l):
  """The optimized HLO of a lookup and update at `b_l` examples per device."""

  def step(state, ids):
    embs, _ = engine.lookup(state['stacks'], ids)
    return engine.apply_gradients(state, ids, [jnp.sin(e) for e in embs],
                                  jnp.int32(0))

  ids = jax.ShapeDtypeStruct(
      (b_l * 8, engine.num_id_columns), jnp.int32,
      sharding=jax.sharding.NamedSharding(mesh, engine.ids_spec()))
  return jax.jit(step).lower(engine.abstract_state(), ids).compile().as_text()


class ExchangeHloTest(parameterized.TestCase):
  """The compiled exchange moves what the all-to-all design says, no more."""

  @parameterized.parameters(((1, 8),), ((2, 4),))
  def test_table_wise_moves_only_owned_ids_and_bags(self, mesh_shape):
    tables, features = embedding_test.make_specs('adagrad')
    data, s = mesh_shape
    mesh = reference.mesh_of(data, s)
    engine = EmbeddingEngine(tables, features, mesh,
                             uniform_plan(tables, 'table_wise', s))

    b_l = 4
    found = comm_volume.collective_bytes(step_hlo(engine, mesh, b_l), 8)
    emb = [(kind, x, n) for where, kind, x, n, _ in found['ops']
           if where == 'emb']
    # Ids (int32) to the owners, pooled sums back and their gradients to the
    # owners (float32), each padded to the largest share: [B_l, S * L] and
    # [B_l, S * N, W] per stack.
    want = 0
    for ex in engine.exchanges.values():
      o = ex.owned
      want += b_l * o.cols.size * 4 + 2 * b_l * o.bag_seg.size * 8 * 4
    got_a2a = sum(x for kind, x, _ in emb if kind == 'all-to-all')
    self.assertIn(got_a2a, (want, want + sum(
        b_l * ex.owned.cols.size * 4 for ex in engine.exchanges.values())))
    for kind, x, n in emb:
      if kind == 'all-reduce':
        self.assertLessEqual(x, 4)  # the invalid-id count
      elif kind == 'all-gather':  # deduplicated pairs of the replicas
        self.assertEqual(n, data)
      else:
        self.assertEqual(kind, 'all-to-all')
    # Each device deduplicates only the ids it owns (padded share), then,
    # with replicas, their deduplicated rows.
    want_dedup = 0
    for ex in engine.exchanges.values():
      m = b_l * ex.owned.cols.size
      want_dedup += m + (data * min(m, ex.stack.capacity + 1) if data > 1
                         else 0)
    self.assertEqual(found['dedup'], want_dedup)

  @parameterized.parameters('row_wise', 'table_row_wise')
  def test_row_split_moves_capacity_blocks(self, strategy):
    tables, features = bucket_specs('adagrad')
    mesh = reference.mesh_of(1, 8)
    engine = EmbeddingEngine(tables, features, mesh,
                             uniform_plan(tables, strategy, 8))
    (part,) = bucketized_parts(engine)

    b_l = _BUCKET_B_L
    found = comm_volume.collective_bytes(step_hlo(engine, mesh, b_l), 8)
    cap, bag_cap, worst, worst_bags = part.capacities(b_l)
    self.assertLess(cap, worst)
    # Per branch: the ids to their owners (lookup and update, int32
    # [S * cap]), the partial bags back and their gradients to the owners
    # (float32 [S * bag_cap, W]); nothing else of any size.
    for where, (c, cb) in (('emb', (cap, bag_cap)),
                           ('fallback', (worst, worst_bags))):
      ops = [(kind, x) for w, kind, x, _, _ in found['ops'] if w == where]
      a2a = sum(x for kind, x in ops if kind == 'all-to-all')
      self.assertIn(a2a, (8 * c * 4 + 2 * 8 * cb * 8 * 4,
                          2 * 8 * c * 4 + 2 * 8 * cb * 8 * 4), where)
      if where == 'emb':  # the lookup's and the update's ids merged
        self.assertEqual(a2a, 8 * c * 4 + 2 * 8 * cb * 8 * 4)
      for kind, x in ops:
        if kind != 'all-to-all':  # the overflow flag, the invalid-id count
          self.assertEqual(kind, 'all-reduce')
          self.assertLessEqual(x, 4)
    # Each branch deduplicates the ids its blocks brought: S * cap of them.
    self.assertEqual(found['dedup'], 8 * cap)
    self.assertEqual(found['dedup_fallback'], 8 * worst)


def trainer_config(strategy):
  config = criteo_config.get_config('tiny')
  config.optimizer.kind = 'sgd'  # params move by -lr * grad: equal params,
  config.optimizer.schedule.learning_rate = 0.5  # equal gradients
  config.embedding.sharding = strategy
  # Exact Adagrad's first step, lr * g / (|g| + eps), is about lr * sign(g)
  # for any g >> eps, so a gradient that is ~0 up to summation order moves a
  # row by +-lr depending on the device count; an accumulator start makes
  # the step smooth in g, so one device and eight compare at tolerance.
  config.embedding.optimizer.initial_accumulator_value = 0.01
  if strategy == 'table_row_wise':
    config.embedding.row_group_size = 2  # of the 4 model shards
  if strategy == 'auto':
    # cat_4 is small next to the batch: replicating it moves fewer bytes
    # than the all-to-alls of its lookups; the other 101-row tables not.
    for i, rows in enumerate((5000, 3000, 2000, 700, 12)):
      config.features[f'cat_{i}'].num_buckets = rows
    config.embedding.replicate_bytes = 20_000
  return config


def host_batches(trainer, n, seed=0):
  rng = np.random.default_rng(seed)
  rows = trainer.spec.table_rows
  out = []
  for _ in range(n):
    b = trainer.spec.loop.batch_size
    out.append({
        'dense': rng.normal(size=(b, 13)).astype(np.float32),
        'ids': np.stack([rng.integers(0, r, b) for r in rows], 1).astype(
            np.int32),
        'label': (rng.random(b) < 0.3).astype(np.float32)})
  return out


_SINGLE_TRAINERS = {}


def single_device_trainer(strategy):
  """On one device every strategy stores the same: share one per config."""
  key = 'auto' if strategy == 'auto' else 'fixed'
  if key not in _SINGLE_TRAINERS:
    _SINGLE_TRAINERS[key] = trainer_lib.Trainer(
        trainer_config(strategy), mesh=reference.single_device_mesh())
  return _SINGLE_TRAINERS[key]


class TrainerShardingTest(parameterized.TestCase):

  @parameterized.parameters(*(STRATEGIES + ('auto', 'table_row_wise')))
  def test_training_steps_match_one_device(self, strategy):
    config = trainer_config(strategy)
    sharded = trainer_lib.Trainer(config, mesh=reference.mesh_of(2, 4))
    single = single_device_trainer(strategy)
    if strategy == 'auto':
      used = {p.strategy for p in sharded.plan.placements}
      self.assertEqual(used, {'replicated', 'row_wise', 'table_wise'})
    a, b = reference.train_alike(sharded, single, host_batches(single, 3))
    probs_a = sharded.predict(a, host_batches(single, 1, seed=9)[0])
    probs_b = single.predict(b, host_batches(single, 1, seed=9)[0])
    np.testing.assert_allclose(probs_a, probs_b, rtol=1e-5, atol=1e-6)


if __name__ == '__main__':
  absltest.main()
