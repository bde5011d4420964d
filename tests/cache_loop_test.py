"""Cached tables through the training loop (`train_and_evaluate`).

The reference is the same config with every table on device. A cached run
must give the same losses, the same eval and, in its stores, the same
tables and Adagrad state, bit for bit; so must a cached run stopped at its
checkpoint and resumed with another cache size.
"""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.embedding import cache as cache_lib
from dlrm_jax.embedding import table_access
from dlrm_jax.serving import offline
from dlrm_jax.serving import tables as export_tables
from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax.train import loop as train_loop
from dlrm_jax.train import trainer as trainer_lib
from tests import reference


def _config(steps, fraction=None, rows=3000):
  config = criteo_config.get_config('tiny')
  for name in config.features:
    if name.startswith('cat_'):
      config.features[name].num_buckets = rows
  config.embedding.optimizer.initial_accumulator_value = 0.01
  config.num_train_steps = steps
  config.eval_every_steps = 20
  config.checkpoint_every_steps = 20
  if fraction is not None:
    config.embedding.cache.tables = 'all'
    config.embedding.cache.fraction = fraction
  return config


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return ([(r['step'], r['loss']) for r in rows if r['type'] == 'train'],
          [(r['step'], r['auc'], r['log_loss']) for r in rows
           if r['type'] == 'eval'])


class CachedLoopTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    mesh = reference.single_device_mesh()
    cls.mesh = mesh
    cls.root = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
    cls.ref_dir = os.path.join(cls.root, 'on_device')
    ref = trainer_lib.Trainer(_config(40), mesh=mesh)
    train_loop.train_and_evaluate(_config(40), cls.ref_dir, ref)
    ckpt = ckpt_lib.Checkpointer(cls.ref_dir)
    state, _ = ref.restore(ckpt, 40)
    ckpt.close()
    cls.ref_tables = {
        t.name: (table_access.get_table(ref.engine, state.emb, t.name),
                 table_access.get_table(ref.engine, state.emb, t.name,
                                        slot='acc'))
        for t in ref.spec.tables}

  def _check_stores(self, workdir, trainer):
    for t in trainer.spec.tables:
      store = cache_lib.HostStore(t, os.path.join(workdir, 'store'),
                                  create=False)
      w, acc = self.ref_tables[t.name]
      np.testing.assert_array_equal(store.arrays['weights'], w,
                                    err_msg=t.name)
      np.testing.assert_array_equal(store.arrays['acc'], acc,
                                    err_msg=t.name)

  def test_cached_run_equals_tables_on_device(self):
    workdir = os.path.join(self.root, 'cached')
    trainer = trainer_lib.Trainer(_config(40, 0.15), mesh=self.mesh)
    train_loop.train_and_evaluate(_config(40, 0.15), workdir, trainer)
    self.assertEqual(_losses(workdir), _losses(self.ref_dir))
    self._check_stores(workdir, trainer)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      first = json.loads(f.readline())
    self.assertLess(first['cache_hit_rate'], 1.0)  # rows were loaded
    self.assertGreater(first['cache_misses'], 0)
    self.assertEqual(sorted(os.listdir(
        os.path.join(workdir, 'store_checkpoints'))), ['20', '40'])

  def test_stop_and_resume_onto_another_cache_size(self):
    workdir = os.path.join(self.root, 'resumed')
    first = trainer_lib.Trainer(_config(20, 0.15), mesh=self.mesh)
    train_loop.train_and_evaluate(_config(20, 0.15), workdir, first)
    # The live store moves on past the checkpoint in a real kill; the
    # resume must read the store checkpoint, not the live files.
    store = cache_lib.HostStore(first.spec.tables[0],
                                os.path.join(workdir, 'store'), create=False)
    store.arrays['weights'][:] = np.nan
    store.arrays['weights'].flush()
    del store
    again = trainer_lib.Trainer(_config(40, 0.25), mesh=self.mesh)
    train_loop.train_and_evaluate(_config(40, 0.25), workdir, again)
    self.assertEqual(_losses(workdir), _losses(self.ref_dir))
    self._check_stores(workdir, again)

  def test_offline_eval_and_export_read_the_stores(self):
    workdir = os.path.join(self.root, 'offline')
    config = _config(40, 0.15)
    trainer = trainer_lib.Trainer(config, mesh=self.mesh)
    train_loop.train_and_evaluate(config, workdir, trainer)
    model = offline.load(config, workdir, mesh=self.mesh)
    ref = offline.load(_config(40), self.ref_dir, mesh=self.mesh)
    got, want = offline.eval_predictions(model), offline.eval_predictions(ref)
    np.testing.assert_array_equal(got[1], want[1])
    out = os.path.join(self.root, 'offline_export')
    offline.export(model, out)
    for t in trainer.spec.tables:
      np.testing.assert_array_equal(
          np.load(os.path.join(out, export_tables.file_names(t.name, None))),
          self.ref_tables[t.name][0], err_msg=t.name)

  def test_eight_devices_row_wise_equal_one_device_on_device(self):
    # 2 x 4 devices, the big tables row-wise: each shard swaps only the
    # cache slots it holds, and replicas over 'data' swap alike.
    workdir = os.path.join(self.root, 'eight')
    config = _config(40, 0.15)
    config.mesh.data, config.mesh.model = 2, 4
    config.embedding.sharding = 'row_wise'
    trainer = trainer_lib.Trainer(config, mesh=reference.mesh_of(2, 4))
    self.assertEqual({p.strategy for p in trainer.plan.placements},
                     {'row_wise'})
    train_loop.train_and_evaluate(config, workdir, trainer)
    got, want = _losses(workdir), _losses(self.ref_dir)
    np.testing.assert_allclose([l for _, l in got[0]],
                               [l for _, l in want[0]], rtol=1e-5)
    for t in trainer.spec.tables:
      store = cache_lib.HostStore(t, os.path.join(workdir, 'store'),
                                  create=False)
      np.testing.assert_allclose(store.arrays['weights'],
                                 self.ref_tables[t.name][0], rtol=1e-4,
                                 atol=1e-6, err_msg=t.name)

  def test_eval_and_predict_of_a_cached_trainer_are_named(self):
    trainer = trainer_lib.Trainer(_config(40, 0.15), mesh=self.mesh)
    with self.assertRaisesRegex(ValueError, 'evaluate_cached'):
      trainer.evaluate(None, [])
    with self.assertRaisesRegex(ValueError, 'cached tables'):
      trainer.predict(None, {})


if __name__ == '__main__':
  absltest.main()
