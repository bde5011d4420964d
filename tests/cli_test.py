"""The command lines as a user runs them: from another directory, with
relative paths, a run's saved config, one-line errors, nothing left behind,
quiet logs, --checkpoint, and SIGINT/SIGTERM during training.

Every command is a real subprocess started in a temporary current directory
that is not the checkout, with relative paths only.
"""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import shutil
import time
import urllib.request

from absl.testing import absltest
import numpy as np

from dlrm_jax import cli
from tests import shared_data

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=_ROOT)
_ENV.pop('DLRM_JAX_TRACEBACK', None)
# Lines of a log that are warnings (absl's W prefix, or Python's).
_WARNING = re.compile(r'^(W\d{4} |WARNING)', re.M)


def run(args, cwd, timeout=600, **kw):
  """`python <args>` in `cwd`; the CompletedProcess."""
  return subprocess.run([sys.executable, *args], cwd=cwd, env=_ENV,
                        capture_output=True, text=True, timeout=timeout, **kw)


def last_line(out) -> str:
  lines = out.stderr.strip().splitlines()
  return lines[-1] if lines else ''


class RelativePathsTest(absltest.TestCase):
  """A run in `runs/a` of a temporary current directory, from a relative
  train file, then every mode of it by relative paths."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if shared_data.shared_dir() is None:
      raise absltest.SkipTest(
          'the Criteo samples are not available: set DLRM_SHARED_DIR to the'
          " 'shared' folder, or put it beside the checkout (../shared).")
    cls.rows = os.path.join(shared_data.shared_dir(), 'data', 'criteo',
                            'kaggle_train_head_4000.tsv')
    cls.cwd = tempfile.mkdtemp(prefix='dlrm_cli_test_')
    cls.config = os.path.relpath(os.path.join(_ROOT, 'configs', 'criteo.py'),
                                 cls.cwd) + ':tiny'
    cls.train_path = os.path.relpath(cls.rows, cls.cwd)
    cls.train_args = [
        '-m', 'dlrm_jax.main', f'--config={cls.config}', '--workdir=runs/a',
        f'--config.data.train_path={cls.train_path}',
        '--config.num_train_steps=20', '--config.eval_every_steps=10',
        '--config.checkpoint_every_steps=10', '--config.log_every_steps=10',
        '--config.keep_best_metric=auc']
    cls.trained = run(cls.train_args, cls.cwd)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.cwd, ignore_errors=True)
    super().tearDownClass()

  def path(self, *parts):
    return os.path.join(self.cwd, *parts)

  def test_1_train_writes_under_the_current_directory(self):
    out = self.trained
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    self.assertTrue(os.path.isdir(self.path('runs', 'a', 'checkpoints', '20')))
    self.assertFalse(os.path.exists(self.path('runs', 'a', '.lock')))
    self.assertIn('eval AUC', out.stderr)
    self.assertEqual(_WARNING.findall(out.stderr), [], out.stderr[-3000:])
    saved = json.load(open(self.path('runs', 'a', 'config.json')))
    self.assertEqual(saved['data']['train_path'], self.rows)  # absolute

  def test_2_resume_and_eval_log_no_warning(self):
    out = run(self.train_args, self.cwd)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    self.assertIn('resumed from the checkpoint at step 20', out.stderr)
    self.assertIn('already trained for 20 steps', out.stderr)
    out_eval = run(['-m', 'dlrm_jax.main', '--config=runs/a/config.json',
                    '--workdir=runs/a', '--mode=eval'], self.cwd)
    self.assertEqual(out_eval.returncode, 0, out_eval.stderr[-3000:])
    for o in (out, out_eval):
      self.assertEqual(_WARNING.findall(o.stderr), [], o.stderr[-3000:])
      self.assertNotIn('could not be restored', o.stderr)
    self.assertIn('restored the best checkpoint', out_eval.stderr)
    metrics = json.loads(out_eval.stdout.splitlines()[0])
    self.assertGreater(metrics['auc'], 0.0)

  def test_3_predict_export_and_serve_agree(self):
    with open(self.rows) as f:
      lines = [next(f) for _ in range(64)]
    with open(self.path('rows.tsv'), 'w') as f:
      f.writelines(lines)
    # Without --config: the workdir's config.json.
    out = run(['-m', 'dlrm_jax.main', '--workdir=runs/a', '--mode=predict',
               '--input=rows.tsv', '--output=out/scores.txt',
               '--checkpoint=latest'], self.cwd)
    self.assertEqual(out.returncode, 1)
    self.assertEqual(last_line(out), 'error: --output'
                     f' {self.path("out", "scores.txt")}: the directory'
                     f' {self.path("out")} does not exist.')
    os.makedirs(self.path('out'))
    out = run(['-m', 'dlrm_jax.main', '--workdir=runs/a', '--mode=predict',
               '--input=rows.tsv', '--output=out/scores.txt',
               '--checkpoint=latest'], self.cwd)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    self.assertIn('restored the latest checkpoint (step 20)', out.stderr)
    predicted = np.loadtxt(self.path('out', 'scores.txt'))
    self.assertLen(predicted, 64)
    out = run(['-m', 'dlrm_jax.main', '--workdir=runs/a', '--mode=export',
               '--output=export', '--checkpoint=latest'], self.cwd)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    scored = run([os.path.relpath(os.path.join(_ROOT, 'examples',
                                               'serve_stdin.py'), self.cwd),
                  'export'], self.cwd, input=''.join(lines))
    self.assertEqual(scored.returncode, 0, scored.stderr[-3000:])
    np.testing.assert_allclose(np.array(scored.stdout.split(), float),
                               predicted, atol=2e-7)
    server = subprocess.Popen(
        [sys.executable, '-m', 'dlrm_jax.serve', '--export=export',
         '--port=0'], cwd=self.cwd, env=_ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
      from dlrm_jax.serving import server as serve  # pylint: disable=g-import-not-at-top
      url = serve.read_url(server.stdout)
      body = json.dumps({'rows': [ln.rstrip('\n') for ln in lines]}).encode()
      with urllib.request.urlopen(url + '/score', body, timeout=60) as r:
        served = json.load(r)['probabilities']
      np.testing.assert_allclose(served, predicted, atol=2e-7)
      server.send_signal(signal.SIGTERM)
      self.assertEqual(server.wait(timeout=60), 0)
    finally:
      if server.poll() is None:
        server.kill()

  def test_4_a_config_mismatch_is_named_as_one(self):
    out = run(['-m', 'dlrm_jax.main', f'--config={self.config}',
               '--workdir=runs/a', '--mode=eval',
               '--config.model.final.hidden_units=[8]'], self.cwd)
    self.assertEqual(out.returncode, 1)
    line = last_line(out)
    self.assertStartsWith(line, 'error: the checkpoint at ')
    self.assertIn('a mismatch, not damage', line)
    self.assertIn('model.final.hidden_units', line)
    self.assertIn('--config=', line)
    self.assertFalse(os.path.exists(self.path('runs', 'a',
                                              'checkpoints_damaged')))

  def test_5_eval_on_other_files_keeps_the_runs_eval_file(self):
    run_eval = self.path('runs', 'a', 'eval_step20.json')
    out = run(['-m', 'dlrm_jax.main', '--workdir=runs/a', '--mode=eval',
               '--checkpoint=latest'], self.cwd)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    own = open(run_eval).read()
    with open(self.rows) as f:
      lines = [next(f) for _ in range(300)]
    with open(self.path('other.tsv'), 'w') as f:
      f.writelines(lines)
    out = run(['-m', 'dlrm_jax.main', '--workdir=runs/a', '--mode=eval',
               '--checkpoint=latest', '--input=other.tsv'], self.cwd)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    written = self.path('runs', 'a', 'eval_step20_other.json')
    self.assertIn(f'metrics written to {written}', out.stdout)
    self.assertEqual(json.load(open(written))['num_examples'], 300)
    self.assertEqual(open(run_eval).read(), own)

  def test_6_preprocess_with_relative_paths(self):
    out = run(['-m', 'dlrm_jax.data.preprocess',
               f'--train={os.path.relpath(self.rows, self.cwd)}',
               '--output_dir=prep', '--num_buckets=1000', '--workers=1'],
              self.cwd)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    self.assertTrue(os.path.isfile(self.path('prep', 'metadata.json')))


class OneLineErrorsTest(absltest.TestCase):
  """Each mistake: one `error:` line, exit 1, nothing created."""

  def test_mistakes(self):
    cwd = tempfile.mkdtemp(prefix='dlrm_cli_errors_')
    self.addCleanup(shutil.rmtree, cwd, ignore_errors=True)
    config = os.path.relpath(os.path.join(_ROOT, 'configs', 'criteo.py'),
                             cwd)
    os.makedirs(os.path.join(cwd, 'empty'))
    variants = ('default, terabyte, terabyte_cached, tiny, mlperf_dcnv2,'
                ' mlperf_dcnv2_tiny, tzrec_criteo, torchrec_criteo,'
                ' small_data')
    cases = [
        ([f'--config={config}:smalldata'],
         f'error: --config={config}:smalldata: unknown variant \'smalldata\''
         f' of configs/criteo.py; choose one of {variants}.'),
        ([f'--config={config}', '--config.batch_size=abc'],
         "error: --config.batch_size=abc: config.batch_size takes an"
         " integer, not 'abc'."),
        ([f'--config={config}', '--config.data.shuffle=maybe'],
         "error: --config.data.shuffle=maybe: config.data.shuffle takes true"
         " or false, not 'maybe'."),
        (['--config=nonexist.py'],
         'error: --config: the file nonexist.py does not exist.'),
        ([f'--config={config}', '--workdir=new_run',
          '--config.data.train_path=missing.tsv'],
         "error: config.data.train_path: the file"
         f" '{os.path.join(cwd, 'missing.tsv')}' does not exist."),
        ([f'--config={config}', '--mode=eval'],
         'error: --mode=eval needs the --workdir of a run.'),
        ([f'--config={config}', '--mode=eval', '--workdir=nonexist'],
         f'error: --workdir {os.path.join(cwd, "nonexist")}: no such'
         ' directory.'),
        ([f'--config={config}', '--mode=eval', '--workdir=empty'],
         f'error: --workdir {os.path.join(cwd, "empty")} holds no'
         ' checkpoints; train first, or pass the --workdir of a run.'),
        ([f'--config={config}', '--mode=predict', '--workdir=empty'],
         f'error: --workdir {os.path.join(cwd, "empty")} holds no'
         ' checkpoints; train first, or pass the --workdir of a run.'),
        ([], "error: --config is required: a config file such as"
             " configs/criteo.py[:variant], or a run's config.json (without"
             " --config, a --workdir holding a config.json runs with it)."),
        ([f'--config={config}', '--mode=bogus'],
         'error: --mode=bogus: value should be one of'
         ' <train|eval|predict|export>'),
    ]
    # The mistakes are independent: their commands run side by side.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      outs = list(pool.map(
          lambda c: run(['-m', 'dlrm_jax.main', *c[0]], cwd, timeout=120),
          cases))
    for (args, want), out in zip(cases, outs):
      with self.subTest(' '.join(args)):
        self.assertEqual(out.returncode, 1, out.stderr[-2000:])
        self.assertEqual(out.stderr.strip(), want)
        self.assertEqual(out.stdout, '')
    self.assertEqual(sorted(os.listdir(cwd)), ['empty'])  # nothing created
    self.assertEqual(os.listdir(os.path.join(cwd, 'empty')), [])

  def test_paths(self):
    self.assertEqual(cli.absolute('~/x'), os.path.expanduser('~/x'))
    self.assertEqual(cli.absolute('a/../b'), os.path.join(os.getcwd(), 'b'))
    self.assertEqual(cli.absolute(''), '')
    here = os.getcwd()
    self.assertEqual(cli.absolute_spec('a.tsv, d/*.gz'),
                     f'{here}/a.tsv,{here}/d/*.gz')
    self.assertEqual(cli.absolute_spec(['a', '/b']), [f'{here}/a', '/b'])
    from configs import criteo  # pylint: disable=g-import-not-at-top
    config = criteo.get_config('tiny')
    config.data.train_path = 'day_*'
    config.data.tfds_data_dir = '~/tfds'
    config.lock()
    cli.absolute_config_paths(config)
    self.assertEqual(config.data.train_path, f'{here}/day_*')
    self.assertEqual(config.data.tfds_data_dir, os.path.expanduser('~/tfds'))
    self.assertEqual(config.data.eval_path, '')


class InterruptTest(absltest.TestCase):
  """SIGINT and SIGTERM during training: a checkpoint at the step reached,
  one line, exit 130 / 0; rerunning resumes from it."""

  def interrupt(self, sig):
    cwd = tempfile.mkdtemp(prefix='dlrm_cli_interrupt_')
    self.addCleanup(shutil.rmtree, cwd, ignore_errors=True)
    config = os.path.relpath(os.path.join(_ROOT, 'configs', 'criteo.py'),
                             cwd) + ':tiny'
    args = [sys.executable, '-m', 'dlrm_jax.main', f'--config={config}',
            '--workdir=run', '--config.num_train_steps=100000',
            '--config.log_every_steps=7', '--config.eval_every_steps=100000',
            '--config.checkpoint_every_steps=100000']
    proc = subprocess.Popen(args, cwd=cwd, env=_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
      for line in proc.stderr:  # until training is under way
        if re.search(r'step \d+/100000', line):
          break
      time.sleep(1.0)
      proc.send_signal(sig)
      _, err = proc.communicate(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
    return proc.returncode, err, cwd, args

  def test_sigint_saves_and_rerun_resumes(self):
    code, err, cwd, args = self.interrupt(signal.SIGINT)
    self.assertEqual(code, 130, err[-2000:])
    line = err.strip().splitlines()[-1]
    m = re.fullmatch(r'interrupted by SIGINT at step (\d+): saved checkpoint'
                     r' \1 in (\S+); run the same command again to resume\.',
                     line)
    self.assertIsNotNone(m, line)
    step = int(m.group(1))
    self.assertEqual(m.group(2), os.path.join(cwd, 'run', 'checkpoints'))
    self.assertEqual(os.listdir(m.group(2)), [str(step)])
    self.assertNotIn('Traceback', err)
    out = subprocess.run(args[:5] + [f'--config.num_train_steps={step + 3}']
                         + args[6:], cwd=cwd, env=_ENV, capture_output=True,
                         text=True, timeout=300)
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    self.assertIn(f'resumed from the checkpoint at step {step}', out.stderr)
    self.assertIn(f'run finished at step {step + 3}', out.stderr)

  def test_sigterm_saves_and_exits_0(self):
    code, err, cwd, _ = self.interrupt(signal.SIGTERM)
    self.assertEqual(code, 0, err[-2000:])
    line = err.strip().splitlines()[-1]
    self.assertRegex(line, r'^interrupted by SIGTERM at step \d+: saved'
                     ' checkpoint')
    step = int(re.search(r'step (\d+)', line).group(1))
    self.assertTrue(os.path.isdir(os.path.join(cwd, 'run', 'checkpoints',
                                               str(step))))


if __name__ == '__main__':
  absltest.main()
