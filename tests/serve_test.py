"""The HTTP scoring server: concurrent clients, malformed requests, health,
dynamic batching, SIGTERM.

The reference is the export scored in-process (and the in-process
ServingModel), on the same rows.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import shutil

from absl.testing import absltest
import aiohttp
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.serving import runtime as export_runtime
from dlrm_jax.serving import server as serve
from dlrm_jax.serving import export as serving
from dlrm_jax.train import trainer as trainer_lib
from tests import reference
from tests.export_tables_test import random_lines

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServerTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.export_dir = tempfile.mkdtemp(prefix='dlrm_serve_test_')
    config = criteo_config.get_config('tiny')
    trainer = trainer_lib.Trainer(config, mesh=reference.single_device_mesh())
    state = trainer.init_state(0)
    cls.sm = serving.ServingModel(trainer, state)
    cls.sm.export(cls.export_dir)
    cls.proc = subprocess.Popen(
        [sys.executable, '-m', 'dlrm_jax.serve', f'--export={cls.export_dir}',
         '--port=0', '--max_batch=64', '--max_wait_ms=20'],
        cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_PLATFORMS='cpu'))
    try:
      cls.url = serve.read_url(cls.proc.stdout)
    except RuntimeError as e:
      raise RuntimeError(f'{e} {cls.proc.stderr.read()[-3000:]}') from e

  @classmethod
  def tearDownClass(cls):
    if cls.proc.poll() is None:
      cls.proc.kill()
    shutil.rmtree(cls.export_dir, ignore_errors=True)
    super().tearDownClass()

  def post_all(self, bodies):
    async def run():
      async with aiohttp.ClientSession() as s:
        async def one(b):
          data = b if isinstance(b, bytes) else json.dumps(b)
          async with s.post(self.url + '/score', data=data) as r:
            return r.status, await r.json()
        return await asyncio.gather(*(one(b) for b in bodies))
    return asyncio.run(run())

  def get(self, path):
    async def run():
      async with aiohttp.ClientSession() as s:
        async with s.get(self.url + path) as r:
          return r.status, await r.json()
    return asyncio.run(run())

  def test_1_concurrent_clients_get_the_models_scores(self):
    lines = random_lines(200)
    inputs = export_runtime.parse_rows(lines)
    want = self.sm(inputs)  # in-process model
    loaded = export_runtime.load_export(self.export_dir).scores(
        inputs['int'], inputs['cat'], inputs['cat_present'])
    np.testing.assert_allclose(loaded, want, atol=2e-6)
    status, h = self.get('/health')
    self.assertEqual((status, h['status']), (200, 'ok'))
    batches0 = h['batches']
    # 40 concurrent requests of 1 to 9 rows each, text rows and dicts.
    bodies, spans, start = [], [], 0
    rng = np.random.default_rng(1)
    while start < len(lines):
      n = int(rng.integers(1, 10))
      chunk = lines[start:start + n]
      if len(bodies) % 2:
        inst = []
        for l in chunk:
          f = l.split('\t')
          d = {f'int_{j}': int(f[j]) for j in range(13) if f[j]}
          d.update({f'cat_{j}': f[13 + j] for j in range(26) if f[13 + j]})
          inst.append(d)
        bodies.append({'instances': inst})
      else:
        bodies.append({'rows': chunk})
      spans.append((start, start + len(chunk)))
      start += n
    results = self.post_all(bodies)
    for (a, b), (status, body) in zip(spans, results):
      self.assertEqual(status, 200, body)
      np.testing.assert_allclose(body['probabilities'], want[a:b], atol=2e-6)
    status, h = self.get('/health')
    self.assertEqual(h['rows'] - 0 >= len(lines), True)
    # Requests arriving together were batched: fewer batches than requests.
    self.assertLess(h['batches'] - batches0, len(bodies))

  def test_2_malformed_requests_get_400_and_the_server_keeps_serving(self):
    good = random_lines(3, seed=5)
    bad_count = good[1].rsplit('\t', 1)[0]  # 38 fields
    bad_int = good[2].split('\t')
    bad_int[4] = 'x7'
    bad_hex = good[0].split('\t')
    bad_hex[20] = 'zz12'
    cases = [
        (b'{not json', None, 'not valid JSON'),
        ({'rows': []}, None, 'non-empty list'),
        ({'something': [1]}, None, 'either "rows"'),
        ({'rows': [good[0], bad_count]}, 1,
         'rows\\[1\\]: expected 39 fields, got 38'),
        ({'rows': [good[0], good[1], '\t'.join(bad_int)]}, 2, 'rows\\[2\\]'),
        ({'rows': ['\t'.join(bad_hex)]}, 0, 'rows\\[0\\]'),
        ({'rows': [good[0], 7]}, 1, 'must be a string'),
        ({'instances': [{'int_0': 1}, {'int_13': 2}]}, 1, 'unknown feature'),
        ({'instances': [{'int_0': 'a'}]}, 0, 'int_0.*32-bit integer'),
        ({'instances': [{'cat_1': 'ghijklmn'}]}, 0, 'cat_1.*hex hash'),
        ({'instances': [{'cat_1': '123456789'}]}, 0, 'at most 8 digits'),
        ({'instances': [{'int_2': 2**40}]}, 0, '32-bit'),
    ]
    results = self.post_all([c[0] for c in cases] + [{'rows': good}])
    for (body, row, pattern), (status, got) in zip(cases, results):
      self.assertEqual(status, 400, (body, got))
      self.assertRegex(got['error'], pattern)
      self.assertEqual(got.get('row'), row, got)
    status, got = results[-1]
    self.assertEqual(status, 200)
    np.testing.assert_allclose(got['probabilities'],
                               self.sm(export_runtime.parse_rows(good)),
                               atol=2e-6)
    self.assertIsNone(self.proc.poll())

  def test_3_sigterm_shuts_down_gracefully(self):
    async def run():
      async with aiohttp.ClientSession() as s:
        async def one(i):
          async with s.post(self.url + '/score',
                            json={'rows': random_lines(5, seed=i)}) as r:
            return r.status
        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        # The signal comes once the server has answered one (so on a loaded
        # machine it has surely received some), the others still in flight.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.gather(*tasks, return_exceptions=True)
    statuses = asyncio.run(run())
    out, err = self.proc.communicate(timeout=60)
    self.assertEqual(self.proc.returncode, 0, err[-2000:])
    self.assertIn('shut down', out)
    # Requests received before the signal were answered in full; later ones
    # found the port closed (never a 5xx or a cut-off response).
    for st in statuses:
      if not isinstance(st, int):
        self.assertIsInstance(st, aiohttp.ClientConnectionError)
      else:
        self.assertEqual(st, 200)
    self.assertGreater(sum(1 for s in statuses if s == 200), 0, statuses)


class BatcherTest(absltest.TestCase):

  def test_batches_up_to_max_rows_without_splitting_requests(self):
    calls = []

    def score(inputs):
      calls.append(len(inputs['int']))
      return inputs['int'][:, 0].astype(np.float32)

    async def run():
      b = serve.Batcher(score, max_batch=10, max_wait_s=0.2)
      b.start()
      reqs = [{'int': np.full((n, 13), i, np.int32),
               'cat': np.zeros((n, 26), np.uint32),
               'cat_present': np.zeros((n, 26), bool)}
              for i, n in enumerate((3, 3, 3, 4, 2, 12))]
      out = await asyncio.gather(*(b.submit(r) for r in reqs))
      await b.close()
      return out

    out = asyncio.run(run())
    for i, o in enumerate(out):
      np.testing.assert_array_equal(o, i)
    self.assertEqual(calls, [9, 6, 12])  # 3+3+3, then 4+2, then 12 alone

  def test_padded_scorer_pads_and_splits(self):
    class Fake:
      signature = {'batch_size': 4}
      def scores(self, a, b, c):
        del b, c
        assert len(a) == 4
        return a[:, 0].astype(np.float32)
    score = serve.padded_scorer(Fake())
    x = {'int': np.arange(10 * 13, dtype=np.int32).reshape(10, 13),
         'cat': np.zeros((10, 26), np.uint32),
         'cat_present': np.zeros((10, 26), bool)}
    np.testing.assert_array_equal(score(x), np.arange(10) * 13)


if __name__ == '__main__':
  absltest.main()
