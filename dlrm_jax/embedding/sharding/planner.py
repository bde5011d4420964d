"""Embedding sharding plans and the physical layout they imply.

A `Plan` gives each table a strategy over the `S` shards of the mesh's model
axis:
  replicated:  a full copy on every device (data parallel; for small tables).
  table_wise:  the whole table on one device.
  row_wise:    rows split in equal blocks over several devices (the last block
               padded; padding rows are never looked up).
  table_row_wise: row_wise over a group of consecutive devices (e.g. those of
               a host; `row_group_size` of them), so a table too big for one
               device does not make every device of the job serve it
               (TorchRec's table-row-wise).
  column_wise: the embedding dim split in equal pieces, one per device.

The layout packs the pieces into *stacks*: one array per (width, dtype,
optimizer, replicated?) group, `[S * cap, width]` sharded over the model axis,
so each device holds `[cap, width]` rows: the pieces placed on it, side by side,
like FBGEMM's table-batched embeddings. One device is the special case S = 1.

`auto_plan`'s rules:
  * With one shard, every table is table_wise on it.
  * A table is replicated when its bytes, optimizer state included, are at
    most `replicate_bytes`, and, given `batch_per_device` B_l, replicating
    it also moves fewer bytes. A replicated table's update all-reduces its
    dense gradient and touch counts: `2 rows (D + 1)` values per device, by
    ring. Sharding it sends `B_l lookups (2 D + 1)` by all-to-all: its ids
    to the owner, the pooled embeddings back, and their gradients to the
    owner. Both are scaled by (S-1)/S.
  * A table bigger than an even share, with at least S rows, is row_wise
    over all devices. An even share is 1/S of all sharded bytes, what greedy
    packing could still balance. So is a table that alone needs more than
    `device_memory_bytes`.
  * The other tables are packed table_wise, largest first, onto the device
    with the least load. Load weighs bytes and lookups (ids per example)
    equally.
  * `overrides` maps table names to a strategy. A row_wise table is then
    placed over all devices, a column_wise one over the first gcd(D, S)
    devices, and a table_wise one on the least-loaded device.
  * With `row_group_size` g, where 0 < g < S and g divides S, tables that
    would be row_wise are table_row_wise instead. They are row_wise over the
    g consecutive devices `k g .. k g + g - 1` of the least-loaded group.
  * A row-split table's row blocks go to its devices rotated so that the
    expected ids per device (uniform ids; a small table's last blocks hold
    fewer rows) stay even: the bucketized all-to-all's blocks are as large
    as its busiest destination's share.

How a row-split feature's ids travel (`TablePlacement.exchange`, else chosen
per feature by `choose_row_exchange` when the layout is built): 'bucketized'
(each id to the shard of its row, in capacity blocks: `bucket_capacity`) or
'every_holder' (each id to every shard of the table), whichever
`row_exchange_bytes` finds cheaper, as replication is chosen by bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Sequence

import numpy as np

from dlrm_jax.embedding.specs import FeatureSpec, SparseOptimizerSpec, TableSpec
from dlrm_jax.embedding import optimizers

STRATEGIES = ('replicated', 'table_wise', 'row_wise', 'column_wise',
              'table_row_wise')
ROW_SPLIT = ('row_wise', 'table_row_wise')
ROW_EXCHANGES = ('', 'bucketized', 'every_holder')
_DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}


@dataclasses.dataclass(frozen=True)
class TablePlacement:
  """Where one table lives.

  Attributes:
    table: the table's name.
    strategy: one of STRATEGIES.
    devices: the model-axis indices that hold its row blocks or column
      pieces, in order. It is empty for replicated, which is on all devices.
    exchange: how the ids of a row-split table (row_wise, table_row_wise)
      travel, one of `ROW_EXCHANGES`: 'bucketized' (each id to the shard
      holding its row, by all-to-all of capacity-sized blocks),
      'every_holder' (each id to every shard holding rows of the table: an
      all-gather for row_wise, a worst-case all-to-all for table_row_wise),
      or '' to choose per feature by bytes (`choose_row_exchange`).
  """

  table: str
  strategy: str
  devices: tuple[int, ...] = ()
  exchange: str = ''


@dataclasses.dataclass(frozen=True)
class Plan:
  """A sharding plan: one placement per table over `num_shards` devices.

  Attributes:
    num_shards: S, the devices of the model axis.
    placements: one `TablePlacement` per table.
  """

  num_shards: int
  placements: tuple[TablePlacement, ...]

  def placement(self, table: str) -> TablePlacement:
    """Finds the placement of a table.

    Args:
      table: the table's name.

    Returns:
      Its `TablePlacement`.

    Raises:
      KeyError: if the plan does not place the table.
    """
    for p in self.placements:
      if p.table == table:
        return p
    raise KeyError(table)

  def to_json(self) -> str:
    """The plan as JSON text, read back by `from_json`."""
    return json.dumps({
        'num_shards': self.num_shards,
        'placements': [dataclasses.asdict(p) for p in self.placements],
    })

  @classmethod
  def from_json(cls, text: str) -> 'Plan':
    """Reads a plan written by `to_json`.

    Args:
      text: the JSON text.

    Returns:
      The plan.
    """
    d = json.loads(text)
    return cls(d['num_shards'], tuple(
        TablePlacement(p['table'], p['strategy'], tuple(p['devices']),
                       p.get('exchange', ''))
        for p in d['placements']))


def table_bytes(t: TableSpec) -> int:
  """Counts the bytes of a table plus its optimizer state.

  Args:
    t: the table spec.

  Returns:
    The bytes. Slots are counted as float32.
  """
  total = t.num_rows * t.dim * _DTYPE_BYTES[t.dtype]
  for shape, _ in optimizers.slot_shapes(t.optimizer, t.num_rows,
                                         t.dim).values():
    total += int(np.prod(shape)) * 4
  return total


def validate_plan(plan: Plan, tables: Sequence[TableSpec]) -> None:
  """Checks that a plan places every table once and validly.

  Args:
    plan: the plan.
    tables: the table specs.

  Raises:
    ValueError: if a table is unknown, placed twice or not placed, or if a
      placement's strategy or devices are invalid.
  """
  by_name = {t.name: t for t in tables}
  seen = set()
  s = plan.num_shards
  for p in plan.placements:
    if p.table not in by_name:
      raise ValueError(f'the sharding plan places unknown table {p.table!r}.')
    if p.table in seen:
      raise ValueError(f'the sharding plan places table {p.table!r} twice.')
    seen.add(p.table)
    if p.strategy not in STRATEGIES:
      raise ValueError(
          f'table {p.table!r}: strategy ({p.strategy!r}) must be one of'
          f' {list(STRATEGIES)}.')
    for d in p.devices:
      if not 0 <= d < s:
        raise ValueError(
            f'table {p.table!r}: device {d} is outside the model axis of'
            f' {s} devices.')
    if len(set(p.devices)) != len(p.devices):
      raise ValueError(
          f'table {p.table!r}: devices {p.devices} repeat a device.')
    t = by_name[p.table]
    if p.exchange not in ROW_EXCHANGES:
      raise ValueError(
          f'table {p.table!r}: exchange ({p.exchange!r}) must be one of'
          f' {list(ROW_EXCHANGES)}.')
    if p.exchange and p.strategy not in ROW_SPLIT:
      raise ValueError(
          f'table {p.table!r}: exchange ({p.exchange!r}) applies to'
          f' {list(ROW_SPLIT)} only, not {p.strategy}.')
    if p.strategy == 'replicated' and p.devices:
      raise ValueError(f'table {p.table!r}: replicated takes no devices.')
    if p.strategy == 'table_wise' and len(p.devices) != 1:
      raise ValueError(
          f'table {p.table!r}: table_wise needs exactly one device, got'
          f' {p.devices}.')
    if p.strategy in ROW_SPLIT + ('column_wise',) and not p.devices:
      raise ValueError(f'table {p.table!r}: {p.strategy} needs devices.')
    if p.strategy == 'column_wise' and t.dim % len(p.devices):
      raise ValueError(
          f'table {p.table!r}: dim {t.dim} does not split evenly over'
          f' {len(p.devices)} devices for column_wise sharding.')
  missing = set(by_name) - seen
  if missing:
    raise ValueError(f'the sharding plan does not place tables {sorted(missing)}.')


def lookups_per_table(features: Sequence[FeatureSpec]) -> dict[str, int]:
  """Table name -> ids per example read from it, over its features.

  Args:
    features: the feature specs.

  Returns:
    The ids per example of each table that a feature reads; `auto_plan`'s
    `lookups`.
  """
  out: dict[str, int] = {}
  for f in features:
    out[f.table] = out.get(f.table, 0) + f.max_ids
  return out


def auto_plan(
    tables: Sequence[TableSpec],
    num_shards: int,
    *,
    overrides: dict[str, str] | None = None,
    replicate_bytes: int = 1 << 20,
    device_memory_bytes: int | None = None,
    lookups: dict[str, int] | None = None,
    batch_per_device: int | None = None,
    row_group_size: int = 0,
) -> Plan:
  """Assigns each table a strategy and devices.

  The rules are in the module docstring.

  Args:
    tables: the table specs.
    num_shards: S, the devices of the model axis.
    overrides: table name -> strategy, for tables whose strategy is fixed.
    replicate_bytes: the most bytes of a table that may be replicated.
    device_memory_bytes: the memory of one device, or None for no limit.
    lookups: table name -> ids per example. A table not named counts 1.
    batch_per_device: B_l, the per-device batch. None skips the traffic test
      for replication.
    row_group_size: g, the devices of a table_row_wise group. 0 is off.

  Returns:
    The plan.

  Raises:
    ValueError: if an override or the row group is invalid, or if a device
      would need more than `device_memory_bytes`.
  """
  overrides = dict(overrides or {})
  lookups = lookups or {}
  s = num_shards
  g, grouped = _check_plan_request(tables, s, overrides, row_group_size)
  if s == 1:
    return _single_shard_plan(tables, overrides)
  placer = _Placer(tables, s, g, lookups)
  sharded_total = sum(table_bytes(t) for t in tables
                      if table_bytes(t) > replicate_bytes)
  to_pack = []
  for t in tables:
    strategy = overrides.get(t.name)
    if strategy is None:
      strategy = _default_strategy(
          t, s, grouped, lookups, replicate_bytes, sharded_total,
          device_memory_bytes, batch_per_device)
    if not placer.place_fixed(t, strategy, grouped):
      to_pack.append(t)
  placer.pack_table_wise(to_pack)
  plan = Plan(s, tuple(placer.placements[t.name] for t in tables))
  if device_memory_bytes is not None:
    _check_device_memory(plan, tables, device_memory_bytes)
  return plan


def _check_plan_request(tables, s, overrides, row_group_size):
  """Validates `auto_plan`'s overrides and row group. Returns (g, grouped)."""
  for name, strategy in overrides.items():
    if name not in {t.name for t in tables}:
      raise ValueError(
          f'config.embedding.sharding_overrides names unknown table {name!r}.')
    if strategy not in STRATEGIES:
      raise ValueError(
          f'config.embedding.sharding_overrides.{name} ({strategy!r}) must be'
          f' one of {list(STRATEGIES)}.')
  g = int(row_group_size or 0)
  if g < 0 or (0 < g < s and s % g):
    raise ValueError(
        f'config.embedding.row_group_size ({row_group_size}) must be 0 (off)'
        f' or divide the model axis ({s} devices).')
  grouped = 0 < g < s
  if not grouped and 'table_row_wise' in overrides.values() and s > 1:
    raise ValueError(
        'config.embedding.sharding_overrides asks for table_row_wise, which'
        ' needs config.embedding.row_group_size between 1 and the model axis'
        f' ({s}), got {row_group_size}.')
  return g, grouped


