"""One command for an accelerator: DLRM and DLRM-DCNv2 speed against the
device's roofline, the scatter-add contention check, bf16 against float32.

  python -m benchmarks.accelerator            # one GPU/TPU, under 6 minutes
  python -m benchmarks.accelerator --smoke    # toy sizes, CPU, seconds

(run from the repository root). On one device it times the train step of

  kaggle:  the default config's DLRM (configs/criteo.py, Kaggle tables capped
           at 100k rows, 1-hot, dot interaction), batch --kaggle_batch;
  mlperf:  configs/criteo.py:mlperf_dcnv2 (multi-hot bags of 214 ids, DCNv2
           cross net, Adagrad), batch 65,536, with the 26 tables capped so
           that tables and Adagrad state fill --table_memory_fraction of the
           device memory (all 204M rows need 195 GiB);

each with float32 and with bfloat16 MLP/cross-net compute (float32 weights,
tables and loss), and prints examples/s, step ms, device memory peak
(`device.memory_stats()`), achieved TFLOP/s (XLA's `cost_analysis()` flops
of the compiled step) and embedding GB/s (rows gathered plus rows the
optimizer reads and writes, repeats counted) next to the device's peaks
(PEAKS, by `device_kind`; unknown on CPU).

The contention check times the sparse update of the Kaggle tables (SGD:
one scatter-add of the raw gradients; Adagrad: dedup by segment_sum, then
an update of the unique rows) with Zipf-skewed ids against uniform ids, and
a bare float32 `table.at[ids].add(...)` into a 64-row table: jaxlib
0.10.2-0.11.0 compile that to a compare-and-swap loop on NVIDIA GPUs, which
collapses under repeated ids (openxla/xla#46225, jax-ml/jax#38806). The train-step
cases run as `dlrm_jax.main` does, with `dlrm_jax.gpu.apply_scatter_workaround`
(which on those versions passes LLVM the option that restores the native
atomic); on a GPU the check runs twice, without and with that option.

Each case runs in its own process on an accelerator (so each memory peak is
its own); --smoke runs them in this process. The last line is
`accelerator_summary=<json>`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags
from dlrm_jax import cli

from dlrm_jax import gpu

_SMOKE = flags.DEFINE_bool(
    'smoke', False, 'Toy sizes and a few steps, all in this process (CI).')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per case.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compiling.')
_KAGGLE_BATCH = flags.DEFINE_integer(
    'kaggle_batch', 65_536, 'Batch of the default (Kaggle) DLRM.')
_MLPERF_BATCH = flags.DEFINE_integer(
    'mlperf_batch', 65_536, 'Batch of DLRM-DCNv2 (MLPerf: 65,536).')
_TABLE_FRACTION = flags.DEFINE_float(
    'table_memory_fraction', 0.55,
    'Share of the device memory given to the DCNv2 tables and their Adagrad'
    ' state; the rest holds activations (batch 65,536 x 214 ids) and XLA'
    ' buffers.')
_ZIPF = flags.DEFINE_float('zipf', 1.05, 'Skew of the contention ids.')
_CASES = flags.DEFINE_list(
    'cases', ['kaggle:float32', 'kaggle:bfloat16', 'mlperf:float32',
              'mlperf:bfloat16', 'contention'],
    'What to run, in order.')
_CHILD = flags.DEFINE_string('child', '', 'Internal: run one case.')

# Dense peaks of one device (vendor datasheets, without sparsity): TF32 is
# what XLA's default float32 matmul precision uses on these GPUs.
PEAKS = {
    'H200': {'bf16_tflops': 989.4, 'tf32_tflops': 494.7, 'hbm_gbps': 4800},
    'H100 PCIe': {'bf16_tflops': 756.0, 'tf32_tflops': 378.0,
                  'hbm_gbps': 2000},
    'H100': {'bf16_tflops': 989.4, 'tf32_tflops': 494.7, 'hbm_gbps': 3350},
    'A100 80GB': {'bf16_tflops': 312.0, 'tf32_tflops': 156.0,
                  'hbm_gbps': 2039},
    'A100': {'bf16_tflops': 312.0, 'tf32_tflops': 156.0, 'hbm_gbps': 1555},
}



def peaks_of(device_kind: str) -> dict | None:
  """The PEAKS entry of a `device_kind` ('NVIDIA H100 80GB HBM3', ...)."""
  kind = device_kind.upper()
  for name in ('H200', 'H100 PCIe', 'H100', 'A100 80GB', 'A100'):
    words = name.upper().split()
    if all(w in kind for w in words):
      return dict(PEAKS[name], name=name)
  return None


# ----------------------------------------------------------------------------
# Configs.


def capped_rows(num_buckets, budget_rows: int) -> tuple[int, ...]:
  """The largest per-table cap c with sum(min(n, c)) <= budget_rows."""
  lo, hi = 1, max(num_buckets)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if sum(min(n, mid) for n in num_buckets) <= budget_rows:
      lo = mid
    else:
      hi = mid - 1
  return tuple(min(n, lo) for n in num_buckets)


def device_memory_bytes() -> int | None:
  """The device's memory (`bytes_limit`); on CPU, the host's available."""
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  stats = _memory_stats(dev)
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if dev.platform == 'cpu' and os.path.exists('/proc/meminfo'):
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  return None


def _memory_stats(device) -> dict | None:
  try:
    return device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None  # not implemented on this backend


def case_config(shape: str, dtype: str):
  """The config of a case, and a description of its tables."""
  from configs import criteo  # pylint: disable=g-import-not-at-top
  from dlrm_jax.config import build as config_lib  # pylint: disable=g-import-not-at-top
  smoke = _SMOKE.value
  if shape == 'kaggle':
    config = criteo.get_config()
    config.batch_size = 256 if smoke else _KAGGLE_BATCH.value
    if smoke:
      for i in range(criteo.NUM_CAT):
        f = config.features[f'cat_{i}']
        f.num_buckets = min(f.num_buckets, 1000)
  elif shape == 'mlperf':
    config = criteo.get_config('mlperf_dcnv2')
    dim = 8 if smoke else 128
    if smoke:
      config.model.dense_mlp.hidden_units = [32, dim]
      config.model.final.hidden_units = [64, 32]
      config.model.dcn.rank = 16
      rows = capped_rows(criteo.TERABYTE_NUM_BUCKETS, 26 * 1000)
      config.batch_size = 128
    else:
      limit = device_memory_bytes()
      # Tables and full Adagrad state: 2 x 4 bytes x dim per row.
      if not limit:
        raise ValueError(
            'the device does not report its memory; cannot size the DCNv2'
            ' tables (run with --smoke, or on a GPU/TPU).')
      budget = int(_TABLE_FRACTION.value * limit) // (8 * dim)
      rows = capped_rows(criteo.TERABYTE_NUM_BUCKETS, budget)
      config.batch_size = _MLPERF_BATCH.value
    for i in range(criteo.NUM_CAT):
      f = config.features[f'cat_{i}']
      f.num_buckets = rows[i]
      f.embedding_dim = dim
  else:
    raise ValueError(f'unknown case shape {shape!r}')
  config.model.compute_dtype = dtype
  config.eval_batch_size = config.batch_size
  config.mesh.data, config.mesh.model = 1, 1
  return config_lib.resolve_data(config)


def host_batches(trainer, n: int, seed: int = 0, zipf: float | None = None):
  """`n` random batches in the engine's packed layout (each feature's ids in
  its `max_ids` columns), uniform or Zipf-skewed within each table."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  b = trainer.spec.loop.batch_size
  rows = trainer.spec.table_rows
  hot = [f.max_ids for f in trainer.spec.feature_specs]
  out = []
  for _ in range(n):
    cols = []
    for r, h in zip(rows, hot):
      if zipf:
        ids = (rng.zipf(zipf, (b, h)) - 1) % r
      else:
        ids = rng.integers(0, r, (b, h))
      cols.append(ids.astype(np.int32))
    batch = {'ids': np.concatenate(cols, axis=1),
             'label': (rng.random(b) < 0.25).astype(np.float32)}
    if trainer.spec.model.num_dense:
      batch['dense'] = rng.normal(
          size=(b, trainer.spec.model.num_dense)).astype(np.float32)
    out.append(batch)
  return out


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def embedding_bytes_per_step(trainer) -> int:
  """Rows gathered by the lookup plus rows the sparse optimizer reads and
  writes with their slots, counting repeated ids (an upper bound)."""
  slots = {'sgd': 0, 'adagrad': 1, 'rowwise_adagrad': 0, 'adam': 2}
  by_table = {t.name: t for t in trainer.spec.tables}
  total = 0
  for f in trainer.spec.feature_specs:
    t = by_table[f.table]
    ids = trainer.spec.loop.batch_size * f.max_ids
    row = t.dim * (2 if t.dtype == 'bfloat16' else 4)
    total += ids * row * (1 + 2 * (1 + slots[t.optimizer.kind]))
  return total


