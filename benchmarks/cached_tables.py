"""Cached tables against tables on device: hit rate and step time.

At `benchmarks.step_shape`'s shape (batch 2048, 26 single-hot tables of dim
64, MLPs 13-512-256-64 and 512-256-1, dot interaction, SGD), every table
placed `cached` (`dlrm_jax.embedding.cache`: all rows in a host store in RAM,
a device cache of `fraction * rows` hot rows), against the same model with
all tables on device, for:

- cache fractions (`--fractions`, default 1%, 5%, 20%, 50%, 100%);
- id distributions (`--distributions`): `uniform` (integers in [0, rows)),
  and `zipf<s>` (`zipf1.05`, `zipf1.2`): p(k) ∝ 1/(k+1)^s over the finite
  support k in [0, rows), sampled by inverse CDF, then scattered over the
  table by a fixed random permutation per table (as hashed ids are: the hot
  rows are not the low row numbers), a different one for each table.

  python -m benchmarks.cached_tables                  # the full grid
  python -m benchmarks.cached_tables --quick          # 5%, 20%, 100%, short
  python -m benchmarks.cached_tables --fractions=0.2 --distributions=zipf1.05
  python -m benchmarks.cached_tables --rows=1000000 --steps=10 --profile_prepare

(run from the repository root).

The batches are host numpy dicts, made before anything is timed: `warmup +
rounds * steps` distinct batches per distribution (a stream, never cycled, so
the cache sees new ids as training would), the same for every fraction and
for the on-device model. A cached step is what a training loop runs: the
`CachePipeline` maps batch j + 1 to cache slots on its thread (`prepare`,
the host's share, overlapping the device) while the loop runs the swap
(`Trainer.swap_step`), hands the evicted rows over for write-back, and runs
`train_step`; `put_batch` is in the loop for both models. The cache starts
empty for each distribution and warms up over `--warmup` untimed steps; at
large fractions with uniform ids it is then still filling (after n batches a
share 1 - exp(-n B / rows) of the rows has been seen), so the hit rate there
is a cold start's, not a long run's.

Prints, per distribution and fraction: cache rows, the hit rate over the
timed steps only (unique rows found cached / unique rows, all tables), the
step time (the fastest of `--rounds` rounds of `--steps` steps, the machine
may be shared; the median beside it), examples/s, the step time over the
on-device model's with the same ids, and the `prepare` time per batch on the
pipeline's thread. A fraction whose cache cannot hold the unique rows of two
consecutive batches prints `cache too small` with the cache's message. Then
`prepare` and `write_back` alone, per batch, at 20% with Zipf 1.05 ids (on a
fresh Trainer, nothing else running): the host's share of a cached step.
The CPU's model name and whether it has avx512f are printed (from
/proc/cpuinfo). The last line is `cached_over_device_at_20pct_zipf=<ratio>`:
the cached step time at fraction 0.2 with Zipf 1.05 ids over the on-device
step time with the same ids (goal: at most 1.3); nan when not measured.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import re
import time
import zlib

from absl import flags
import numpy as np

from benchmarks import step_shape
from dlrm_jax import cli

_ROWS = flags.DEFINE_integer('rows', 100_000, 'Rows per table.')
_BATCH = flags.DEFINE_integer('batch', 2048, 'Global batch size.')
_FRACTIONS = flags.DEFINE_list(
    'fractions', ['0.01', '0.05', '0.2', '0.5', '1.0'],
    'Cache fractions (cache rows per table over its rows), in (0, 1].')
_DISTRIBUTIONS = flags.DEFINE_list(
    'distributions', ['uniform', 'zipf1.05', 'zipf1.2'],
    'Id distributions: uniform, or zipf<s> (finite support, permuted).')
_STEPS = flags.DEFINE_integer('steps', 15, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer(
    'rounds', 5, 'Timed rounds per case; the fastest round is reported (the'
    ' machine may be shared), with the median beside it.')
_WARMUP = flags.DEFINE_integer(
    'warmup', 30, 'Untimed steps per case (they also warm the cache up).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the batches.')
_QUICK = flags.DEFINE_bool(
    'quick', False, 'A short run: fractions 5%, 20%, 100%, uniform and'
    ' zipf1.05, warm-up 10, 2 rounds of 5 steps (flags given explicitly'
    ' win).')
_PREPARE = flags.DEFINE_bool(
    'prepare', True, 'Time `prepare` and `write_back` alone at 20% with'
    ' zipf1.05 ids.')
_PROFILE = flags.DEFINE_bool(
    'profile_prepare', False, 'Also print a cProfile of `prepare` and'
    ' `write_back` (at 20%, zipf1.05), top functions by own time.')

_QUICK_VALUES = {'fractions': ['0.05', '0.2', '1.0'],
                 'distributions': ['uniform', 'zipf1.05'],
                 'warmup': 10, 'steps': 5, 'rounds': 2}

_RATIO_FRACTION, _RATIO_DIST = 0.2, 'zipf1.05'


def _flag(holder):
  """A flag's value; under --quick, the quick value unless it was given."""
  name = holder.name
  if _QUICK.value and name in _QUICK_VALUES and not flags.FLAGS[name].present:
    return _QUICK_VALUES[name]
  return holder.value


