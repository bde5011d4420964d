"""Pytest set-up shared by the absltest suites.

Every test process gets 8 fake CPU devices (set before JAX starts), so the
sharding tests can build meshes of 1, 2, 4 or 8 devices; single-device tests
pick one device explicitly.

One persistent compilation cache serves the whole session: the pytest
process, its xdist workers and every subprocess a test starts (they inherit
`JAX_COMPILATION_CACHE_DIR`). A program compiled once (the tiny model's
steps, say, which dozens of command-line runs build alike) is read back
instead of compiled again. The cache is keyed by the program, the XLA flags
and the devices, so a hit is the executable the compiler would have made; it
is a fresh folder for each session, removed at its end, and
`JAX_COMPILATION_CACHE_DIR` set beforehand (say, to an empty string for no
cache) is kept.

Under pytest-xdist's `--dist loadgroup` (the README's test command), the
tests of a class with a `setUpClass` (a trained run shared by its tests, say)
go to one worker, so the class's set-up is built once, not once per worker.
"""

import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
# Eight fake devices share two loaded cores under xdist: XLA:CPU aborts the
# process when a collective's rendezvous waits past its default timeout for
# one of them, which a busy CI machine can exceed with nothing wrong.
if 'collective_call_terminate_timeout' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += (
      ' --xla_cpu_collective_call_terminate_timeout_seconds=600')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

_OWN_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix='dlrm_jax_test_compile_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
  # Programs that compile in under a second are cached too: the tiny model's
  # steps are such, and every command-line test compiles them again.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

from absl import flags  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top


def pytest_configure(config):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  config.addinivalue_line(  # pytest-xdist's mark, known without it too
      'markers', 'xdist_group(name): run on the same xdist worker')


def pytest_collection_modifyitems(items):
  for item in items:
    cls = getattr(item, 'cls', None)
    if cls is not None and 'setUpClass' in vars(cls):
      item.add_marker(pytest.mark.xdist_group(
          f'{cls.__module__}.{cls.__qualname__}'))


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:  # only the process that made it (not xdist's workers)
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
