"""The accelerator benchmark: its helpers, and a smoke run on CPU."""

import json
import os
import subprocess
import sys

from absl.testing import absltest

from benchmarks import accelerator


class HelpersTest(absltest.TestCase):

  def test_peaks_by_device_kind(self):
    self.assertEqual(accelerator.peaks_of('NVIDIA H200')['name'], 'H200')
    self.assertEqual(accelerator.peaks_of('NVIDIA H100 80GB HBM3')['name'],
                     'H100')
    self.assertEqual(accelerator.peaks_of('NVIDIA H100 PCIe')['name'],
                     'H100 PCIe')
    self.assertEqual(accelerator.peaks_of('NVIDIA A100-SXM4-80GB')['name'],
                     'A100 80GB')
    self.assertEqual(accelerator.peaks_of('NVIDIA A100-SXM4-40GB')['name'],
                     'A100')
    self.assertIsNone(accelerator.peaks_of('cpu'))

  def test_capped_rows_is_the_largest_cap_in_budget(self):
    sizes = (40, 3, 17, 40, 9)
    for budget in (5, 20, 60, 109, 1000):
      got = accelerator.capped_rows(sizes, budget)
      # Brute force: the largest cap whose capped total fits.
      cap = max(c for c in range(1, 41)
                if sum(min(n, c) for n in sizes) <= budget or c == 1)
      self.assertEqual(got, tuple(min(n, cap) for n in sizes))


class SmokeTest(absltest.TestCase):

  def test_smoke_run_prints_every_figure(self):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=1')
    out = subprocess.run(
        [sys.executable, '-m', 'benchmarks.accelerator', '--smoke'],
        cwd=root, env=env, capture_output=True, text=True, check=True)
    last = out.stdout.strip().splitlines()[-1]
    self.assertTrue(last.startswith('accelerator_summary='), last)
    summary = json.loads(last[len('accelerator_summary='):])
    self.assertEqual(summary['platform'], 'cpu')
    self.assertIsNone(summary['peaks'])
    for case in ('kaggle:float32', 'kaggle:bfloat16', 'mlperf:float32',
                 'mlperf:bfloat16'):
      res = summary['cases'][case]
      self.assertGreater(res['examples_per_s'], 0, case)
      self.assertGreater(res['tflops'], 0, case)
      self.assertGreater(res['embedding_gbps'], 0, case)
      self.assertTrue(res['loss_finite'], case)
    self.assertEqual(summary['cases']['mlperf:float32']['ids_per_example'],
                     214)
    self.assertEqual(summary['cases']['kaggle:float32']['ids_per_example'],
                     26)
    for k in ('sgd_zipf_ms', 'sgd_uniform_ms', 'adagrad_zipf_ms',
              'adagrad_uniform_ms', 'scatter64_zipf_ms'):
      self.assertGreater(summary['contention'][k], 0, k)
    self.assertIn('kaggle_bf16_speedup', summary)
    self.assertIn('examples/s', out.stdout)


if __name__ == '__main__':
  absltest.main()
