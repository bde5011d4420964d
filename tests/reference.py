"""Plain references for the tests: dense lookups, dense-gradient optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlrm_jax import schedules
from dlrm_jax.embedding import optimizers


def single_device_mesh():
  return jax.make_mesh((1, 1), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:1])


def mesh_of(data, model):
  n = data * model
  return jax.make_mesh((data, model), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:n])


def dense_lookup(tables, table_specs, feature_specs, ids):
  """Pooled embeddings with a Python loop over features and examples' bags.

  Args:
    tables: table name -> `[R, D]` array (jax or numpy).
    table_specs, feature_specs: the specs.
    ids: `[B, T]` packed ids (-1 pads; other out-of-range ids are ignored).

  Returns:
    One `[B, D]` array per feature (differentiable in `tables`).
  """
  by_name = {t.name: t for t in table_specs}
  outs, off = [], 0
  for f in feature_specs:
    t = by_name[f.table]
    cols = np.asarray(ids)[:, off:off + f.max_ids]
    off += f.max_ids
    valid = (cols >= 0) & (cols < t.num_rows)
    safe = np.where(valid, cols, 0)
    rows = jnp.asarray(tables[f.table])[safe].astype(jnp.float32)
    rows = rows * valid[..., None]
    pooled = rows.sum(axis=1)
    n = np.maximum(valid.sum(axis=1, keepdims=True), 1).astype(np.float32)
    if t.combiner == 'mean' and f.max_ids > 1:
      pooled = pooled / n
    elif t.combiner == 'sqrtn' and f.max_ids > 1:
      pooled = pooled / np.sqrt(n)
    outs.append(pooled)
  return outs


def loop_pool(table, bag, combiner):
  """One bag's pooled embedding, with a plain loop."""
  acc = np.zeros(table.shape[1], np.float64)
  n = 0
  for i in bag:
    if 0 <= i < table.shape[0]:
      acc += table[i]
      n += 1
  if n and combiner == 'mean':
    acc /= n
  elif n and combiner == 'sqrtn':
    acc /= np.sqrt(n)
  return acc


def dense_optimizer(table_spec):
  """(init, update) of the table's optimizer applied to dense gradients.

  sgd, adagrad and adam use optax itself; rowwise_adagrad (not in optax) uses
  the dense form of the same formula.
  """
  opt = table_spec.optimizer
  lr_fn = schedules.build(opt.schedule)
  if opt.kind == 'sgd':
    tx = optax.sgd(lr_fn)
  elif opt.kind == 'adagrad':
    tx = optax.adagrad(lr_fn, initial_accumulator_value=(
        opt.initial_accumulator_value), eps=opt.eps)
  elif opt.kind == 'adam':
    tx = optax.adam(lr_fn, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  else:
    step_fn = optimizers.dense_reference(opt, lr_fn)

    def init(table):
      return {'acc': jnp.full(table.shape[:1], opt.initial_accumulator_value,
                              jnp.float32), 'step': 0}

    def update(table, state, grad):
      new, slots = step_fn(table, {'acc': state['acc']}, grad, state['step'])
      return new, {'acc': slots['acc'], 'step': state['step'] + 1}
    return init, update

  def init(table):
    return tx.init(table)

  def update(table, state, grad):
    upd, state = tx.update(grad, state, table)
    return optax.apply_updates(table, upd), state
  return init, update
