"""Where `dlrm_jax/` still mentions `config.` outside the config package.

  python tools/config_reads.py [root]

Takes the lines that `grep -rn "config\\." dlrm_jax | grep -v dlrm_jax/config/`
lists and sorts them by where the text sits, using Python's tokenizer: in
code (a read of a config object), or only in strings and comments (error
messages naming a config field, docstrings). Prints the code lines and the
last line `config_lines=<all> in_code=<code lines>`.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tokenize

_PATTERN = re.compile(r'config\.')
# The config package reads the config by design: `config/build.py` turns it
# into the RunSpec, `config/checks.py` holds its rules.
_CONFIG_PACKAGE = os.path.join('dlrm_jax', 'config', '')


def _code_lines(text: str) -> set[int]:
  """Line numbers where `config.` appears in code, not in a string/comment."""
  lines = set()
  tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
  for i, tok in enumerate(tokens):
    # `config.x` in code is the NAME `...config` followed by the OP `.`.
    if (tok.type == tokenize.NAME and tok.string.endswith('config') and
        i + 1 < len(tokens) and tokens[i + 1].string == '.'):
      lines.add(tok.start[0])
  return lines


def scan(root: str) -> tuple[int, list[str]]:
  total, in_code = 0, []
  for folder, _, files in os.walk(root):
    for name in sorted(files):
      path = os.path.join(folder, name)
      if not name.endswith('.py') or _CONFIG_PACKAGE in path:
        continue
      with open(path, encoding='utf-8') as f:
        text = f.read()
      code = _code_lines(text)
      for n, line in enumerate(text.splitlines(), 1):
        if _PATTERN.search(line):
          total += 1
          if n in code:
            in_code.append(f'{path}:{n}: {line.strip()}')
  return total, in_code


def main(argv: list[str]) -> None:
  root = argv[1] if len(argv) > 1 else 'dlrm_jax'
  total, in_code = scan(root)
  for line in in_code:
    print(line)
  print(f'config_lines={total} in_code={len(in_code)}')


if __name__ == '__main__':
  main(sys.argv)
