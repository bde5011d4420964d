"""Serving a tabular config (`config.data.source='table'`) by column name.

Avazu and MovieLens (side tables) are trained for a few steps; the export,
fed column-named instances encoded by `dlrm_jax.serving.columns`, must give
the scores `predict` gives (the Trainer on the training input pipeline's
batches of the same rows), and so must the HTTP server. Bad requests get
one-line errors naming the instance and the column.
"""

import asyncio
import contextlib
import csv
import io
import itertools
import json
import os
import runpy
import shutil
import sys
import tempfile
import threading
import unittest

from absl.testing import absltest
import numpy as np

from configs import avazu as avazu_config
from configs import movielens as movielens_config
from dlrm_jax.serving import columns as columns_lib
from dlrm_jax.serving import export as serving
from dlrm_jax.serving import offline
from dlrm_jax.serving import runtime as export_runtime
from dlrm_jax.serving import server as serve
from dlrm_jax.train import loop as train_loop
from dlrm_jax.train import trainer as trainer_lib
from tests import reference
from tests import shared_data

_ROWS = 200  # rows scored by predict and by the export
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve_stdin(export_dir: str, lines: list[str]) -> tuple[int, list[str]]:
  """`examples/serve_stdin.py export_dir < lines`, in this process: its exit
  status and output lines."""
  stdout, stderr = io.StringIO(), io.StringIO()
  argv, stdin = sys.argv, sys.stdin
  sys.argv = ['serve_stdin.py', export_dir, '--batch', '3']
  sys.stdin = io.StringIO(''.join(l + '\n' for l in lines))
  code = 0
  try:
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(
        stderr):
      try:
        runpy.run_path(os.path.join(_ROOT, 'examples', 'serve_stdin.py'),
                       run_name='__main__')
      except SystemExit as e:
        code = e.code or 0
  finally:
    sys.argv, sys.stdin = argv, stdin
  return code, stdout.getvalue().splitlines()


def _train(config, workdir):
  """Trains a config for a few steps; the restored model."""
  config.num_train_steps = 20
  config.min_train_steps = 0
  config.eval_every_steps = 20
  config.checkpoint_every_steps = 20
  mesh = reference.single_device_mesh()
  train_loop.train_and_evaluate(config, workdir,
                                trainer_lib.Trainer(config, mesh=mesh))
  return offline.load(config, workdir, mesh=mesh)


def _predict(model, path, workdir):
  out = os.path.join(workdir, 'scores.txt')
  n = offline.predict(model, path, out)
  scores = np.loadtxt(out)
  assert len(scores) == n, (len(scores), n)
  return scores


class _Server:
  """`server.serve` of an export in a thread, on a free port."""

  def __init__(self, export_dir: str):
    self._stop = None
    self._ready = threading.Event()
    self.url = None
    self._error = None

    def run():
      async def main():
        self._stop = asyncio.Event()
        await serve.serve(export_dir, port=0, max_batch=8, max_wait_ms=1,
                          ready=self._on_ready, stop=self._stop,
                          handle_signals=False)
      try:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())
      except Exception as e:  # pylint: disable=broad-except
        self._error = e
        self._ready.set()

    self._thread = threading.Thread(target=run, daemon=True)
    self._thread.start()
    self._ready.wait(120)
    if self._error is not None:
      raise self._error

  def _on_ready(self, port):
    self.url = f'http://127.0.0.1:{port}'
    self._ready.set()

  def post(self, bodies):
    import aiohttp  # pylint: disable=g-import-not-at-top

    async def run():
      async with aiohttp.ClientSession() as s:
        async def one(b):
          data = b if isinstance(b, bytes) else json.dumps(b)
          async with s.post(self.url + '/score', data=data) as r:
            return r.status, await r.json()
        return await asyncio.gather(*(one(b) for b in bodies))
    return asyncio.run(run())

  def close(self):
    if self._stop is not None:
      self._loop.call_soon_threadsafe(self._stop.set)
    self._thread.join(30)


class ColumnEncoderTest(absltest.TestCase):
  """The encoder alone: the reader's functions on request values."""

  def test_bags_as_lists_or_joined_text_and_the_readers_ids(self):
    from dlrm_jax.data import table  # pylint: disable=g-import-not-at-top
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    tags = table.ColumnRead('tags', 'string', separator='|', max_len=3)
    n = table.ColumnRead('n', 'int')
    enc = columns_lib.ColumnEncoder([tags, n])
    got = enc.encode([{'tags': 'a|b', 'n': 7}, {'tags': ['a', 'b'], 'n': '7'},
                      {'tags': None, 'n': None}, {'tags': '', 'n': ''}])
    want, _, _ = table.encode_bag(pa.array(['a|b'] * 2 + [None, ''],
                                           pa.string()), tags)
    np.testing.assert_array_equal(got['tags:present'], want >= 0)
    np.testing.assert_array_equal(got['tags'], np.where(want >= 0, want, 0))
    np.testing.assert_array_equal(got['n'], [7, 7, 0, 0])
    np.testing.assert_array_equal(got['n:present'], [1, 1, 0, 0])
    with self.assertRaisesRegex(
        columns_lib.ColumnError,
        r"^instances\[1\]\.tags \('a\|b\|c\|d'\) is not text, at most 3"):
      enc.encode([{'tags': 'a', 'n': 1}, {'tags': 'a|b|c|d', 'n': 1}])
    with self.assertRaisesRegex(columns_lib.ColumnError,
                                r"^instances\[0\]\.n \(True\) must be"):
      enc.encode([{'tags': 'a', 'n': True}])


