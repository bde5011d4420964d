"""The XLA_FLAGS guard against the GPU float32 scatter-add regression."""

import os
from unittest import mock

from absl.testing import absltest
from jax._src import xla_bridge

from dlrm_jax import gpu

OPTION = '--xla_backend_extra_options=-nvptx-allow-ftz-atomics'


class GpuTest(absltest.TestCase):

  def test_affected_versions(self):
    self.assertFalse(gpu.scatter_regression_affected('0.10.1'))
    self.assertTrue(gpu.scatter_regression_affected('0.10.2'))
    self.assertTrue(gpu.scatter_regression_affected('0.11.0'))
    self.assertFalse(gpu.scatter_regression_affected('0.11.1'))
    self.assertFalse(gpu.scatter_regression_affected('0.12.0.dev20261201'))

  def test_with_ftz_atomics_merges_into_existing_flags(self):
    self.assertEqual(gpu.with_ftz_atomics(''), OPTION)
    self.assertEqual(
        gpu.with_ftz_atomics('--xla_force_host_platform_device_count=8'),
        '--xla_force_host_platform_device_count=8 ' + OPTION)
    self.assertEqual(
        gpu.with_ftz_atomics('--xla_backend_extra_options=a=1'),
        '--xla_backend_extra_options=a=1,-nvptx-allow-ftz-atomics')
    self.assertEqual(gpu.with_ftz_atomics(OPTION), OPTION)

  def test_sets_xla_flags_only_where_affected(self):
    with mock.patch.object(xla_bridge, 'backends_are_initialized',
                           return_value=False):
      for version, cuda, skip, want in (
          ('0.10.2', True, '', True), ('0.11.0', True, '', True),
          ('0.10.2', False, '', False), ('0.11.1', True, '', False),
          ('0.10.2', True, '1', False)):
        with self.subTest(version=version, cuda=cuda, skip=skip):
          env = {'XLA_FLAGS': '--xla_dump_to=/tmp/x', gpu.SKIP_ENV: skip}
          with mock.patch.dict(os.environ, env):
            self.assertEqual(gpu.apply_scatter_workaround(version, cuda),
                             want)
            self.assertEqual(OPTION in os.environ['XLA_FLAGS'], want)
            self.assertIn('--xla_dump_to=/tmp/x', os.environ['XLA_FLAGS'])

  def test_too_late_once_jax_started(self):
    with mock.patch.object(xla_bridge, 'backends_are_initialized',
                           return_value=True), mock.patch.dict(
                               os.environ, {'XLA_FLAGS': '',
                                            gpu.SKIP_ENV: ''}):
      self.assertFalse(gpu.apply_scatter_workaround('0.10.2', True))
      self.assertNotIn(OPTION, os.environ['XLA_FLAGS'])


if __name__ == '__main__':
  absltest.main()
