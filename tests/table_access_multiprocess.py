"""Worker of table_access_test's two-process test (not a test by itself).

  python -m tests.table_access_multiprocess PORT PROCESS_ID OUT_JSON

Two processes with 2 CPU devices each join over 127.0.0.1; for each
strategy, set_table writes a known array through a reader that records the
rows this process asked for, and get_table (collective here) reads it back.
"""

import json
import sys

import jax
import numpy as np


class RecordingRows:
  """An array-like that records which rows were read."""

  def __init__(self, values):
    self.values = values
    self.shape = values.shape
    self.rows = set()

  def __getitem__(self, idx):
    rows = idx[0] if isinstance(idx, tuple) else idx
    self.rows.update(range(*rows.indices(self.shape[0])))
    return self.values[idx]


def main(port, pid, out):
  jax.distributed.initialize(f'127.0.0.1:{port}', 2, pid)
  from dlrm_jax.embedding import EmbeddingEngine  # pylint: disable=g-import-not-at-top
  from dlrm_jax.embedding import table_access  # pylint: disable=g-import-not-at-top
  from tests import embedding_test  # pylint: disable=g-import-not-at-top
  from tests import sharding_test  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((1, 4), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  tables, features = embedding_test.make_specs('rowwise_adagrad')
  result = {}
  for strategy in sharding_test.STRATEGIES:
    engine = EmbeddingEngine(tables, features, mesh, sharding_test.uniform_plan(
        tables, strategy, 4))
    state = engine.init(jax.random.key(0))
    values = np.arange(37 * 8, dtype=np.float32).reshape(37, 8) / 7
    reader = RecordingRows(values)
    state = table_access.set_table(engine, state, 'bag', reader)
    acc = np.arange(37, dtype=np.float32)
    state = table_access.set_slot(engine, state, 'bag', 'acc', acc)
    got = table_access.get_table(engine, state, 'bag')
    got_acc = table_access.get_slot(engine, state, 'bag', 'acc')
    result[strategy] = {
        'equal': bool(np.array_equal(got, values)),
        'acc_equal': bool(np.array_equal(got_acc, acc)),
        'rows_read': sorted(reader.rows)}
  with open(out, 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
