"""Memory of the compiled train step: no dense gradient of a table.

  python -m tools.step_memory                  # configs/criteo.py's default
  python -m tools.step_memory --rows=1000000   # every table 1e6 rows
  python -m tools.step_memory --rows=1000000 --dtype=bfloat16
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m tools.step_memory --rows=1000000 --sharding=row_wise

Compiles `Trainer.train_step` (the DLRM through `SparseEmbed`, the tables'
update in the lookup's backward pass) and prints, per device, from
`compiled.memory_analysis()`: the embedding state (tables and optimizer
slots), the step's temporaries, and how much of the donated state the
outputs alias (the update in place). Then it counts the HLO values as large
as the smallest stack (per device): only the state itself (parameters, its
in-place scatters and the fusions that write into it) should be there.

For contrast it compiles the same loss with the tables as dense arrays, their
rows gathered with `jnp.take` and updated by plain SGD on `jax.grad`'s dense
gradient: its temporaries hold at least one table-sized gradient.
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tools import step_hlo
from dlrm_jax.train import trainer as trainer_lib

_SHAPE = re.compile(r'= ([a-z0-9]+)\[([\d,]+)\]\{[^}]*\} ([\w-]+)\(')


def _mib(n: int) -> str:
  return f'{n / 2**20:9.1f} MiB'


def _census(text: str, min_elems: int) -> dict[str, int]:
  out: dict[str, int] = {}
  for m in _SHAPE.finditer(text):
    dims = [int(d) for d in m[2].split(',')]
    if np.prod(dims) >= min_elems:
      key = f'{m[3]} {m[1]}'
      out[key] = out.get(key, 0) + 1
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--rows', type=int, default=None,
                      help='num_buckets of every table (default: the config)')
  parser.add_argument('--sharding', default=None)
  parser.add_argument('--optimizer', default=None)
  parser.add_argument('--dtype', default=None,
                      help='config.embedding.dtype (float32, bfloat16, ...)')
  parser.add_argument('--batch', type=int, default=2048)
  args = parser.parse_args(argv)
  config = step_hlo.make_config(
      sharding=args.sharding, optimizer=args.optimizer,
      overrides={'embedding.dtype': args.dtype} if args.dtype else None)
  if args.rows:
    for name in config.features:
      if 'num_buckets' in config.features[name]:
        config.features[name].num_buckets = args.rows
  config.batch_size = config.eval_batch_size = args.batch
  trainer = trainer_lib.Trainer(config)
  n_dev = trainer.mesh.devices.size
  host = {'ids': np.zeros((args.batch, trainer.engine.num_id_columns),
                          np.int32),
          'label': np.zeros(args.batch, np.float32)}
  if trainer.spec.model.num_dense:
    host['dense'] = np.zeros((args.batch, trainer.spec.model.num_dense),
                             np.float32)
  if trainer.resets_rows:
    host['reset'] = np.full_like(host['ids'], -1)
  compiled = trainer.train_step.lower(
      trainer.abstract_state(), trainer.put_batch(host),
      trainer.zero_metrics()).compile()
  mem = compiled.memory_analysis()
  emb = trainer.abstract_state().emb
  per_device = [x.sharding.shard_shape(x.shape) for x in jax.tree.leaves(emb)]
  state_bytes = sum(int(np.prod(s)) * x.dtype.itemsize
                    for s, x in zip(per_device, jax.tree.leaves(emb)))
  stacks = [x.sharding.shard_shape(x.shape)
            for x in jax.tree.leaves(emb['stacks'])]
  table_bytes = max(int(np.prod(s)) * x.dtype.itemsize for s, x in
                    zip(stacks, jax.tree.leaves(emb['stacks'])))
  min_elems = min(int(np.prod(s)) for s in stacks)
  print(f'devices {n_dev}, batch {args.batch}, plan strategies'
        f' {sorted({p.strategy for p in trainer.plan.placements})}')
  print('per device (memory_analysis of the compiled train step):')
  print(f'  embedding state (tables + slots) {_mib(state_bytes)}'
        f'   largest stack {_mib(table_bytes)}')
  print(f'  arguments {_mib(mem.argument_size_in_bytes)}'
        f'   outputs {_mib(mem.output_size_in_bytes)}'
        f'   aliased (donated, in place) {_mib(mem.alias_size_in_bytes)}')
  print(f'  temporaries {_mib(mem.temp_size_in_bytes)}'
        f'  = {mem.temp_size_in_bytes / table_bytes:.3f} x the largest stack')
  census = _census(compiled.as_text(), min_elems)
  print(f'HLO values of >= {min_elems} elements (the smallest stack):')
  for k, v in sorted(census.items()):
    print(f'  {v:4d}  {k}')

  # The contrast: dense tables, dense gradient, plain SGD, on one device.
  rows = [t.num_rows for t in trainer.spec.tables]
  dim = trainer.spec.tables[0].dim
  tabs = [jax.ShapeDtypeStruct((r, dim), jnp.float32) for r in rows]
  ids = jnp.zeros((args.batch, len(rows)), jnp.int32)

  def dense_step(tabs, ids):
    def loss(tabs):
      pooled = jnp.stack([jnp.take(t, ids[:, k], axis=0)
                          for k, t in enumerate(tabs)], axis=1)
      return jnp.mean(optax.sigmoid_binary_cross_entropy(
          jnp.sum(jnp.sin(pooled), axis=(1, 2)), jnp.zeros(args.batch)))
    grads = jax.grad(loss)(tabs)
    return [t - 0.1 * g for t, g in zip(tabs, grads)]

  dense = jax.jit(dense_step, donate_argnums=0).lower(
      tabs, ids).compile().memory_analysis()
  largest = max(rows) * dim * 4
  print('contrast, one device: the same tables dense, jax.grad, SGD:')
  print(f'  tables {_mib(sum(rows) * dim * 4)}   temporaries'
        f' {_mib(dense.temp_size_in_bytes)}'
        f'  = {dense.temp_size_in_bytes / largest:.3f} x the largest table')


if __name__ == '__main__':
  main()
