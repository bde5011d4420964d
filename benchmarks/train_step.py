"""Train-step throughput of the DLRM against table size.

Shape (issue 3): batch 2048, 26 single-hot tables of dim 64, dense MLP
512-256-64, final MLP 512-256, dot interaction, SGD for tables and MLPs. Each
table size runs in a fresh subprocess, so its peak resident memory is its own.

  python -m benchmarks.train_step                 # 1e4, 1e5, 1e6, 1e7 rows
  python -m benchmarks.train_step --rows=10000,1000000 --steps=50
  python -m benchmarks.train_step --rows=100000 --table_dtype=float32,bfloat16

(run from the repository root).

Prints examples/s and peak memory per size; the last line is
`step_time_ratio_1e6_over_1e4=<ratio>`. Runs unchanged on GPU/TPU. On CPU,
each size runs with glibc's huge-page tunable (see --hugepages), which users
with big tables on CPU hosts should set too.
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import flags
from benchmarks import step_shape
from dlrm_jax import cli

_ROWS = flags.DEFINE_list('rows', ['10000', '100000', '1000000', '10000000'],
                          'Rows per table.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer(
    'rounds', 5, 'Timed rounds per size; the fastest round is reported (the'
    ' machine may be shared), with the median beside it.')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed steps per size.')
_BATCH = flags.DEFINE_integer('batch', 2048, 'Global batch size.')
_DIM = flags.DEFINE_integer('dim', 64, 'Embedding dim.')
_ARCH_WITH_SPARSE = flags.DEFINE_bool(
    'arch_with_sparse', False,
    'Feed the sparse embeddings to the final MLP too (TorchEasyRec); the'
    ' reference DLRM and TorchRec do not, so off by default.')
_SPARSE_OPT = flags.DEFINE_string('sparse_optimizer', 'sgd',
                                  'sgd, adagrad, rowwise_adagrad, adam or'
                                  ' ftrl.')
_TABLE_DTYPE = flags.DEFINE_list(
    'table_dtype', ['float32'],
    'Table storage dtypes to time, each size with each (float32, bfloat16,'
    ' float16); with several, prints each one\'s step time over the first\'s.')
_CHILD = flags.DEFINE_integer('child_rows', 0, 'Internal: run one size.')
_CHILD_DTYPE = flags.DEFINE_string('child_dtype', 'float32',
                                   'Internal: the table dtype of that run.')
_HUGEPAGES = flags.DEFINE_bool(
    'hugepages', True,
    'Run each size with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so the big'
    ' host allocations (the tables, on CPU) use transparent huge pages where'
    ' the kernel allows them (madvise mode): fewer TLB misses on random rows.')
_MEM_FRACTION = flags.DEFINE_float(
    'memory_fraction', 0.7,
    'Skip a size whose tables and optimizer state exceed this share of the'
    ' available memory.')


def config_for(rows: int):
  return step_shape.config_for(
      rows, batch=_BATCH.value, dim=_DIM.value,
      arch_with_sparse=_ARCH_WITH_SPARSE.value,
      sparse_optimizer=_SPARSE_OPT.value, table_dtype=_CHILD_DTYPE.value)


def run_one(rows: int) -> dict:
  """Times the train step for one table size (in this process)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dlrm_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  config = config_for(rows)
  t0 = time.time()
  trainer = trainer_lib.Trainer(config)
  state = trainer.init_state(0)
  jax.block_until_ready(state)
  init_s = time.time() - t0
  batches = step_shape.random_batches(trainer, rows, _BATCH.value)
  acc = trainer.zero_metrics()
  t0 = time.time()
  state, acc = trainer.train_step(state, batches[0], acc)
  jax.block_until_ready(acc)
  compile_s = time.time() - t0
  for i in range(_WARMUP.value):
    state, acc = trainer.train_step(state, batches[i % 4], acc)
  jax.block_until_ready(acc)
  rounds = []
  for _ in range(_ROUNDS.value):
    t0 = time.time()
    for i in range(_STEPS.value):
      state, acc = trainer.train_step(state, batches[i % 4], acc)
    jax.block_until_ready((state, acc))
    rounds.append((time.time() - t0) / _STEPS.value)
  dt = min(rounds)
  emb_bytes = sum(x.nbytes for x in jax.tree.leaves(state.emb))
  loss = float(acc['loss_sum']) / int(acc['steps'])
  return {
      'rows': rows, 'table_dtype': _CHILD_DTYPE.value, 'step_s': dt, 'examples_per_s': _BATCH.value / dt,
      'median_step_s': float(np.median(rounds)),
      'init_s': init_s, 'compile_s': compile_s, 'loss': loss,
      'table_bytes': emb_bytes,
      'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                        * 1024,
      'device': str(jax.devices()[0].device_kind), 'num_devices':
          jax.device_count(),
  }


