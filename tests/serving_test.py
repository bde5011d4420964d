"""Run artifacts, eval/predict modes, export and serving, input tiling."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.serving import offline as inference
from dlrm_jax.serving import export as serving
from dlrm_jax.train import loop as train_loop
from dlrm_jax.train import trainer as trainer_lib
from dlrm_jax.data import criteo
from dlrm_jax.data import preprocess
from tests import reference
from tests import shared_data

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unlabeled_copy(test, name, rows=None):
  path = shared_data.criteo_file(test, name)
  lines = open(path).read().splitlines()[:rows]
  out = os.path.join(test.create_tempdir().full_path, 'test.txt')
  with open(out, 'w') as f:
    f.write('\n'.join(l.split('\t', 1)[1] for l in lines) + '\n')
  return out


class TrainedRunTest(absltest.TestCase):
  """One tiny training run, shared by the tests of this class."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp(prefix='dlrm_serving_test_')
    cls.config = criteo_config.get_config('tiny')
    cls.config.features.cat_4.managed_collision.num_rows = 500
    cls.summary = train_loop.train_and_evaluate(
        cls.config, cls.workdir,
        trainer_lib.Trainer(cls.config, mesh=reference.single_device_mesh()))
    cls.model = inference.load(cls.config, cls.workdir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.workdir, ignore_errors=True)
    super().tearDownClass()

  def test_workdir_artifacts(self):
    names = os.listdir(self.workdir)
    for name in ('checkpoints', 'metrics.jsonl', 'tensorboard',
                 'config.json', 'summary.json', 'loss.png', 'eval.png',
                 'roc.png'):
      self.assertIn(name, names)
    for png in ('loss.png', 'eval.png', 'roc.png'):
      data = open(os.path.join(self.workdir, png), 'rb').read()
      self.assertEqual(data[:8], b'\x89PNG\r\n\x1a\n')
      import matplotlib.image  # pylint: disable=g-import-not-at-top
      img = matplotlib.image.imread(os.path.join(self.workdir, png))
      self.assertGreater(img.shape[0], 100)
      self.assertGreater(img.std(), 0.01)  # not blank
    # TensorBoard events hold the same losses as metrics.jsonl.
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    tb = os.path.join(self.workdir, 'tensorboard')
    events = []
    for name in os.listdir(tb):
      data = open(os.path.join(tb, name), 'rb').read()
      pos = 0
      while pos < len(data):
        n = int.from_bytes(data[pos:pos + 8], 'little')
        ev = event_pb2.Event()
        ev.ParseFromString(data[pos + 12:pos + 12 + n])
        events.append(ev)
        pos += 12 + n + 4
    losses = {ev.step: v.simple_value for ev in events
              for v in ev.summary.value if v.tag == 'train/loss'}
    rows = [json.loads(l) for l in open(os.path.join(self.workdir,
                                                     'metrics.jsonl'))]
    want = {r['step']: r['loss'] for r in rows if r['type'] == 'train'}
    self.assertEqual(set(losses), set(want))
    for step, v in want.items():
      self.assertAlmostEqual(losses[step], v, places=5)

  def test_eval_mode_reproduces_the_final_eval(self):
    result = inference.evaluate(self.model)
    for k in ('auc', 'log_loss', 'accuracy', 'calibration'):
      self.assertAlmostEqual(result[k], self.summary['eval'][k], places=6)

  def test_predict_writes_one_score_per_row_in_order(self):
    path = unlabeled_copy(self, 'kaggle_train_random_1000.tsv')
    out = os.path.join(self.create_tempdir().full_path, 'scores.txt')
    self.assertEqual(inference.predict(self.model, path, out), 1000)
    scores = np.array([float(x) for x in open(out)])
    self.assertLen(scores, 1000)
    # Row by row through the export's parser and the in-process model: the
    # same scores in the same order.
    lines = open(path).read().splitlines()
    sm = serving.ServingModel(self.model.trainer, self.model.state,
                              id_tables=self.model.id_tables())
    for i in (0, 1, 517, 999):
      want = sm(serving.parse_rows([lines[i]]))[0]
      self.assertAlmostEqual(scores[i], want, places=6)

  def test_export_reloaded_in_a_fresh_process(self):
    path = unlabeled_copy(self, 'kaggle_train_random_1000.tsv', rows=300)
    export_dir = self.create_tempdir().full_path
    inference.export(self.model, export_dir)
    scores_file = os.path.join(self.create_tempdir().full_path, 's.txt')
    inference.predict(self.model, path, scores_file)
    want = np.array([float(x) for x in open(scores_file)])
    code = ('import sys, numpy as np\n'
            'from dlrm_jax.serving import runtime as rt\n'
            f'm = rt.load_export({export_dir!r})\n'
            f'rows = rt.parse_rows(open({path!r}).read().splitlines())\n'
            "s = m.scores(rows['int'], rows['cat'], rows['cat_present'])\n"
            "print(' '.join(f'{x:.8f}' for x in s))\n"
            "print('flax' in sys.modules, 'dlrm_jax.models' in sys.modules)\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True, check=True, cwd=_ROOT,
                         env=dict(os.environ, JAX_PLATFORMS='cpu'))
    got_line, loaded = out.stdout.strip().splitlines()
    got = np.array([float(x) for x in got_line.split()])
    np.testing.assert_allclose(got, want, atol=2e-6)
    self.assertEqual(loaded, 'False False')
    # The documented stdin scorer gives the same scores.
    out = subprocess.run(
        [sys.executable, 'examples/serve_stdin.py', export_dir, '--batch',
         '64'], stdin=open(path), capture_output=True, text=True, check=True,
        cwd=_ROOT)
    np.testing.assert_allclose(
        np.array([float(x) for x in out.stdout.split()]), want, atol=2e-6)
    # A blank line and a malformed row get an error on their own output
    # line; every other row keeps its score and its place (batches of 64:
    # the bad row lies in the third).
    lines = open(path, 'rb').read().splitlines()
    lines.insert(10, b'')
    lines[150] = lines[150].replace(b'\t', b'\t+', 1)
    out = subprocess.run(
        [sys.executable, 'examples/serve_stdin.py', export_dir, '--batch',
         '64'], input=b'\r\n'.join(lines) + b'\r\n', capture_output=True,
        cwd=_ROOT)
    self.assertEqual(out.returncode, 1)
    got = out.stdout.decode().splitlines()
    self.assertLen(got, 301)
    self.assertEqual(got[10], 'error\trow 11: empty line')
    self.assertRegex(got[150], r'^error\trow 151: I2 is not an integer: ')
    self.assertIn(b'2 of 301 rows malformed', out.stderr)
    keep = [i for i in range(301) if i not in (10, 150)]
    np.testing.assert_allclose(
        np.array([float(got[i]) for i in keep]),
        np.delete(want, [149]), atol=2e-6)

  def test_wrong_inputs_raise_clear_errors(self):
    export_dir = self.create_tempdir().full_path
    inference.export(self.model, export_dir, batch_size=4)
    m = serving.load_export(export_dir)
    ok = serving.parse_rows(open(shared_data.criteo_file(
        self, 'terabyte_day0_head_200.tsv')).read().splitlines()[:4])
    self.assertEqual(m.scores(ok['int'], ok['cat'], ok['cat_present']).shape,
                     (4,))
    with self.assertRaisesRegex(ValueError,
                                r"'int' must have shape \[B, 13\], got"
                                r' \[4, 12\]'):
      m.scores(ok['int'][:, :12], ok['cat'], ok['cat_present'])
    with self.assertRaisesRegex(ValueError, r"'cat' must have shape \[B, 26\]"):
      m.scores(ok['int'], ok['cat'][:, :25], ok['cat_present'])
    with self.assertRaisesRegex(ValueError, 'batches of exactly 4 rows'):
      m.scores(ok['int'][:3], ok['cat'][:3], ok['cat_present'][:3])
    with self.assertRaisesRegex(ValueError, 'expected 39 or 40'):
      serving.parse_rows(['1\t2\t3'])
    with self.assertRaisesRegex(ValueError, 'no request-level columns'):
      m.scores_tiled(ok, ok)

  def test_input_tiling_equals_untiled(self):
    export_dir = self.create_tempdir().full_path
    request = ['int_0', 'int_5', 'cat_0', 'cat_1', 'cat_4', 'cat_7']
    inference.export(self.model, export_dir, request_columns=request)
    m = serving.load_export(export_dir)
    rows = serving.parse_rows(open(shared_data.criteo_file(
        self, 'kaggle_train_random_1000.tsv')).read().splitlines()[:50])
    t = m.signature['tiled']
    self.assertEqual(t['request_int'], [0, 5])
    self.assertEqual(t['request_cat'], [0, 1, 4, 7])
    pick = lambda d, i, c: {'int': d['int'][i][:, t[f'{c}_int']],
                            'cat': d['cat'][i][:, t[f'{c}_cat']],
                            'cat_present': d['cat_present'][i][
                                :, t[f'{c}_cat']]}
    tiled = m.scores_tiled(pick(rows, slice(0, 1), 'request'),
                           pick(rows, slice(None), 'candidate'))
    full = {k: v.copy() for k, v in rows.items()}
    for k, kind in (('int', 'int'), ('cat', 'cat'), ('cat_present', 'cat')):
      cols = t[f'request_{kind}']
      full[k][:, cols] = rows[k][0, cols]
    untiled = m.scores(full['int'], full['cat'], full['cat_present'])
    np.testing.assert_allclose(tiled, untiled, rtol=1e-6, atol=1e-7)


class VocabExportTest(absltest.TestCase):

  def test_export_maps_raw_hashes_through_the_vocabulary(self):
    data_dir = self.create_tempdir().full_path
    preprocess.run([shared_data.criteo_file(self, 'kaggle_train_head_4000.tsv')],
                   data_dir, id_scheme='vocab', vocab_threshold=2, workers=1,
                   progress=False)
    config = criteo_config.get_config('tiny')
    config.data.source = 'binary'
    config.data.binary_dir = data_dir
    config.num_train_steps = 30
    workdir = self.create_tempdir().full_path
    train_loop.train_and_evaluate(config, workdir)
    model = inference.load(config, workdir)
    path = unlabeled_copy(self, 'kaggle_train_random_1000.tsv', rows=200)
    want, got = reference.predicted_and_exported(self, model, path)
    np.testing.assert_allclose(got, want, atol=2e-6)
    # And predict through the vocabulary equals the binary rows' scores.
    self.assertGreater(np.std(want), 1e-4)


if __name__ == '__main__':
  absltest.main()
