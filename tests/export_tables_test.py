"""Exported tables: streamed per shard, memory-mapped, int8/fp16 quantized.

References: a Python loop of FBGEMM's row-wise int8 formula; the in-process
float32 `ServingModel` of the same state on one device.
"""

import os
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.embedding import table_access
from dlrm_jax.serving import runtime as export_runtime
from dlrm_jax.serving import tables as export_tables
from dlrm_jax.serving import offline as inference
from dlrm_jax.train import metrics
from dlrm_jax.serving import export as serving
from dlrm_jax.train import loop as train_loop
from dlrm_jax.train import trainer as trainer_lib
from tests import reference
from tests import shared_data


def random_inputs(n, seed=0):
  rng = np.random.default_rng(seed)
  return {'int': rng.integers(-1, 200, (n, 13)).astype(np.int32),
          'cat': rng.integers(0, 2**32, (n, 26), dtype=np.uint64).astype(
              np.uint32),
          'cat_present': rng.random((n, 26)) < 0.9}


def random_lines(n, seed=0):
  """Criteo text lines (39 fields), about a tenth of the values missing."""
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(n):
    ints = [str(v) if rng.random() > 0.1 else ''
            for v in rng.integers(0, 500, 13)]
    cats = [f'{v:08x}' if rng.random() > 0.1 else ''
            for v in rng.integers(0, 2**32, 26, dtype=np.uint64)]
    lines.append('\t'.join(ints + cats))
  return lines


def loop_int8(row):
  """FBGEMM FloatOrHalfToFused8BitRowwiseQuantizedSBFloatRef, one row."""
  lo, hi = min(row), max(row)
  inv = np.float32(255.0) / (np.float32(hi - lo) + np.float32(1e-8))
  q = [int(np.rint(np.float32(x - lo) * inv)) for x in row]
  return q, np.float32(hi - lo) / np.float32(255.0), lo


class QuantizeTest(absltest.TestCase):

  def test_int8_rows_match_fbgemm_formula(self):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(20, 8)).astype(np.float32)
    w[3] = 0.5  # a constant row: range 0
    got = export_tables.quantize_int8(w)
    for r in range(20):
      q, scale, bias = loop_int8(w[r])
      np.testing.assert_array_equal(got['q'][r], q)
      self.assertEqual(got['scale'][r], scale)
      self.assertEqual(got['bias'][r], bias)
    deq = got['q'] * got['scale'][:, None] + got['bias'][:, None]
    self.assertTrue(np.all(np.abs(deq - w) <= got['scale'][:, None] / 2
                           + 1e-6))
    np.testing.assert_array_equal(deq[3], 0.5)

  def test_bad_quantize(self):
    with self.assertRaisesRegex(ValueError, r"quantize \('int4'\) must be"):
      export_tables.check_quantize('int4')


class ShardedExportTest(absltest.TestCase):
  """A model sharded over 8 devices exports per shard and scores like the
  single-device in-process model."""

  def test_sharded_export_scores_like_the_model(self):
    config = criteo_config.get_config('tiny')
    config.embedding.replicate_bytes = 0
    config.embedding.sharding_overrides = {'cat_0': 'column_wise',
                                           'cat_1': 'row_wise',
                                           'cat_2': 'replicated'}
    trainer = trainer_lib.Trainer(config, mesh=reference.mesh_of(2, 4))
    self.assertEqual(trainer.plan.placement('cat_0').strategy, 'column_wise')
    state = trainer.init_state(0)
    inputs = random_inputs(64)
    want = serving.ServingModel(trainer, state)(inputs)
    for quantize, atol in ((None, 2e-6), ('fp16', 2e-3), ('int8', 5e-3)):
      out = self.create_tempdir().full_path
      sm = serving.ServingModel(trainer, state, quantize=quantize)
      sm.export(out)
      files = sorted(os.listdir(os.path.join(out, 'tables')))
      self.assertLen(files, 26 * (3 if quantize == 'int8' else 1))
      m = export_runtime.load_export(out)
      got = m.scores(inputs['int'], inputs['cat'], inputs['cat_present'])
      np.testing.assert_allclose(got, want, atol=atol, err_msg=str(quantize))
      # The export equals the in-process model with the same stored rows.
      np.testing.assert_allclose(got, sm(inputs), atol=2e-6)
      table = np.load(os.path.join(out, 'tables', files[0]), mmap_mode='r')
      self.assertIsInstance(table, np.memmap)
    # The tables on disk are the logical tables.
    stored = np.load(os.path.join(out, 'tables', 'cat_0.q.npy'))
    np.testing.assert_array_equal(
        stored, export_tables.quantize_int8(
            table_access.get_table(trainer.engine, state.emb, 'cat_0'))['q'])


