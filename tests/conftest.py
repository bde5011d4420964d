"""Pytest set-up shared by the absltest suites.

Every test process gets 8 fake CPU devices (set before JAX starts), so the
sharding tests can build meshes of 1, 2, 4 or 8 devices; single-device tests
pick one device explicitly.
"""

import os

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # pylint: disable=g-import-not-at-top


def pytest_configure(config):
  del config
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
