"""Where the train step's time goes, against the floor of its matmuls.

In one process and one run, at `benchmarks.step_shape`'s shape (batch 2048,
26 tables of dim 64, MLPs 13-512-256-64 and 512-256-1, dot interaction, SGD):

  1. times the real train step (`Trainer.train_step`);
  2. times the same step's matrix multiplications alone: every `dot` of the
     step's compiled HLO (forward and backward, the interaction's batched
     `X Xᵀ` included), with its shapes and dimension numbers, run on random
     operands in one jitted function, nothing else;
  3. traces a few steps with `jax.profiler` and prints the top ops (XLA
     thunks, by the fusion or custom call the compiled program runs) with
     their share of the traced time and what each is in the model (the
     `op_name` metadata of the HLO instruction: the Flax module path and the
     jax primitive).

The last line is `step_over_matmul_floor=<ratio>`: the step's time over its
matmuls' time, both the fastest of `--rounds` rounds (the machine may be
shared; medians are printed beside them). 1.0 would mean the step is nothing
but its matrix multiplications.

  python -m benchmarks.step_breakdown
  python -m benchmarks.step_breakdown --rows=1000000 --top=20
  python -m benchmarks.step_breakdown --sparse_optimizer=adagrad

(run from the repository root). It runs unchanged on GPU and TPU, where the
trace names the device kernels' thunks the same way.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import flags
from benchmarks import step_shape
from dlrm_jax import cli

_ROWS = flags.DEFINE_integer('rows', 100_000, 'Rows per table.')
_BATCH = flags.DEFINE_integer('batch', 2048, 'Global batch size.')
_DIM = flags.DEFINE_integer('dim', 64, 'Embedding dim.')
_SPARSE_OPT = flags.DEFINE_string('sparse_optimizer', 'sgd',
                                  'The tables\' optimizer kind.')
_ARCH_WITH_SPARSE = flags.DEFINE_bool(
    'arch_with_sparse', False,
    'Feed the sparse embeddings to the final MLP too (TorchEasyRec\'s'
    ' default); the reference DLRM and TorchRec do not.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds.')
_TRACE_STEPS = flags.DEFINE_integer('trace_steps', 10, 'Steps to trace.')
_TOP = flags.DEFINE_integer('top', 15, 'Ops to list.')
_HUGEPAGES = flags.DEFINE_bool(
    'hugepages', True,
    'Run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (re-executing itself),'
    ' as `benchmarks.train_step` runs each size: the tables on CPU take'
    ' transparent huge pages where the kernel allows them.')

# One HLO instruction: `%name = shape opcode(operands), attrs`.
_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?) ([\w\-]+)\((.*)$')
_OPERAND_SHAPE = re.compile(r'(\w+)\[([\d,]*)\]')
_DIMS = {k: re.compile(k + r'=\{([\d,]*)\}') for k in (
    'lhs_batch_dims', 'rhs_batch_dims', 'lhs_contracting_dims',
    'rhs_contracting_dims')}
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(',') if x)


def hlo_dots(hlo: str) -> list[dict]:
  """Every `dot` of an HLO module's text, fused computations included.

  Args:
    hlo: `compiled.as_text()`.

  Returns:
    One dict per dot: 'name', 'lhs' and 'rhs' (dtype, shape), the four
    dimension-number tuples, 'flops' (2 x output elements x contracted size)
    and 'op_name' (its metadata).
  """
  shapes = {}  # instruction -> (dtype, shape); names are module-unique
  lines = []
  for line in hlo.splitlines():
    m = _INSTR.match(line)
    if m:
      got = _OPERAND_SHAPE.match(m.group(2))
      if got:
        shapes[m.group(1)] = (got.group(1), _ints(got.group(2)))
      lines.append((m, line))
  dots = []
  for m, line in lines:
    if m.group(3) != 'dot':
      continue
    operands = re.findall(r'%([\w.\-]+)', m.group(4).split(')')[0])
    if len(operands) < 2 or not all(o in shapes for o in operands[:2]):
      continue
    (ldt, lhs), (rdt, rhs) = shapes[operands[0]], shapes[operands[1]]
    dims = {k: _ints(r.search(line).group(1)) if r.search(line) else ()
            for k, r in _DIMS.items()}
    contracted = 1
    for d in dims['lhs_contracting_dims']:
      contracted *= lhs[d]
    out = 1
    for d in _ints(_OPERAND_SHAPE.search(m.group(2)).group(2)):
      out *= d
    op = _OP_NAME.search(line)
    dots.append({'name': m.group(1), 'lhs': (ldt, lhs), 'rhs': (rdt, rhs),
                 **dims, 'flops': 2 * out * contracted,
                 'op_name': op.group(1) if op else ''})
  return dots


def hlo_op_names(hlo: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (opcode, metadata op_name), over the whole module."""
  out = {}
  for line in hlo.splitlines():
    m = _INSTR.match(line)
    if m:
      op = _OP_NAME.search(line)
      out[m.group(1)] = (m.group(3), op.group(1) if op else '')
  return out


def matmul_fn(dots: list[dict]):
  """A jitted function running each dot once on its operands.

  Returns the function and a list of its random operands.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  keys = jax.random.split(jax.random.key(0), 2 * len(dots))
  args = []
  for i, d in enumerate(dots):
    for j, side in enumerate(('lhs', 'rhs')):
      dtype, shape = d[side]
      dtype = {'f32': jnp.float32, 'bf16': jnp.bfloat16,
               'f16': jnp.float16}.get(dtype, jnp.float32)
      args.append(jax.random.normal(keys[2 * i + j], shape, dtype))

  def run(*operands):
    outs = []
    for i, d in enumerate(dots):
      dn = ((d['lhs_contracting_dims'], d['rhs_contracting_dims']),
            (d['lhs_batch_dims'], d['rhs_batch_dims']))
      outs.append(jax.lax.dot_general(operands[2 * i], operands[2 * i + 1],
                                      dn, preferred_element_type=jnp.float32))
    return outs

  return jax.jit(run), args


def _time(fn, rounds: int, steps: int) -> tuple[float, float]:
  """Fastest and median seconds per call of `fn()` over rounds of steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / steps)
  return min(times), float(np.median(times))