def run_case(name: str) -> dict:
  """Times one `shape:dtype` train-step case in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dlrm_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  shape, dtype = name.split(':')
  config = case_config(shape, dtype)
  mesh = jax.make_mesh((1, 1), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:1])
  trainer = trainer_lib.Trainer(config, mesh=mesh)
  t0 = time.time()
  state = trainer.init_state(0)
  jax.block_until_ready(state)
  init_s = time.time() - t0
  batches = [trainer.put_batch(b) for b in host_batches(trainer, 3)]
  acc = trainer.zero_metrics()
  t0 = time.time()
  compiled = trainer.train_step.lower(state, batches[0], acc).compile()
  compile_s = time.time() - t0
  flops = _flops(compiled)
  for i in range(_WARMUP.value):
    state, acc = compiled(state, batches[i % 3], acc)
  jax.block_until_ready(acc)
  steps = 3 if _SMOKE.value else _STEPS.value
  t0 = time.time()
  for i in range(steps):
    state, acc = compiled(state, batches[i % 3], acc)
  jax.block_until_ready((state, acc))
  step_s = (time.time() - t0) / steps
  loss = float(acc['loss_sum']) / max(int(acc['steps']), 1)
  stats = _memory_stats(jax.devices()[0]) or {}
  emb = embedding_bytes_per_step(trainer)
  return {
      'case': name, 'batch': config.batch_size, 'step_ms': step_s * 1e3,
      'examples_per_s': config.batch_size / step_s,
      'tflops': flops / step_s / 1e12 if flops else None,
      'flops_per_step': flops,
      'embedding_gbps': emb / step_s / 1e9,
      'table_rows': int(sum(t.num_rows for t in trainer.spec.tables)),
      'table_gib': sum(x.nbytes for x in jax.tree.leaves(state.emb)) / 2**30,
      'peak_memory_gib': (stats['peak_bytes_in_use'] / 2**30
                          if 'peak_bytes_in_use' in stats else None),
      'ids_per_example': int(sum(f.max_ids
                                 for f in trainer.spec.feature_specs)),
      'init_s': init_s, 'compile_s': compile_s,
      'loss_finite': bool(np.isfinite(loss)),
  }


def _time(fn, *args, n: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.time()
  for _ in range(n):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.time() - t0) / n


def run_contention() -> dict:
  """Sparse-update time with Zipf-skewed against uniform ids."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dlrm_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  n = 3 if _SMOKE.value else 20
  result = {'jaxlib': _jaxlib_version(),
            'xla_flags': os.environ.get('XLA_FLAGS', '')}
  mesh = jax.make_mesh((1, 1), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:1])
  for kind in ('sgd', 'adagrad'):
    config = case_config('kaggle', 'float32')
    config.embedding.optimizer.kind = kind
    trainer = trainer_lib.Trainer(config, mesh=mesh)
    engine = trainer.engine
    emb = engine.init(jax.random.key(0))
    b = config.batch_size
    g = jnp.full((b, trainer.spec.model.num_sparse,
                  trainer.spec.model.embedding_dim), 1e-3, jnp.float32)
    # The state is donated, as in the train step: no copy of the tables.
    update = jax.jit(lambda emb, ids, g: engine.apply_gradients(
        emb, ids, g, jnp.int32(0)), donate_argnums=0)
    for dist, zipf in (('uniform', None), ('zipf', _ZIPF.value)):
      ids = trainer.put_batch(host_batches(trainer, 1, zipf=zipf)[0])['ids']
      emb = update(emb, ids, g)  # compiles
      jax.block_until_ready(emb)
      t0 = time.time()
      for _ in range(n):
        emb = update(emb, ids, g)
      jax.block_until_ready(emb)
      result[f'{kind}_{dist}_ms'] = (time.time() - t0) / n * 1e3
    result[f'{kind}_zipf_over_uniform'] = (result[f'{kind}_zipf_ms']
                                           / result[f'{kind}_uniform_ms'])
  # A bare scatter-add with heavy contention: 64 rows, batch x 26 updates.
  m = (256 if _SMOKE.value else _KAGGLE_BATCH.value) * 26
  rng = np.random.default_rng(0)
  table = jnp.zeros((64, 128), jnp.float32)
  upd = jnp.ones((m, 128), jnp.float32)
  scatter = jax.jit(lambda t, i, u: t.at[i].add(u))  # 32 KB: copies are noise
  for dist, ids in (('uniform', rng.integers(0, 64, m)),
                    ('zipf', (rng.zipf(_ZIPF.value, m) - 1) % 64)):
    result[f'scatter64_{dist}_ms'] = _time(
        scatter, table, jnp.asarray(ids, jnp.int32), upd, n=n) * 1e3
  return result


