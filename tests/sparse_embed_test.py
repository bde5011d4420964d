"""`SparseEmbed` (linen and NNX) against plain references.

  * The module's lookup and its sparse update, trained by an optax loop
    (`table_updates.with_tables` and `apply_updates`), equal a dense
    reference: the same tables as dense arrays, the pooled lookup written as
    a Python loop, `jax.grad`, then each table's optimizer formula (NumPy,
    tests/reference.py) applied to the rows the batch touched. Every table
    optimizer is crossed with every sharding strategy in one model, on 1
    device and on 8 (model-parallel, and 2 data replicas of 4 shards).
  * The NNX module gives the linen module's numbers, bit for bit.
  * 16-bit tables: the update that reaches the module through the
    custom_vjp cotangent is bit for bit the engine's own update.
  * The compiled step holds no dense gradient of a table: its temporaries
    are smaller than one table, and the donated state is updated in place,
    while `jax.grad` of the same loss through a dense lookup needs a table's
    worth of temporaries.
"""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import criteo as criteo_config
from dlrm_jax.embedding import FeatureSpec, SparseOptimizerSpec, TableSpec
from dlrm_jax.embedding import lookup as lookup_lib
from dlrm_jax.embedding import table_access
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.models import SparseEmbed
from dlrm_jax.models.embed import embedding_engine
from dlrm_jax.models import nnx_embed
from dlrm_jax.train import schedules
from dlrm_jax.train import table_updates
from dlrm_jax.train import trainer as trainer_lib
from tests import reference

B, ROWS, DIM, LR_DENSE = 16, 40, 8, 0.3

OPTIMIZERS = {
    'sgd': dict(kind='sgd', weight_decay=0.1),
    'adagrad': dict(kind='adagrad', initial_accumulator_value=0.1),
    'rowwise_adagrad': dict(kind='rowwise_adagrad', weight_decay=0.1,
                            weight_decay_mode='decoupled'),
    'adam': dict(kind='adam'),
    'ftrl': dict(kind='ftrl', initial_accumulator_value=0.1, l1=0.01,
                 l2=0.05, beta=0.5),
}


def every_pair(dtype='float32'):
  """One table per (optimizer, strategy); one feature per table, every
  third a bag of 3; the strategies as a plan's overrides."""
  tables, features, strategies = [], [], {}
  for kind, kw in OPTIMIZERS.items():
    opt = SparseOptimizerSpec(
        schedule=schedules.ScheduleSpec('constant', 0.05), **kw)
    for strategy in plan_lib.STRATEGIES:
      name = f'{kind}_{strategy}'
      tables.append(TableSpec(name, ROWS, DIM, optimizer=opt,
                              init_scale=0.5, dtype=dtype))
      features.append(FeatureSpec(f'f_{name}', name,
                                  max_ids=3 if len(features) % 3 == 0 else 1))
      strategies[name] = strategy
  return tuple(tables), tuple(features), strategies


def plan_for(tables, strategies, mesh):
  s = int(mesh.shape['model'])
  return plan_lib.auto_plan(tables, s, overrides=strategies,
                            row_group_size=s // 2 if s > 1 else 0)


def batch_ids(rng, features):
  cols = []
  for f in features:
    # ids below 10: they repeat within the batch; rows 10.. stay untouched.
    c = rng.integers(0, 10, (B, f.max_ids))
    if f.max_ids > 1:
      c = np.where(rng.random(c.shape) < 0.3, -1, c)
    cols.append(c)
  return np.concatenate(cols, axis=1).astype(np.int32)


class Scorer(nn.Module):
  """A small user model: pooled embeddings times a dense weight."""

  tables: tuple
  features: tuple
  mesh: jax.sharding.Mesh
  plan: plan_lib.Plan

  @nn.compact
  def __call__(self, ids, step):
    pooled = SparseEmbed(self.tables, self.features, self.mesh, self.plan,
                         name='embed')(ids, step=step)
    w = self.param('w', nn.initializers.normal(1.0), pooled.shape[1:])
    return jnp.sum(jnp.sin(pooled) * w) / ids.shape[0]


class NNXScorer(nnx.Module):

  def __init__(self, tables, features, mesh, plan, rngs):
    self.embed = nnx_embed.SparseEmbed(tables, features, mesh, plan,
                                       rngs=rngs)
    self.w = nnx.Param(jnp.zeros((len(features), DIM)))

  def __call__(self, ids, step):
    pooled = self.embed(ids, step=step)
    return jnp.sum(jnp.sin(pooled) * self.w[...]) / ids.shape[0]


def linen_loop(model):
  tx = table_updates.with_tables(optax.sgd(LR_DENSE))

  @jax.jit
  def step_fn(params, opt_state, ids, step):
    loss, grads = jax.value_and_grad(
        lambda p: model.apply({'params': p}, ids, step))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return table_updates.apply_updates(params, updates), opt_state, loss

  return tx, step_fn


def put_ids(mesh, ids):
  return jax.device_put(ids, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(('data', 'model'), None)))


