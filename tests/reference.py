"""Plain references for the tests: dense lookups, dense-gradient optimizers,
a host copy of a whole table."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from dlrm_jax.embedding import rounding
from dlrm_jax.embedding import table_access
from dlrm_jax.train import schedules


def single_device_mesh():
  return jax.make_mesh((1, 1), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:1])


def mesh_of(data, model):
  n = data * model
  return jax.make_mesh((data, model), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:n])


def train_alike(sharded, single, batches):
  """Trains two Trainers (a sharded one and a one-device one) from
  `init_state(0)` on the same host batches, checking every step's loss
  agrees, then that the dense parameters and the logical tables do.

  Returns:
    The two final states (sharded, single).
  """
  a, b = sharded.init_state(0), single.init_state(0)
  acc_a, acc_b = sharded.zero_metrics(), single.zero_metrics()
  for batch in batches:
    a, acc_a = sharded.train_step(a, sharded.put_batch(batch), acc_a)
    b, acc_b = single.train_step(b, single.put_batch(batch), acc_b)
    np.testing.assert_allclose(float(acc_a['loss_sum']),
                               float(acc_b['loss_sum']), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                               atol=1e-6)
  for t in single.spec.tables:
    np.testing.assert_allclose(
        table_access.get_table(sharded.engine, a.emb, t.name),
        table_access.get_table(single.engine, b.emb, t.name),
        rtol=1e-4, atol=1e-6, err_msg=t.name)
  return a, b


def host_table(engine, state, name, slot=None):
  """The logical `[R, D]` table `name` (or `[R]` row-wise slot) read the
  plain way: every stack array copied whole to the host, the table's pieces
  cut out of it (one process only; `table_access.get_table` reads shards)."""
  spec = next(t for t in engine.tables if t.name == name)
  out = None
  for s in engine.stacks:
    arr = state['stacks'][s.name] if slot is None else state['slots'][
        s.name][slot]
    arr = np.asarray(jax.device_get(arr))
    if slot is None:
      arr = rounding.to_logical(arr, s.dtype)
    for pc in s.pieces:
      if pc.table != name:
        continue
      if out is None:
        tail = (spec.dim,) if arr.ndim == 2 else ()
        out = np.zeros((spec.num_rows,) + tail, arr.dtype)
      base = 0 if s.replicated else pc.device * s.capacity
      block = arr[base + pc.offset:base + pc.offset + pc.rows]
      if arr.ndim == 2:
        out[pc.row_start:pc.row_start + pc.rows,
            pc.col_start:pc.col_start + pc.width] = block
      else:  # row-wise slot: identical across column pieces
        out[pc.row_start:pc.row_start + pc.rows] = block
  return out


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


class NumpyOptimizer:
  """A table optimizer written from its published formula, in float64 NumPy,
  one row at a time (see dlrm_jax/embedding/optimizers.py for the sources).

  `step(table, grads, step)` updates only the rows in `grads` (row -> summed
  gradient), as the sparse engine does; `dense_optimizer` below passes every
  row (the dense optimizer the sparse one replaces).
  """

  def __init__(self, spec, num_rows, dim):
    self.o = spec
    self.lr_fn = schedules.build(spec.schedule)
    a0 = spec.initial_accumulator_value
    self.acc = np.full((num_rows, dim), a0)
    self.racc = np.full((num_rows,), a0)
    self.m = np.zeros((num_rows, dim))
    self.v = np.zeros((num_rows, dim))
    self.z = np.zeros((num_rows, dim))

  def step(self, table, grads, step):
    o = self.o
    lr = float(self.lr_fn(step))
    table = np.array(table, np.float64)
    for r, g in grads.items():
      w = table[r].copy()
      g = np.asarray(g, np.float64)
      if o.weight_decay and o.weight_decay_mode == 'l2':
        g = g + o.weight_decay * w
      if o.kind == 'sgd':
        new = w - lr * g
      elif o.kind == 'adagrad':  # torch.optim.Adagrad, lr_decay 0
        self.acc[r] += g * g
        new = w - lr * g / (np.sqrt(self.acc[r]) + o.eps)
      elif o.kind == 'rowwise_adagrad':
        self.racc[r] += np.mean(g * g)
        new = w - lr * g / (np.sqrt(self.racc[r]) + o.eps)
      elif o.kind == 'adam':
        t = step + 1
        self.m[r] = o.b1 * self.m[r] + (1 - o.b1) * g
        self.v[r] = o.b2 * self.v[r] + (1 - o.b2) * g * g
        m_hat = self.m[r] / (1 - o.b1 ** t)
        v_hat = self.v[r] / (1 - o.b2 ** t)
        new = w - lr * m_hat / (np.sqrt(v_hat) + o.eps)
      elif o.kind == 'ftrl':  # McMahan et al. 2013, Algorithm 1, per coord.
        new = np.empty_like(w)
        for i in range(len(w)):
          n_old = self.acc[r, i]
          n = n_old + g[i] ** 2
          sigma = (n ** -o.lr_power - n_old ** -o.lr_power) / lr
          self.z[r, i] += g[i] - sigma * w[i]
          self.acc[r, i] = n
          z = self.z[r, i]
          if abs(z) <= o.l1:
            new[i] = 0.0
          else:
            new[i] = -(z - np.sign(z) * o.l1) / (
                (o.beta + n ** -o.lr_power) / lr + 2 * o.l2)
      else:
        raise ValueError(o.kind)
      if o.weight_decay and o.weight_decay_mode == 'decoupled':
        new = new - lr * o.weight_decay * w
      table[r] = new
    return table


def touched_rows(ids, table_specs, feature_specs):
  """table name -> sorted valid ids of that table in the packed `[B, T]` ids."""
  out = {t.name: set() for t in table_specs}
  rows = {t.name: t.num_rows for t in table_specs}
  off = 0
  for f in feature_specs:
    cols = np.asarray(ids)[:, off:off + f.max_ids].reshape(-1)
    off += f.max_ids
    out[f.table] |= {int(i) for i in cols if 0 <= i < rows[f.table]}
  return {k: sorted(v) for k, v in out.items()}


def dense_optimizer(table_spec):
  """(init, update) of the table's optimizer applied to the dense gradient of
  every row: `NumpyOptimizer` over all rows."""
  def init(table):
    return {'opt': NumpyOptimizer(table_spec.optimizer, *np.shape(table)),
            'step': 0}

  def update(table, state, grad):
    grad = np.asarray(grad)
    new = state['opt'].step(np.asarray(table), dict(enumerate(grad)),
                            state['step'])
    state = dict(state, step=state['step'] + 1)
    return new.astype(np.float32), state
  return init, update


def predicted_and_exported(test, model, path):
  """(`inference.predict`'s scores, the export's scores) of the rows of the
  Criteo file `path`, the export written to a temp dir of `test`."""
  from dlrm_jax.serving import runtime as export_runtime  # pylint: disable=g-import-not-at-top
  from dlrm_jax.serving import offline as inference  # pylint: disable=g-import-not-at-top
  scores = os.path.join(test.create_tempdir().full_path, 'scores.txt')
  inference.predict(model, path, scores)
  with open(scores) as f:
    want = np.array([float(x) for x in f])
  out = test.create_tempdir().full_path
  inference.export(model, out)
  with open(path) as f:
    rows = export_runtime.parse_rows(f.read().splitlines())
  got = export_runtime.load_export(out).scores(rows['int'], rows['cat'],
                                               rows['cat_present'])
  return want, got
