"""The tabular source's read-ahead thread (`table._ReadAhead`) against a
reader in the caller's thread.

A CSV with short and long rows, bad values and bad labels is read in
blocks of a few lines, so drops and bad values fall on every side of the
block ends; the rows, the reports, the line count and the first error must
be those of the same source reading each batch when asked. The order of
the reports is compared as a set: pyarrow's own reader, in one thread too,
hands over a block's dropped rows sooner or later from run to run, so a
drop and a bad value of neighbouring blocks are reported in either order.
"""

import os
import random
import tempfile
import threading
import time
from unittest import mock

import numpy as np
from absl.testing import absltest

from configs import criteo as criteo_config
from dlrm_jax.config import build
from dlrm_jax.data import criteo
from dlrm_jax.data import table
from tests import table_test


class _InThread:
  """`_ReadAhead`'s interface, reading when asked."""

  def __init__(self, reader, dropped):
    self.reader, self.dropped = reader, dropped

  def next(self):
    try:
      batch, error = self.reader.read_next_batch(), None
    except BaseException as e:  # pylint: disable=broad-except
      batch, error = None, e
    return batch, error, len(self.dropped)

  def close(self):
    pass


def _write(path: str, seed: int) -> None:
  rng = random.Random(seed)
  lines = ['label,user,price']
  for _ in range(150):
    r = rng.random()
    lines.append(
        f'{rng.randint(0, 1)},{rng.randint(0, 9)}' if r < 0.05 else
        '1,2,3,4' if r < 0.08 else
        f'1,x{rng.randint(0, 9)},1.5' if r < 0.11 else
        '0,3,nan' if r < 0.13 else
        '2,3,1.0' if r < 0.15 else
        f'{rng.randint(0, 1)},{rng.randint(0, 9)},{rng.random():.3f}')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


class ReadAheadTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    config = table_test._config(  # pylint: disable=protected-access
        dict(user=dict(type='id', input='user', embedding_dim=4,
                       num_buckets=10),
             price=dict(type='raw', input='price', normalizer='none')),
        ['user'], dense=['price'])
    config.model.dense_mlp = criteo_config.mlp([4])
    self.path = os.path.join(tempfile.mkdtemp(), 'log.csv')
    config.data.train_path = self.path
    self.spec = build.run_spec(config).data.table

  def _read(self):
    """Rows, sorted reports and lines read under 'skip'; the error under
    'error'."""
    skip = table.TableSource(
        [self.path], self.spec, bad_lines='skip', counter=criteo.LineCounter(),
        report=criteo.BadLineReport(max_examples=1000))
    rows = {}
    for b in skip.iter_rows():
      for k, v in b.items():
        rows.setdefault(k, []).append(v)
    with self.assertRaises(criteo.MalformedLineError) as error:
      for _ in table.TableSource([self.path], self.spec,
                                 bad_lines='error').iter_rows():
        pass
    return ({k: np.concatenate(v).tolist() for k, v in rows.items()},
            skip.report.count, sorted(skip.report.examples),
            skip.counter.lines), str(error.exception)

  def test_same_as_reading_in_the_callers_thread(self):
    for seed in range(6):
      _write(self.path, seed)
      for block in (64, 200):
        with mock.patch.object(table, '_BLOCK_BYTES', block):
          got, got_error = self._read()
          with mock.patch.object(table, '_ReadAhead', _InThread):
            want, want_error = self._read()
        self.assertEqual(got, want, (seed, block))
        self.assertIn(got_error, want[2])
        self.assertIn(want_error, want[2])

  def test_stopping_early_ends_the_thread(self):
    _write(self.path, 0)
    before = threading.active_count()
    with mock.patch.object(table, '_BLOCK_BYTES', 64):
      rows = table.TableSource([self.path], self.spec,
                               bad_lines='skip').iter_rows()
      next(rows)
      rows.close()
    for _ in range(100):
      if threading.active_count() <= before:
        break
      time.sleep(0.05)
    self.assertLessEqual(threading.active_count(), before)


if __name__ == '__main__':
  absltest.main()
