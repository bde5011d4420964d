"""Checks of the config's numbers, and command-line parsing of list fields.

`validate_numbers` checks every integer and float field of the loop, data,
mesh and embedding-budget groups (model and optimizer fields are checked
where they are built), with the field's name, its value and the rule; it is
the one place these rules live, and `config_lib.build` calls it. `ListFlagParser` lets `--config.<field>=[32,8]` (or `=32,8`)
override a list field, which ml_collections' config_flags cannot by itself
(it parses tuples only); `main.py` registers it.
"""

from __future__ import annotations

import ast
from typing import Any, Callable

from absl import flags
from ml_collections import config_flags

# (path, type, rule as text, test). Types: 'int' (not bool), 'float' (int or
# float), each optionally 'or None'.
_RULES: list[tuple[str, str, str, Callable[[Any], bool]]] = [
    ('seed', 'int', 'an integer', lambda v: True),
    ('batch_size', 'int', 'at least 1', lambda v: v >= 1),
    ('eval_batch_size', 'int', 'at least 1', lambda v: v >= 1),
    ('num_train_steps', 'int',
     '-1 (num_epochs over the train rows) or at least 1',
     lambda v: v == -1 or v >= 1),
    ('num_epochs', 'float', 'more than 0', lambda v: v > 0),
    ('log_every_steps', 'int', 'at least 1', lambda v: v >= 1),
    ('eval_every_steps', 'int', 'at least 1', lambda v: v >= 1),
    ('checkpoint_every_steps', 'int', 'at least 1', lambda v: v >= 1),
    ('max_to_keep', 'int', 'at least 1 (the checkpoint to resume from)',
     lambda v: v >= 1),
    ('min_train_steps', 'int', 'at least 0 (0: off)', lambda v: v >= 0),
    ('target_auc', 'float', 'an AUC in [0, 1] (0: no target)',
     lambda v: 0 <= v <= 1),
    ('data.eval_fraction', 'float', 'in [0, 1)', lambda v: 0 <= v < 1),
    ('data.shuffle_buffer', 'int', 'at least 0 (0: no shuffle window)',
     lambda v: v >= 0),
    ('data.chunk_rows', 'int', 'at least 1', lambda v: v >= 1),
    ('data.num_threads', 'int', 'at least 0', lambda v: v >= 0),
    ('data.prefetch', 'int', 'at least 0', lambda v: v >= 0),
    ('data.synthetic.num_train', 'int', 'at least 1', lambda v: v >= 1),
    ('data.synthetic.num_eval', 'int', 'at least 0', lambda v: v >= 0),
    ('data.synthetic.zipf_exponent', 'float', 'more than 0',
     lambda v: v > 0),
    ('data.synthetic.logit_scale', 'float', 'at least 0', lambda v: v >= 0),
    ('mesh.data', 'int', '-1 (the rest) or at least 1',
     lambda v: v == -1 or v >= 1),
    ('mesh.model', 'int', '-1 (the rest) or at least 1',
     lambda v: v == -1 or v >= 1),
    ('embedding.replicate_bytes', 'int', 'at least 0', lambda v: v >= 0),
    ('embedding.row_group_size', 'int', 'at least 0 (0: off)',
     lambda v: v >= 0),
    ('embedding.device_memory_gb', 'float or None', 'more than 0',
     lambda v: v > 0),
    ('embedding.init_scale', 'float or None', 'more than 0',
     lambda v: v > 0),
]

_MISSING = object()


def _get(config, path: str):
  node = config
  for part in path.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def validate_numbers(config) -> None:
  """Raises ValueError naming the first number field that breaks its rule.

  Fields absent from the config are passed over (configs of other files).
  """
  for path, kind, rule, test in _RULES:
    v = _get(config, path)
    if v is _MISSING or (v is None and kind.endswith('or None')):
      continue
    base = kind.split()[0]
    is_int = isinstance(v, int) and not isinstance(v, bool)
    ok_type = is_int if base == 'int' else (
        is_int or isinstance(v, float))
    if not ok_type:
      want = 'an integer' if base == 'int' else 'a number'
      raise ValueError(f'config.{path} ({v!r}) must be {want}'
                       + (f', {rule}' if rule != 'an integer' else '') + '.')
    if not test(v):
      raise ValueError(f'config.{path} ({v!r}) must be {rule}.')


class ListFlagParser(flags.ArgumentParser):
  """`[32, 8]`, `(32, 8)`, `32,8`, `32` or `[]` -> a list of literals
  (numbers, strings, booleans; a bare word is a string)."""

  syntactic_help = 'a list: [a,b,...] or a,b,...'

  def parse(self, argument):
    if isinstance(argument, (list, tuple)):
      return list(argument)
    text = str(argument).strip()
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    else:
      if isinstance(value, (list, tuple)):
        return list(value)
      if isinstance(value, (int, float, str, bool)):
        return [value]
    if text[:1] in '[(' and text[-1:] in '])':
      text = text[1:-1]
    if not text.strip():
      return []
    out = []
    for item in text.split(','):
      item = item.strip()
      if not item:
        raise ValueError(f'empty item in the list {argument!r}')
      try:
        out.append(ast.literal_eval(item))
      except (ValueError, SyntaxError):
        out.append(item)
    return out

  def flag_type(self):
    return 'list'


def register_list_parser() -> None:
  """Makes config_flags parse list fields with ListFlagParser."""
  config_flags.register_flag_parser_for_type(list, ListFlagParser())
