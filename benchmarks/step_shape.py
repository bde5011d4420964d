"""The train-step shape that the step benchmarks share (issue 3's shape).

Batch 2048, 26 single-hot tables of dim 64, dense MLP 13-512-256-64, final MLP
512-256, dot interaction, SGD for tables and MLPs: the shape timed against
the facebookresearch reference and TorchRec by `benchmarks.train_step`, and
broken down op by op by `benchmarks.step_breakdown`.
"""

from __future__ import annotations

import numpy as np

NUM_TABLES = 26
NUM_DENSE = 13


def config_for(rows: int, *, batch: int = 2048, dim: int = 64,
               arch_with_sparse: bool = False, sparse_optimizer: str = 'sgd',
               table_dtype: str = 'float32'):
  """The Criteo config at the benchmark shape.

  Args:
    rows: rows of each of the 26 tables.
    batch: the global batch size.
    dim: the embedding dim (and the dense MLP's output).
    arch_with_sparse: feed the sparse embeddings to the final MLP too
      (TorchEasyRec); the reference DLRM and TorchRec do not.
    sparse_optimizer: the tables' optimizer kind.
    table_dtype: the tables' storage dtype.

  Returns:
    An ml_collections ConfigDict for `dlrm_jax.train.trainer.Trainer`.
  """
  from configs import criteo  # pylint: disable=g-import-not-at-top
  config = criteo.get_config()
  for i in range(NUM_TABLES):
    f = config.features[f'cat_{i}']
    f.num_buckets = rows
    f.embedding_dim = dim
  config.model.dense_mlp.hidden_units = [512, 256, dim]
  config.model.final.hidden_units = [512, 256]
  config.model.arch_with_sparse = arch_with_sparse
  config.embedding.optimizer.kind = sparse_optimizer
  config.embedding.dtype = table_dtype
  config.embedding.optimizer.schedule.learning_rate = 0.01
  config.optimizer.kind = 'sgd'
  config.optimizer.schedule.learning_rate = 0.01
  config.batch_size = batch
  config.eval_batch_size = batch
  config.mesh.data, config.mesh.model = 1, -1
  return config


def random_batches(trainer, rows: int, batch: int, count: int = 4,
                   seed: int = 0) -> list:
  """`count` device batches with ids uniform over each table.

  Uniform ids over the whole table are the worst case for caches.

  Args:
    trainer: the `Trainer` whose `put_batch` places them.
    rows: rows per table.
    batch: the global batch size (this process takes its share).
    count: how many batches.
    seed: the numpy seed.

  Returns:
    A list of `count` dicts of global arrays (dense, ids, label).
  """
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  b = batch // jax.process_count()
  out = []
  for _ in range(count):
    host = {
        'dense': rng.normal(size=(b, NUM_DENSE)).astype(np.float32),
        'ids': rng.integers(0, rows, (b, NUM_TABLES)).astype(np.int32),
        'label': (rng.random(b) < 0.25).astype(np.float32),
    }
    out.append(trainer.put_batch(host))
  return out
