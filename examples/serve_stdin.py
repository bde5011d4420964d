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
"""

import argparse
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


if __name__ == '__main__':
  main()
