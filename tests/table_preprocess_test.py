"""Preprocessing a table config: model batches written once, read back."""

import os
import tempfile

import numpy as np
from absl.testing import absltest

from configs import avazu
from dlrm_jax.config import build as config_lib
from dlrm_jax.data import binary
from dlrm_jax.data import inputs
from dlrm_jax.data import preprocess

AVAZU = '/work/shared/data/avazu/avazu_train_head_9999.csv'
ROWS = 3000


class TablePreprocessTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if not os.path.exists(AVAZU):
      raise absltest.SkipTest(f'{AVAZU} is not here.')
    cls.tmp = tempfile.mkdtemp()
    head = os.path.join(cls.tmp, 'avazu_head.csv')
    with open(AVAZU) as f, open(head, 'w') as out:
      for _ in range(ROWS + 1):
        out.write(f.readline())
    cls.config = avazu.get_config()
    cls.config.data.train_path = head
    cls.config.data.eval_fraction = 0.0
    cls.out = os.path.join(cls.tmp, 'bin')
    cls.meta = preprocess.run_table(cls.config, cls.out, part_rows=1000,
                                    progress=False)

  def _binary_config(self):
    config = avazu.get_config()
    config.data.train_path = self.config.data.train_path
    config.data.eval_fraction = 0.0
    config.data.source = 'binary'
    config.data.binary_dir = self.out
    return config

  def test_metadata(self):
    self.assertEqual(self.meta.layout, 'model')
    self.assertEqual([p['rows'] for p in self.meta.splits['train']],
                     [1000, 1000, 1000])
    self.assertEqual(self.meta.num_dense, 0)
    self.assertEqual(self.meta.num_id_columns, 23)

  def test_same_model_batches_as_table(self):
    table_spec = config_lib.run_spec(self.config)
    table_src = inputs.make_data(table_spec).train.source
    make = inputs.make_batch_maker(table_spec)
    want = [make(b) for b in table_src.iter_rows()]
    want = {k: np.concatenate([w[k] for w in want]) for k in want[0]}
    spec = config_lib.run_spec(self._binary_config())
    self.assertEqual(spec.table_rows, table_spec.table_rows)
    src = inputs.make_data(spec).train.source
    got = inputs.make_batch_maker(spec)(src.read(np.arange(ROWS)))
    self.assertEqual(sorted(got), sorted(want))
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
      self.assertEqual(got[k].dtype, want[k].dtype, k)
    # Random access gives the same rows.
    idx = np.array([2999, 5, 1500, 999, 1000])
    got = inputs.make_batch_maker(spec)(src.read(idx))
    np.testing.assert_array_equal(got['ids'], want['ids'][idx])
    np.testing.assert_array_equal(got['label'], want['label'][idx])

  def test_dense_round_trip(self):
    batch = {'label': np.array([0., 1.], np.float32),
             'dense': np.array([[0.5, -1.25], [np.pi, 7.]], np.float32),
             'ids': np.array([[3, -1], [0, 9]], np.int32)}
    got = binary.model_batch(binary.model_records(batch, 2, 2), 2)
    for k in batch:
      np.testing.assert_array_equal(got[k], batch[k])

  def test_refuses_other_features(self):
    config = self._binary_config()
    config.features.hour.hash_bucket_size = 999
    with self.assertRaisesRegex(ValueError, r'fingerprint \w+, .* differ from'
                                r' those .* \(fingerprint \w+'):
      inputs.make_data(config)

  def test_refuses_non_table_config(self):
    config = self._binary_config()
    with self.assertRaisesRegex(ValueError, "config.data.source .* 'table'"):
      preprocess.run_table(config, os.path.join(self.tmp, 'x'))


if __name__ == '__main__':
  absltest.main()