# ----------------------------------------------------------------------------
# The machine.


def cpu_info() -> tuple[str, bool | None]:
  """The CPU's model name and whether it has avx512f (None: unknown)."""
  name, avx512 = 'unknown', None
  try:
    with open('/proc/cpuinfo') as f:
      text = f.read()
  except OSError:
    return name, avx512
  m = re.search(r'^model name\s*:\s*(.+)$', text, re.M)
  if m:
    name = m.group(1).strip()
  m = re.search(r'^flags\s*:\s*(.+)$', text, re.M)
  if m:
    avx512 = 'avx512f' in m.group(1).split()
  return name, avx512


def _load() -> str:
  """The 1-minute load average (others' work on a shared machine)."""
  try:
    return f'{os.getloadavg()[0]:.2f}'
  except OSError:
    return 'unknown'


# ----------------------------------------------------------------------------
# Ids.


def parse_distribution(name: str) -> float | None:
  """'uniform' -> None, 'zipf<s>' -> s."""
  if name == 'uniform':
    return None
  m = re.fullmatch(r'zipf([0-9.]+)', name)
  if not m or float(m.group(1)) <= 0:
    raise ValueError(f'unknown distribution {name!r}: uniform or zipf<s>'
                     ' with s > 0 (zipf1.05).')
  return float(m.group(1))


def make_batches(dist: str, rows: int, batch: int, count: int,
                 seed: int) -> list[dict[str, np.ndarray]]:
  """`count` host batches with ids of distribution `dist`.

  Zipf ids: k in [0, rows) with p(k) ∝ 1/(k+1)^s, by inverse CDF
  (`np.searchsorted` on the cumulative weights), then `perm_t[k]` with a
  fixed random permutation per table t (the same for every distribution).
  """
  s = parse_distribution(dist)
  rng = np.random.default_rng([seed, zlib.crc32(dist.encode())])
  shape = (count, batch, step_shape.NUM_TABLES)
  if s is None:
    ids = rng.integers(0, rows, shape, dtype=np.int64)
  else:
    cdf = np.cumsum(np.arange(1, rows + 1, dtype=np.float64) ** -s)
    cdf /= cdf[-1]
    k = np.searchsorted(cdf, rng.random(shape), side='right')
    np.minimum(k, rows - 1, out=k)
    ids = np.empty(shape, np.int64)
    for t in range(step_shape.NUM_TABLES):
      perm = np.random.default_rng([seed, 1000 + t]).permutation(rows)
      ids[..., t] = perm[k[..., t]]
  out = []
  for i in range(count):
    out.append({
        'dense': rng.normal(size=(batch, step_shape.NUM_DENSE)).astype(
            np.float32),
        'ids': ids[i].astype(np.int32),
        'label': (rng.random(batch) < 0.25).astype(np.float32),
    })
  return out