def _jaxlib_version() -> str:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return jaxlib.__version__


_PREALLOCATE = 'XLA_PYTHON_CLIENT_PREALLOCATE'
_USER_PREALLOCATE = os.environ.get(_PREALLOCATE)


def _child(args: list[str], extra_env: dict | None = None) -> dict | str:
  """Runs `python -m benchmarks.accelerator --child=...`; its RESULT line."""
  env = dict(os.environ, **(extra_env or {}))
  env.pop(_PREALLOCATE, None)  # the children allocate as users' runs do
  if _USER_PREALLOCATE is not None:
    env[_PREALLOCATE] = _USER_PREALLOCATE
  cmd = [sys.executable, '-m', 'benchmarks.accelerator'] + [
      a for a in sys.argv[1:] if not a.startswith(('--cases', '--child'))
  ] + args  # later flags win
  out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       env=env)
  lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  if out.returncode or not lines:
    return f'failed (exit {out.returncode}): {out.stderr[-1500:]}'
  return json.loads(lines[-1][len('RESULT '):])


def _fmt(x, spec):
  return format(x, spec) if isinstance(x, (int, float)) else 'n/a'


def main(argv):
  del argv
  if _CHILD.value:
    gpu.apply_scatter_workaround()  # as dlrm_jax.main (unless skipped)
    res = (run_contention() if _CHILD.value == 'contention'
           else run_case(_CHILD.value))
    print('RESULT ' + json.dumps(res), flush=True)
    return
  if not _SMOKE.value:
    # This process only reads the device's name: it must not take the
    # memory (JAX preallocates 75% of a GPU) that its children time with.
    os.environ[_PREALLOCATE] = 'false'
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  kind = str(dev.device_kind)
  peaks = peaks_of(kind)
  jaxlib_v = _jaxlib_version()
  affected = dev.platform == 'gpu' and gpu.scatter_regression_affected(
      jaxlib_v)
  print(f'device: {kind} ({dev.platform}), {jax.device_count()} device(s);'
        f' jax {jax.__version__}, jaxlib {jaxlib_v}; memory'
        f' {_fmt((device_memory_bytes() or 0) / 2**30 or None, ".1f")} GiB')
  print('peaks: ' + (f'{peaks["name"]}: bf16 {peaks["bf16_tflops"]} TFLOP/s,'
                     f' tf32 {peaks["tf32_tflops"]} TFLOP/s, HBM'
                     f' {peaks["hbm_gbps"]} GB/s' if peaks else
                     'unknown for this device'))
  isolate = not _SMOKE.value
  summary = {'device_kind': kind, 'platform': dev.platform,
             'jax': jax.__version__, 'jaxlib': jaxlib_v, 'peaks': peaks,
             'smoke': _SMOKE.value, 'cases': {},
             'scatter_regression_jaxlib': affected}
  header = (f'{"case":<17} {"batch":>7} {"ids/ex":>6} {"examples/s":>12}'
            f' {"step ms":>9} {"TFLOP/s":>8} {"%peak":>6} {"emb GB/s":>9}'
            f' {"%HBM":>5} {"tables GiB":>10} {"peak GiB":>9}'
            f' {"compile s":>9}')
  printed_header = False
  for case in _CASES.value:
    if case == 'contention':
      continue
    res = _child([f'--child={case}']) if isolate else run_case(case)
    fraction = _TABLE_FRACTION.value
    while (isolate and case.startswith('mlperf') and isinstance(res, str)
           and ('RESOURCE_EXHAUSTED' in res or 'out of memory' in res)
           and fraction > 0.05):
      fraction /= 2
      print(f'{case}: out of memory; again with tables in {fraction:.0%} of'
            ' the device memory', flush=True)
      res = _child([f'--child={case}', f'--table_memory_fraction={fraction}'])
    if isinstance(res, str):
      print(f'{case}: {res}')
      summary['cases'][case] = res
      continue
    if peaks:
      peak_tf = peaks['bf16_tflops' if 'bfloat16' in case else 'tf32_tflops']
      res['tflops_pct_peak'] = (100 * res['tflops'] / peak_tf
                                if res['tflops'] else None)
      res['hbm_pct_peak'] = 100 * res['embedding_gbps'] / peaks['hbm_gbps']
    if not printed_header:
      print(header)
      printed_header = True
    print(f'{case:<17} {res["batch"]:>7,} {res["ids_per_example"]:>6}'
          f' {res["examples_per_s"]:>12,.0f} {res["step_ms"]:>9.2f}'
          f' {_fmt(res["tflops"], ">8.3f")}'
          f' {_fmt(res.get("tflops_pct_peak"), ">6.1f")}'
          f' {res["embedding_gbps"]:>9.2f}'
          f' {_fmt(res.get("hbm_pct_peak"), ">5.1f")}'
          f' {res["table_gib"]:>10.2f} {_fmt(res["peak_memory_gib"], ">9.2f")}'
          f' {res["compile_s"]:>9.1f}', flush=True)
    summary['cases'][case] = res
  for shape in ('kaggle', 'mlperf'):
    a = summary['cases'].get(f'{shape}:float32')
    b = summary['cases'].get(f'{shape}:bfloat16')
    if isinstance(a, dict) and isinstance(b, dict):
      summary[f'{shape}_bf16_speedup'] = a['step_ms'] / b['step_ms']
      print(f'{shape}: bfloat16 compute {a["step_ms"] / b["step_ms"]:.2f}x'
            ' the float32 speed')
  if 'contention' in _CASES.value:
    res = (_child(['--child=contention'], {gpu.SKIP_ENV: '1'}) if isolate
           else run_contention())
    summary['contention'] = res
    if isinstance(res, dict):
      print(f'contention (jaxlib {jaxlib_v}'
            f'{", in the 0.10.2-0.11.0 GPU scatter-add regression" if affected else ""}):'
            f' update of the Kaggle tables, Zipf({_ZIPF.value}) ids vs'
            ' uniform:')
      for k in ('sgd', 'adagrad'):
        print(f'  {k:<8} uniform {res[f"{k}_uniform_ms"]:.3f} ms, zipf'
              f' {res[f"{k}_zipf_ms"]:.3f} ms:'
              f' {res[f"{k}_zipf_over_uniform"]:.2f}x')
      print(f'  float32 scatter-add into 64 rows: uniform'
            f' {res["scatter64_uniform_ms"]:.3f} ms, zipf'
            f' {res["scatter64_zipf_ms"]:.3f} ms')
      if dev.platform == 'gpu':
        xla_flags = gpu.with_ftz_atomics(os.environ.get('XLA_FLAGS', ''))
        fixed = _child(['--child=contention'],
                       {'XLA_FLAGS': xla_flags, gpu.SKIP_ENV: '1'})
        summary['contention_ftz_atomics'] = fixed
        if isinstance(fixed, dict):
          print(f'  with {gpu.FTZ_ATOMICS_OPTION}: sgd zipf'
                f' {fixed["sgd_zipf_ms"]:.3f} ms, adagrad zipf'
                f' {fixed["adagrad_zipf_ms"]:.3f} ms, scatter64 zipf'
                f' {fixed["scatter64_zipf_ms"]:.3f} ms')
        else:
          print(f'  with {gpu.FTZ_ATOMICS_OPTION}: {fixed}')
    else:
      print(f'contention: {res}')
  print('accelerator_summary=' + json.dumps(summary, sort_keys=True),
        flush=True)


if __name__ == '__main__':
  cli.run_app(main)