def _single_shard_plan(tables, overrides) -> Plan:
  """One shard: every table table_wise on it, or as overridden."""
  placements = []
  for t in tables:
    strategy = overrides.get(t.name, 'table_wise')
    devices = () if strategy == 'replicated' else (0,)
    placements.append(TablePlacement(t.name, strategy, devices))
  return Plan(1, tuple(placements))


def _default_strategy(t, s, grouped, lookups, replicate_bytes, sharded_total,
                      device_memory_bytes, batch_per_device) -> str:
  """`auto_plan`'s rule for a table without an override. See the module doc."""
  b = table_bytes(t)
  if b <= replicate_bytes and (
      batch_per_device is None or 2 * t.num_rows * (t.dim + 1) <=
      batch_per_device * lookups.get(t.name, 1) * (2 * t.dim + 1)):
    return 'replicated'
  if (b > sharded_total / s and t.num_rows >= s) or (
      device_memory_bytes is not None and b > device_memory_bytes):
    return 'table_row_wise' if grouped else 'row_wise'
  return 'table_wise'


class _Placer:
  """Per-device memory and lookup load while `auto_plan` places tables."""

  def __init__(self, tables, s, g, lookups):
    self.tables = tables
    self.s = s
    self.g = g
    self.lookups = lookups
    self.all_devices = tuple(range(s))
    self.mem = np.zeros(s)
    self.load = np.zeros(s)
    self.row_load = np.zeros(s)  # expected ids of row-split tables
    self.placements: dict[str, TablePlacement] = {}

  def place_fixed(self, t, strategy, grouped) -> bool:
    """Places `t` unless it is table_wise, which is left to packing.

    Returns True if it placed `t`.
    """
    b = table_bytes(t)
    n = self.lookups.get(t.name, 1)
    mem, load, s, g = self.mem, self.load, self.s, self.g
    if strategy == 'replicated':
      self.placements[t.name] = TablePlacement(t.name, 'replicated', ())
      mem += b
    elif strategy == 'row_wise' or (strategy == 'table_row_wise' and
                                    not grouped):
      self.placements[t.name] = TablePlacement(
          t.name, 'row_wise', self._rotated(t, self.all_devices, n))
      mem += b / s
      load += n / s
    elif strategy == 'table_row_wise':
      k = int(np.argmin(mem.reshape(-1, g).sum(axis=1)))
      group = self._rotated(t, self.all_devices[k * g:(k + 1) * g], n)
      self.placements[t.name] = TablePlacement(t.name, 'table_row_wise', group)
      mem[k * g:(k + 1) * g] += b / g
      load[k * g:(k + 1) * g] += n
    elif strategy == 'column_wise':
      k = math.gcd(t.dim, s)
      self.placements[t.name] = TablePlacement(
          t.name, 'column_wise', self.all_devices[:k])
      mem[:k] += b / k
      load[:k] += n
    else:
      return False
    return True

  def _rotated(self, t, group, n) -> tuple[int, ...]:
    """The devices of a row-split table's blocks: `group`, rotated.

    Blocks hold `rps = ceil(rows / g)` rows, the last ones fewer or none, so
    a table of few rows sends more of its ids to the first devices. Block 0
    goes to the rotation of `group` that keeps the expected row-wise ids per
    example (`row_load`, uniform ids, `n` per example) most even (least sum
    of squares); ties keep `group` as it is. All-to-all blocks are as large as the
    busiest destination's share (`planner.bucket_capacity`), so this keeps
    them small.
    """
    g = len(group)
    rps = -(-t.num_rows // g)
    share = np.array([max(0, min(rps, t.num_rows - k * rps)) for k in
                      range(g)]) * n / max(t.num_rows, 1)
    idx = np.array(group)
    best, best_cost = 0, None
    for r in range(g):
      load = self.row_load.copy()
      load[np.roll(idx, -r)] += share
      cost = round(float(np.sum(load * load)), 9)
      if best_cost is None or cost < best_cost:
        best, best_cost = r, cost
    devices = tuple(int(d) for d in np.roll(idx, -best))
    self.row_load[np.array(devices)] += share
    return devices

  def pack_table_wise(self, to_pack) -> None:
    """Largest first, each onto the device with the least bytes + lookups."""
    tables, lookups = self.tables, self.lookups
    total_lookups = max(1, sum(lookups.get(t.name, 1) for t in tables))
    total_bytes = max(1, sum(table_bytes(t) for t in tables))
    for t in sorted(to_pack, key=lambda t: -table_bytes(t)):
      score = self.mem / total_bytes + self.load / total_lookups
      d = int(np.argmin(score))
      self.placements[t.name] = TablePlacement(t.name, 'table_wise', (d,))
      self.mem[d] += table_bytes(t)
      self.load[d] += lookups.get(t.name, 1)


def _check_device_memory(plan, tables, device_memory_bytes) -> None:
  per_device = plan_bytes_per_device(plan, tables)
  worst = int(np.argmax(per_device))
  if per_device[worst] > device_memory_bytes:
    raise ValueError(
        f'the embedding tables need {per_device[worst] / 2**30:.2f} GiB on'
        f' device {worst}, more than config.embedding.device_memory_gb'
        f' ({device_memory_bytes / 2**30:.2f} GiB); use more devices,'
        ' smaller tables, bfloat16 storage or rowwise_adagrad.')


def host_available_bytes() -> int | None:
  """The host memory available to new allocations (Linux's MemAvailable).

  Returns:
    Bytes, or None where /proc/meminfo does not say.
  """
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def check_fits(plan: Plan, tables: Sequence[TableSpec],
               shards: Sequence[int], budget_bytes: float,
               budget_name: str, extra_bytes: int = 0) -> None:
  """Refuses a plan whose tables cannot be allocated, before allocating.

  Args:
    plan: the plan.
    tables: its tables.
    shards: the model shard of each device that shares the budget: one
      entry for a device's own memory, every local device for host memory.
    budget_bytes: the memory they share.
    budget_name: what the memory is, for the message.
    extra_bytes: more bytes the same memory must hold (cached tables'
      stores kept in host memory).

  Raises:
    ValueError: one line, if the tables and their optimizer state need more
      than `budget_bytes`: the need, the budget, the largest tables and the
      ways out.
  """
  per_shard = plan_bytes_per_device(plan, tables)
  need = float(sum(per_shard[s] for s in shards)) + extra_bytes
  if need <= budget_bytes:
    return
  largest = sorted(tables, key=table_bytes, reverse=True)[:3]
  names = ', '.join(f'{t.name} ({_human(table_bytes(t))})' for t in largest)
  raise ValueError(
      f'the embedding tables and their optimizer state need {_human(need)}'
      f' of {budget_name}, more than the {_human(budget_bytes)} available'
      f' (largest tables: {names}); use more devices or hosts'
      ' (config.mesh), cached tables (config.embedding.cache.tables, with'
      ' the store on disk: config.embedding.cache.directory), smaller'
      " num_buckets, config.embedding.dtype='bfloat16' or"
      " config.embedding.optimizer.kind='rowwise_adagrad'.")


def plan_bytes_per_device(plan: Plan, tables: Sequence[TableSpec]) -> np.ndarray:
  """Counts the bytes that each model shard holds under a plan.

  Args:
    plan: the plan.
    tables: its tables.

  Returns:
    `[S]` float bytes per model shard, optimizer state included.
  """
  by_name = {t.name: t for t in tables}
  mem = np.zeros(plan.num_shards)
  for p in plan.placements:
    b = table_bytes(by_name[p.table])
    if p.strategy == 'replicated':
      mem += b
    else:
      for d in p.devices:
        mem[d] += b / len(p.devices)
  return mem


def describe(plan: Plan, tables: Sequence[TableSpec],
             data_replicas: int = 1,
             stores: dict[str, tuple[int, int, str]] | None = None) -> str:
  """The plan as a text table.

  Args:
    plan: the plan.
    tables: its tables.
    data_replicas: the devices along the mesh's data axis. Each model shard
      is held by that many devices.
    stores: for cached tables (whose `tables` entry is the device cache),
      `(rows, bytes, where)` of their stores: the table's own rows, its
      rows' and optimizer slots' bytes, and 'host memory' or a directory.

  Returns:
    One row per table, then the bytes per device over all tables. A row
    gives the table's rows, dim, strategy, the model shards that hold it and
    its bytes per device.
  """
  by_name = {t.name: t for t in tables}
  rows = [('table', 'rows', 'dim', 'strategy', 'model shards',
           'bytes/device')]
  for p in plan.placements:
    t = by_name[p.table]
    b = table_bytes(t)
    if p.strategy == 'replicated':
      devices, per = 'all', b
    else:
      devices = ','.join(map(str, p.devices)) if len(p.devices) <= 4 else (
          f'{min(p.devices)}..{max(p.devices)}' +
          (f' from {p.devices[0]}' if p.devices[0] != min(p.devices) else ''))
      per = b / len(p.devices)
    strategy = p.strategy + (f'/{p.exchange}' if p.exchange else '')
    n_rows = f'{t.num_rows:,}'
    if stores and p.table in stores:
      strategy = 'cached, ' + strategy
      n_rows = f'{t.num_rows:,} of {stores[p.table][0]:,}'
    rows.append((p.table, n_rows, str(t.dim), strategy, devices,
                 _human(per)))
  per_device = plan_bytes_per_device(plan, tables)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  lines.append(
      f'per device: min {_human(per_device.min())}, max '
      f'{_human(per_device.max())}; {plan.num_shards} model shard(s), each'
      f' held by {data_replicas} device(s) of the mesh\'s data axis')
  if stores:
    total = sum(v[1] for v in stores.values())
    wheres = sorted({v[2] for v in stores.values()})
    lines.append(
        f'cached tables: {len(stores)}, their caches counted above; their'
        f' stores (all rows and optimizer state) {_human(total)} in'
        f' {", ".join(wheres)}')
  return '\n'.join(lines)


def _human(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if n < 1024 or unit == 'TiB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
    n /= 1024
  return str(n)


# ----------------------------------------------------------------------------
# How the ids of row-split tables travel.

# The capacity rule of the bucketized exchange (`exchange.BucketizedExchange`).
CAPACITY_SLACK = 1.02
CAPACITY_SIGMAS = 4.0


def bucket_capacity(expected: float, worst: int, multiple: int = 8) -> int:
  """The static block size of a bucketized all-to-all, per destination.

  The block must hold what one device sends one destination: ids, or the
  partial bags they make. With uniformly drawn ids the count is about
  binomial, mean `expected` and standard deviation at most its root, so the
  block is `CAPACITY_SLACK * expected + CAPACITY_SIGMAS * sqrt(expected)`
  (2% and four standard deviations: of the S x S counts of a step, one
  exceeds its block about once in 500 steps at S = 8), rounded up to
  `multiple` and at most `worst`, the count when every id goes to one
  destination. jax-tpu-embedding sizes its blocks by a user-given
  `max_ids_per_partition`; TorchRec's row-wise bucketize
  (`torchrec/distributed/embedding_sharding.py`, `bucketize_kjt_before_all2all`)
  sends variable-length blocks, which static shapes cannot. A batch that
  overflows a block takes the exchange's exact worst-case path instead.

  Args:
    expected: the mean count per destination.
    worst: the largest possible count.
    multiple: the rounding.

  Returns:
    The block size, in `[1, worst]`.
  """
  cap = math.ceil(CAPACITY_SLACK * expected +
                  CAPACITY_SIGMAS * math.sqrt(max(expected, 0.0)))
  cap = -(-max(cap, 1) // multiple) * multiple
  return int(max(1, min(cap, worst)))


def row_exchange_bytes(max_ids: int, dim: int, group: int,
                       num_shards: int) -> dict[str, float]:
  """Bytes per example that one row-split feature sends, for each way.

  With a bag of L ids over g shards, uniform ids reach
  `P = g (1 - (1 - 1/g)^L)` of them, at most min(L, g). Either way, the ids
  go to their owners once (the compiler merges the lookup's and the
  update's identical sends), then the partial bags back and their
  gradients to the owners. 'bucketized' sends them in blocks
  `CAPACITY_SLACK` larger than the mean: `slack (L 4 + 2 P D 4) (S-1)/S`.
  'every_holder' sends each id and a partial bag to each of the g holders:
  `(S-1) (L 4 + 2 D 4)` by all-gather and reduce-scatter when g = S,
  `g (L 4 + 2 D 4) (S-1)/S` by all-to-all otherwise. Bucketized is cheaper
  unless bags are long next to the shards (P near g) and rows wide.

  Args:
    max_ids: L, the ids per example of the feature.
    dim: D, the width of the table's piece.
    group: g, the shards holding its rows.
    num_shards: S, the model shards.

  Returns:
    The bytes per local example, by way.
  """
  s, g, l, f = num_shards, group, max_ids, (num_shards - 1) / num_shards
  partials = g * (1.0 - (1.0 - 1.0 / g) ** l)
  per_holder = 4 * l + 2 * 4 * dim
  every = (s - 1) * per_holder if g == s else f * g * per_holder
  return {'bucketized': f * CAPACITY_SLACK * (4 * l + 2 * 4 * dim * partials),
          'every_holder': every}


def choose_row_exchange(max_ids: int, dim: int, group: int,
                        num_shards: int) -> str:
  """The cheaper way by `row_exchange_bytes`: 'bucketized' on a tie.

  Args:
    max_ids: L, the ids per example of the feature.
    dim: D, the width of the table's piece.
    group: g, the shards holding its rows.
    num_shards: S, the model shards.

  Returns:
    'bucketized' or 'every_holder'.
  """
  cost = row_exchange_bytes(max_ids, dim, group, num_shards)
  return ('bucketized' if cost['bucketized'] <= cost['every_holder']
          else 'every_holder')


# ----------------------------------------------------------------------------
# Physical layout.


@dataclasses.dataclass(frozen=True)
class Piece:
  """A block of a table stored on one device of a stack.

  The block is `rows` logical rows from `row_start` and `width` columns from
  `col_start`. It is stored at local rows `offset .. offset + capacity` on
  model device `device`.

  Attributes:
    table: the table's name.
    device: the model device. -1 means every device, for replicated.
    row_start: the first logical row.
    rows: the logical rows.
    capacity: the stored rows, `>= rows`. The extra rows are row-wise
      padding.
    col_start: the first column.
    width: the columns.
    offset: the first local row on the device.
  """

  table: str
  device: int
  row_start: int
  rows: int
  capacity: int
  col_start: int
  width: int
  offset: int


@dataclasses.dataclass(frozen=True)
class FeatureRoute:
  """How one feature's ids reach one column piece of its table in a stack.

  An id `i` of the feature is valid when `0 <= i < num_rows`. It lives on
  model device `block_devices[i // rows_per_shard]` (`first_device` when the
  piece is not split by rows), at local row
  `offsets[device] + i % rows_per_shard`. A stack's `segments` are its
  routes.

  Attributes:
    feature: the feature's index among the features.
    id_offset: its first column in the packed ids.
    max_ids: its columns there, the ids per example.
    num_rows: the rows of its table.
    col_start: the piece's first embedding column.
    first_device: the model device that holds the piece's first rows. It is
      0 when replicated.
    rows_per_shard: the rows of each device's block. It is `num_rows` when
      the piece is not split by rows.
    offsets: the piece's local row offset on each model device. -1 means
      not on it. A replicated piece has one entry.
    combiner: how the feature's ids are pooled.
    row_exchange: for a piece split by rows, how its ids travel:
      'bucketized' or 'every_holder' (see `TablePlacement.exchange`). ''
      otherwise.
    block_devices: for a piece split by rows, the model device of each row
      block, in block order: the placement's devices. Empty otherwise.
  """

  feature: int
  id_offset: int
  max_ids: int
  num_rows: int
  col_start: int
  first_device: int
  rows_per_shard: int
  offsets: tuple[int, ...]
  combiner: str
  row_exchange: str = ''
  block_devices: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Stack:
  """One stacked array, of the pieces of tables that share a width and kind.

  Its global shape is `[num_shards * capacity, width]`, or `[capacity, width]`
  when replicated.

  Attributes:
    name: the stack's name, unique in the layout.
    width: W, the columns.
    dtype: the logical dtype of its tables.
    optimizer: the sparse optimizer of its tables.
    replicated: whether every device holds a full copy.
    capacity: C, the rows on each device.
    pieces: the table blocks it stores.
    segments: the feature routes into it.
  """

  name: str
  width: int
  dtype: str
  optimizer: SparseOptimizerSpec
  replicated: bool
  capacity: int
  pieces: tuple[Piece, ...]
  segments: tuple[FeatureRoute, ...]

  @property
  def max_ids(self) -> int:
    """The packed id columns of all its segments."""
    return sum(s.max_ids for s in self.segments)


def build_layout(
    plan: Plan,
    tables: Sequence[TableSpec],
    features: Sequence[FeatureSpec],
    *,
    row_multiple: int = 8,
) -> tuple[Stack, ...]:
  """Packs the plan's pieces into stacks and routes the features to them.

  Args:
    plan: the plan.
    tables: the table specs.
    features: the feature specs, in the order of the packed id columns.
    row_multiple: each stack's capacity is rounded up to a multiple of it.

  Returns:
    The stacks.

  Raises:
    ValueError: if the plan is invalid, or if a row-split table's devices
      are not consecutive.
  """
  validate_plan(plan, tables)
  by_name = {t.name: t for t in tables}
  groups = _group_pieces(plan, tables)
  stacks = [_pack_stack(i, key, pieces, plan.num_shards, row_multiple)
            for i, (key, pieces) in enumerate(groups.items())]
  # Route features: one segment per (feature, column piece of its table).
  id_offset = 0
  segs: dict[str, list[FeatureRoute]] = {s.name: [] for s in stacks}
  for fi, f in enumerate(features):
    t = by_name[f.table]
    p = plan.placement(t.name)
    for s in stacks:
      segs[s.name].extend(_segments(fi, f, t, p, s, id_offset, plan.num_shards))
    id_offset += f.max_ids
  return tuple(dataclasses.replace(s, segments=tuple(segs[s.name]))
               for s in stacks)


def _group_pieces(plan: Plan, tables: Sequence[TableSpec]) -> dict[tuple, list]:
  """Groups piece fields by `(width, dtype, optimizer, replicated)`.

  Groups come in first-seen order. The fields are `Piece`'s without `offset`.
  """
  groups: dict[tuple, list] = {}
  for t in tables:
    p = plan.placement(t.name)
    if p.strategy == 'replicated':
      groups.setdefault((t.dim, t.dtype, t.optimizer, True), []).append(
          (t.name, -1, 0, t.num_rows, t.num_rows, 0, t.dim))
    elif p.strategy == 'table_wise':
      groups.setdefault((t.dim, t.dtype, t.optimizer, False), []).append(
          (t.name, p.devices[0], 0, t.num_rows, t.num_rows, 0, t.dim))
    elif p.strategy in ROW_SPLIT:
      n = len(p.devices)
      rps = -(-t.num_rows // n)
      for k, d in enumerate(p.devices):
        start = k * rps
        groups.setdefault((t.dim, t.dtype, t.optimizer, False), []).append(
            (t.name, d, start, max(0, min(rps, t.num_rows - start)), rps, 0,
             t.dim))
    else:  # column_wise
      w = t.dim // len(p.devices)
      for k, d in enumerate(p.devices):
        groups.setdefault((w, t.dtype, t.optimizer, False), []).append(
            (t.name, d, 0, t.num_rows, t.num_rows, k * w, w))
  return groups


def _pack_stack(i, key, piece_fields, num_shards, row_multiple) -> Stack:
  """Stack `i` of group `key`: its pieces side by side on each device."""
  width, dtype, opt, replicated = key
  used = np.zeros(num_shards if not replicated else 1, dtype=np.int64)
  pieces = []
  for (name, dev, row_start, rows, cap, col_start, w) in piece_fields:
    slot = 0 if dev < 0 else dev
    pieces.append(Piece(name, dev, row_start, rows, cap, col_start, w,
                        int(used[slot])))
    used[slot] += cap
  capacity = int(max(1, used.max()))
  capacity = -(-capacity // row_multiple) * row_multiple
  kind = 'rep' if replicated else 'shard'
  name = f'{kind}{i}_{dtype}_d{width}_{opt.kind}'
  return Stack(name, width, dtype, opt, replicated, capacity, tuple(pieces),
               ())


def _segments(fi, f, t, p, s, id_offset, num_shards) -> list[FeatureRoute]:
  """Feature `fi`'s segments in stack `s`.

  There is one per column piece of table `t`, with placement `p`, stored there.
  """
  by_col: dict[int, list[Piece]] = {}
  for pc in s.pieces:
    if pc.table == t.name:
      by_col.setdefault(pc.col_start, []).append(pc)
  out = []
  for col_start, pcs in sorted(by_col.items()):
    if s.replicated:
      offsets = (pcs[0].offset,)
      first, rps = 0, t.num_rows
    else:
      offsets_arr = [-1] * num_shards
      for pc in pcs:
        offsets_arr[pc.device] = pc.offset
      offsets = tuple(offsets_arr)
      if p.strategy in ROW_SPLIT:
        first, rps = p.devices[0], pcs[0].capacity
        lo = min(p.devices)
        if sorted(p.devices) != list(range(lo, lo + len(p.devices))):
          raise ValueError(
              f'table {t.name!r}: {p.strategy} devices {p.devices} must be'
              ' consecutive, in any order.')
      else:
        first, rps = pcs[0].device, t.num_rows
    row_exchange, block_devices = '', ()
    if not s.replicated and p.strategy in ROW_SPLIT and rps < t.num_rows:
      row_exchange = p.exchange or choose_row_exchange(
          f.max_ids, pcs[0].width, len(p.devices), num_shards)
      block_devices = tuple(p.devices)
    out.append(FeatureRoute(fi, id_offset, f.max_ids, t.num_rows, col_start,
                            first, rps, offsets, t.combiner, row_exchange,
                            block_devices))
  return out