def unique_per_batch(batches) -> float:
  """Mean unique ids of a table in one batch, over tables and batches."""
  got = [len(np.unique(b['ids'][:, t])) for b in batches[:8]
         for t in range(step_shape.NUM_TABLES)]
  return float(np.mean(got))


# ----------------------------------------------------------------------------
# Timing.


def make_trainer(rows: int, batch: int, fraction: float | None):
  """A Trainer at the shape: all tables cached at `fraction`, or none."""
  from dlrm_jax.train.trainer import Trainer  # pylint: disable=g-import-not-at-top
  config = step_shape.config_for(rows, batch=batch)
  config.embedding.cache.tables = '' if fraction is None else 'all'
  if fraction is not None:
    config.embedding.cache.fraction = fraction
  config.embedding.cache.directory = ''  # the stores in host RAM
  trainer = Trainer(config)
  trainer.attach_store(None)
  return trainer


def _summary(rounds: list[float]) -> dict:
  return {'step_s': min(rounds), 'median_step_s': float(np.median(rounds))}


def time_device(trainer, batches, warmup: int, steps: int,
                rounds: int) -> dict:
  """The on-device model's step over the batch stream."""
  import jax  # pylint: disable=g-import-not-at-top
  state = trainer.init_state(0)
  acc = trainer.zero_metrics()
  it = iter(batches)
  for _ in range(warmup):
    state, acc = trainer.train_step(state, trainer.put_batch(next(it)), acc)
  jax.block_until_ready((state, acc))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, acc = trainer.train_step(state, trainer.put_batch(next(it)), acc)
    jax.block_until_ready((state, acc))
    times.append((time.perf_counter() - t0) / steps)
  return _summary(times)


def _record_prepare(cached) -> dict[int, tuple[int, int, float]]:
  """Wraps `cached.prepare` (this instance only) to record, per batch index,
  the unique-row hits and misses of all tables and its wall time."""
  record: dict[int, tuple[int, int, float]] = {}
  orig = type(cached).prepare

  def prepare(index, ids, next_ids):
    h0 = sum(c.hits for c in cached.caches.values())
    m0 = sum(c.misses for c in cached.caches.values())
    t0 = time.perf_counter()
    out = orig(cached, index, ids, next_ids)
    dt = time.perf_counter() - t0
    record[index] = (sum(c.hits for c in cached.caches.values()) - h0,
                     sum(c.misses for c in cached.caches.values()) - m0, dt)
    return out

  cached.prepare = prepare
  return record


