"""Prints the longest functions in a package, with their lengths in lines.

Usage: python tools/function_lengths.py [--top 5] [dlrm_jax]

Length is `end_lineno - lineno + 1` of each `def` (decorators excluded), as
`ast` reports it; nested functions are counted on their own and inside their
parent.
"""

import argparse
import ast
import pathlib


def function_lengths(root):
  """[(lines, 'path:line name')] of every function in `root` (a file or a
  folder of .py files), longest first."""
  rows = []
  root = pathlib.Path(root)
  paths = [root] if root.is_file() else sorted(root.rglob('*.py'))
  for path in paths:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        rows.append((node.end_lineno - node.lineno + 1,
                     f'{path}:{node.lineno} {node.name}'))
  return sorted(rows, reverse=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('root', nargs='?', default='dlrm_jax')
  parser.add_argument('--top', type=int, default=5)
  args = parser.parse_args()
  for length, where in function_lengths(args.root)[:args.top]:
    print(f'{length:5d}  {where}')


if __name__ == '__main__':
  main()
