"""The compiled train step's ops, for comparing two trees of the code.

  python -m tools.step_hlo OUT.txt     # in each tree, then diff
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m tools.step_hlo OUT.txt --sharding=table_row_wise \\
    --row_group_size=4 --optimizer=rowwise_adagrad

Compiles `Trainer.train_step` of a config (by default configs/criteo.py's
default: batch 2048, the auto plan, one process's devices) and writes its
HLO instructions, sorted, with names, metadata and source locations
stripped, so that two versions of the code that compile to the same program
give identical files. Prints the op count and the scatters and gathers among
them.

Flags change the config, so that each sharding strategy's exchange (and each
sparse optimizer's update) can be compared:
  --variant            configs/criteo.py's variant (default: default)
  --sharding           config.embedding.sharding: auto or one strategy for
                       every table
  --row_group_size     config.embedding.row_group_size (table_row_wise)
  --optimizer          config.embedding.optimizer.kind (the tables')
  --mesh_data          config.mesh.data (replicas of the table shards)
  --batch              the global batch (default 2048)
  --set PATH=VALUE     any other config field, repeatable (the value read as
                       a Python literal, else as a string), e.g.
                       --set features.cat_0.managed_collision.num_rows=500
With managed-collision features the step also resets rows (`batch['reset']`).
"""

import argparse
import ast
import re

import numpy as np

from configs import criteo
from dlrm_jax.train import trainer as trainer_lib

_TABLES = re.compile(
    r'(function_name|file_name|file_location|parent_frame)_id=')


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def make_config(variant: str = 'default', *, sharding: str | None = None,
                row_group_size: int | None = None,
                optimizer: str | None = None, mesh_data: int | None = None,
                overrides: dict[str, object] | None = None):
  """configs/criteo.py's `variant` with the given fields changed.

  Args:
    variant: the config variant.
    sharding: config.embedding.sharding, or None to keep it.
    row_group_size: config.embedding.row_group_size, or None to keep it.
    optimizer: config.embedding.optimizer.kind, or None to keep it.
    mesh_data: config.mesh.data, or None to keep it.
    overrides: other fields, by dotted path below `config`.

  Returns:
    The config.
  """
  config = criteo.get_config(variant)
  if sharding is not None:
    config.embedding.sharding = sharding
  if row_group_size is not None:
    config.embedding.row_group_size = row_group_size
  if optimizer is not None:
    config.embedding.optimizer.kind = optimizer
  if mesh_data is not None:
    config.mesh.data = mesh_data
  for path, value in (overrides or {}).items():
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def step_ops(batch: int = 2048, config=None) -> list[str]:
  """The sorted, anonymized HLO instructions of the compiled train step.

  Args:
    batch: the global batch (train and eval).
    config: the config; None for configs/criteo.py's default.

  Returns:
    One string per instruction.
  """
  config = criteo.get_config() if config is None else config
  config.batch_size = config.eval_batch_size = batch
  trainer = trainer_lib.Trainer(config)
  num_dense = trainer.spec.model.num_dense
  ids_shape = (batch, trainer.engine.num_id_columns)
  host = {'ids': np.zeros(ids_shape, np.int32),
          'label': np.zeros(batch, np.float32)}
  if num_dense:
    host['dense'] = np.zeros((batch, num_dense), np.float32)
  if trainer.resets_rows:
    host['reset'] = np.full(ids_shape, -1, np.int32)
  text = trainer.train_step.lower(
      trainer.abstract_state(), trainer.put_batch(host),
      trainer.zero_metrics()).compile().as_text()
  ops = []
  for line in text.splitlines():
    if '=' not in line or _TABLES.search(line) or line.lstrip().startswith(
        ('HloModule', '"')):
      continue  # the module's source-location tables
    op = line.split('=', 1)[1]
    op = re.sub(r', metadata=\{[^}]*\}', '', op)
    op = re.sub(r',? ?stack_frame_id=\d+|origin=\{[^}]*\}', '', op)
    ops.append(re.sub(r'%[\w.\-]+', '%', op).strip())
  return sorted(ops)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('out', nargs='?', help='file for the sorted ops')
  parser.add_argument('--variant', default='default')
  parser.add_argument('--sharding')
  parser.add_argument('--row_group_size', type=int)
  parser.add_argument('--optimizer')
  parser.add_argument('--mesh_data', type=int)
  parser.add_argument('--batch', type=int, default=2048)
  parser.add_argument('--set', action='append', default=[],
                      metavar='PATH=VALUE')
  args = parser.parse_args(argv)
  overrides = {}
  for item in args.set:
    path, sep, value = item.partition('=')
    if not sep:
      parser.error(f'--set {item!r}: expected PATH=VALUE')
    overrides[path] = _literal(value)
  config = make_config(
      args.variant, sharding=args.sharding,
      row_group_size=args.row_group_size, optimizer=args.optimizer,
      mesh_data=args.mesh_data, overrides=overrides)
  ops = step_ops(args.batch, config)
  if args.out:
    with open(args.out, 'w') as f:
      f.write('\n'.join(ops) + '\n')
  kinds = sum(1 for o in ops if re.search(r'\b(scatter|gather)\(', o))
  print(f'step_ops={len(ops)} scatter_gather={kinds}')


if __name__ == '__main__':
  main()
