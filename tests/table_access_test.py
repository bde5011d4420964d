"""get_table / set_table under every sharding strategy on 8 fake devices.

The reference is plain NumPy: the array that was set, and a NumPy gather of
it for the lookups.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from dlrm_jax.serving import tables as export_tables
from dlrm_jax.embedding import EmbeddingEngine
from dlrm_jax.embedding import table_access
from tests import embedding_test
from tests import reference
from tests import sharding_test

_CASES = ([(s, 'rowwise_adagrad', (2, 4)) for s in sharding_test.STRATEGIES]
          + [(s, 'adagrad', (1, 8)) for s in ('row_wise', 'column_wise')]
          + [('mixed', 'adam', (1, 8)), ('auto', 'sgd', (2, 4))])


def _plan(strategy, tables, shards):
  if strategy == 'mixed':
    return sharding_test.mixed_plan(tables, shards)
  if strategy == 'auto':
    return None
  return sharding_test.uniform_plan(tables, strategy, shards)


class TableAccessTest(parameterized.TestCase):

  @parameterized.parameters(*_CASES)
  def test_round_trip_and_lookup(self, strategy, kind, mesh_shape):
    tables, features = embedding_test.make_specs(kind)
    mesh = reference.mesh_of(*mesh_shape)
    engine = EmbeddingEngine(tables, features, mesh,
                             _plan(strategy, tables, mesh_shape[1]))
    state = engine.init(jax.random.key(0))
    before = {t.name: table_access.get_table(engine, state, t.name)
              for t in tables}
    for t in tables:  # get_table reads what a plain host copy reads
      np.testing.assert_array_equal(
          before[t.name], reference.host_table(engine, state, t.name))
    rng = np.random.default_rng(1)
    new = rng.normal(size=(tables[0].num_rows, tables[0].dim)).astype(
        np.float32)
    state2 = table_access.set_table(engine, state, 'shared', new)
    np.testing.assert_array_equal(
        table_access.get_table(engine, state2, 'shared'), new)
    for t in tables[1:]:  # the other tables are untouched
      np.testing.assert_array_equal(
          table_access.get_table(engine, state2, t.name), before[t.name])
    np.testing.assert_array_equal(  # the old state is still valid
        table_access.get_table(engine, state, 'shared'), before['shared'])
    for k in table_access.table_slots(engine, 'bag'):
      shape = table_access.get_slot(engine, state2, 'bag', k).shape
      vals = rng.uniform(size=shape).astype(np.float32)
      state2 = table_access.set_slot(engine, state2, 'bag', k, vals)
      np.testing.assert_array_equal(
          table_access.get_slot(engine, state2, 'bag', k), vals)
      np.testing.assert_array_equal(
          reference.host_table(engine, state2, 'bag', k), vals)
    tabs = {t.name: table_access.get_table(engine, state2, t.name)
            for t in tables}
    ids = embedding_test.make_ids(np.random.default_rng(2), features, tables,
                                  batch=16)
    ids[:, 0] = np.arange(16) % tables[0].num_rows
    ids[:, 5:7] = (np.arange(32).reshape(16, 2) + 7) % tables[0].num_rows
    embs, _ = engine.lookup(
        state2['stacks'],
        jax.device_put(ids, jax.sharding.NamedSharding(mesh,
                                                       engine.ids_spec())))
    want = reference.dense_lookup(tabs, tables, features, ids)
    np.testing.assert_allclose(np.asarray(embs[0]), new[ids[:, 0]],
                               rtol=1e-6)  # a plain NumPy gather
    for got, w in zip(embs, want):
      np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-5,
                                 atol=1e-6)

  @parameterized.parameters('bfloat16', 'float16')
  def test_low_precision_tables_stored_as_bits(self, dtype):
    # 16-bit tables are stored as float16 arrays (bf16 as its bit patterns);
    # a plain host copy, lookups and exports see the logical values.
    tables, features = embedding_test.make_specs('adagrad', dtype=dtype)
    mesh = reference.mesh_of(2, 4)
    engine = EmbeddingEngine(tables, features, mesh,
                             sharding_test.mixed_plan(tables, 4))
    state = engine.init(jax.random.key(0))
    for leaf in jax.tree.leaves(state['stacks']):
      self.assertEqual(leaf.dtype, np.float16)
    for leaf in jax.tree.leaves(engine.abstract_state()['stacks']):
      self.assertEqual(leaf.dtype, np.float16)
    logical = jax.numpy.dtype(dtype)
    new = np.random.default_rng(1).normal(
        size=(tables[0].num_rows, tables[0].dim)).astype(np.float32)
    state = table_access.set_table(engine, state, 'shared', new)
    got = table_access.get_table(engine, state, 'shared')
    self.assertEqual(got.dtype, logical)
    np.testing.assert_array_equal(got, new.astype(logical))  # NumPy's cast
    np.testing.assert_array_equal(
        reference.host_table(engine, state, 'shared'), got)
    # Initial values: the float32 engine's, rounded to nearest once.
    engine32 = EmbeddingEngine(embedding_test.make_specs('adagrad')[0],
                               features, reference.single_device_mesh())
    bag = table_access.get_table(engine, state, 'bag')
    self.assertEqual(bag.dtype, logical)
    np.testing.assert_array_equal(
        bag, table_access.get_table(engine32, engine32.init(
            jax.random.key(0)), 'bag').astype(logical))
    ids = embedding_test.make_ids(np.random.default_rng(2), features, tables,
                                  batch=16)
    embs, _ = engine.lookup(
        state['stacks'],
        jax.device_put(ids, jax.sharding.NamedSharding(mesh,
                                                       engine.ids_spec())))
    np.testing.assert_array_equal(np.asarray(embs[0]),
                                  got.astype(np.float32)[ids[:, 0]])
    out = self.create_tempdir().full_path
    files = export_tables.write_tables(engine, state, out)
    np.testing.assert_array_equal(
        np.load(f'{out}/{files["shared"]}'), got.astype(np.float32))

  def test_memmap_values_and_errors(self):
    tables, features = embedding_test.make_specs('rowwise_adagrad')
    mesh = reference.mesh_of(2, 4)
    engine = EmbeddingEngine(tables, features, mesh, sharding_test.uniform_plan(
        tables, 'row_wise', 4))
    state = engine.init(jax.random.key(0))
    path = self.create_tempfile('t.npy').full_path
    vals = np.arange(37 * 8, dtype=np.float32).reshape(37, 8)
    np.save(path, vals)
    state = table_access.set_table(engine, state, 'bag',
                                   np.load(path, mmap_mode='r'))
    np.testing.assert_array_equal(table_access.get_table(engine, state, 'bag'),
                                  vals)
    with self.assertRaisesRegex(ValueError, r"'bag' has shape \[37, 8\]"):
      table_access.set_table(engine, state, 'bag', vals[:5])
    with self.assertRaisesRegex(ValueError, "unknown table 'nope'"):
      table_access.get_table(engine, state, 'nope')
    with self.assertRaisesRegex(ValueError, "slot 'm' does not exist"):
      table_access.get_slot(engine, state, 'bag', 'm')


if __name__ == '__main__':
  absltest.main()


class TwoProcessTest(absltest.TestCase):

  def test_each_process_reads_only_its_rows(self):
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=2')
    tmp = self.create_tempdir().full_path
    outs = [os.path.join(tmp, f'{i}.json') for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, '-m', 'tests.table_access_multiprocess', str(port),
         str(i), outs[i]], cwd=root, env=env, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    for p in procs:
      _, err = p.communicate(timeout=300)
      self.assertEqual(p.returncode, 0, err[-3000:])
    res = [json.load(open(o)) for o in outs]
    for strategy in sharding_test.STRATEGIES:
      for r in res:
        self.assertTrue(r[strategy]['equal'], strategy)
        self.assertTrue(r[strategy]['acc_equal'], strategy)
    # Row-wise over 4 devices (2 per process): blocks of 10 rows on the
    # plan's devices, in its (rotated) order; each process reads only the
    # blocks its two devices hold.
    tables, _ = embedding_test.make_specs('rowwise_adagrad')
    devices = sharding_test.uniform_plan(tables, 'row_wise',
                                         4).placement('bag').devices
    for pid, r in enumerate(res):
      want = [row for k, d in enumerate(devices) if d // 2 == pid
              for row in range(10 * k, min(37, 10 * k + 10))]
      self.assertEqual(r['row_wise']['rows_read'], sorted(want))
    # Table-wise on one device: only its process reads the table.
    self.assertEqual(sorted(len(r['table_wise']['rows_read']) for r in res),
                     [0, 37])


class CollectiveReadTest(absltest.TestCase):

  def test_a_piece_crosses_devices_alone(self):
    """The collective read of one piece (several processes) moves only that
    piece: the compiled HLO's collectives are `[rows, W]`, never the stack."""
    import re  # pylint: disable=g-import-not-at-top
    tables, features = embedding_test.make_specs('sgd')
    mesh = reference.mesh_of(2, 4)
    engine = EmbeddingEngine(tables, features, mesh,
                             sharding_test.uniform_plan(tables, 'row_wise', 4))
    state = engine.init(jax.random.key(0))
    s, pc, _ = next(table_access.pieces(engine, 'bag'))
    arr = state['stacks'][s.name]
    got = table_access._cut(engine, arr, s, pc)  # pylint: disable=protected-access
    np.testing.assert_array_equal(
        np.asarray(got), reference.host_table(engine, state, 'bag')[:pc.rows])
    hlo = table_access.cut_fn(engine, s, pc, 2).lower(arr).compile().as_text()
    ops = re.findall(r'= (\w+\[[\d,]*\])\{?[\d,]*\}? ?(all-reduce|all-gather|'
                     r'collective-permute|all-to-all)\(', hlo)
    self.assertNotEmpty(ops, hlo)
    for shape, op in ops:
      self.assertEqual(shape, f'f32[{pc.rows},{s.width}]', (op, hlo))