class Int8AucTest(absltest.TestCase):

  def test_int8_auc_difference_on_criteo_sample(self):
    train_file = shared_data.criteo_file(self, 'kaggle_train_head_4000.tsv')
    eval_file = shared_data.criteo_file(self, 'kaggle_train_random_1000.tsv')
    config = criteo_config.get_config('tiny')
    config.data.train_path = train_file
    config.data.eval_path = eval_file
    config.num_train_steps = 30
    config.eval_every_steps = 30
    workdir = tempfile.mkdtemp(prefix='dlrm_int8_')
    train_loop.train_and_evaluate(config, workdir, trainer_lib.Trainer(
        config, mesh=reference.single_device_mesh()))
    model = inference.load(config, workdir)
    lines = open(eval_file).read().splitlines()
    labels = np.array([int(l.split('\t', 1)[0]) for l in lines])
    rows = serving.parse_rows(lines)
    scores = {}
    for q in (None, 'int8'):
      out = self.create_tempdir().full_path
      inference.export(model, out, quantize=q)
      scores[q] = export_runtime.load_export(out).scores(
          rows['int'], rows['cat'], rows['cat_present'])
    auc = {q: metrics.roc_auc(s, labels) for q, s in scores.items()}
    diff = auc['int8'] - auc[None]
    print(f'\nint8 vs float32 export on {len(lines)} Criteo rows: AUC'
          f' {auc["int8"]:.6f} vs {auc[None]:.6f} (difference {diff:+.2e});'
          f' max |score difference| {np.abs(scores["int8"] - scores[None]).max():.2e}')
    self.assertLess(abs(diff), 2e-3)
    np.testing.assert_allclose(scores['int8'], scores[None], atol=5e-3)


if __name__ == '__main__':
  absltest.main()


class MultiHotExportTest(absltest.TestCase):
  """A model trained on synthetic multi-hot bags exports; its export scores
  raw rows as `inference.predict` does through the training input path."""

  def test_bags_match_the_pipeline(self):
    from dlrm_jax.data import multi_hot as multi_hot_export  # pylint: disable=g-import-not-at-top
    from dlrm_jax.data import loader  # pylint: disable=g-import-not-at-top
    ids = np.concatenate([np.arange(50), [39_999_999, 12345]]).astype(np.int32)
    for dist in loader.DISTRIBUTIONS:
      mh = loader.MultiHot(hotness=(1, 5, 100), num_rows=(7, 101, 40_000_000),
                           distribution=dist, seed=3)
      packed = np.full((len(ids), 106), -1, np.int64)
      packed[:, 0] = ids % 7
      packed[:, 1] = ids % 101
      packed[:, 6] = ids
      want = mh.expand(packed)
      for k, (start, h) in enumerate(((0, 1), (1, 5), (6, 100))):
        got = jax.jit(lambda x, k=k: multi_hot_export.bags(x, mh, k))(
            packed[:, start].astype(np.int32))
        np.testing.assert_array_equal(np.asarray(got),
                                      want[:, start:start + h],
                                      err_msg=f'{dist} feature {k}')

  def test_multi_hot_export_scores_like_predict(self):
    from dlrm_jax.config import build as config_lib  # pylint: disable=g-import-not-at-top
    config = criteo_config.get_config('tiny')
    config.data.multi_hot.enabled = True
    config.data.multi_hot.hotness = [3, 1, 5] + [1] * 22 + [2]
    config.features.cat_2.combiner = 'mean'
    config = config_lib.resolve_data(config)
    trainer = trainer_lib.Trainer(config, mesh=reference.single_device_mesh())
    model = inference.TrainedModel(trainer.spec, trainer,
                                   trainer.init_state(0), 0)
    path = self.create_tempfile(
        'rows.txt', '\n'.join(random_lines(64)) + '\n').full_path
    want, got = reference.predicted_and_exported(self, model, path)
    np.testing.assert_allclose(got, want, atol=2e-6)
