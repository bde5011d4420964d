"""Multi-host input: each process reads and parses only its own rows.

A real two-process run (jax.distributed on 127.0.0.1, two CPU devices each,
`tests/input_multiprocess.py`) on the criteo_tsv samples, against one process
with four devices: the eval metrics and predictions are exactly equal, and
the training lines each process handed to its parser partition the file.
"""

import json
import os
import socket
import subprocess
import sys

from absl.testing import absltest
import numpy as np

from dlrm_jax.data import criteo
from tests import shared_data

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class TwoProcessInputTest(absltest.TestCase):

  def test_two_processes_read_their_own_rows(self):
    self._check('criteo_tsv')

  def test_two_processes_read_their_own_rows_of_a_table(self):
    self._check('table')

  def _check(self, source):
    train_file = shared_data.criteo_file(self, 'kaggle_train_head_4000.tsv')
    eval_file = shared_data.criteo_file(self, 'kaggle_train_random_1000.tsv')
    tmp = self.create_tempdir().full_path
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=_ROOT)

    def worker(pid, num, devices, port=0):
      out = os.path.join(tmp, f'{source}_{num}_{pid}.json')
      cmd = [sys.executable, '-m', 'tests.input_multiprocess', str(port),
             str(pid), str(num), out, train_file, eval_file, source]
      return out, subprocess.Popen(
          cmd, cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          text=True, env=dict(env, XLA_FLAGS=(
              f'--xla_force_host_platform_device_count={devices}')))

    port = _free_port()
    runs = [worker(0, 1, 4)] + [worker(i, 2, 2, port) for i in range(2)]
    results = []
    for out, proc in runs:
      log, _ = proc.communicate(timeout=300)
      self.assertEqual(proc.returncode, 0, log[-3000:])
      with open(out) as f:
        results.append(json.load(f))
    one, *two = results

    # (a) Eval on 2 processes (each its own half of the eval file) gives
    # exactly the predictions, labels and metrics of one process.
    for r in two:
      self.assertEqual(r['metrics'], one['metrics'])
      self.assertEqual(r['probs'], one['probs'])
      self.assertEqual(r['labels'], one['labels'])
    self.assertEqual(one['metrics']['num_examples'], 1000)
    # Each parsed its own eval share only.
    self.assertEqual(sum(r['eval_lines'] for r in two), 1000)
    self.assertTrue(all(0 < r['eval_lines'] < 1000 for r in two))

    # (b) The training shares: byte ranges that tile the file, and the lines
    # each process handed to its parser partition the file's lines.
    size = os.path.getsize(train_file)
    (p0, b0, e0), = two[0]['segments']
    (p1, b1, e1), = two[1]['segments']
    self.assertEqual((p0, p1), (train_file, train_file))
    self.assertEqual((b0, e0, e1), (0, b1, size))
    with open(train_file, 'rb') as f:
      f.seek(b1 - 1)
      self.assertEqual(f.read(1), b'\n')  # the cut is at a line start
    total = criteo.count_rows(train_file)
    lines = [r['train_lines'] for r in two]
    self.assertEqual(sum(lines), total)
    self.assertTrue(all(0.4 * total < n < 0.6 * total for n in lines), lines)
    self.assertEqual([r['share_rows'] for r in two], lines)
    # Their rows, concatenated in process order, are the file's.
    self.assertEqual(sum(r['share_cat_sum'] for r in two),
                     one['share_cat_sum'])
    self.assertEqual(two[0]['first_cat'], one['first_cat'])
    self.assertEqual(two[1]['last_cat'], one['last_cat'])
    rows = list(criteo.read_criteo(train_file))
    cat = np.concatenate([r['cat'] for r in rows])
    np.testing.assert_array_equal(cat[lines[0] - 1], two[0]['last_cat'])
    np.testing.assert_array_equal(cat[lines[0]], two[1]['first_cat'])
    # Lockstep: the same steps per epoch (the smaller share's), and both
    # trained across the epoch boundary together.
    per = 32  # batch_size 64 over 2 processes
    self.assertEqual([r['batches_per_epoch'] for r in two],
                     [min(lines) // per] * 2)
    self.assertEqual([r['state_step'] for r in two], [3, 3])
    self.assertEqual(two[0]['loss'], two[1]['loss'])
    # The stream's position, checkpointed one file per process and restored,
    # goes on with the batch the uninterrupted stream reads next.
    for r in results:
      self.assertEqual(r['resumed_position'], r['steps'])
      self.assertTrue(r['resumed_same_batch'])
    step = two[0]['steps']
    self.assertEqual(step, min(lines) // per + 1)
    saved = os.listdir(os.path.join(tmp, 'ckpt_2', 'checkpoints', str(step),
                                    'data'))
    self.assertEqual(sorted(f for f in saved if f.startswith('process_')),
                     ['process_0-of-2.json', 'process_1-of-2.json'])


if __name__ == '__main__':
  absltest.main()
