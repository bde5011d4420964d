"""A real multi-process run: launch/local.sh, 2 processes x 2 CPU devices.

jax.distributed on 127.0.0.1 with gloo collectives; each process reads its
share of every batch. It must reach the same loss and eval metrics as one
process with 4 devices.
"""

import json
import os
import subprocess
import sys

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ARGS = ['--config=configs/criteo.py:tiny', '--config.num_train_steps=20',
         '--config.eval_every_steps=20', '--config.checkpoint_every_steps=10']


class MultiProcessTest(absltest.TestCase):

  def test_two_processes_match_one(self):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop('XLA_FLAGS', None)
    multi = self.create_tempdir().full_path
    out = subprocess.run(
        ['bash', os.path.join(_ROOT, 'launch', 'local.sh'), *_ARGS,
         f'--workdir={multi}'],
        cwd=_ROOT, env=dict(env, NUM_PROCESSES='2', DEVICES_PER_PROCESS='2'),
        capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    self.assertIn('[process 0]', out.stderr)
    self.assertIn("mesh: {'data': 1, 'model': 4}; 4 device(s), 2 process(es)",
                  out.stderr)
    # Only process 0 writes logs.
    self.assertNotIn('[process 1] I', out.stderr)

    single = self.create_tempdir().full_path
    out = subprocess.run(
        [sys.executable, '-m', 'dlrm_jax.main', *_ARGS, f'--workdir={single}'],
        cwd=_ROOT, env=dict(env, JAX_PLATFORMS='cpu', XLA_FLAGS=(
            '--xla_force_host_platform_device_count=4')),
        capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])

    a = json.load(open(os.path.join(multi, 'summary.json')))
    b = json.load(open(os.path.join(single, 'summary.json')))
    self.assertEqual(a['step'], 20)
    self.assertAlmostEqual(a['train_loss'], b['train_loss'], places=5)
    for k in ('auc', 'log_loss', 'accuracy'):
      self.assertAlmostEqual(a['eval'][k], b['eval'][k], places=5, msg=k)
    self.assertEqual(sorted(os.listdir(os.path.join(multi, 'checkpoints'))),
                     ['10', '20'])
    rows = open(os.path.join(multi, 'metrics.jsonl')).read().splitlines()
    self.assertLen([r for r in rows if '"train"' in r], 2)  # not 2x2


if __name__ == '__main__':
  absltest.main()
