"""Checkpoints across topologies: 8 devices -> 4 -> 1 and back.

A run on 8 devices saves its state (tables laid out by an 8-shard plan, their
Adagrad state, dense parameters and Adam state). Restored on 4 devices and
on 1 device, where the planner lays the tables out differently, training goes
on to the same result as on 8 devices.
"""

import shutil

from absl.testing import absltest
import jax
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax.train import loop as train_loop
from dlrm_jax.train import trainer as trainer_lib
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding import table_access
from tests import reference


def mixed_config(num_train_steps):
  config = criteo_config.get_config('tiny')
  # cat_4: small next to the batch, so the planner replicates it.
  for i, rows in enumerate((5000, 3000, 2000, 700, 12)):
    config.features[f'cat_{i}'].num_buckets = rows
  config.embedding.replicate_bytes = 20_000
  config.embedding.sharding_overrides = {'cat_5': 'column_wise'}
  # Exact Adagrad's first step is ~lr * sign(g) for any g >> eps: an
  # accumulator start keeps it smooth in g, so meshes compare at tolerance.
  config.embedding.optimizer.initial_accumulator_value = 0.01
  config.num_train_steps = num_train_steps
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  return config


def final_state(trainer, workdir):
  ckpt = ckpt_lib.Checkpointer(workdir)
  state, meta = trainer.restore(ckpt, ckpt.latest_step())
  ckpt.close()
  return state, meta


class CheckpointTopologyTest(absltest.TestCase):

  def test_8_to_4_to_1_and_back(self):
    meshes = {8: reference.mesh_of(1, 8), 4: reference.mesh_of(1, 4),
              1: reference.single_device_mesh()}
    trainers = {n: trainer_lib.Trainer(mixed_config(20), mesh=m)
                for n, m in meshes.items()}
    strategies = {p.strategy for p in trainers[8].plan.placements}
    self.assertEqual(strategies, {'replicated', 'table_wise', 'row_wise',
                                  'column_wise'})
    self.assertNotEqual(trainers[8].plan, trainers[4].plan)

    first = self.create_tempdir().full_path
    train_loop.train_and_evaluate(mixed_config(10), first, trainers[8])
    _, meta = final_state(trainers[8], first)
    self.assertEqual(plan_lib.Plan.from_json(meta['plan']), trainers[8].plan)

    results = {}
    for n in (8, 4, 1):
      workdir = self.create_tempdir().full_path
      shutil.copytree(first, workdir, dirs_exist_ok=True)
      summary = train_loop.train_and_evaluate(mixed_config(20), workdir,
                                              trainers[n])
      self.assertEqual(summary['step'], 20)
      state, meta = final_state(trainers[n], workdir)
      results[n] = (summary, state, workdir)
      self.assertEqual(plan_lib.Plan.from_json(meta['plan']),
                       trainers[n].plan)

    base_summary, base_state, _ = results[8]
    for n in (4, 1):
      summary, state, _ = results[n]
      self.assertAlmostEqual(summary['eval']['auc'], base_summary['eval']['auc'],
                             places=4)
      for x, y in zip(jax.tree.leaves(state.params),
                      jax.tree.leaves(base_state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4,
                                   atol=1e-5)
      for t in trainers[8].spec.tables:
        for slot in (None, 'acc'):
          np.testing.assert_allclose(
              table_access.get_table(trainers[n].engine, state.emb, t.name,
                                     slot),
              table_access.get_table(trainers[8].engine, base_state.emb,
                                     t.name, slot),
              rtol=2e-4, atol=1e-5, err_msg=f'{n} devices, {t.name} {slot}')

    # And back: the 1-device checkpoint onto 8 devices, exactly.
    _, state1, workdir1 = results[1]
    state8, _ = final_state(trainers[8], workdir1)
    for t in trainers[8].spec.tables:
      for slot in (None, 'acc'):
        np.testing.assert_array_equal(
            table_access.get_table(trainers[8].engine, state8.emb, t.name,
                                   slot),
            table_access.get_table(trainers[1].engine, state1.emb, t.name,
                                   slot))
    self.assertEqual(int(state8.step), 20)

  def test_bfloat16_tables_move_bit_exactly(self):
    # bf16 tables are saved as their bit patterns in float16 arrays;
    # restored under another plan (8 devices -> 1) they are the same bits,
    # and the saved signature says how they are stored.
    config = mixed_config(2)
    config.embedding.dtype = 'bfloat16'
    t8 = trainer_lib.Trainer(config, mesh=reference.mesh_of(1, 8))
    t1 = trainer_lib.Trainer(config, mesh=reference.single_device_mesh())
    self.assertNotEqual(t8.plan, t1.plan)
    workdir = self.create_tempdir().full_path
    train_loop.train_and_evaluate(config, workdir, t8)
    state8, meta = final_state(t8, workdir)
    self.assertEqual(
        meta['signature']['tables']['cat_0'].get('storage'), 'float16')
    state1, _ = final_state(t1, workdir)
    for leaf in jax.tree.leaves(state1.emb['stacks']):
      self.assertEqual(leaf.dtype, np.float16)
    for t in t8.spec.tables:
      a = table_access.get_table(t8.engine, state8.emb, t.name)
      self.assertEqual(a.dtype, jax.numpy.bfloat16)
      np.testing.assert_array_equal(
          table_access.get_table(t1.engine, state1.emb,
                                 t.name).view(np.uint16),
          a.view(np.uint16))


if __name__ == '__main__':
  absltest.main()
