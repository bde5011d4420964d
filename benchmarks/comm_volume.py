"""Bytes each device sends per train step, read from the compiled HLO.

Compiles the real train step (`trainer_lib.Trainer.train_step`) of the default
Criteo model (configs/criteo.py: 26 Kaggle-sized tables of dim 16, Adagrad)
on meshes data=1 x model=S of fake CPU devices (S = 1, 2, 4, 8 by default),
at a fixed per-device batch B_l, for each sharding strategy; nothing runs,
so the figures are exactly what the compiled program moves.

Every collective of the optimized HLO (`compiled.as_text()`) is read with its
result shape and replica-group size n, and costed per device with the ring
formulas (X: the collective's result bytes on one device):

  all-to-all          (n-1)/n X      (keeps its own block)
  all-gather          (n-1)/n X      (X the gathered result)
  reduce-scatter      (n-1)   X      (= (n-1)/n of the n X input)
  all-reduce          2 (n-1)/n X    (reduce-scatter + all-gather)
  collective-permute  X

Collectives inside the embedding engine's `shard_map` are embedding traffic;
the others (the all-reduce of the dense MLP gradients that the compiler
partitions, the loss) are printed apart and left out of the comparison with
the all-to-all lower bound of the issue: the ids to their owners, the pooled
embeddings back and their gradients to the owners, each once,

  bound = (2 B_l N D 4 + B_l N L 4) (S-1)/S bytes   (N features of dim D,
                                                    bags of L ids).

Row-split tables whose ids travel bucketized (`exchange.BucketizedExchange`)
exchange capacity-sized blocks inside a `lax.cond` whose other branch, taken
only when a block would overflow, exchanges worst-case blocks. The HLO holds
both; the collectives of the worst-case branch (their op_name carries
`exchange.FALLBACK_SCOPE`) are left out of `emb tot` and printed apart as
`fallbk`, so `emb tot` and `ratio` are the common case. Under each table,
`row exchange` gives the planner's choice for the row-split features
(`planner.choose_row_exchange`) and its estimate of both ways' bytes
(`planner.row_exchange_bytes`, times B_l).

`dedup ids` is the number of ids each device sorts to deduplicate per step
(the sizes of the HLO's 1-D int32 sorts; those of the worst-case branch are
left out). The last line is
`comm_over_bound_8=<ratio>` for `auto` at 8 devices (embedding traffic over
the bound).

  python -m benchmarks.comm_volume
  python -m benchmarks.comm_volume --devices=1,2,4,8 --batch_per_device=256 \
      --strategies=table_wise,auto,row_wise
  python -m benchmarks.comm_volume --strategies=table_row_wise \
      --row_group_size=2 --devices=4,8
  python -m benchmarks.comm_volume --strategies=row_wise,table_row_wise \
      --devices=2,4,8 --max_ids=4

(table_row_wise without --row_group_size takes groups of S/2 devices, so at
S=2 groups of one: table-wise.)

(run from the repository root; it sets XLA_FLAGS for 8 fake CPU devices
before JAX starts.)
"""

import collections
import os
import re
import sys

if __name__ == '__main__' and 'jax' not in sys.modules:
  _flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in _flags:
    os.environ['XLA_FLAGS'] = (
        _flags + ' --xla_force_host_platform_device_count=8').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags
from dlrm_jax import cli

_DEVICES = flags.DEFINE_list('devices', ['1', '2', '4', '8'],
                             'Model-axis sizes S to compile for.')
_BATCH = flags.DEFINE_integer('batch_per_device', 256, 'B_l.')
_ROW_GROUP = flags.DEFINE_integer(
    'row_group_size', 0, 'config.embedding.row_group_size (table_row_wise);'
    ' 0: S/2.')
_MAX_IDS = flags.DEFINE_integer(
    'max_ids', 1, 'ids per bag L of every feature (sum-pooled bags).')
_STRATEGIES = flags.DEFINE_list(
    'strategies', ['table_wise', 'auto', 'row_wise'],
    'config.embedding.sharding values.')

KINDS = ('all-to-all', 'all-gather', 'reduce-scatter', 'all-reduce',
         'collective-permute')
_DTYPE_BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 's8': 1,
                'u8': 1, 'pred': 1, 'f64': 8, 's64': 8, 'u64': 8}
_OP = re.compile(
    r'=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<kind>' + '|'.join(KINDS) +
    r')(?P<start>-start)?\(')