def available_bytes() -> int:
  from dlrm_jax.embedding.sharding import planner  # pylint: disable=g-import-not-at-top
  got = planner.host_available_bytes()
  return 1 << 62 if got is None else got


def run_child(r: int, dtype: str) -> dict | None:
  """Runs one (size, table dtype) in a fresh subprocess."""
  cmd = [sys.executable, '-m', 'benchmarks.train_step',
         f'--child_rows={r}', f'--child_dtype={dtype}'] + [
      a for a in sys.argv[1:] if not a.startswith('--rows')]
  env = dict(os.environ)
  if _HUGEPAGES.value:
    env['GLIBC_TUNABLES'] = ':'.join(
        t for t in (env.get('GLIBC_TUNABLES'), 'glibc.malloc.hugetlb=1') if t)
  out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       env=env)
  lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  if out.returncode or not lines:
    print(f'{r:>12,} {dtype} failed (exit {out.returncode}):\n'
          f'{out.stderr[-2000:]}')
    return None
  return json.loads(lines[-1][len('RESULT '):])


def main(argv):
  del argv
  if _CHILD.value:
    print('RESULT ' + json.dumps(run_one(_CHILD.value)), flush=True)
    return
  results = {}
  bytes_per_row = 26 * _DIM.value * 4 * {
      'sgd': 1, 'adagrad': 2, 'rowwise_adagrad': 1, 'adam': 3, 'ftrl': 3}[
          _SPARSE_OPT.value]
  print(f'batch {_BATCH.value}, 26 tables x dim {_DIM.value}, dense MLP '
        f'512-256-{_DIM.value}, final 512-256, sparse optimizer '
        f'{_SPARSE_OPT.value}, arch_with_sparse={_ARCH_WITH_SPARSE.value},'
        f' huge pages {"on" if _HUGEPAGES.value else "off"}')
  print(f'{"rows/table":>12} {"examples/s":>12} {"step ms":>9} '
        f'{"median ms":>10} {"tables GB":>10} {"peak RSS GB":>12} '
        f'{"init s":>7}')
  ratios = []
  for r in (int(float(x)) for x in _ROWS.value):
    need = r * bytes_per_row
    if need > _MEM_FRACTION.value * available_bytes():
      print(f'{r:>12,} skipped: tables and optimizer state need '
            f'{need / 2**30:.1f} GiB, more than {_MEM_FRACTION.value:.0%} of '
            f'the {available_bytes() / 2**30:.1f} GiB available')
      continue
    for dtype in _TABLE_DTYPE.value:
      res = run_child(r, dtype)
      if res is None:
        continue
      if dtype == _TABLE_DTYPE.value[0]:
        results[r] = res
      elif r in results:
        ratios.append((r, dtype, res['step_s'] / results[r]['step_s']))
      tag = '' if len(_TABLE_DTYPE.value) == 1 else f' {dtype}'
      print(f'{r:>12,} {res["examples_per_s"]:>12,.0f} '
            f'{res["step_s"] * 1e3:>9.1f} {res["median_step_s"] * 1e3:>10.1f} '
            f'{res["table_bytes"] / 1e9:>10.2f} '
            f'{res["peak_rss_bytes"] / 1e9:>12.2f} {res["init_s"]:>7.1f}'
            f'{tag}', flush=True)
  for r, dtype, ratio in ratios:
    print(f'step_time_{dtype}_over_{_TABLE_DTYPE.value[0]}_{r}={ratio:.3f}')
  if results:
    print(f'device: {next(iter(results.values()))["device"]}')
  if 10_000 in results and 1_000_000 in results:
    ratio = results[1_000_000]['step_s'] / results[10_000]['step_s']
    print(f'step_time_ratio_1e6_over_1e4={ratio:.3f}')
  else:
    print('step_time_ratio_1e6_over_1e4=nan')


if __name__ == '__main__':
  cli.run_app(main)
