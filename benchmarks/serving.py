"""Scoring throughput and latency: the HTTP server against the exported
function called in-process.

  python -m benchmarks.serving                       # Kaggle-shaped model
  python -m benchmarks.serving --export=DIR --clients=1,8,64 --rows=4

(run from the repository root). Without --export, it exports a freshly
initialized model of `configs/criteo.py` (26 tables of up to 100k rows, dim
16) to a temporary directory (with --quantize, its int8/fp16 tables).

For each number of concurrent clients, each client sends requests of --rows
Criteo rows one after another, until --requests requests were answered or
--seconds passed (both bounds hold: the run is bounded). Printed per level:
requests/s, rows/s and the p50/p99 latency, for
  server:     `python -m dlrm_jax.serve` in a subprocess on 127.0.0.1, driven
              by an aiohttp client in this process (HTTP, JSON, batching);
  in-process: the same export's function (`LoadedModel.scores`, padded as the
              server pads) called from that many threads.
"""

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time

from absl import flags
import numpy as np

from dlrm_jax import cli

_EXPORT = flags.DEFINE_string('export', None, 'An export directory (default:'
                              ' export a fresh model to a temp dir).')
_QUANTIZE = flags.DEFINE_enum('quantize', 'none', ['none', 'fp16', 'int8'],
                              'Tables of the exported fresh model.')
_CLIENTS = flags.DEFINE_list('clients', ['1', '8', '64'],
                             'Concurrent clients per level.')
_ROWS = flags.DEFINE_integer('rows', 1, 'Rows per request.')
_REQUESTS = flags.DEFINE_integer('requests', 2000,
                                 'At most this many requests per level.')
_SECONDS = flags.DEFINE_float('seconds', 10.0,
                              'At most this long per level.')
_MAX_BATCH = flags.DEFINE_integer('max_batch', 256, 'Server --max_batch.')
_MAX_WAIT_MS = flags.DEFINE_float('max_wait_ms', 2.0, 'Server --max_wait_ms.')

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_export(out_dir: str, quantize: str | None) -> None:
  from configs import criteo  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from dlrm_jax.serving import export as serving  # pylint: disable=g-import-not-at-top,g-multiple-import
  from dlrm_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top,g-multiple-import
  config = criteo.get_config()
  mesh = jax.make_mesh((1, 1), ('data', 'model'), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  trainer = trainer_lib.Trainer(config, mesh=mesh)
  serving.ServingModel(trainer, trainer.init_state(0),
                       quantize=quantize).export(out_dir)


def request_lines(n_requests: int, rows: int, seed: int = 0) -> list[list[str]]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n_requests):
    lines = []
    for _ in range(rows):
      ints = [str(v) for v in rng.integers(0, 1000, 13)]
      cats = [f'{v:08x}' for v in rng.integers(0, 2**32, 26, dtype=np.uint64)]
      lines.append('\t'.join(ints + cats))
    out.append(lines)
  return out


def summarize(latencies: list[float], elapsed: float, rows: int) -> str:
  lat = np.array(latencies) * 1e3
  n = len(lat)
  return (f'{n / elapsed:9.1f} req/s {n * rows / elapsed:10.1f} rows/s'
          f'  p50 {np.percentile(lat, 50):7.2f} ms'
          f'  p99 {np.percentile(lat, 99):7.2f} ms  ({n} requests)')


async def drive_server(url: str, clients: int, bodies, limit: int,
                       seconds: float):
  import aiohttp  # pylint: disable=g-import-not-at-top
  latencies, count = [], [0]
  deadline = time.perf_counter() + seconds
  conn = aiohttp.TCPConnector(limit=clients)
  async with aiohttp.ClientSession(connector=conn) as s:
    async def client(k):
      i = k
      while count[0] < limit and time.perf_counter() < deadline:
        count[0] += 1
        t = time.perf_counter()
        async with s.post(url + '/score', json=bodies[i % len(bodies)]) as r:
          if r.status != 200:
            raise RuntimeError(f'HTTP {r.status}: {await r.text()}')
          await r.read()
        latencies.append(time.perf_counter() - t)
        i += clients
    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies, time.perf_counter() - start


def drive_in_process(score, clients: int, inputs, limit: int,
                     seconds: float):
  latencies, lock, count = [], threading.Lock(), [0]
  deadline = time.perf_counter() + seconds

  def client(k):
    i = k
    while True:
      with lock:
        if count[0] >= limit or time.perf_counter() >= deadline:
          return
        count[0] += 1
      t = time.perf_counter()
      score(inputs[i % len(inputs)])
      dt = time.perf_counter() - t
      with lock:
        latencies.append(dt)
      i += clients

  threads = [threading.Thread(target=client, args=(k,))
             for k in range(clients)]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return latencies, time.perf_counter() - start


def main(argv):
  del argv
  from dlrm_jax.serving import runtime as export_runtime  # pylint: disable=g-import-not-at-top,g-multiple-import
  from dlrm_jax.serving import server as serve  # pylint: disable=g-import-not-at-top,g-multiple-import
  clients = [int(c) for c in _CLIENTS.value]
  with tempfile.TemporaryDirectory(prefix='dlrm_serving_bench_') as tmp:
    export_dir = _EXPORT.value
    if export_dir is None:
      export_dir = os.path.join(tmp, 'export')
      t = time.perf_counter()
      fresh_export(export_dir, None if _QUANTIZE.value == 'none'
                   else _QUANTIZE.value)
      print(f'exported a fresh criteo.py model to {export_dir} in'
            f' {time.perf_counter() - t:.1f} s')
    lines = request_lines(256, _ROWS.value)
    bodies = [{'rows': l} for l in lines]
    inputs = [export_runtime.parse_rows(l) for l in lines]
    proc = subprocess.Popen(
        [sys.executable, '-m', 'dlrm_jax.serve', f'--export={export_dir}',
         '--port=0', f'--max_batch={_MAX_BATCH.value}',
         f'--max_wait_ms={_MAX_WAIT_MS.value}'],
        cwd=_ROOT, stdout=subprocess.PIPE, text=True)
    try:
      url = serve.read_url(proc.stdout)
      print(f'server: {url}, max_batch {_MAX_BATCH.value}, max_wait'
            f' {_MAX_WAIT_MS.value} ms; {_ROWS.value} row(s) per request;'
            f' per level at most {_REQUESTS.value} requests or'
            f' {_SECONDS.value:g} s')
      asyncio.run(drive_server(url, 1, bodies, 20, 5.0))  # warm up
      for c in clients:
        lat, el = asyncio.run(drive_server(url, c, bodies, _REQUESTS.value,
                                           _SECONDS.value))
        print(f'server      clients={c:3d} {summarize(lat, el, _ROWS.value)}')
    finally:
      proc.terminate()
      proc.wait(timeout=60)
    model = export_runtime.load_export(export_dir)
    score = serve.padded_scorer(model)
    score(inputs[0])  # compile
    for c in clients:
      lat, el = drive_in_process(score, c, inputs, _REQUESTS.value,
                                 _SECONDS.value)
      print(f'in-process  clients={c:3d} {summarize(lat, el, _ROWS.value)}')


if __name__ == '__main__':
  cli.run_app(main)