_ARRAY = re.compile(r'\b([a-z]+[0-9]*)\[([0-9,]*)\]')
_SORT = re.compile(r'=\s*s32\[(\d+)\]\{0\}\s+sort\(')


def _array_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    out.append(n * _DTYPE_BYTES[dtype])
  return out


def _group_size(line: str, num_devices: int) -> int:
  m = re.search(r'replica_groups=\{\{([0-9,]*)\}', line)
  if m:
    return len(m.group(1).split(','))
  m = re.search(r'replica_groups=\[([0-9,]+)\]<=', line)
  if m:
    return int(m.group(1).split(',')[-1])
  return num_devices


_NAME = re.compile(r'^\s*(?:ROOT\s+)?%(\S+)\s*=')
_GTE = re.compile(r'get-tuple-element\(%(\S+?)\), index=(\d+)')


def _where(line: str) -> str:
  """'emb', 'fallback' or 'other', by the op_name of an HLO line.

  The engine's collectives are traced inside its shard_map; those of the
  bucketized exchange's worst-case branch also in its name scope.
  """
  from dlrm_jax.embedding.sharding import exchange  # pylint: disable=g-import-not-at-top
  m = re.search(r'op_name="([^"]*)"', line)
  if not m or 'shard_map' not in m.group(1):
    return 'other'
  return 'fallback' if exchange.FALLBACK_SCOPE in m.group(1) else 'emb'


def collective_bytes(hlo: str, num_devices: int) -> dict:
  """Per-device bytes sent by kind, embedding, fallback or other, from HLO.

  The compiler combines collectives into tuples (the MLP gradients with the
  engine's psums, say): each element is classified by the metadata of the
  `get-tuple-element` that reads it.
  """
  out = {'emb': collections.Counter(), 'other': collections.Counter(),
         'fallback': collections.Counter(), 'dedup': 0, 'dedup_fallback': 0,
         'ops': []}
  lines = hlo.splitlines()
  gtes: dict[str, dict[int, str]] = collections.defaultdict(dict)
  for line in lines:
    m = _GTE.search(line)
    if m:
      gtes[m.group(1)][int(m.group(2))] = line
  for line in lines:
    m = _SORT.search(line)
    if m:
      key = 'dedup_fallback' if _where(line) == 'fallback' else 'dedup'
      out[key] += int(m.group(1))
      continue
    m = _OP.search(line)
    if not m:
      continue
    kind = m.group('kind')
    sizes = _array_bytes(m.group('shape'))
    offset = 0
    if m.group('start') and len(sizes) > 1:  # (operands..., results...)
      offset = len(sizes) // 2
      sizes = sizes[offset:]
    n = _group_size(line, num_devices)
    if n <= 1:
      continue
    name = _NAME.match(line).group(1)
    for i, x in enumerate(sizes):
      sent = {'all-to-all': (n - 1) / n * x, 'all-gather': (n - 1) / n * x,
              'reduce-scatter': (n - 1) * x,
              'all-reduce': 2 * (n - 1) / n * x, 'collective-permute': x}[kind]
      src = gtes[name].get(i + offset, '') if len(sizes) > 1 else ''
      if 'op_name=' not in src:
        src = line
      where = _where(src)
      out[where][kind] += sent
      out['ops'].append((where, kind, x, n, sent))
  return out


