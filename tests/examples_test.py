"""The examples of models built from `SparseEmbed` learn.

examples/two_tower.py trains a two-tower retrieval model on the MovieLens
100K sample with 8 (fake) devices and row-wise sharded id tables, and prints
recall@10 on held-out positives beside a popularity baseline computed on the
same split; the model must beat it.
"""

import os
import re
import subprocess
import sys

from absl.testing import absltest

from tests import shared_data

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TwoTowerTest(absltest.TestCase):

  def test_beats_the_popularity_baseline_on_eight_devices(self):
    data = shared_data.movielens_dir(self)
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=8'
               ' --xla_cpu_collective_call_terminate_timeout_seconds=600')
    out = subprocess.run(
        [sys.executable, '-m', 'examples.two_tower', f'--data={data}'],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=900)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    m = re.search(r'recall@10 ([\d.]+) \(popularity baseline ([\d.]+), (\d+)'
                  r' held-out users\)', out.stdout)
    self.assertIsNotNone(m, out.stdout[-2000:])
    model, popularity, users = float(m[1]), float(m[2]), int(m[3])
    self.assertGreater(users, 300)
    self.assertGreater(popularity, 0)
    self.assertGreater(model, popularity)


if __name__ == '__main__':
  absltest.main()
