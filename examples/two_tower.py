"""A two-tower retrieval model with sharded `SparseEmbed` tables, on MovieLens.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m examples.two_tower --data=../shared/data/movielens/ml-100k

A user tower (user id, age band, gender, occupation, zip region) and an
item tower (item id, genres as a bag, release decade) share nothing; each is
a `SparseEmbed` under a small MLP, ending in an L2-normalized vector. The
loss is the in-batch softmax over the batch's items (cosine similarities
over a temperature of 0.1), with the logQ correction of Yi et al. 2019
("Sampling-bias-corrected neural modeling for large corpus item
recommendations": subtract the log of each item's sampling probability from
its logit), so popular items are not over-penalized as negatives. Ratings >= 4 are positives; each user's latest positive is held
out. The model is scored by recall@10 over every item (the user's training
positives excluded), beside the popularity baseline scored the same way.

The user and item id tables are row-wise sharded over the mesh's 'model'
axis; the plan places the small tables. It is written as a user of the
library would: ordinary Flax modules, an optax loop, `table_updates`.
"""

from __future__ import annotations

import os

from absl import flags
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlrm_jax import cli
from dlrm_jax import parallel
from dlrm_jax.embedding import FeatureSpec, SparseOptimizerSpec, TableSpec
from dlrm_jax.models import SparseEmbed
from dlrm_jax.train import schedules
from dlrm_jax.train import table_updates
from examples import movielens_data as movielens

_DATA = flags.DEFINE_string('data', None, 'the ml-100k folder (u.data or '
                            'u.data.first20000, u.user, u.item).')
_STEPS = flags.DEFINE_integer('steps', 600, 'training steps.')
_BATCH = flags.DEFINE_integer('batch', 256, 'the global batch.')
_DIM = flags.DEFINE_integer('dim', 32, 'embedding and output dim.')
_SEED = flags.DEFINE_integer('seed', 0, 'the seed of the tables and MLPs.')
flags.mark_flag_as_required('data')

TEMPERATURE = 0.1  # of the in-batch softmax over cosine similarities


def tower_specs(columns: dict[str, np.ndarray], dim: int, id_name: str):
  """One table per column (rows: its largest value + 1), one feature each."""
  opt = SparseOptimizerSpec('rowwise_adagrad',
                            schedules.ScheduleSpec('constant', 0.1))
  tables = tuple(TableSpec(name, int(col.max()) + 1, dim, optimizer=opt,
                           combiner='mean', init_scale=0.05)
                 for name, col in columns.items())
  features = tuple(FeatureSpec(name, name, max_ids=col.shape[1])
                   for name, col in columns.items())
  return tables, features, {id_name: 'row_wise'}


class Tower(nn.Module):
  """SparseEmbed, an MLP, an L2-normalized `[B, dim]` output."""

  tables: tuple
  features: tuple
  mesh: jax.sharding.Mesh
  plan: dict
  dim: int

  @nn.compact
  def __call__(self, ids, step):
    pooled = SparseEmbed(self.tables, self.features, self.mesh, self.plan,
                         name='embed')(ids, step=step)          # [B, N, D]
    x = nn.relu(nn.Dense(128)(pooled.reshape(ids.shape[0], -1)))
    x = nn.Dense(self.dim)(x)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


class TwoTower(nn.Module):
  user: Tower
  item: Tower

  def __call__(self, user_ids, item_ids, step):
    return self.user(user_ids, step), self.item(item_ids, step)


def main(argv):
  del argv
  data = movielens.load(cli.absolute(_DATA.value))
  mesh = parallel.create_mesh(1, jax.device_count())
  dim = _DIM.value
  user_t, user_f, user_p = tower_specs(data.user_columns, dim, 'user_id')
  item_t, item_f, item_p = tower_specs(data.item_columns, dim, 'item_id')
  model = TwoTower(Tower(user_t, user_f, mesh, user_p, dim),
                   Tower(item_t, item_f, mesh, item_p, dim))
  users, items = data.user_ids, data.item_ids             # [U, Tu], [I, Ti]
  train_u, train_i = data.train_pairs.T
  log_q = jnp.asarray(np.log(data.item_frequency + 1e-9), jnp.float32)
  put = lambda x: jax.device_put(x, parallel.batch_sharding(mesh, x.ndim))
  b = _BATCH.value
  params = jax.jit(model.init)(jax.random.key(_SEED.value),
                               put(users[train_u[:b]]),
                               put(items[train_i[:b]]), 0)['params']
  tx = table_updates.with_tables(optax.adam(3e-3))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, u, i, item_rows, step):
    def loss_fn(params):
      uv, iv = model.apply({'params': params}, u, i, step)
      logits = uv @ iv.T / TEMPERATURE - log_q[item_rows][None, :]
      # The same item twice in a batch is not a negative of itself.
      same = item_rows[None, :] == item_rows[:, None]
      logits = jnp.where(same & ~jnp.eye(len(item_rows), dtype=bool),
                         -1e9, logits)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, jnp.arange(len(item_rows))).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return table_updates.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(_SEED.value)
  for step in range(_STEPS.value):
    rows = rng.choice(len(train_u), b, replace=False)
    params, opt_state, loss = train_step(
        params, opt_state, put(users[train_u[rows]]),
        put(items[train_i[rows]]), put(train_i[rows]), step)
    # One step in flight: with several queued, XLA:CPU's fake devices can
    # deadlock in a collective on a loaded machine (some devices' threads
    # never join the rendezvous).
    loss.block_until_ready()
    if step % 100 == 0 or step == _STEPS.value - 1:
      print(f'step {step} loss {float(loss):.4f}', flush=True)

  n = jax.device_count()
  user_vecs, item_vecs = jax.jit(lambda p, u, i: model.apply(
      {'params': p}, u, i, 0))(params, put(movielens.pad_rows(users, n)),
                               put(movielens.pad_rows(items, n)))
  scores = np.asarray(user_vecs)[:len(users)] @ np.asarray(
      item_vecs)[:len(items)].T
  recall = movielens.recall_at_k(scores, data, 10)
  baseline = movielens.recall_at_k(data.popularity_scores(len(users)), data,
                                   10)
  print(f'recall@10 {recall:.4f} (popularity baseline {baseline:.4f},'
        f' {len(data.test_pairs)} held-out users)')


if __name__ == '__main__':
  cli.run_app(main)
