"""Exports written by 2 processes (launch/local.sh, 2 x 2 CPU devices): each
process writes the table rows it holds (row-wise tables), or, for int8 rows
split over devices (column-wise), the table is read collectively and written
once. The result loads and scores like the model restored in one process."""

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax import convert
from dlrm_jax.embedding import table_access
from dlrm_jax.serving import runtime as export_runtime
from dlrm_jax.serving import tables as export_tables
from dlrm_jax.serving import export as serving
from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax.train import trainer as trainer_lib
from tests import export_tables_test
from tests import reference

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MultiProcessExportTest(parameterized.TestCase):

  @parameterized.parameters(('row_wise', None), ('column_wise', 'int8'))
  def test_two_process_export_scores_like_the_model(self, strategy, quantize):
    overrides = {'embedding.replicate_bytes': 0,
                 'embedding.sharding': strategy}
    config = criteo_config.get_config('tiny')
    for k, v in overrides.items():
      section, field = k.split('.')
      config[section][field] = v
    workdir = tempfile.mkdtemp(prefix='dlrm_mp_export_')
    trainer = trainer_lib.Trainer(config, mesh=reference.mesh_of(1, 4))
    convert.save_initial_checkpoint(trainer, trainer.init_state(1), workdir)
    export_dir = os.path.join(workdir, 'export')
    env = dict(os.environ, PYTHON=sys.executable, NUM_PROCESSES='2',
               DEVICES_PER_PROCESS='2')
    env.pop('XLA_FLAGS', None)
    out = subprocess.run(
        ['bash', os.path.join(_ROOT, 'launch', 'local.sh'),
         '--config=configs/criteo.py:tiny', '--mode=export',
         f'--workdir={workdir}', f'--output={export_dir}',
         f'--quantize={quantize or "none"}',
         *[f'--config.{k}={v}' for k, v in overrides.items()]],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600,
        check=False)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    # The model restored in one process, on the 4 devices it was saved from
    # (the same values as on any other mesh; checkpoint_test moves them).
    ckpt = ckpt_lib.Checkpointer(workdir, create=False)
    host = trainer.new_host_state()
    state, _ = trainer.restore(ckpt, ckpt.latest_step(), host=host)
    ckpt.close()
    # Every table on disk is the logical table, rows from both processes.
    for t in trainer.spec.tables:
      want = export_tables.quantize_rows(
          table_access.get_table(trainer.engine, state.emb, t.name),
          quantize)
      names = export_tables.file_names(t.name, quantize)
      if quantize is None:
        want, names = {'w': want}, {'w': names}
      for k, rel in names.items():
        np.testing.assert_array_equal(np.load(os.path.join(export_dir, rel)),
                                      want[k], err_msg=rel)
    inputs = export_tables_test.random_inputs(128, seed=4)
    want = serving.ServingModel(trainer, state,
                                id_tables=host.export_id_tables(),
                                quantize=quantize)(inputs)
    got = export_runtime.load_export(export_dir).scores(
        inputs['int'], inputs['cat'], inputs['cat_present'])
    np.testing.assert_allclose(got, want, atol=2e-6)


if __name__ == '__main__':
  absltest.main()
