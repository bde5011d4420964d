"""One model, whatever the path: for every variant of configs/criteo.py,
shrunk to run here, `--mode=predict`, the export loaded by `export_runtime`,
`examples/serve_stdin.py` and the HTTP server score the same rows alike.

Each variant keeps what makes it itself (features and their normalizers,
rare-id admission, multi-hot bags, DCN, optimizers); only table sizes,
widths (of the 128-wide variants), batch sizes and steps are cut. Training
reads the real Criteo sample; the scored rows are another real sample. The
reference is `--mode=predict`'s output (`inference.predict`, seven
decimals).
"""

import asyncio
import contextlib
import io
import json
import os
import runpy
import sys
import threading
import urllib.request

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.serving import runtime as export_runtime
from dlrm_jax.serving import offline as inference
from dlrm_jax.serving import server as serve
from dlrm_jax.train import loop as train_loop
from tests import shared_data

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROWS = 96  # scored rows
_MAX_ROWS = 1000  # table rows kept
_WIDTH = 16  # the embedding dim of the narrowed wide variants


def shrunk(variant: str, train_path: str):
  """The variant's config with small tables, batches and runs.

  The 128-wide variants (mlperf_dcnv2, tzrec_criteo, torchrec_criteo) are
  narrowed by one factor everywhere, to the width of the others (16): the
  embedding dim, every MLP layer and the DCN rank. Layer counts, the
  interaction, bags, dtypes and optimizers stay; the dense MLP still ends at
  the embedding dim.
  """
  config = criteo_config.get_config(variant)
  dims = [f.embedding_dim for f in config.features.values()
          if f.get('embedding_dim')]
  factor = max(1, max(dims) // _WIDTH)
  narrow = lambda n: max(1, n // factor)
  for f in config.features.values():
    for field in ('num_buckets', 'hash_bucket_size'):
      if f.get(field):
        f[field] = min(f[field], _MAX_ROWS)
    if f.get('embedding_dim'):
      f.embedding_dim = narrow(f.embedding_dim)
  for mlp in (config.model.dense_mlp, config.model.final):
    mlp.hidden_units = [narrow(n) for n in mlp.hidden_units]
  config.model.dcn.rank = narrow(config.model.dcn.rank)
  config.data.train_path = train_path
  config.batch_size, config.eval_batch_size = 64, 256
  config.num_train_steps = 12
  config.min_train_steps = 0
  config.log_every_steps = config.eval_every_steps = 12
  config.checkpoint_every_steps = 12
  # torchrec_criteo's SGD at 1.0 is for its global batch of 2048 per GPU;
  # at batch 64 it diverges in a few steps. The paths are the point here.
  for schedule in (config.optimizer.schedule,
                   config.embedding.optimizer.schedule):
    schedule.learning_rate = min(schedule.learning_rate, 0.1)
  return config


def serve_stdin(export_dir: str, lines: list[str]) -> list[float]:
  """`examples/serve_stdin.py export_dir < lines`, run in this process."""
  stdin = io.TextIOWrapper(io.BytesIO(''.join(lines).encode()))
  stdout = io.StringIO()
  argv = sys.argv
  sys.argv = ['serve_stdin.py', export_dir]
  try:
    with contextlib.redirect_stdout(stdout), _stdin(stdin):
      try:
        runpy.run_path(os.path.join(_ROOT, 'examples', 'serve_stdin.py'),
                       run_name='__main__')
      except SystemExit as e:
        assert not e.code, f'serve_stdin.py exited {e.code}'
  finally:
    sys.argv = argv
  return [float(x) for x in stdout.getvalue().split()]


@contextlib.contextmanager
def _stdin(stream):
  old = sys.stdin
  sys.stdin = stream
  try:
    yield
  finally:
    sys.stdin = old


def http_scores(export_dir: str, lines: list[str]) -> list[float]:
  """The scores of `dlrm_jax.serve` (started in this process) for one
  request of `lines`."""
  ready, stop_box, error = threading.Event(), {}, []

  def main():
    async def go():
      stop_box['event'], stop_box['loop'] = asyncio.Event(), (
          asyncio.get_running_loop())
      await serve.serve(export_dir, port=0, max_batch=128,
                        ready=lambda port: (stop_box.update(port=port),
                                            ready.set()),
                        stop=stop_box['event'], handle_signals=False)
    try:
      asyncio.run(go())
    except Exception as e:  # pylint: disable=broad-except
      error.append(e)
      ready.set()

  thread = threading.Thread(target=main, daemon=True)
  thread.start()
  ready.wait(300)
  if error:
    raise error[0]
  try:
    body = json.dumps({'rows': [ln.rstrip('\n') for ln in lines]}).encode()
    url = f'http://127.0.0.1:{stop_box["port"]}/score'
    with urllib.request.urlopen(url, body, timeout=120) as r:
      return json.load(r)['probabilities']
  finally:
    stop_box['loop'].call_soon_threadsafe(stop_box['event'].set)
    thread.join(60)


class EveryPathScoresAlikeTest(parameterized.TestCase):

  @parameterized.named_parameters(*((v, v) for v in criteo_config.VARIANTS))
  def test_variant(self, variant):
    train_path = shared_data.criteo_file(self, 'kaggle_train_head_4000.tsv')
    rows_path = shared_data.criteo_file(self, 'kaggle_train_random_1000.tsv')
    config = shrunk(variant, train_path)
    workdir = self.create_tempdir().full_path
    train_loop.train_and_evaluate(config, workdir)
    model = inference.load(config, workdir)
    if variant == 'small_data':  # the admission filter is at work
      masks = model.admission()
      self.assertNotEmpty(masks)
      self.assertFalse(all(m.all() for m, _ in masks.values()))
    with open(rows_path) as f:
      lines = [next(f) for _ in range(_ROWS)]
    rows_file = os.path.join(self.create_tempdir().full_path, 'rows.tsv')
    with open(rows_file, 'w') as f:
      f.writelines(lines)
    scores_file = os.path.join(self.create_tempdir().full_path, 'scores.txt')
    inference.predict(model, [rows_file], scores_file)
    predicted = np.loadtxt(scores_file)
    export_dir = self.create_tempdir().full_path
    inference.export(model, export_dir)
    rows = export_runtime.parse_rows(lines)
    exported = export_runtime.load_export(export_dir).scores(
        rows['int'], rows['cat'], rows['cat_present'])
    paths = {'export_runtime': exported,
             'serve_stdin.py': serve_stdin(export_dir, lines),
             'HTTP server': http_scores(export_dir, lines)}
    for name, got in paths.items():
      with self.subTest(name):
        np.testing.assert_allclose(np.asarray(got, np.float64), predicted,
                                   atol=1e-6, rtol=0,
                                   err_msg=f'{variant}: {name}')
    print(f'{variant}: max |export - predict| ='
          f' {np.abs(exported - predicted).max():.2e} over {_ROWS} rows')


if __name__ == '__main__':
  absltest.main()