def compile_step(strategy: str, s: int, batch_per_device: int) -> dict:
  """Compiles the train step on data=1 x model=s; returns its figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import criteo  # pylint: disable=g-import-not-at-top
  from dlrm_jax import parallel  # pylint: disable=g-import-not-at-top
  from dlrm_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  config = criteo.get_config()
  config.batch_size = config.eval_batch_size = batch_per_device * s
  config.embedding.sharding = strategy
  g = _ROW_GROUP.value or (max(1, s // 2) if strategy == 'table_row_wise'
                           else 0)
  config.embedding.row_group_size = g if 0 < g < s and s % g == 0 else 0
  for name in config.features:
    if 'max_ids' in config.features[name]:  # categorical, not raw, features
      config.features[name].max_ids = _MAX_IDS.value
  mesh = parallel.create_mesh(1, s, devices=jax.devices()[:s])
  trainer = trainer_lib.Trainer(config, mesh=mesh)
  sh = trainer.batch_shardings()
  b = config.batch_size
  n_ids = trainer.engine.num_id_columns
  batch = {'ids': jax.ShapeDtypeStruct((b, n_ids), jnp.int32,
                                       sharding=sh['ids']),
           'label': jax.ShapeDtypeStruct((b,), jnp.float32,
                                         sharding=sh['label'])}
  if 'dense' in sh:
    batch['dense'] = jax.ShapeDtypeStruct(
        (b, trainer.spec.model.num_dense), jnp.float32, sharding=sh['dense'])
  # pylint: disable=protected-access
  acc = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype,
                                     sharding=trainer._replicated),
      trainer_lib._zero_acc())
  # pylint: enable=protected-access
  hlo = trainer.train_step.lower(trainer.abstract_state(), batch,
                                 acc).compile().as_text()
  res = collective_bytes(hlo, s)
  n_feat = len(trainer.spec.feature_specs)
  dim = trainer.engine.feature_dims[0]
  res['bound'] = ((2 * batch_per_device * n_feat * dim * 4 +
                   batch_per_device * n_feat * _MAX_IDS.value * 4) *
                  (s - 1) / s)
  res['strategies'] = collections.Counter(
      p.strategy for p in trainer.plan.placements)
  res['row_exchange'] = row_exchange_choice(trainer.engine.stacks, s,
                                            batch_per_device)
  return res


def row_exchange_choice(stacks, s: int, batch_per_device: int) -> dict:
  """The planner's way for the row-split segments, and both ways' bytes.

  Returns the count of segments per chosen way and, summed over them, the
  estimated bytes per device per step of each way.
  """
  from dlrm_jax.embedding.sharding import planner  # pylint: disable=g-import-not-at-top
  from dlrm_jax.embedding.sharding import routing  # pylint: disable=g-import-not-at-top
  chosen = collections.Counter()
  cost = collections.Counter()
  for stack in stacks:
    for seg in stack.segments:
      if not seg.row_exchange:
        continue
      chosen[seg.row_exchange] += 1
      est = planner.row_exchange_bytes(
          seg.max_ids, stack.width, len(routing.holders(seg, s)), s)
      for way, b in est.items():
        cost[way] += b * batch_per_device
  return {'chosen': chosen, 'bytes': cost}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  sizes = [int(x) for x in _DEVICES.value]
  if max(sizes) > jax.device_count():
    raise ValueError(f'--devices needs {max(sizes)} devices, JAX has'
                     f' {jax.device_count()}.')
  bl = _BATCH.value
  print(f'default Criteo model (configs/criteo.py), per-device batch {bl},'
        ' mesh data=1 x model=S; KB (1000 B) sent per device per step,'
        ' ring costs from the compiled HLO')
  last = {}
  for strategy in _STRATEGIES.value:
    print(f'\nsharding={strategy}')
    head = (f'{"S":>2} {"a2a":>8} {"a-gath":>8} {"r-scat":>8} {"a-red":>8}'
            f' {"emb tot":>8} {"bound":>8} {"ratio":>6} {"fallbk":>8}'
            f' {"mlp a-red":>9} {"dedup ids":>9}  plan')
    print(head)
    for s in sizes:
      r = compile_step(strategy, s, bl)
      e = r['emb']
      tot = sum(e.values())
      ratio = tot / r['bound'] if r['bound'] else float('nan')
      plan = ','.join(f'{k}:{v}' for k, v in sorted(r['strategies'].items()))
      print(f'{s:>2} {e["all-to-all"] / 1e3:>8.1f}'
            f' {e["all-gather"] / 1e3:>8.1f}'
            f' {e["reduce-scatter"] / 1e3:>8.1f}'
            f' {e["all-reduce"] / 1e3:>8.1f} {tot / 1e3:>8.1f}'
            f' {r["bound"] / 1e3:>8.1f} {ratio:>6.2f}'
            f' {sum(r["fallback"].values()) / 1e3:>8.1f}'
            f' {sum(r["other"].values()) / 1e3:>9.1f} {r["dedup"]:>9d}  {plan}',
            flush=True)
      rx = r['row_exchange']
      if rx['chosen']:
        ways = ','.join(f'{k}:{v}' for k, v in sorted(rx['chosen'].items()))
        est = ', '.join(f'{k} {v / 1e3:.1f} KB'
                        for k, v in sorted(rx['bytes'].items()))
        print(f'   row exchange {ways} (planner estimate: {est})')
      if e['collective-permute']:
        print(f'   (collective-permute {e["collective-permute"] / 1e3:.1f} KB'
              ' included)')
      last[(strategy, s)] = ratio
  ratio8 = last.get(('auto', 8), float('nan'))
  print(f'\ncomm_over_bound_8={ratio8:.3f}')


if __name__ == '__main__':
  cli.run_app(main)