class AgainstDenseReferenceTest(parameterized.TestCase):

  @parameterized.named_parameters(('one_device', 1, 1),
                                  ('eight_shards', 1, 8),
                                  ('two_replicas_of_four', 2, 4))
  def test_every_optimizer_and_strategy(self, data, model_shards):
    mesh = (reference.single_device_mesh() if data * model_shards == 1
            else reference.mesh_of(data, model_shards))
    tables, features, strategies = every_pair()
    plan = plan_for(tables, strategies, mesh)
    self.assertEqual({p.strategy for p in plan.placements},
                     set(plan_lib.STRATEGIES))
    model = Scorer(tables, features, mesh, plan)
    rng = np.random.default_rng(0)
    ids = put_ids(mesh, batch_ids(rng, features))
    params = jax.jit(model.init)(jax.random.key(0), ids, 0)['params']
    engine = embedding_engine(tables, features, mesh, plan)
    state = params['embed'][lookup_lib.STATE_KEY]
    tabs = {t.name: table_access.get_table(engine, state, t.name).astype(
        np.float64) for t in tables}
    initial = {k: v.copy() for k, v in tabs.items()}
    w = np.asarray(params['w'], np.float64)
    refs = {t.name: reference.NumpyOptimizer(t.optimizer, ROWS, DIM)
            for t in tables}
    tx, step_fn = linen_loop(model)
    opt_state = tx.init(params)

    def dense_loss(tabs, w, ids):
      pooled = jnp.stack(reference.dense_lookup(tabs, tables, features, ids),
                         axis=1)
      return jnp.sum(jnp.sin(pooled) * w) / B

    for step in range(3):
      host_ids = batch_ids(rng, features)
      params, opt_state, loss = step_fn(params, opt_state,
                                        put_ids(mesh, host_ids), step)
      want_loss, (g_tabs, g_w) = jax.value_and_grad(dense_loss, (0, 1))(
          {k: jnp.asarray(v, jnp.float32) for k, v in tabs.items()},
          jnp.asarray(w, jnp.float32), host_ids)
      np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
      touched = reference.touched_rows(host_ids, tables, features)
      for name, rows in touched.items():
        g = np.asarray(g_tabs[name], np.float64)
        tabs[name] = refs[name].step(tabs[name], {r: g[r] for r in rows},
                                     step)
      w = w - LR_DENSE * np.asarray(g_w, np.float64)
      state = params['embed'][lookup_lib.STATE_KEY]
      for t in tables:
        np.testing.assert_allclose(
            table_access.get_table(engine, state, t.name), tabs[t.name],
            rtol=2e-5, atol=2e-6, err_msg=f'{t.name} step {step}')
      np.testing.assert_allclose(np.asarray(params['w']), w, rtol=1e-5,
                                 atol=1e-6)
    # Rows no batch touched are as they were (ids are drawn below 10).
    for t in tables:
      np.testing.assert_array_equal(
          table_access.get_table(engine, state, t.name)[10:],
          initial[t.name][10:])

  def test_nnx_equals_linen_bit_for_bit(self):
    mesh = reference.mesh_of(2, 4)
    tables, features, strategies = every_pair()
    # A diagonal of the table above: each optimizer once, each strategy once.
    keep = [5 * i + i for i in range(5)]
    tables = tuple(tables[i] for i in keep)
    features = tuple(features[i] for i in keep)
    plan = plan_for(tables, {t.name: strategies[t.name] for t in tables},
                    mesh)
    self.assertEqual({p.strategy for p in plan.placements},
                     set(plan_lib.STRATEGIES))
    model = Scorer(tables, features, mesh, plan)
    rng = np.random.default_rng(1)
    batches = [put_ids(mesh, batch_ids(rng, features)) for _ in range(3)]
    params = jax.jit(model.init)(jax.random.key(0), batches[0], 0)['params']
    nmodel = NNXScorer(tables, features, mesh, plan, nnx.Rngs(5))
    nmodel.embed.set_state(params['embed'][lookup_lib.STATE_KEY])
    nmodel.w.set_value(params['w'])
    tx, step_fn = linen_loop(model)
    opt_state = tx.init(params)
    ntx = table_updates.with_tables(optax.sgd(LR_DENSE))
    n_opt = ntx.init(nnx.state(nmodel, nnx.Param))

    @nnx.jit
    def nnx_step(nmodel, n_opt, ids, step):
      loss, grads = nnx.value_and_grad(lambda m: m(ids, step))(nmodel)
      return table_updates.nnx_update(nmodel, grads, ntx, n_opt), loss

    for step, ids in enumerate(batches):
      params, opt_state, loss = step_fn(params, opt_state, ids, step)
      n_opt, n_loss = nnx_step(nmodel, n_opt, ids, step)
      self.assertEqual(float(loss), float(n_loss))
    got = nnx.state(nmodel, nnx.Param)
    np.testing.assert_array_equal(np.asarray(got['w'][...]),
                                  np.asarray(params['w']))
    for a, b in zip(jax.tree.leaves(nmodel.embed.state),
                    jax.tree.leaves(params['embed'])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class SixteenBitTablesTest(absltest.TestCase):

  def test_the_cotangent_is_the_engines_update_bit_for_bit(self):
    mesh = reference.mesh_of(1, 8)
    # Adagrad on every strategy, in bfloat16 and in float16.
    tables, features = [], []
    for dtype in ('bfloat16', 'float16'):
      t, f, strategies = every_pair(dtype)
      tables += [dataclasses.replace(x, name=f'{x.name}_{dtype}')
                 for x in t[5:10]]
      features += [dataclasses.replace(x, name=f'{x.name}_{dtype}',
                                       table=f'{x.table}_{dtype}')
                   for x in f[5:10]]
    tables, features = tuple(tables), tuple(features)
    plan = plan_for(tables, {t.name: strategies[t.name.rsplit('_', 1)[0]]
                             for t in tables}, mesh)
    embed = SparseEmbed(tables, features, mesh, plan)
    ids = put_ids(mesh, batch_ids(np.random.default_rng(2), features))
    params = jax.jit(embed.init)(jax.random.key(0), ids)['params']
    state = params[lookup_lib.STATE_KEY]
    for leaf in jax.tree.leaves(state['stacks']):
      self.assertEqual(leaf.dtype, jnp.float16)  # the carrier
    weights = jnp.linspace(-1, 1, len(features) * DIM).reshape(-1, DIM)

    def loss(pooled):
      return jnp.sum(jnp.sin(pooled) * weights)

    new = jax.jit(jax.grad(lambda p: loss(embed.apply({'params': p}, ids,
                                                      step=3))))(params)
    engine = embed.engine

    @jax.jit
    def engine_update(state, ids):
      pooled, _ = engine.lookup(state['stacks'], ids, stacked=True)
      return engine.apply_gradients(state, ids, jax.grad(loss)(pooled),
                                    jnp.int32(3))

    want = engine_update(state, ids)
    for a, b in zip(jax.tree.leaves(new[lookup_lib.STATE_KEY]),
                    jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a).view(np.uint8),
                                    np.asarray(b).view(np.uint8))
    moved = sum(int(np.sum(np.asarray(a) != np.asarray(b)))
                for a, b in zip(jax.tree.leaves(want['stacks']),
                                jax.tree.leaves(state['stacks'])))
    self.assertGreater(moved, 0)
    for t in tables:  # the logical table reads back in its own dtype
      self.assertEqual(table_access.get_table(engine, want, t.name).dtype,
                       jnp.dtype(t.dtype))