class AvazuServingTest(absltest.TestCase):
  """Avazu: a CSV with a header, every column hashed as text, a cross."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    sample = shared_data.avazu_sample()
    if sample is None:
      raise unittest.SkipTest(
          'the Avazu sample is not available: set DLRM_SHARED_DIR to the'
          " 'shared' folder (with data/avazu/avazu_train_head_9999.csv), or"
          ' put it beside the checkout (../shared).')
    cls.tmp = tempfile.mkdtemp(prefix='dlrm_table_serving_avazu_')
    config = avazu_config.get_config()
    config.data.train_path = sample
    cls.model = _train(config, os.path.join(cls.tmp, 'run'))
    cls.head = os.path.join(cls.tmp, 'head.csv')
    with open(sample) as f, open(cls.head, 'w') as g:
      g.writelines(itertools.islice(f, _ROWS + 1))
    cls.want = _predict(cls.model, cls.head, cls.tmp)
    with open(cls.head, newline='') as f:
      cls.rows = list(csv.DictReader(f))
    cls.export_dir = os.path.join(cls.tmp, 'export')
    offline.export(cls.model, cls.export_dir)
    cls.loaded = export_runtime.load_export(cls.export_dir)
    cls.encoder = columns_lib.ColumnEncoder.from_export(
        cls.export_dir, cls.loaded.signature)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_export_scores_equal_predict(self):
    self.assertEqual(self.loaded.signature['source'], 'table')
    self.assertIn('site_id', self.loaded.signature['inputs'])
    got = self.loaded.scores_columns(self.encoder.encode(self.rows))
    np.testing.assert_allclose(got, self.want, atol=1e-6)
    # The in-process function gives them too.
    sm = serving.ServingModel(self.model.trainer, self.model.state,
                              id_tables=self.model.id_tables(),
                              admission=self.model.admission())
    np.testing.assert_allclose(sm(self.encoder.encode(self.rows[:16])),
                               self.want[:16], atol=1e-6)

  def test_integers_are_their_decimal_text(self):
    as_ints = [{k: int(v) if v.isdigit() and not v.startswith('0') else v
                for k, v in r.items()} for r in self.rows[:8]]
    self.assertIsInstance(as_ints[0]['C1'], int)
    got = self.loaded.scores_columns(self.encoder.encode(as_ints))
    np.testing.assert_allclose(got, self.want[:8], atol=1e-6)

  def test_criteo_inputs_are_refused(self):
    with self.assertRaisesRegex(ValueError, 'scores_columns'):
      self.loaded.scores(np.zeros((1, 13)), np.zeros((1, 26)),
                         np.ones((1, 26), bool))

  def test_http_server(self):
    srv = _Server(self.export_dir)
    try:
      first = dict(self.rows[3], C1=int(self.rows[3]['C1']))
      missing = dict(self.rows[1])
      del missing['device_ip']
      results = srv.post([
          {'instances': [first, self.rows[4]]},
          {'instances': self.rows[:11]},
          {'instances': [self.rows[0], missing]},
          {'instances': [self.rows[0], self.rows[1], dict(self.rows[2],
                                                          C14=1.5)]},
          {'instances': [dict(self.rows[0], hour=['1', '2'])]},
          {'rows': ['1\t2']},
      ])
    finally:
      srv.close()
    (s1, g1), (s2, g2) = results[:2]
    self.assertEqual((s1, s2), (200, 200), (g1, g2))
    np.testing.assert_allclose(g1['probabilities'], self.want[3:5],
                               atol=1e-6)
    np.testing.assert_allclose(g2['probabilities'], self.want[:11],
                               atol=1e-6)
    for (status, got), (row, pattern) in zip(results[2:], [
        (1, r"^instances\[1\]: column 'device_ip' is missing\.$"),
        (2, r'^instances\[2\]\.C14 \(1\.5\) must be a string, an integer'),
        (0, r'^instances\[0\]\.hour is a list'),
        (None, 'reads columns by name: send "instances"')]):
      self.assertEqual(status, 400, got)
      self.assertRegex(got['error'], pattern)
      self.assertNotIn('\n', got['error'])
      self.assertEqual(got.get('row'), row, got)


class MovieLensServingTest(absltest.TestCase):
  """MovieLens: ratings joined with u.item and u.user on their keys."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    folder = shared_data.movielens_sample()
    if folder is None:
      raise unittest.SkipTest(
          'the MovieLens sample is not available: set DLRM_SHARED_DIR to the'
          " 'shared' folder (with data/movielens/ml-100k), or put it beside"
          ' the checkout (../shared).')
    cls.folder = folder
    cls.tmp = tempfile.mkdtemp(prefix='dlrm_table_serving_ml_')
    config = movielens_config.get_config(folder)
    config.data.train_path = os.path.join(folder, 'u.data.first20000')
    cls.model = _train(config, os.path.join(cls.tmp, 'run'))
    cls.head = os.path.join(cls.tmp, 'head.tsv')
    with open(config.data.train_path) as f, open(cls.head, 'w') as g:
      g.writelines(itertools.islice(f, _ROWS))
    cls.want = _predict(cls.model, cls.head, cls.tmp)
    with open(cls.head) as f:
      cls.ratings = [l.split('\t') for l in f.read().splitlines()]
    cls.export_dir = os.path.join(cls.tmp, 'export')
    offline.export(cls.model, cls.export_dir)
    shutil.rmtree(os.path.join(cls.tmp, 'run'))  # the export stands alone
    cls.loaded = export_runtime.load_export(cls.export_dir)
    cls.encoder = columns_lib.ColumnEncoder.from_export(
        cls.export_dir, cls.loaded.signature)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_join_keys_give_predicts_scores(self):
    self.assertEqual(sorted(os.listdir(os.path.join(self.export_dir,
                                                    'side'))),
                     ['item_u.item', 'user_u.user'])
    instances = [{'user_id': int(u), 'item_id': int(i)}
                 for u, i, _, _ in self.ratings]
    got = self.loaded.scores_columns(self.encoder.encode(instances))
    np.testing.assert_allclose(got, self.want, atol=1e-6)

  def test_side_columns_given_directly(self):
    with open(os.path.join(self.folder, 'u.item'), encoding='latin-1') as f:
      items = {l.split('|')[0]: l.rstrip('\n').split('|') for l in f
               if l.strip()}
    with open(os.path.join(self.folder, 'u.user')) as f:
      users = {l.split('|')[0]: l.rstrip('\n').split('|') for l in f
               if l.strip()}
    instances = []
    for u, i, _, _ in self.ratings[:20]:
      flags = items[i][5:]
      inst = dict(zip(movielens_config.GENRES, map(int, flags)))
      age, gender, occupation, zipcode = users[u][1:]
      inst.update(user_id=u, item_id=i, age=int(age), gender=gender,
                  occupation=occupation, zip=zipcode)
      instances.append(inst)
    # Given directly (they win over the join on the keys, which the user_id
    # and item_id features read too): the same inputs.
    direct = self.encoder.encode(instances)
    joined = self.encoder.encode([{'user_id': u, 'item_id': i}
                                  for u, i, _, _ in self.ratings[:20]])
    for k in joined:
      np.testing.assert_array_equal(direct[k], joined[k], err_msg=k)
    np.testing.assert_allclose(self.loaded.scores_columns(direct),
                               self.want[:20], atol=1e-6)

  def test_stdin_json_lines(self):
    lines = [json.dumps({'user_id': int(u), 'item_id': int(i)})
             for u, i, _, _ in self.ratings[:5]]
    lines.insert(2, json.dumps({'user_id': 1}))
    lines.insert(4, 'not json')
    code, out = _serve_stdin(self.export_dir, lines)
    self.assertEqual(code, 1)
    self.assertEqual(out[2], "error\tinstances[2]: column 'item_id' is"
                     ' missing.')
    self.assertRegex(out[4], r'^error\tinstances\[4\]: not valid JSON')
    got = [float(x) for k, x in enumerate(out) if k not in (2, 4)]
    np.testing.assert_allclose(got, self.want[:5], atol=1e-6)

  def test_bad_requests_name_the_instance_and_column(self):
    good = {'user_id': 196, 'item_id': 242}
    cases = [
        ({'user_id': 196}, r"^instances\[1\]: column 'item_id' is missing"),
        ({'item_id': 3}, r"^instances\[1\]: column '(age|user_id)' is"
         r' missing'),
        ({'user_id': 'x7', 'item_id': 3},
         r"^instances\[1\]\.user_id \('x7'\) is not a decimal integer\.$"),
        (dict(good, age='old'),
         r"^instances\[1\]\.age \('old'\) is not a number\.$"),
        ([1, 2], r'^instances\[1\] must be an object of columns'),
    ]
    for bad, pattern in cases:
      body = json.dumps({'instances': [good, bad]}).encode()
      with self.assertRaisesRegex(serve.BadRequest, pattern) as ctx:
        serve.parse_request(body, 100, self.encoder)
      self.assertEqual(ctx.exception.row, 1, str(ctx.exception))
    # All the flag columns given, one of them not a number.
    flags = dict.fromkeys(movielens_config.GENRES, 0)
    flags['Drama'] = 'x'
    with self.assertRaisesRegex(columns_lib.ColumnError,
                                r"^instances\[0\]\.Drama \('x'\) is not"):
      self.encoder.encode([dict(good, **flags)])


if __name__ == '__main__':
  absltest.main()
