"""`python -m dlrm_jax.main` shows INFO lines of dlrm_jax only.

A library installed in a virtual environment inside a clone named dlrm_jax
(the README's set-up) is not dlrm_jax: its INFO lines are hidden, its
warnings shown.
"""

import logging
import os

from absl.testing import absltest

from dlrm_jax import main

_PACKAGE = os.path.dirname(os.path.abspath(main.__file__))
_CLONE = os.path.dirname(_PACKAGE)


def record(path, level=logging.INFO):
  return logging.LogRecord('x', level, path, 1, 'msg', None, None)


class OwnInfoOnlyTest(absltest.TestCase):

  def test_own_lines_kept_libraries_in_a_venv_inside_the_clone_hidden(self):
    keep = main._OwnInfoOnly().filter  # pylint: disable=protected-access
    self.assertTrue(keep(record(os.path.join(_PACKAGE, 'train', 'loop.py'))))
    venv_lib = os.path.join(_CLONE, '.venv', 'lib', 'python3.11',
                            'site-packages', 'orbax', 'checkpoint', 'x.py')
    self.assertFalse(keep(record(venv_lib)))
    # A clone named dlrm_jax elsewhere, its venv inside: '/dlrm_jax/' is in
    # the path, and it is still not this package.
    self.assertFalse(keep(record(os.path.join(
        os.sep, 'tmp', 'dlrm_jax', '.venv', 'lib', 'orbax', 'x.py'))))
    self.assertTrue(keep(record(venv_lib, logging.WARNING)))


if __name__ == '__main__':
  absltest.main()
