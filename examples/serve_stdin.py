"""Scores Criteo rows from stdin with an exported dlrm_jax model.

  python -m dlrm_jax.main --config=configs/criteo.py --workdir=runs/x \
      --mode=export --output=/tmp/dlrm_export
  cut -f2- test_rows.tsv | python examples/serve_stdin.py /tmp/dlrm_export

Reads Criteo text rows (39 feature fields, or 40 with a label first) from
stdin, scores them in batches of --batch rows, and prints one click
probability per row, in order. It loads the export with jax and numpy only
(`dlrm_jax.export_runtime`): no model code, no flax, no training libraries.
"""

import argparse
import sys

from dlrm_jax import export_runtime


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('export_dir', help='directory written by --mode=export')
  parser.add_argument('--batch', type=int, default=1024,
                      help='rows scored per call')
  args = parser.parse_args()
  model = export_runtime.load_export(args.export_dir)
  lines = []

  def flush():
    rows = export_runtime.parse_rows(lines)
    for p in model.scores(rows['int'], rows['cat'], rows['cat_present']):
      sys.stdout.write(f'{p:.7f}\n')
    lines.clear()

  for line in sys.stdin:
    if line.strip():
      lines.append(line)
    if len(lines) == args.batch:
      flush()
  if lines:
    flush()


if __name__ == '__main__':
  main()
