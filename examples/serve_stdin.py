"""Scores Criteo rows from stdin with an exported dlrm_jax model.

  python -m dlrm_jax.main --config=configs/criteo.py --workdir=runs/x \
      --mode=export --output=/tmp/dlrm_export
  cut -f2- test_rows.tsv | python examples/serve_stdin.py /tmp/dlrm_export

Reads Criteo text rows (39 feature fields, or 40 with a label first; lines
end at \\n, \\r\\n or \\r) from stdin, scores them in batches of --batch rows,
and prints one line per input line, in order: its click probability, or, for
a malformed row (an empty line included), `error<TAB>row N: reason`; the
error goes to stderr too. Rows follow the training reader's rules
(`dlrm_jax.data.rows`). Exits with 1 if any row was malformed, after scoring
all the others. It loads the export with jax and numpy only
(`dlrm_jax.serving.runtime`): no model code, no flax, no training libraries.

A tabular export (`config.data.source='table'`) reads JSON lines instead,
one object keyed by column name each (`dlrm_jax.serving.columns`, as the
HTTP server takes them), and prints its probability or
`error<TAB>instances[N]...` (N counted from 0).
"""

import argparse
import json
import sys

from dlrm_jax.serving import runtime as export_runtime
from dlrm_jax.data import rows as rows_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('export_dir', help='directory written by --mode=export')
  parser.add_argument('--batch', type=int, default=1024,
                      help='rows scored per call')
  parser.add_argument('--layout', choices=('auto', 'labeled', 'unlabeled'),
                      default='auto',
                      help='40 fields with a label first, 39 without, or the'
                      ' layout of the first row of 39 or 40 fields')
  args = parser.parse_args()
  if args.batch < 1:
    parser.error(f'--batch ({args.batch}) must be at least 1')
  model = export_runtime.load_export(args.export_dir)
  if model.is_table:
    sys.exit(serve_instances(model, args))
  labeled = {'auto': None, 'labeled': True, 'unlabeled': False}[args.layout]
  lines, done, bad = [], 0, 0

  def flush():
    nonlocal labeled, done, bad
    if labeled is None:  # The first row of 39 or 40 fields sets the layout.
      labeled = next((l for l in map(rows_lib.layout_of, lines)
                      if l is not None), None)
    out = export_runtime.score_lines(model, lines, labeled=labeled,
                                     first_row=done + 1)
    for r in out:
      if isinstance(r, str):
        bad += 1
        sys.stdout.write(f'error\t{r}\n')
        sys.stderr.write(f'stdin: {r}\n')
      else:
        sys.stdout.write(f'{r:.7f}\n')
    sys.stdout.flush()
    done += len(lines)
    lines.clear()

  for line in rows_lib.iter_lines(sys.stdin.buffer):
    lines.append(line)
    if len(lines) == args.batch:
      flush()
  if lines:
    flush()
  if bad:
    sys.stderr.write(f'stdin: {bad} of {done} rows malformed, not scored.\n')
    sys.exit(1)


def serve_instances(model, args) -> int:
  """Scores JSON lines of column-named instances; the exit status."""
  from dlrm_jax.serving import columns  # pylint: disable=g-import-not-at-top
  encoder = columns.ColumnEncoder.from_export(args.export_dir,
                                              model.signature)
  batch, done, bad = [], 0, 0

  def flush():
    nonlocal done, bad
    parsed = {}
    for k, line in enumerate(batch):
      try:
        parsed[k] = json.loads(line)
      except ValueError as e:
        parsed[k] = f'instances[{done + k}]: not valid JSON: {e}'
    ok = [k for k in parsed if not isinstance(parsed[k], str)]
    scored = dict(zip(ok, columns.score_instances(
        model, encoder, [parsed[k] for k in ok]))) if ok else {}
    for k in range(len(batch)):
      r = scored.get(k, parsed[k])
      if isinstance(r, str):
        r = r.replace(f'instances[{ok.index(k)}]', f'instances[{done + k}]',
                      1) if k in scored else r
        bad += 1
        sys.stdout.write(f'error\t{r}\n')
        sys.stderr.write(f'stdin: {r}\n')
      else:
        sys.stdout.write(f'{r:.7f}\n')
    sys.stdout.flush()
    done += len(batch)
    batch.clear()

  for line in sys.stdin:
    batch.append(line)
    if len(batch) == args.batch:
      flush()
  if batch:
    flush()
  if bad:
    sys.stderr.write(f'stdin: {bad} of {done} instances malformed, not'
                     ' scored.\n')
    return 1
  return 0


if __name__ == '__main__':
  main()