def time_cached(trainer, batches, warmup: int, steps: int,
                rounds: int) -> dict:
  """The cached model's step (pipeline, swap, train) over the batch stream.

  Every batch of the stream is consumed, so every prepared batch is swapped
  and written back before the next case.

  Raises:
    ValueError: a cache is too small (from `prepare`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from dlrm_jax.embedding import cache as cache_lib  # pylint: disable=g-import-not-at-top
  state = trainer.init_state(0)
  acc = trainer.zero_metrics()
  record = _record_prepare(trainer.cached)
  n = warmup + steps * rounds
  assert len(batches) == n, (len(batches), n)
  pipe = cache_lib.CachePipeline(trainer.cached, iter(batches))
  it = iter(pipe)

  def step(state, acc):
    prepared, hb = next(it)
    emb, evicted = trainer.swap_step(state.emb, prepared.swaps)
    state = state.replace(emb=emb)
    pipe.evicted(prepared, evicted)
    return trainer.train_step(
        state, trainer.put_batch(dict(hb, ids=prepared.ids)), acc)

  try:
    for _ in range(warmup):
      state, acc = step(state, acc)
    jax.block_until_ready((state, acc))
    times = []
    for _ in range(rounds):
      t0 = time.perf_counter()
      for _ in range(steps):
        state, acc = step(state, acc)
      jax.block_until_ready((state, acc))
      times.append((time.perf_counter() - t0) / steps)
  finally:
    pipe.finish()
  timed = [record[i] for i in range(warmup, n)]
  hits = sum(r[0] for r in timed)
  misses = sum(r[1] for r in timed)
  out = _summary(times)
  out['hit_rate'] = hits / (hits + misses) if hits + misses else 1.0
  out['prepare_s'] = float(np.mean([r[2] for r in timed]))
  return out


def time_prepare_alone(rows: int, batch: int, fraction: float, batches,
                       warmup: int, profile: bool) -> dict:
  """`prepare` and `write_back` alone, per batch, on a fresh Trainer.

  The write-back hands each batch's loaded values back as its evicted values
  (host arrays of the right shapes): `prepare` refuses to load a row whose
  write-back never landed, so some write-back must run; its values do not
  matter here.
  """
  trainer = make_trainer(rows, batch, fraction)
  trainer.init_state(0)
  cached = trainer.cached

  def fake_evicted(prepared):
    return {n: {a: v for a, v in sw.items() if a != 'slots'}
            for n, sw in prepared.swaps.items()}

  def run(on_timed=None):
    prep, wb = [], []
    for j in range(len(batches) - 1):
      if j == warmup and on_timed:
        on_timed()
      t0 = time.perf_counter()
      p = cached.prepare(j, batches[j]['ids'], batches[j + 1]['ids'])
      t1 = time.perf_counter()
      cached.write_back(p, fake_evicted(p))
      t2 = time.perf_counter()
      if j >= warmup:
        prep.append(t1 - t0)
        wb.append(t2 - t1)
    return prep, wb

  prep, wb = run()
  out = {'prepare_s': float(np.mean(prep)),
         'prepare_median_s': float(np.median(prep)),
         'write_back_s': float(np.mean(wb)),
         'write_back_median_s': float(np.median(wb)), 'batches': len(prep)}
  if profile:  # the same pass again from a fresh cache, profiled
    trainer.init_state(0)
    prof = cProfile.Profile()
    run(prof.enable)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats('tottime').print_stats(15)
    out['profile'] = buf.getvalue()
  return out


# ----------------------------------------------------------------------------


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  rows, batch = _ROWS.value, _BATCH.value
  fractions = [float(f) for f in _flag(_FRACTIONS)]
  dists = list(_flag(_DISTRIBUTIONS))
  for d in dists:
    parse_distribution(d)
  warmup, steps, rounds = _flag(_WARMUP), _flag(_STEPS), _flag(_ROUNDS)
  n = warmup + steps * rounds

  cpu, avx512 = cpu_info()
  dev = jax.devices()[0]
  print(f'cpu: {cpu}, avx512f: '
        f'{"unknown" if avx512 is None else "yes" if avx512 else "no"},'
        f' {os.cpu_count()} cores; device: {dev.device_kind} ({dev.platform})'
        f' x {jax.device_count()}')
  print(f'batch {batch}, {step_shape.NUM_TABLES} tables x {rows:,} rows x dim'
        ' 64, SGD; cached: all tables, stores in host RAM; warm-up'
        f' {warmup} steps, then {rounds} rounds x {steps} steps (fastest;'
        f' median beside it); load average {_load()}', flush=True)

  t0 = time.perf_counter()
  streams = {d: make_batches(d, rows, batch, n, _SEED.value) for d in dists}
  print(f'batches made in {time.perf_counter() - t0:.1f} s; unique ids per'
        ' table per batch: ' + ', '.join(
            f'{d} {unique_per_batch(b):,.0f}' for d, b in streams.items()))

  results: dict[tuple[str, float | None], dict | str] = {}
  cache_rows: dict[float, int] = {}
  t0 = time.perf_counter()
  trainer = make_trainer(rows, batch, None)
  for d in dists:
    results[(d, None)] = time_device(trainer, streams[d], warmup, steps,
                                     rounds)
  del trainer
  device_s = time.perf_counter() - t0
  for f in fractions:
    trainer = make_trainer(rows, batch, f)
    cache_rows[f] = max(c.cache_rows for c in trainer.cached.caches.values())
    for d in dists:
      try:
        results[(d, f)] = time_cached(trainer, streams[d], warmup, steps,
                                      rounds)
      except ValueError as e:
        results[(d, f)] = str(e)
    del trainer
  print(f'timed in {time.perf_counter() - t0:.0f} s (on-device model'
        f' {device_s:.0f} s); load average {_load()} at the end (this run'
        ' alone keeps it near 2 on 2 cores)')

  head = (f'{"ids":>9} {"cache":>6} {"cache rows":>11} {"hit %":>6} '
          f'{"step ms":>8} {"median ms":>10} {"examples/s":>11} '
          f'{"vs device":>10} {"prepare ms":>11}')
  print(head)
  print('-' * len(head))
  for d in dists:
    base = results[(d, None)]
    print(f'{d:>9} {"device":>6} {"-":>11} {"-":>6} '
          f'{base["step_s"] * 1e3:>8.1f} {base["median_step_s"] * 1e3:>10.1f}'
          f' {batch / base["step_s"]:>11,.0f} {1.0:>10.2f} {"-":>11}')
    for f in fractions:
      res = results[(d, f)]
      lead = f'{d:>9} {f:>6.0%} {cache_rows[f]:>11,}'
      if isinstance(res, str):
        print(f'{lead} cache too small: {res}')
        continue
      print(f'{lead} {res["hit_rate"] * 100:>6.1f} '
            f'{res["step_s"] * 1e3:>8.1f} {res["median_step_s"] * 1e3:>10.1f}'
            f' {batch / res["step_s"]:>11,.0f} '
            f'{res["step_s"] / base["step_s"]:>10.2f} '
            f'{res["prepare_s"] * 1e3:>11.1f}')
  print('hit %: unique rows found cached over unique rows, all tables, timed'
        ' steps only; prepare ms: `prepare` per batch on the pipeline\'s'
        ' thread (overlapping the device step), timed steps only.')

  key = (_RATIO_DIST, _RATIO_FRACTION)
  if _PREPARE.value:
    alone = time_prepare_alone(
        rows, batch, _RATIO_FRACTION,
        streams.get(_RATIO_DIST) or make_batches(
            _RATIO_DIST, rows, batch, n, _SEED.value), warmup,
        _PROFILE.value)
    cached_res = results.get(key)
    share = ''
    if isinstance(cached_res, dict):
      host_s = alone['prepare_s'] + alone['write_back_s']
      share = (f'; prepare + write_back = {host_s / cached_res["step_s"]:.0%}'
               ' of the cached step')
    print(f'host alone, {_RATIO_FRACTION:.0%} cache, {_RATIO_DIST} ids'
          f' ({alone["batches"]} batches after {warmup}): prepare'
          f' {alone["prepare_s"] * 1e3:.1f} ms/batch (median'
          f' {alone["prepare_median_s"] * 1e3:.1f}), write_back'
          f' {alone["write_back_s"] * 1e3:.1f} ms/batch (median'
          f' {alone["write_back_median_s"] * 1e3:.1f}){share}')
    if 'profile' in alone:
      print(alone['profile'])

  ratio = float('nan')
  if isinstance(results.get(key), dict) and (_RATIO_DIST, None) in results:
    ratio = results[key]['step_s'] / results[(_RATIO_DIST, None)]['step_s']
  print(f'cached_over_device_at_20pct_zipf={ratio:.3f}')


if __name__ == '__main__':
  cli.run_app(main)