class NoDenseGradientTest(absltest.TestCase):

  def test_temporaries_are_smaller_than_a_table_and_the_update_in_place(self):
    rows, dim = 200_000, 16  # 12.8 MB per table, float32
    opt = SparseOptimizerSpec('adagrad',
                              schedules.ScheduleSpec('constant', 0.1))
    tables = (TableSpec('a', rows, dim, optimizer=opt),
              TableSpec('b', rows, dim, optimizer=opt))
    features = (FeatureSpec('fa', 'a', max_ids=2), FeatureSpec('fb', 'b'))
    mesh = reference.single_device_mesh()
    embed = SparseEmbed(tables, features, mesh)
    ids = jnp.zeros((256, 3), jnp.int32)
    params = jax.eval_shape(embed.init, jax.random.key(0), ids)['params']
    table_bytes = rows * dim * 4

    def sparse_step(params, ids):
      grads = jax.grad(lambda p: jnp.sum(jnp.sin(embed.apply(
          {'params': p}, ids, step=0))))(params)
      return table_updates.apply_updates(params, grads)

    compiled = jax.jit(sparse_step, donate_argnums=0).lower(
        params, ids).compile()
    mem = compiled.memory_analysis()
    state_bytes = sum(x.size * x.dtype.itemsize
                      for x in jax.tree.leaves(params))
    self.assertEqual(state_bytes, 4 * table_bytes)  # 2 tables, 2 accumulators
    self.assertLess(mem.temp_size_in_bytes, table_bytes // 4)
    self.assertEqual(mem.alias_size_in_bytes, state_bytes)  # in place

    # The same loss through a dense lookup: its gradient is table-sized.
    dense = {t.name: jax.ShapeDtypeStruct((rows, dim), jnp.float32)
             for t in tables}

    def dense_step(tabs, ids):
      grads = jax.grad(lambda t: jnp.sum(jnp.sin(jnp.stack(
          reference.dense_lookup(t, tables, features, np.zeros((256, 3),
                                                                 np.int32)),
          axis=1))))(tabs)
      return jax.tree.map(lambda t, g: t - 0.1 * g, tabs, grads)

    dense_mem = jax.jit(dense_step, donate_argnums=0).lower(
        dense, ids).compile().memory_analysis()
    self.assertGreaterEqual(dense_mem.temp_size_in_bytes, table_bytes)


class DLRMThroughTheModuleTest(absltest.TestCase):

  def test_fifty_steps_equal_the_hand_wired_step(self):
    # The step before `SparseEmbed`: lookup, `value_and_grad` with respect
    # to the pooled embeddings, `apply_gradients`, written here with the
    # engine's public calls. The Trainer now trains `DLRMModel` instead.
    config = criteo_config.get_config('tiny')
    config.batch_size = 64
    trainer = trainer_lib.Trainer(config, mesh=reference.mesh_of(2, 4))
    engine = trainer.engine

    def variables(params, bs):
      return ({'params': params, 'batch_stats': bs} if trainer.has_bn
              else {'params': params})

    @jax.jit
    def hand_wired(state, batch):
      emb, invalid = engine.lookup(state.emb['stacks'], batch['ids'],
                                   stacked=True)
      rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                               state.step)

      def loss_fn(params, emb):
        out, mutated = trainer.arches.apply(
            variables(params, state.batch_stats), batch['dense'], emb,
            train=True, rngs={'dropout': rng}, mutable=['batch_stats'])
        loss = optax.sigmoid_binary_cross_entropy(out['logits'],
                                                  batch['label']).mean()
        return loss, mutated.get('batch_stats', state.batch_stats)

      (loss, bs), (g_params, g_emb) = jax.value_and_grad(
          loss_fn, argnums=(0, 1), has_aux=True)(state.params, emb)
      updates, opt_state = trainer.tx.update(g_params, state.opt_state,
                                             state.params)
      return state.replace(
          step=state.step + 1, params=optax.apply_updates(state.params,
                                                          updates),
          batch_stats=bs, opt_state=opt_state,
          emb=engine.apply_gradients(state.emb, batch['ids'], g_emb,
                                     state.step)), loss, invalid

    rng = np.random.default_rng(0)
    rows = trainer.spec.table_rows
    old, new = trainer.init_state(0), trainer.init_state(0)
    for step in range(50):
      host = {
          'dense': rng.normal(size=(64, 13)).astype(np.float32),
          'ids': np.stack([rng.integers(0, r, 64) for r in rows],
                          1).astype(np.int32),
          'label': (rng.random(64) < 0.3).astype(np.float32)}
      host['ids'][0, 0] = rows[0] + 5  # one invalid id per batch
      batch = trainer.put_batch(host)
      old, old_loss, old_invalid = hand_wired(old, batch)
      new, acc = trainer.train_step(new, batch, trainer.zero_metrics())
      np.testing.assert_allclose(float(acc['loss_sum']), float(old_loss),
                                 rtol=1e-6, err_msg=f'step {step}')
      self.assertEqual(int(acc['invalid_ids']), int(old_invalid))
      self.assertEqual(int(old_invalid), 1)
    for x, y in zip(jax.tree.leaves((new.params, new.opt_state)),
                    jax.tree.leaves((old.params, old.opt_state))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6,
                                 atol=1e-7)
    # The tables and every optimizer slot, in the same layout.
    for x, y in zip(jax.tree.leaves(new.emb), jax.tree.leaves(old.emb),
                    strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6,
                                 atol=1e-7)


class ModuleErrorsTest(absltest.TestCase):

  def test_bad_output_and_ids_shape_name_the_field(self):
    tables = (TableSpec('a', 10, 4),)
    features = (FeatureSpec('fa', 'a', max_ids=2),)
    mesh = reference.single_device_mesh()
    with self.assertRaisesRegex(ValueError, r"output \('pooled'\)"):
      SparseEmbed(tables, features, mesh, output='pooled').init(
          jax.random.key(0), jnp.zeros((4, 2), jnp.int32))
    with self.assertRaisesRegex(ValueError, r'expected \[B, 2\]'):
      SparseEmbed(tables, features, mesh).init(
          jax.random.key(0), jnp.zeros((4, 3), jnp.int32))
    out = SparseEmbed(tables, features, mesh, output='features').init_with_output(
        jax.random.key(0), jnp.zeros((4, 2), jnp.int32))[0]
    self.assertEqual(list(out), ['fa'])
    self.assertEqual(out['fa'].shape, (4, 4))


if __name__ == '__main__':
  absltest.main()
