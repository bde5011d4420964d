"""The MLPerf DLRM-DCNv2 recipe: built abstractly at full size; its tiny
shrink trains, resumes and stops at a target AUC."""

import json
import os

from absl.testing import absltest
import jax
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.config import build as config_lib
from dlrm_jax.train import loop as train_loop
from dlrm_jax.train import trainer as trainer_lib
from dlrm_jax.data import inputs
from tests import reference

_TRAINER = None


def tiny_config(**overrides):
  config = criteo_config.get_config('mlperf_dcnv2_tiny')
  for k, v in overrides.items():
    config[k] = v
  return config


def shared_trainer():
  global _TRAINER
  if _TRAINER is None:
    _TRAINER = trainer_lib.Trainer(config_lib.resolve_data(tiny_config()),
                                   mesh=reference.single_device_mesh())
  return _TRAINER


def nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def mlp_params(widths):
  return sum(a * b + b for a, b in zip(widths, widths[1:]))


class FullSizeTest(absltest.TestCase):

  def test_builds_abstractly_with_the_recipe_shapes(self):
    config = config_lib.resolve_data(criteo_config.get_config('mlperf_dcnv2'))
    trainer = trainer_lib.Trainer(config, mesh=reference.single_device_mesh())
    state = trainer.abstract_state()  # jax.eval_shape: allocates nothing
    d, n = 128, 26
    cross_in = (n + 1) * d
    want_dense = (mlp_params([13, 512, 256, 128])
                  + 3 * (2 * cross_in * 512 + cross_in)
                  + mlp_params([cross_in, 1024, 1024, 512, 256, 1]))
    got_dense = sum(x.size for x in jax.tree.leaves(state.params))
    self.assertEqual(got_dense, want_dense)
    cross = state.params['crossnet']
    self.assertEqual(cross['v_0']['kernel'].shape, (cross_in, 512))
    self.assertEqual(cross['u_2']['kernel'].shape, (512, cross_in))
    self.assertEqual(state.params['final']['dense_0']['kernel'].shape,
                     (cross_in, 1024))
    rows = sum(criteo_config.TERABYTE_NUM_BUCKETS)
    self.assertEqual(max(t.num_rows for t in trainer.spec.tables),
                     40_000_000)
    tables = nbytes(state.emb['stacks'])
    # The engine's stack pads the rows a little (alignment).
    self.assertBetween(tables - rows * d * 4, 0, 64 * d * 4)
    self.assertEqual(nbytes(state.emb['slots']), tables)  # full Adagrad
    self.assertEqual(
        [f.max_ids for f in trainer.spec.feature_specs],
        list(criteo_config.MLPERF_HOTNESS))
    self.assertEqual(config.batch_size, 65_536)
    self.assertEqual(config.eval_every_steps, 3200)
    self.assertEqual(config.target_auc, 0.80275)
    print(f'mlperf_dcnv2: {got_dense:,} dense parameters'
          f' ({nbytes(state.params) / 2**20:.1f} MiB, Adagrad state'
          f' {nbytes(state.opt_state) / 2**20:.1f} MiB); tables {rows:,} rows'
          f' x {d} = {tables / 2**30:.2f} GiB float32, Adagrad'
          f' {nbytes(state.emb["slots"]) / 2**30:.2f} GiB')


class TinyTest(absltest.TestCase):

  def test_trains_and_resumes_to_the_same_state(self):
    trainer = shared_trainer()
    straight = self.create_tempdir().full_path
    summary = train_loop.train_and_evaluate(tiny_config(), straight, trainer)
    self.assertEqual(summary['step'], 40)
    self.assertGreater(summary['eval']['auc'], 0.55)
    self.assertFalse(summary['target_auc_reached'])
    resumed = self.create_tempdir().full_path
    train_loop.train_and_evaluate(tiny_config(num_train_steps=20), resumed,
                                  trainer)
    second = train_loop.train_and_evaluate(tiny_config(), resumed, trainer)
    self.assertEqual(second['step'], 40)
    self.assertEqual(second['eval'], summary['eval'])
    a = trainer_lib.ckpt_lib.Checkpointer(straight)
    b = trainer_lib.ckpt_lib.Checkpointer(resumed)
    sa, _ = a.restore(40, trainer.abstract_state())
    sb, _ = b.restore(40, trainer.abstract_state())
    a.close()
    b.close()
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  def test_stops_at_the_target_auc_and_stays_stopped(self):
    trainer = shared_trainer()
    workdir = self.create_tempdir().full_path
    # Any trained model beats 0.51 at the first eval (step 20 of 40).
    summary = train_loop.train_and_evaluate(tiny_config(target_auc=0.51), workdir,
                                            trainer)
    self.assertEqual(summary['step'], 20)
    self.assertTrue(summary['target_auc_reached'])
    self.assertGreaterEqual(summary['eval']['auc'], 0.51)
    evals = [json.loads(l) for l in open(os.path.join(workdir,
                                                      'metrics.jsonl'))
             if json.loads(l)['type'] == 'eval']
    self.assertLen(evals, 1)
    # Running the same command again does not train past the target.
    again = train_loop.train_and_evaluate(tiny_config(target_auc=0.51), workdir,
                                          trainer)
    self.assertEqual(again['step'], 20)
    self.assertTrue(again['target_auc_reached'])
    # An unreachable target trains to the end.
    summary = train_loop.train_and_evaluate(
        tiny_config(target_auc=1.0, num_train_steps=20),
        self.create_tempdir().full_path, trainer)
    self.assertEqual(summary['step'], 20)
    self.assertFalse(summary['target_auc_reached'])

  def test_bad_target_auc_names_the_field(self):
    with self.assertRaisesRegex(ValueError, r'config\.target_auc \(1\.5\)'):
      config_lib.build_loop(tiny_config(target_auc=1.5))


class ShardedTinyTest(absltest.TestCase):

  def test_eight_devices_match_one(self):
    """DLRM-DCN with multi-hot bags, row-wise tables on a 2 x 4 mesh: the
    same losses, dense parameters and tables as one device; the cross net
    runs on each device's batch rows only."""
    config = config_lib.resolve_data(tiny_config())
    config.optimizer.kind = 'sgd'  # equal params <=> equal gradients
    config.embedding.sharding = 'row_wise'
    sharded = trainer_lib.Trainer(config, mesh=reference.mesh_of(2, 4))
    single = trainer_lib.Trainer(config, mesh=reference.single_device_mesh())
    it = inputs.make_data(config).train.iterator()
    batches = [next(it) for _ in range(3)]
    hlo = sharded.train_step.lower(
        sharded.init_state(0), sharded.put_batch(batches[0]),
        sharded.zero_metrics()).compile().as_text()
    cross_in = 27 * 8
    self.assertIn(f'f32[16,{cross_in}]', hlo)  # 128 rows / 8 devices
    self.assertNotIn(f'f32[128,{cross_in}]', hlo)
    reference.train_alike(sharded, single, batches)


if __name__ == '__main__':
  absltest.main()