def trace_ops(step, steps: int) -> dict[str, float]:
  """Traces `steps` calls of `step()`; returns thunk name -> total us."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(step())
  log_dir = tempfile.mkdtemp(prefix='step_breakdown_')
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for _ in range(steps):
      out = step()
    jax.block_until_ready(out)
  path = glob.glob(f'{log_dir}/**/perfetto_trace.json.gz', recursive=True)
  if not path:
    return {}
  with gzip.open(path[0]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  # The runtime's own events (PjRt, Python) are not ops of the program.
  skip = re.compile(r'^(\$|Pjit|Pjrt|PjRt|Common|Thunk|Threadpool|Python|'
                    r'end: |Handle|Allocate|Wait|Parse|TfrtCpu)')
  totals = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and not skip.match(e.get('name', '')):
      totals[e['name']] += float(e.get('dur') or 0.0)
  return dict(totals)


def _where(op_name: str) -> str:
  """A short model location from an op_name: modules and primitive."""
  parts = [p for p in op_name.split('/') if p]
  keep = [re.sub(r'^(jvp|transpose|vmap|checkpoint)\((.*)\)$', r'\2', p)
          for p in parts[1:]]
  return '/'.join(keep[-4:]) if keep else '-'


def main(argv):
  del argv
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if _HUGEPAGES.value and 'glibc.malloc.hugetlb' not in tunables:
    env = dict(os.environ, GLIBC_TUNABLES=':'.join(
        t for t in (tunables, 'glibc.malloc.hugetlb=1') if t))
    os.execve(sys.executable, [sys.executable, '-m', 'benchmarks.step_breakdown']
              + sys.argv[1:], env)
  import jax  # pylint: disable=g-import-not-at-top
  from dlrm_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  rows, batch = _ROWS.value, _BATCH.value
  config = step_shape.config_for(rows, batch=batch, dim=_DIM.value,
                                 arch_with_sparse=_ARCH_WITH_SPARSE.value,
                                 sparse_optimizer=_SPARSE_OPT.value)
  trainer = trainer_lib.Trainer(config)
  state = trainer.init_state(0)
  batches = step_shape.random_batches(trainer, rows, batch)
  acc = trainer.zero_metrics()
  hlo = trainer.train_step.lower(state, batches[0], acc).compile().as_text()
  dots = hlo_dots(hlo)
  names = hlo_op_names(hlo)

  box = {'state': state, 'acc': acc, 'i': 0}

  def step():
    box['state'], box['acc'] = trainer.train_step(
        box['state'], batches[box['i'] % len(batches)], box['acc'])
    box['i'] += 1
    return box['acc']

  mm, mm_args = matmul_fn(dots)
  step_best, step_med = _time(step, _ROUNDS.value, _STEPS.value)
  mm_best, mm_med = _time(lambda: mm(*mm_args), _ROUNDS.value, _STEPS.value)
  ops = trace_ops(step, _TRACE_STEPS.value)

  device = jax.devices()[0]
  print(f'device: {device.device_kind} ({device.platform}), {jax.device_count()}'
        f' device(s); batch {batch}, 26 tables x {rows:,} rows x dim'
        f' {_DIM.value}, sparse optimizer {_SPARSE_OPT.value},'
        f' arch_with_sparse={_ARCH_WITH_SPARSE.value}')
  gflop = sum(d['flops'] for d in dots) / 1e9
  print(f'train step     {step_best * 1e3:8.2f} ms  (median'
        f' {step_med * 1e3:.2f})  {batch / step_best:,.0f} examples/s')
  print(f'its {len(dots)} dots  {mm_best * 1e3:8.2f} ms  (median'
        f' {mm_med * 1e3:.2f})  {gflop:.2f} GFLOP,'
        f' {gflop / mm_best:.0f} GFLOP/s')
  print()
  print(f'{"dot":<14} {"lhs":<18} {"rhs":<18} {"MFLOP":>7}  where')
  for d in sorted(dots, key=lambda d: -d['flops']):
    print(f'{d["name"][:14]:<14} {str(list(d["lhs"][1])):<18}'
          f' {str(list(d["rhs"][1])):<18} {d["flops"] / 1e6:7.0f} '
          f' {_where(d["op_name"])}')
  total = sum(ops.values())
  if total:
    per_step = total / _TRACE_STEPS.value / 1e3
    print()
    print(f'top ops of the traced step ({per_step:.2f} ms of thunks per step'
          f' over {_TRACE_STEPS.value} steps; shares of that time):')
    print(f'{"op":<34} {"ms/step":>8} {"share":>6}  {"kind":<14} where')
    for name, us in sorted(ops.items(), key=lambda kv: -kv[1])[:_TOP.value]:
      kind, op_name = names.get(name, ('?', ''))
      print(f'{name[:34]:<34} {us / _TRACE_STEPS.value / 1e3:8.2f}'
            f' {us / total:6.1%}  {kind[:14]:<14} {_where(op_name)}')
  else:
    print('(the profiler trace held no op events on this backend)')
  print(f'step_over_matmul_floor={step_best / mm_best:.3f}')


if __name__ == '__main__':
  cli.run_app(main)
