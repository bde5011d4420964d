"""Peer recipes (configs/criteo.py variants) build abstractly, allocating
nothing, with the shapes and optimizers their sources give."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from configs import criteo as criteo_config
from dlrm_jax.train import trainer as trainer_lib
from dlrm_jax.models import interaction


class PeerRecipeTest(parameterized.TestCase):

  @parameterized.parameters(
      ('tzrec_criteo', 'adagrad', 'exact_adagrad', 0.006, 8192),
      ('torchrec_criteo', 'sgd', 'sgd', 1.0, 2048))
  def test_builds_abstractly(self, variant, sparse_opt, dense_opt, lr, batch):
    config = criteo_config.get_config(variant)
    mesh = jax.make_mesh((1, 1), ('data', 'model'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:1])
    trainer = trainer_lib.Trainer(config, mesh=mesh)
    self.assertEqual([t.num_rows for t in trainer.spec.tables],
                     list(criteo_config.TERABYTE_NUM_BUCKETS))
    self.assertEqual({t.dim for t in trainer.spec.tables}, {128})
    abstract = trainer.abstract_state()
    shapes = jax.eval_shape(lambda: abstract)
    p = shapes.params
    self.assertEqual([p['dense_mlp'][f'dense_{i}']['kernel'].shape
                      for i in range(3)], [(13, 512), (512, 256), (256, 128)])
    # arch_with_sparse false: the over arch sees the dense output and the
    # 27 * 26 / 2 pairwise dot products only.
    self.assertEqual(p['final']['dense_0']['kernel'].shape,
                     (interaction.output_dim(27) + 128, 1024))
    self.assertEqual([p['final'][f'dense_{i}']['kernel'].shape[1]
                      for i in range(4)], [1024, 1024, 512, 256])
    out = jax.eval_shape(trainer._predict, abstract, {  # pylint: disable=protected-access
        'dense': jax.ShapeDtypeStruct((batch, 13), jnp.float32),
        'ids': jax.ShapeDtypeStruct((batch, 26), jnp.int32)})
    self.assertEqual(out.shape, (batch,))
    self.assertEqual(config.batch_size, batch)
    self.assertEqual(config.embedding.optimizer.kind, sparse_opt)
    self.assertEqual(config.optimizer.kind, dense_opt)
    self.assertEqual(config.embedding.optimizer.schedule.learning_rate, lr)
    self.assertEqual(config.optimizer.schedule.learning_rate, lr)

  def test_small_data_variant_builds(self):
    config = criteo_config.get_config('small_data')
    self.assertEqual(config.keep_best_metric, 'auc')
    self.assertGreater(config.admission.min_count, 1)
    self.assertGreater(config.early_stopping.patience, 0)


if __name__ == '__main__':
  absltest.main()
