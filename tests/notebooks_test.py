"""Every notebook runs top to bottom (small settings), and is stored stripped."""

import glob
import os

from absl.testing import absltest
from absl.testing import parameterized
import nbclient
import nbformat

_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'notebooks')
NOTEBOOKS = sorted(glob.glob(os.path.join(_DIR, '*.ipynb')))


class NotebooksTest(parameterized.TestCase):

  def test_there_are_four(self):
    self.assertEqual([os.path.basename(p)[:2] for p in NOTEBOOKS],
                     ['01', '02', '03', '04'])

  @parameterized.parameters(*NOTEBOOKS)
  def test_stored_without_outputs(self, path):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
      if cell.cell_type == 'code':
        self.assertEqual(cell.outputs, [], path)
        self.assertIsNone(cell.execution_count, path)

  @parameterized.parameters(*NOTEBOOKS)
  def test_runs(self, path):
    book = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(DLRM_NOTEBOOK_STEPS='40', JAX_PLATFORMS='cpu',
               MPLBACKEND='Agg')
    client = nbclient.NotebookClient(
        book, timeout=600, kernel_name='python3',
        resources={'metadata': {'path': _DIR}})
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this environment
    try:
      client.execute()
    finally:
      os.environ.clear()
      os.environ.update(old)


if __name__ == '__main__':
  absltest.main()
