"""MLP options, DLRM shapes, config validation and the terabyte config."""

import copy

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.config import build as config_lib
from dlrm_jax.models import DLRM, DLRMSpec, MLP, MLPSpec
from dlrm_jax.models import interaction


class MLPTest(parameterized.TestCase):

  def _run(self, spec, x, train=False, rngs=None, variables=None,
           mutable=False):
    mlp = MLP(spec)
    if variables is None:
      variables = mlp.init({'params': jax.random.key(0),
                            'dropout': jax.random.key(1)}, x, train=False)
    return mlp.apply(variables, x, train=train, rngs=rngs,
                     mutable=mutable), variables

  @parameterized.parameters('relu', 'gelu', 'silu', 'sigmoid', 'tanh', 'none',
                            'nn.ReLU')
  def test_activation_on_every_layer(self, act):
    spec = MLPSpec.create([4, 3], activation=act)
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    out, v = self._run(spec, x)
    p = v['params']
    fn = {'relu': nn.relu, 'gelu': nn.gelu, 'silu': nn.silu,
          'sigmoid': nn.sigmoid, 'tanh': nn.tanh, 'none': lambda z: z,
          'nn.ReLU': nn.relu}[act]
    h = fn(x @ p['dense_0']['kernel'] + p['dense_0']['bias'])
    h = fn(h @ p['dense_1']['kernel'] + p['dense_1']['bias'])
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)

  def test_no_bias(self):
    _, v = self._run(MLPSpec.create([4], bias=False), np.ones((2, 3)))
    self.assertNotIn('bias', v['params']['dense_0'])

  def test_batch_norm_uses_running_stats_at_eval(self):
    spec = MLPSpec.create([4], use_bn=True, activation='none')
    x = np.random.default_rng(0).normal(3.0, 2.0, (64, 3)).astype(np.float32)
    mlp = MLP(spec)
    v = mlp.init(jax.random.key(0), x, train=False)
    self.assertNotIn('bias', v['params']['dense_0'])
    out_train, upd = mlp.apply(v, x, train=True, mutable=['batch_stats'])
    # Train mode normalizes with the batch's own statistics.
    np.testing.assert_allclose(np.asarray(out_train).mean(0), 0.0, atol=1e-4)
    stats = upd['batch_stats']['bn_0']
    z = x @ v['params']['dense_0']['kernel']
    np.testing.assert_allclose(stats['mean'], 0.1 * z.mean(0), rtol=1e-4,
                               atol=1e-5)
    # Eval mode uses the running statistics.
    v2 = {'params': v['params'], 'batch_stats': upd['batch_stats']}
    out_eval = mlp.apply(v2, x, train=False)
    bn = v['params']['bn_0']
    want = (z - stats['mean']) / np.sqrt(stats['var'] + 1e-5) * bn[
        'scale'] + bn['bias']
    np.testing.assert_allclose(out_eval, want, rtol=1e-4, atol=1e-4)

  def test_layer_norm(self):
    spec = MLPSpec.create([6], use_ln=True, activation='none')
    out, _ = self._run(spec, np.random.default_rng(0).normal(size=(4, 3)))
    np.testing.assert_allclose(np.asarray(out).mean(-1), 0.0, atol=1e-5)

  def test_dropout_per_layer_and_off_at_eval(self):
    spec = MLPSpec.create([200, 200], activation='none',
                          dropout_ratio=[0.0, 0.5])
    self.assertEqual(spec.dropout_ratio, (0.0, 0.5))
    x = np.ones((8, 3), np.float32)
    out_eval, v = self._run(spec, x)
    out_eval2, _ = self._run(spec, x, variables=v)
    np.testing.assert_array_equal(out_eval, out_eval2)
    out_train, _ = self._run(spec, x, train=True, variables=v,
                             rngs={'dropout': jax.random.key(3)})
    zeros = float(np.mean(np.asarray(out_train) == 0.0))
    self.assertBetween(zeros, 0.4, 0.6)

  def test_dropout_one_value_for_all_layers(self):
    self.assertEqual(MLPSpec.create([3, 3, 3], dropout_ratio=0.1).dropout_ratio,
                     (0.1, 0.1, 0.1))

  @parameterized.named_parameters(
      ('empty', dict(hidden_units=[]), r'mlp\.hidden_units'),
      ('nonpositive', dict(hidden_units=[4, 0]), r'hidden_units\[1\] \(0\)'),
      ('activation', dict(hidden_units=[4], activation='swoosh'),
       r"activation \('swoosh'\)"),
      ('bn_and_ln', dict(hidden_units=[4], use_bn=True, use_ln=True),
       'use_bn and .*use_ln'),
      ('dropout_len', dict(hidden_units=[4, 4, 4], dropout_ratio=[0.1, 0.2]),
       'dropout_ratio has 2 values'),
      ('dropout_range', dict(hidden_units=[4], dropout_ratio=1.0),
       r'dropout_ratio\[0\] \(1.0\)'),
  )
  def test_errors(self, kwargs, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      MLPSpec.create(**kwargs)


def tiny_config():
  return criteo_config.get_config('tiny')


class DLRMTest(parameterized.TestCase):

  @parameterized.parameters((True, False), (False, False), (True, True))
  def test_output_shapes_and_final_width(self, arch_with_sparse, self_inter):
    spec = DLRMSpec(
        num_dense=13, num_sparse=26, embedding_dim=8,
        dense_mlp=MLPSpec.create([16, 8]), final=MLPSpec.create([12]),
        arch_with_sparse=arch_with_sparse, interaction_self=self_inter)
    model = DLRM(spec)
    dense = jnp.ones((5, 13))
    sparse = jnp.ones((5, 26, 8))
    v = model.init(jax.random.key(0), dense, sparse, train=False)
    out = model.apply(v, dense, sparse, train=False)
    self.assertEqual(out['logits'].shape, (5,))
    self.assertEqual(out['probs'].shape, (5,))
    np.testing.assert_allclose(out['probs'], jax.nn.sigmoid(out['logits']))
    want = interaction.output_dim(27, self_inter) + 8 + (
        26 * 8 if arch_with_sparse else 0)
    self.assertEqual(spec.final_input_dim, want)
    self.assertEqual(v['params']['final']['dense_0']['kernel'].shape,
                     (want, 12))

  def test_without_dense_group(self):
    spec = DLRMSpec(num_dense=0, num_sparse=3, embedding_dim=4,
                    dense_mlp=None, final=MLPSpec.create([5]))
    model = DLRM(spec)
    sparse = jnp.ones((2, 3, 4))
    v = model.init(jax.random.key(0), None, sparse, train=False)
    self.assertEqual(model.apply(v, None, sparse, train=False)['logits'].shape,
                     (2,))
    self.assertEqual(spec.final_input_dim, 3 + 12)

  def test_bfloat16_compute_keeps_float32_logits(self):
    spec = DLRMSpec(num_dense=2, num_sparse=2, embedding_dim=4,
                    dense_mlp=MLPSpec.create([4]), final=MLPSpec.create([4]))
    model = DLRM(spec, dtype=jnp.bfloat16)
    v = model.init(jax.random.key(0), jnp.ones((2, 2)), jnp.ones((2, 2, 4)),
                   train=False)
    out = model.apply(v, jnp.ones((2, 2)), jnp.ones((2, 2, 4)), train=False)
    self.assertEqual(out['logits'].dtype, jnp.float32)
    self.assertEqual(v['params']['final']['dense_0']['kernel'].dtype,
                     jnp.float32)


class ConfigErrorTest(parameterized.TestCase):

  def _build(self, mutate):
    config = tiny_config()
    mutate(config)
    return config_lib.build(config)

  def test_tiny_config_builds(self):
    setup = config_lib.build(tiny_config())
    self.assertEqual(setup.model.num_sparse, 26)
    self.assertEqual(setup.model.num_dense, 13)
    self.assertLen(setup.tables, 26)

  def test_dense_mlp_dim_mismatch(self):
    def m(c):
      c.model.dense_mlp.hidden_units = [16, 64]
    with self.assertRaisesRegex(
        ValueError, r'config\.model\.dense_mlp\.hidden_units\[-1\] \(64\) must'
        r' equal the sparse embedding dim \(8\)'):
      self._build(m)

  def test_sparse_dims_differ(self):
    def m(c):
      c.features.cat_3.embedding_dim = 4
    with self.assertRaisesRegex(ValueError, "embedding_dim.*'cat_3': 4"):
      self._build(m)

  def test_dense_group_without_dense_mlp(self):
    def m(c):
      c.model.dense_mlp = None
    with self.assertRaisesRegex(ValueError,
                                'dense.*config.model.dense_mlp is not set'):
      self._build(m)

  def test_dense_mlp_without_dense_group(self):
    def m(c):
      c.model.feature_groups.dense = []
    with self.assertRaisesRegex(ValueError,
                                'dense_mlp is set but there is no dense'):
      self._build(m)

  def test_no_sparse_group(self):
    def m(c):
      c.model.feature_groups.sparse = []
    with self.assertRaisesRegex(ValueError, 'sparse group'):
      self._build(m)

  def test_sequence_feature_rejected(self):
    def m(c):
      c.features.cat_0.type = 'sequence_id'
      for field in ('max_ids', 'combiner', 'managed_collision'):
        del c.features.cat_0[field]
    with self.assertRaisesRegex(ValueError,
                                "'cat_0', a sequence feature"):
      self._build(m)

  def test_multi_value_feature_in_dense_group(self):
    def m(c):
      c.features.cat_0.max_ids = 3
      c.model.feature_groups.dense = list(c.model.feature_groups.dense) + [
          'cat_0']
    with self.assertRaisesRegex(ValueError,
                                "dense lists 'cat_0', which has ids"):
      self._build(m)

  def test_unknown_activation(self):
    def m(c):
      c.model.final.activation = 'swoosh'
    with self.assertRaisesRegex(
        ValueError, r"config\.model\.final\.activation \('swoosh'\)"):
      self._build(m)

  def test_empty_hidden_units(self):
    def m(c):
      c.model.final.hidden_units = []
    with self.assertRaisesRegex(ValueError,
                                r'config\.model\.final\.hidden_units'):
      self._build(m)

  def test_shared_table_dim_mismatch(self):
    def m(c):
      c.features.cat_1.embedding_name = 'shared'
      c.features.cat_2.embedding_name = 'shared'
      c.features.cat_2.num_buckets = 55
    with self.assertRaisesRegex(ValueError,
                                "share table 'shared' but differ in table"
                                r' size \(55 vs 101\)'):
      self._build(m)

  def test_shared_table(self):
    def m(c):
      c.features.cat_1.embedding_name = 'shared'
      c.features.cat_2.embedding_name = 'shared'
    setup = self._build(m)
    self.assertLen(setup.tables, 25)
    self.assertEqual(setup.feature_specs[1].table, 'shared')
    self.assertEqual(setup.feature_specs[2].table, 'shared')

  def test_bucketized_raw_feature_joins_sparse_group(self):
    def m(c):
      c.features.int_0.boundaries = [0.0, 1.0, 10.0]
      c.features.int_0.embedding_dim = 8
      c.model.feature_groups.dense = [f'int_{i}' for i in range(1, 13)]
      c.model.feature_groups.sparse = list(c.model.feature_groups.sparse) + [
          'int_0']
    setup = self._build(m)
    self.assertEqual(setup.model.num_sparse, 27)
    self.assertEqual(setup.tables[-1].num_rows, 4)

  def test_managed_collision_cannot_share_a_table(self):
    def m(c):
      c.features.cat_1.embedding_name = 'shared'
      c.features.cat_2.embedding_name = 'shared'
      c.features.cat_1.managed_collision.num_rows = 101
      c.features.cat_2.managed_collision.num_rows = 101
    with self.assertRaisesRegex(ValueError,
                                "managed_collision.*cannot share table"):
      self._build(m)

  def test_managed_collision_policy(self):
    def m(c):
      c.features.cat_1.managed_collision.num_rows = 50
      c.features.cat_1.managed_collision.policy = 'fifo'
    with self.assertRaisesRegex(
        ValueError, r"cat_1\.managed_collision\.policy \('fifo'\)"):
      self._build(m)

  def test_num_buckets_and_hash_bucket_size_exclusive(self):
    def m(c):
      c.features.cat_0.hash_bucket_size = 100
    with self.assertRaisesRegex(ValueError, 'exactly one of num_buckets'):
      self._build(m)

  def test_unknown_feature_in_group(self):
    def m(c):
      c.model.feature_groups.sparse = ['cat_0', 'nope']
    with self.assertRaisesRegex(ValueError, "lists 'nope'"):
      self._build(m)


class TerabyteConfigTest(absltest.TestCase):

  def test_refuses_to_allocate_what_cannot_fit(self):
    # Issue 25: on a host short of memory, init_state stops before
    # allocating, with one line naming the need and the largest tables.
    from unittest import mock  # pylint: disable=g-import-not-at-top
    from dlrm_jax.embedding.sharding import planner  # pylint: disable=g-import-not-at-top
    from dlrm_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
    config = criteo_config.get_config('terabyte')
    mesh = jax.make_mesh((1, 1), ('data', 'model'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:1])
    trainer = trainer_lib.Trainer(config, mesh=mesh)
    need = sum(planner.table_bytes(t) for t in trainer.spec.tables)
    allocate = mock.patch.object(  # fails cleanly if it got that far
        trainer.engine, 'init',
        side_effect=AssertionError('init_state allocated the tables'))
    with allocate, mock.patch.object(planner, 'host_available_bytes',
                                     return_value=need - 1):
      with self.assertRaisesRegex(
          ValueError, r'need 24\.\d GiB of host memory for 1 CPU device\(s\),'
          r' more than .* \(largest tables: cat_\d+ \(4\.8 GiB\).*'
          r'rowwise_adagrad'):
        trainer.init_state(0)
    tiny = trainer_lib.Trainer(criteo_config.get_config('tiny'), mesh=mesh)
    with mock.patch.object(planner, 'host_available_bytes',
                           return_value=need - 1):
      tiny.check_memory()  # a few MB: passes

  def test_builds_abstractly(self):
    from dlrm_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
    config = criteo_config.get_config('terabyte')
    mesh = jax.make_mesh((1, 1), ('data', 'model'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:1])
    trainer = trainer_lib.Trainer(config, mesh=mesh)
    self.assertEqual(
        [t.num_rows for t in trainer.spec.tables],
        list(criteo_config.TERABYTE_NUM_BUCKETS))
    abstract = trainer.abstract_state()
    shapes = jax.eval_shape(lambda: abstract)  # allocates nothing
    stacks = shapes.emb['stacks']
    total_rows = sum(v.shape[0] for v in stacks.values())
    self.assertGreaterEqual(total_rows,
                            sum(criteo_config.TERABYTE_NUM_BUCKETS))
    table_bytes = sum(np.prod(v.shape) * v.dtype.itemsize
                      for v in jax.tree.leaves(shapes.emb))
    self.assertGreater(table_bytes, 2 * 10**10)  # ~12 GB tables + Adagrad
    params = shapes.params
    self.assertEqual(params['dense_mlp']['dense_0']['kernel'].shape, (13, 64))
    self.assertEqual(params['final']['dense_0']['kernel'].shape,
                     (interaction.output_dim(27) + 16 + 26 * 16, 64))
    # A forward pass traced abstractly, on the real batch size.
    batch = {
        'dense': jax.ShapeDtypeStruct((8192, 13), jnp.float32),
        'ids': jax.ShapeDtypeStruct((8192, 26), jnp.int32),
        'label': jax.ShapeDtypeStruct((8192,), jnp.float32),
    }
    out = jax.eval_shape(trainer._predict, abstract, batch)  # pylint: disable=protected-access
    self.assertEqual(out.shape, (8192,))
    self.assertEqual(config.batch_size, 8192)
    self.assertEqual(config.embedding.optimizer.kind, 'adagrad')
    self.assertEqual(config.optimizer.kind, 'adam')
    self.assertEqual(config.features.int_0.normalizer, 'log(x+3)')


if __name__ == '__main__':
  absltest.main()
