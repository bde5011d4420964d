"""Table optimizers and low-precision rounding through the real engine update.

Every optimizer runs in `EmbeddingEngine.apply_gradients` on one device, for
several steps with ids repeated within and across bags, against
`reference.NumpyOptimizer`, a float64 NumPy loop written from the published
formulas (torch.optim.Adagrad, FBGEMM's row-wise Adagrad, Adam, the FTRL
paper's per-coordinate update), applied to the rows each batch touches with
their summed gradient computed here by a plain loop.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlrm_jax.train import schedules
from dlrm_jax.embedding import EmbeddingEngine, FeatureSpec
from dlrm_jax.embedding import SparseOptimizerSpec, TableSpec
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding import rounding
from dlrm_jax.embedding import table_access
from tests import reference

ROWS, DIM, B = 11, 4, 8


def make_engine(opt, dtype='float32', rows=ROWS, dim=DIM, bag=3):
  tables = (TableSpec('t', rows, dim, optimizer=opt, dtype=dtype,
                      init_scale=0.5),)
  features = (FeatureSpec('a', 't', max_ids=bag), FeatureSpec('b', 't'))
  engine = EmbeddingEngine(tables, features, reference.single_device_mesh())
  return engine, jax.jit(engine.apply_gradients, donate_argnums=0)


def row_grads(ids, grads, bag):
  """row -> summed gradient of the (sum-pooled) features, by a plain loop."""
  out = {}
  for b in range(ids.shape[0]):
    for j in range(ids.shape[1]):
      r = int(ids[b, j])
      if r < 0:
        continue
      g = grads[0][b] if j < bag else grads[1][b]
      out[r] = out.get(r, 0.0) + np.asarray(g, np.float64)
  return out


def set_table(engine, state, values):
  """A state whose logical table 't' is `values` (in the table's dtype)."""
  return table_access.set_table(engine, state, 't', values)


OPTIMIZERS = {
    'sgd': dict(kind='sgd'),
    'adagrad': dict(kind='adagrad'),
    'adagrad_acc': dict(kind='adagrad', initial_accumulator_value=0.1,
                        eps=1e-6),
    'rowwise_adagrad': dict(kind='rowwise_adagrad'),
    'adam': dict(kind='adam'),
    'ftrl': dict(kind='ftrl', initial_accumulator_value=0.1, l1=0.01,
                 l2=0.05, beta=0.5),
    'ftrl_lr_power': dict(kind='ftrl', initial_accumulator_value=0.1,
                          lr_power=-0.3),
    'sgd_l2': dict(kind='sgd', weight_decay=0.3),
    'adagrad_l2': dict(kind='adagrad', weight_decay=0.3),
    'adam_decoupled': dict(kind='adam', weight_decay=0.3,
                           weight_decay_mode='decoupled'),
    'rowwise_decoupled': dict(kind='rowwise_adagrad', weight_decay=0.3,
                              weight_decay_mode='decoupled'),
}


class AgainstNumpyTest(parameterized.TestCase):

  @parameterized.named_parameters(
      *[dict(testcase_name=k, **v) for k, v in OPTIMIZERS.items()])
  def test_several_steps_repeated_ids(self, **kw):
    opt = SparseOptimizerSpec(
        schedule=schedules.ScheduleSpec('constant', 0.05), **kw)
    engine, update = make_engine(opt)
    state = engine.init(jax.random.key(0))
    table = table_access.get_table(engine, state, 't').astype(np.float64)
    ref = reference.NumpyOptimizer(opt, ROWS, DIM)
    rng = np.random.default_rng(1)
    for step in range(4):
      ids = rng.integers(0, 6, (B, 4)).astype(np.int32)  # rows 6.. untouched
      ids[:, :3] = np.where(rng.random((B, 3)) < 0.2, -1, ids[:, :3])
      ids[1, :3] = [2, 2, 2]  # a row repeated in a bag
      grads = (rng.normal(size=(B, DIM)).astype(np.float32),
               rng.normal(size=(B, DIM)).astype(np.float32))
      state = update(state, jnp.asarray(ids), grads, jnp.int32(step))
      table = ref.step(table, row_grads(ids, grads, 3), step)
      got = table_access.get_table(engine, state, 't')
      np.testing.assert_allclose(got, table, rtol=2e-5, atol=2e-6,
                                 err_msg=f'{kw} step {step}')
    np.testing.assert_array_equal(got[6:], table[6:])  # untouched rows

  def test_adagrad_first_step_on_a_tiny_gradient(self):
    # torch.optim.Adagrad / FBGEMM EXACT_ADAGRAD: lr * g / (sqrt(g^2) + eps).
    # (optax.adagrad's lr * g / sqrt(g^2 + eps) would move it 0.1 lr.)
    lr, g, eps = 0.05, 1e-5, 1e-8
    opt = SparseOptimizerSpec('adagrad', schedules.ScheduleSpec('constant', lr),
                              eps=eps)
    engine, update = make_engine(opt)
    state = engine.init(jax.random.key(0))
    before = table_access.get_table(engine, state, 't')
    ids = np.full((B, 4), -1, np.int32)
    ids[0, 3] = 4
    grads = (np.zeros((B, DIM), np.float32),
             np.zeros((B, DIM), np.float32))
    grads[1][0] = g
    state = update(state, jnp.asarray(ids), grads, jnp.int32(0))
    moved = before[4] - table_access.get_table(engine, state, 't')[4]
    np.testing.assert_allclose(moved, lr * g / (g + eps), rtol=1e-4)
    self.assertGreater(moved.min(), 0.99 * lr)

  def test_ftrl_l1_leaves_weak_rows_exactly_zero(self):
    opt = SparseOptimizerSpec('ftrl', schedules.ScheduleSpec('constant', 0.1),
                              initial_accumulator_value=0.1, l1=1.0)
    engine, update = make_engine(opt)
    state = set_table(engine, engine.init(jax.random.key(0)),
                      np.zeros((ROWS, DIM), np.float32))
    ids = np.full((B, 4), -1, np.int32)
    ids[:, 3] = np.arange(B) % 4   # rows 0, 1 weak; 2, 3 strong
    scale = np.array([0.01, 0.1, 3.0, 5.0], np.float32)
    for step in range(3):
      grads = (np.zeros((B, DIM), np.float32),
               np.tile(scale[np.arange(B) % 4, None], (1, DIM)))
      state = update(state, jnp.asarray(ids), grads, jnp.int32(step))
    got = table_access.get_table(engine, state, 't')
    np.testing.assert_array_equal(got[:2], 0.0)  # exactly, not just small
    self.assertTrue(np.all(got[2:4] < -0.01))

  def test_validation_names_the_field(self):
    with self.assertRaisesRegex(ValueError, r'weight_decay_mode'):
      make_engine(SparseOptimizerSpec('sgd', weight_decay_mode='l1'))
    with self.assertRaisesRegex(ValueError, r'lr_power \(0.5\) must be <= 0'):
      make_engine(SparseOptimizerSpec('ftrl', lr_power=0.5,
                                      initial_accumulator_value=0.1))
    with self.assertRaisesRegex(ValueError, r'initial_accumulator_value > 0'):
      make_engine(SparseOptimizerSpec('ftrl'))


class DenseExactAdagradTest(absltest.TestCase):

  def test_against_torch_style_loop(self):
    from configs import criteo as criteo_config  # pylint: disable=g-import-not-at-top
    from dlrm_jax.config import build as config_lib  # pylint: disable=g-import-not-at-top
    from dlrm_jax.train import optimizers as dense_optimizers  # pylint: disable=g-import-not-at-top
    cfg = criteo_config.get_config().optimizer
    cfg.kind, cfg.eps = 'exact_adagrad', 1e-8
    cfg.schedule.kind, cfg.schedule.learning_rate = 'constant', 0.05
    tx = dense_optimizers.build_dense_optimizer(
        config_lib.build_dense_optimizer_spec(cfg))
    rng = np.random.default_rng(0)
    w = {'k': rng.normal(size=(3, 4)).astype(np.float32)}
    state = tx.init(w)
    ref, acc = w['k'].astype(np.float64), np.zeros((3, 4))
    for step in range(3):
      g = rng.normal(size=(3, 4)).astype(np.float32) * 10.0 ** -(2 * step + 1)
      upd, state = tx.update({'k': jnp.asarray(g)}, state, w)
      w = {'k': np.asarray(w['k'] + upd['k'])}
      acc += g.astype(np.float64) ** 2  # torch.optim.Adagrad, lr_decay 0
      ref -= 0.05 * g / (np.sqrt(acc) + 1e-8)
    np.testing.assert_allclose(w['k'], ref, rtol=1e-5, atol=1e-7)


class DenseAdagradKindTest(absltest.TestCase):
  """The dense 'adagrad' is named by its formula: optax_adagrad or
  exact_adagrad; the bare name is refused with both choices."""

  def _cfg(self, kind):
    from configs import criteo as criteo_config  # pylint: disable=g-import-not-at-top
    cfg = criteo_config.get_config().optimizer
    cfg.kind = kind
    return cfg

  def test_optax_adagrad_is_optax_adagrad(self):
    from dlrm_jax.config import build as config_lib  # pylint: disable=g-import-not-at-top
    from dlrm_jax.train import optimizers as dense_optimizers  # pylint: disable=g-import-not-at-top
    spec = config_lib.build_dense_optimizer_spec(self._cfg('optax_adagrad'))
    tx = dense_optimizers.build_dense_optimizer(spec)
    ref = optax.adagrad(spec.schedule.learning_rate,
                        initial_accumulator_value=0.1, eps=spec.eps)
    w = {'k': jnp.ones((2, 3))}
    g = {'k': jnp.full((2, 3), 1e-3)}
    got, _ = tx.update(g, tx.init(w), w)
    want, _ = ref.update(g, ref.init(w), w)
    np.testing.assert_allclose(got['k'], want['k'], rtol=1e-6)

  def test_bare_adagrad_names_the_field_and_both_choices(self):
    from dlrm_jax.config import build as config_lib  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(
        ValueError, r"config\.optimizer\.kind \('adagrad'\).*'optax_adagrad'"
        r".*optax\.adagrad.*'exact_adagrad'.*torch\.optim\.Adagrad"):
      config_lib.build_dense_optimizer_spec(self._cfg('adagrad'))


class StochasticRoundingTest(parameterized.TestCase):

  def test_result_is_a_neighbour_and_reproducible(self):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 16)),
                    jnp.float32)
    rows = jnp.arange(64)
    for dtype in (jnp.bfloat16, jnp.float16):
      a = rounding.stochastic_round(x, dtype, 7, rows, jnp.int32(3))
      b = rounding.stochastic_round(x, dtype, 7, rows, jnp.int32(3))
      c = rounding.stochastic_round(x, dtype, 7, rows, jnp.int32(4))
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      self.assertFalse(np.array_equal(np.asarray(a), np.asarray(c)))
      near = x.astype(dtype)
      below = near.astype(jnp.float32) <= x
      other = jnp.nextafter(near, jnp.where(below, jnp.inf, -jnp.inf).astype(
          dtype))
      lo = np.asarray(jnp.where(below, near, other).astype(jnp.float32))
      hi = np.asarray(jnp.where(below, other, near).astype(jnp.float32))
      a32 = np.asarray(a.astype(jnp.float32))
      self.assertTrue(np.all((a32 == lo) | (a32 == hi)))
      self.assertTrue(np.any(a32 != np.asarray(near.astype(jnp.float32))))
      exact = x.astype(dtype).astype(jnp.float32)  # representable: unchanged
      np.testing.assert_array_equal(
          np.asarray(rounding.stochastic_round(exact, dtype, 7, rows, 0)),
          np.asarray(exact.astype(dtype)))
    # Round to nearest through integer ops equals XLA's convert.
    np.testing.assert_array_equal(
        np.asarray(rounding.round_nearest(x, jnp.bfloat16)),
        np.asarray(x.astype(jnp.bfloat16)))

  @parameterized.parameters(('bfloat16', 5e-6), ('float16', 6e-7))
  def test_small_updates_move_the_table_as_far_as_float32(self, dtype, delta):
    # Weights 0.01: a bf16 ulp is 2^-14 = 6.1e-5, a float16 one 2^-17; each
    # step adds `delta`, under a tenth of an ulp, split over two ids of the
    # same row (the sum is rounded once).
    rows, dim, steps = 256, 8, 32
    opt = SparseOptimizerSpec('sgd', schedules.ScheduleSpec('constant', 1.0))
    nearest = SparseOptimizerSpec(
        'sgd', schedules.ScheduleSpec('constant', 1.0),
        stochastic_rounding=False)
    ids = np.full((rows, 4), -1, np.int32)
    ids[:, 0] = ids[:, 1] = np.arange(rows)
    grads = (np.full((rows, dim), -delta / 2, np.float32),
             np.zeros((rows, dim), np.float32))
    start = np.full((rows, dim), 0.01, np.float32)
    moves = {}
    for name, o, dt in (('f32', opt, 'float32'), ('sr', opt, dtype),
                        ('rn', nearest, dtype)):
      engine, update = make_engine(o, dtype=dt, rows=rows, dim=dim)
      state = set_table(engine, engine.init(jax.random.key(0)), start)
      w0 = table_access.get_table(engine, state, 't').astype(np.float64)
      for step in range(steps):
        state = update(state, jnp.asarray(ids), grads, jnp.int32(step))
      moves[name] = table_access.get_table(engine, state, 't').astype(
          np.float64) - w0
    want = steps * delta
    np.testing.assert_allclose(moves['f32'].mean(), want, rtol=5e-3)
    np.testing.assert_array_equal(moves['rn'], 0.0)
    # Each element's final value is a sum of `steps` independent roundings,
    # each off by at most one ulp with variance <= ulp^2 / 4: the mean of n
    # elements has a standard deviation <= ulp * sqrt(steps / 4 / n).
    ulp = 2.0 ** (-14 if dtype == 'bfloat16' else -17)
    sd = ulp * np.sqrt(steps / 4 / moves['sr'].size)
    self.assertLess(abs(moves['sr'].mean() - want), 6 * sd)
    self.assertLess(6 * sd, 0.15 * want)  # the bound is informative


  def test_rounding_is_the_same_on_every_mesh(self):
    # The hash is of (table, step, logical row, column): one device and a
    # 2 x 4 mesh (row-, table- and column-wise pieces) store identical bf16
    # tables.
    opt = SparseOptimizerSpec('adagrad',
                              schedules.ScheduleSpec('constant', 0.05))
    tables = tuple(TableSpec(f't{i}', 40 + 8 * i, 8, optimizer=opt,
                             dtype='bfloat16') for i in range(3))
    features = tuple(FeatureSpec(f'f{i}', f't{i}', max_ids=2)
                     for i in range(3))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, (16, 6)).astype(np.int32)
    grads = tuple(rng.normal(size=(16, 8)).astype(np.float32) * 1e-3
                  for _ in range(3))
    out = []
    sharded = plan_lib.auto_plan(tables, 4, overrides={
        't0': 'row_wise', 't1': 'table_wise', 't2': 'column_wise'})
    for mesh, plan in ((reference.single_device_mesh(), None),
                       (reference.mesh_of(2, 4), sharded)):
      engine = EmbeddingEngine(tables, features, mesh, plan)
      state = engine.init(jax.random.key(0))
      put = jax.device_put(ids, jax.sharding.NamedSharding(
          mesh, engine.ids_spec()))
      g = tuple(jax.device_put(x, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(('data', 'model'), None)))
                for x in grads)
      update = jax.jit(engine.apply_gradients)
      for step in range(3):
        state = update(state, put, g, jnp.int32(step))
      out.append([table_access.get_table(engine, state, t.name)
                  for t in tables])
    for a, b in zip(*out):
      np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


if __name__ == '__main__':
  absltest.main()
