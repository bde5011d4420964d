"""Outcome counts of the scoring-path row parsers on fuzzed lines.

  python benchmarks/row_parser_fuzz.py [--n=1000] [--seed=0] [--before=REV]

Classifies each of the fuzzed lines of tests/row_fuzz.py by what a parser
did with it, judged by the plain reference there (labeled layout, the
export's int32 ints):

  before, parse_rows:  `export_runtime.parse_rows` as of git REV, one line
                       per call (it stops at the first bad row of a batch);
  before, serve_stdin: that REV's `examples/serve_stdin.py` path: stdin in
                       text mode (UTF-8, universal newlines), blank lines
                       dropped, batches of 1024 rows numbered from 1;
  after:               `export_runtime.parse_rows_checked` on all lines (what
                       `parse_rows`, `score_lines` and serve_stdin use).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import types

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import numpy as np  # pylint: disable=g-import-not-at-top

from dlrm_jax.serving import runtime as export_runtime  # pylint: disable=g-import-not-at-top
from tests import row_fuzz  # pylint: disable=g-import-not-at-top

OUTCOMES = (
    'valid, scored right',
    'valid, rejected',
    'valid, scored with a wrong value',
    'malformed, scored anyway',
    'malformed, error names the row and the field',
    'malformed, error without the right row or field',
    'crash (not a ValueError)',
    'dropped or split (later scores move)',
)


# The module's path, now and before the layout of issue 21 (882e564).
_RUNTIME_PATHS = ('dlrm_jax/serving/runtime.py', 'dlrm_jax/export_runtime.py')


def _old_parse_rows(rev: str):
  for path in _RUNTIME_PATHS:
    out = subprocess.run(['git', 'show', f'{rev}:{path}'],
                         capture_output=True, text=True, check=False,
                         cwd=_ROOT)
    if not out.returncode:
      break
  else:
    raise ValueError(f'--before={rev}: no {" or ".join(_RUNTIME_PATHS)} at'
                     f' that revision: {out.stderr.strip()}')
  src = out.stdout
  mod = types.ModuleType('old_export_runtime')
  exec(compile(src, 'old_export_runtime.py', 'exec'), mod.__dict__)  # pylint: disable=exec-used
  return mod.parse_rows


def _judge(want, got, err, row: int) -> str:
  """got: (ints, cats, present) of an accepted line; err: the message."""
  if got is not None:
    if want[0] == 'bad':
      return 'malformed, scored anyway'
    cats = np.array(want[3])
    same = (np.array_equal(got[0], want[2]) and
            np.array_equal(got[2], cats >= 0) and
            np.array_equal(got[1], np.where(cats >= 0, cats, 0)))
    return 'valid, scored right' if same else 'valid, scored with a wrong value'
  if want[0] == 'ok':
    return 'valid, rejected'
  named = re.match(rf'row {row}: ', err) and (
      not want[1] or re.match(rf'row {row}: {want[1]}\b', err))
  return ('malformed, error names the row and the field' if named else
          'malformed, error without the right row or field')


def _call_old(parse, text: str):
  try:
    r = parse([text])
    return (r['int'][0], r['cat'][0], r['cat_present'][0]), None
  except ValueError as e:
    return None, str(e)


def before_parse_rows(lines, parse) -> collections.Counter:
  out = collections.Counter()
  for line in lines:
    want = row_fuzz.reference(line, int32=True)
    try:
      got, err = _call_old(parse, line.decode('utf-8', 'surrogateescape'))
    except Exception:  # pylint: disable=broad-except
      out['crash (not a ValueError)'] += 1
      continue
    out[_judge(want, got, err, 1)] += 1
  return out


def before_serve_stdin(lines, parse, batch: int = 1024) -> collections.Counter:
  out = collections.Counter()
  kept = 0
  for i, line in enumerate(lines):
    want = row_fuzz.reference(line, int32=True)
    try:
      text = line.decode('utf-8')
    except UnicodeDecodeError:
      out['crash (not a ValueError)'] += 1  # Text-mode stdin dies.
      continue
    body = row_fuzz._strip_end(line)  # pylint: disable=protected-access
    if b'\r' in body or b'\n' in body:
      out['dropped or split (later scores move)'] += 1  # Universal newlines.
      continue
    if not text.strip():
      out['dropped or split (later scores move)'] += 1
      continue
    kept += 1
    try:
      got, err = _call_old(parse, text.rstrip('\r\n') + '\n')
    except Exception:  # pylint: disable=broad-except
      out['crash (not a ValueError)'] += 1
      continue
    if err is not None:  # Numbered within its batch of kept lines.
      err = re.sub(r'^row 1:', f'row {(kept - 1) % batch + 1}:', err)
    out[_judge(want, got, err, i + 1)] += 1  # Right: its line on stdin.
  return out


def after(lines) -> collections.Counter:
  out = collections.Counter()
  inputs, errors = export_runtime.parse_rows_checked(lines)
  k = 0
  for i, (line, err) in enumerate(zip(lines, errors)):
    want = row_fuzz.reference(line, int32=True)
    got = None
    if err is None:
      got = (inputs['int'][k], inputs['cat'][k], inputs['cat_present'][k])
      k += 1
    out[_judge(want, got, err, i + 1)] += 1
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--n', type=int, default=1000)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--before', default='4fdc8b6',
                 help='git revision of the old parse_rows')
  args = p.parse_args()
  lines = row_fuzz.fuzzed_lines(args.n, args.seed)
  ref = collections.Counter(row_fuzz.reference(l, int32=True)[0]
                            for l in lines)
  print(f'{len(lines)} fuzzed lines (seed {args.seed}): {ref["ok"]} valid,'
        f' {ref["bad"]} malformed by the reference')
  old = _old_parse_rows(args.before)
  cols = {f'before ({args.before}) parse_rows': before_parse_rows(lines, old),
          f'before ({args.before}) serve_stdin': before_serve_stdin(lines,
                                                                    old),
          'after': after(lines)}
  width = max(map(len, OUTCOMES))
  print(' ' * width + ''.join(f' | {c:>28}' for c in cols))
  for o in OUTCOMES:
    print(f'{o:<{width}}' + ''.join(f' | {c[o]:>28}' for c in cols.values()))
  print(f'{"total":<{width}}' +
        ''.join(f' | {sum(c.values()):>28}' for c in cols.values()))


if __name__ == '__main__':
  main()
