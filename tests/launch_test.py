"""launch/: scripts parse, the manifest is valid, and parallel's env handling.

launch/local.sh runs for real in multiprocess_test.py.
"""

import glob
import os
import subprocess
from unittest import mock

from absl.testing import absltest
import yaml

from dlrm_jax import parallel

_LAUNCH = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'launch')


class LaunchFilesTest(absltest.TestCase):

  def test_shell_scripts_parse(self):
    scripts = sorted(glob.glob(os.path.join(_LAUNCH, '*.sh')) +
                     glob.glob(os.path.join(_LAUNCH, '*.sbatch')))
    self.assertLen(scripts, 3)
    for path in scripts:
      out = subprocess.run(['bash', '-n', path], capture_output=True,
                           text=True, check=False)
      self.assertEqual(out.returncode, 0, f'{path}: {out.stderr}')
      self.assertTrue(os.access(path, os.X_OK), f'{path} is not executable')

  def test_jobset_manifest(self):
    with open(os.path.join(_LAUNCH, 'k8s', 'jobset.yaml')) as f:
      docs = list(yaml.safe_load_all(f))
    self.assertLen(docs, 1)
    js = docs[0]
    self.assertEqual(js['kind'], 'JobSet')
    job = js['spec']['replicatedJobs'][0]['template']['spec']
    pod = job['template']['spec']['containers'][0]
    env = {e['name']: e for e in pod['env']}
    self.assertEqual(set(env), {'DLRM_COORDINATOR_ADDRESS',
                                'DLRM_NUM_PROCESSES', 'DLRM_PROCESS_ID'})
    self.assertEqual(int(env['DLRM_NUM_PROCESSES']['value']),
                     job['parallelism'])
    self.assertEqual(job['parallelism'], job['completions'])
    self.assertEqual(pod['command'], ['python', '-m', 'dlrm_jax.main'])


class DistributedEnvTest(absltest.TestCase):

  def test_explicit_and_environment_values(self):
    with mock.patch('jax.distributed.initialize') as init:
      with mock.patch.dict(os.environ, {
          'DLRM_COORDINATOR_ADDRESS': '10.0.0.1:1234',
          'DLRM_NUM_PROCESSES': '4', 'DLRM_PROCESS_ID': '3'}):
        parallel.initialize_distributed()
      init.assert_called_once_with('10.0.0.1:1234', 4, 3)
      init.reset_mock()
      with mock.patch.dict(os.environ, {}, clear=True):
        parallel.initialize_distributed()  # one process: nothing to do
        init.assert_not_called()
        with mock.patch.dict(os.environ, {'DLRM_DISTRIBUTED': '1'}):
          parallel.initialize_distributed()  # TPU VMs: JAX detects
        init.assert_called_once_with()
      with self.assertRaisesRegex(ValueError, 'without the process count'):
        parallel.initialize_distributed('10.0.0.1:1234')

  def test_mesh_sizes(self):
    self.assertEqual(parallel.resolve_axis_sizes(1, -1, 8), (1, 8))
    self.assertEqual(parallel.resolve_axis_sizes(-1, 4, 8), (2, 4))
    with self.assertRaisesRegex(ValueError, r'config\.mesh: data \(3\) x model'):
      parallel.resolve_axis_sizes(3, 2, 8)
    with self.assertRaisesRegex(ValueError, 'at most one axis may be -1'):
      parallel.resolve_axis_sizes(-1, -1, 8)


if __name__ == '__main__':
  absltest.main()
