"""Loading and calling a dlrm_jax export, with jax and numpy only.

This file imports nothing else from dlrm_jax but `dlrm_jax.data.rows` (the
row rules, standard library only), so a serving process needs neither the
model code nor flax.
See `dlrm_jax.serving.export` for what an export holds, and
`examples/serve_stdin.py` for a complete scorer.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from dlrm_jax.data import rows as rows_lib

NUM_INT, NUM_CAT = rows_lib.NUM_INT, rows_lib.NUM_CAT
INPUTS = ('int', 'cat', 'cat_present')
_DTYPES = {'int': np.int32, 'cat': np.uint32, 'cat_present': np.bool_}


def column_inputs(reads: Sequence[dict]) -> list[tuple[str, tuple, str]]:
  """The inputs of a tabular export's function, in the order it takes them.

  Args:
    reads: the column reads, as signature.json's 'columns' holds them.

  Returns:
    `(name, shape, dtype)` per input: `(column, ('B',), 'float32')` for a
    'float' read; else `(column, shape, 'uint32')` and
    `(column + ':present', shape, 'bool')`, shape `('B',)`, or
    `('B', max_len)` for a bag.
  """
  out = []
  for r in reads:
    shape = ('B', r['max_len']) if r['bag'] else ('B',)
    if r['kind'] == 'float':
      out.append((r['name'], shape, 'float32'))
    else:
      out.append((r['name'], shape, 'uint32'))
      out.append((r['name'] + ':present', shape, 'bool'))
  return out


class LoadedModel:
  """An exported model, loaded.

  `scores(int, cat, cat_present)` scores rows. An export with request-level
  columns also has `scores_tiled(request, candidates)`.

  Attributes:
    signature: the export's signature.json.
  """

  def __init__(self, export_dir: str):
    """Loads an export.

    Args:
      export_dir: the export directory.

    Raises:
      ValueError: the directory holds no dlrm_jax export.
    """
    with open(os.path.join(export_dir, 'signature.json')) as f:
      self.signature = json.load(f)
    if self.signature.get('format') != 'dlrm_jax.export':
      raise ValueError(f'{export_dir} is not a dlrm_jax export.')
    with open(os.path.join(export_dir, 'model.stablehlo'), 'rb') as f:
      self._fn = jax.export.deserialize(bytearray(f.read()))
    self._params = load_params(export_dir, self.signature)
    self.columns = self.signature.get('columns')
    self.inputs = (column_inputs(self.columns) if self.columns is not None
                   else None)
    self._tiled = None
    tiled_path = os.path.join(export_dir, 'tiled.stablehlo')
    if os.path.exists(tiled_path):
      with open(tiled_path, 'rb') as f:
        self._tiled = jax.export.deserialize(bytearray(f.read()))

  def _check(self, name: str, x, width: int, rows: int | None = None):
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != width or (
        rows is not None and x.shape[0] != rows):
      raise ValueError(
          f'input {name!r} must have shape [{rows if rows else "B"},'
          f' {width}], got {list(x.shape)}.')
    return x.astype(_DTYPES[name.split('_', 1)[-1]
                            if name.startswith(('request_', 'candidate_'))
                            else name])

  def scores(self, int_, cat, cat_present) -> np.ndarray:
    """Scores B raw rows.

    Args:
      int_: the integer columns, `[B, 13]`.
      cat: the categorical columns as unsigned ids, `[B, 26]`.
      cat_present: whether each categorical value is present, `[B, 26]`.

    Returns:
      The probabilities, `[B]`.

    Raises:
      ValueError: a shape is wrong, the inputs disagree on B, or B differs
        from an export's fixed batch size.
    """
    if self.columns is not None:
      raise ValueError(
          'this export reads columns by name (a tabular config): call'
          ' scores_columns with the encoded columns, not int/cat/cat_present.')
    a = self._check('int', int_, NUM_INT)
    b = self._check('cat', cat, NUM_CAT)
    c = self._check('cat_present', cat_present, NUM_CAT)
    if not a.shape[0] == b.shape[0] == c.shape[0]:
      raise ValueError(
          f'inputs disagree on the batch size: int {a.shape[0]}, cat'
          f' {b.shape[0]}, cat_present {c.shape[0]}.')
    fixed = self.signature.get('batch_size')
    if fixed is not None and a.shape[0] != fixed:
      raise ValueError(
          f'this export takes batches of exactly {fixed} rows, got'
          f' {a.shape[0]}; export with a symbolic batch size to take any.')
    return np.asarray(self._fn.call(*self._params, a, b, c))

  @property
  def is_table(self) -> bool:
    """Whether it takes named columns (`scores_columns`)."""
    return self.columns is not None

  def scores_columns(self, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Scores B rows of a tabular export's encoded columns.

    Args:
      columns: one array per input of `self.inputs` (`column_inputs`), as
        `dlrm_jax.serving.columns.ColumnEncoder.encode` gives them.

    Returns:
      The probabilities, `[B]`.

    Raises:
      ValueError: the export is Criteo's, an input is missing, a shape is
        wrong or the inputs disagree on B.
    """
    if self.inputs is None:
      raise ValueError('this export takes int/cat/cat_present: call scores.')
    args, rows = [], None
    for name, shape, dtype in self.inputs:
      if name not in columns:
        raise ValueError(f'input {name!r} is missing.')
      x = np.asarray(columns[name])
      rows = x.shape[0] if rows is None and x.ndim else rows
      if x.ndim != len(shape) or x.shape[0] != rows or (
          tuple(x.shape[1:]) != tuple(shape[1:])):
        raise ValueError(
            f'input {name!r} must have shape {[rows, *shape[1:]]}, got'
            f' {list(x.shape)}.')
      args.append(x.astype(dtype))
    fixed = self.signature.get('batch_size')
    if fixed is not None and rows != fixed:
      raise ValueError(
          f'this export takes batches of exactly {fixed} rows, got {rows};'
          ' export with a symbolic batch size to take any.')
    return np.asarray(self._fn.call(*self._params, *args))

  def scores_tiled(self, request: dict[str, np.ndarray],
                   candidates: dict[str, np.ndarray]) -> np.ndarray:
    """Scores K candidates of one request.

    The column lists are in `signature['tiled']`.

    Args:
      request: 'int', 'cat' and 'cat_present' of the request-level columns
        only, each `[1, n]`.
      candidates: the same for the other columns, each `[K, m]`.

    Returns:
      The probabilities, `[K]`.

    Raises:
      ValueError: the export has no request-level columns, or a shape is
        wrong.
    """
    if self._tiled is None:
      raise ValueError('this export has no request-level columns (tiling).')
    t = self.signature['tiled']
    k = np.asarray(candidates['int']).shape[0]
    args = [
        self._check('request_int', request['int'], len(t['request_int']), 1),
        self._check('request_cat', request['cat'], len(t['request_cat']), 1),
        self._check('request_cat_present', request['cat_present'],
                    len(t['request_cat']), 1),
        self._check('candidate_int', candidates['int'],
                    len(t['candidate_int']), k),
        self._check('candidate_cat', candidates['cat'],
                    len(t['candidate_cat']), k),
        self._check('candidate_cat_present', candidates['cat_present'],
                    len(t['candidate_cat']), k)]
    return np.asarray(self._tiled.call(*self._params, *args))


def load_params(export_dir: str, signature: dict) -> list:
  """Loads the function's parameters, in order, onto the default device once.

  Version 2 exports list each parameter's file in `param_files`. It is an
  entry of `params.npz`, such as `params.npz:p00003`, or a table's `.npy`. A
  `.npy` is read with memory mapping. So a table is paged in from disk, not
  read whole into this process's heap before it goes to the device.

  Args:
    export_dir: the export directory.
    signature: its signature.json.

  Returns:
    The parameters as device arrays.
  """
  files = signature.get('param_files') or [
      f'params.npz:p{i:05d}' for i in range(signature['num_params'])]
  out = []
  with np.load(os.path.join(export_dir, 'params.npz')) as z:
    for rel in files:
      if rel.startswith('params.npz:'):
        out.append(jax.device_put(z[rel.split(':', 1)[1]]))
      else:
        out.append(jax.device_put(np.load(os.path.join(export_dir, rel),
                                          mmap_mode='r')))
  return out


def load_export(export_dir: str) -> LoadedModel:
  """Loads an export.

  Args:
    export_dir: the export directory.

  Returns:
    The LoadedModel.

  Raises:
    ValueError: the directory holds no dlrm_jax export.
  """
  return LoadedModel(export_dir)


class RowError(ValueError):
  """A malformed request row. The message is `row N: reason`."""


def parse_rows_checked(lines: Sequence[str | bytes], *,
                       labeled: bool | None = None, first_row: int = 1
                       ) -> tuple[dict[str, np.ndarray], list[str | None]]:
  """Parses Criteo text rows into inputs, and says each row's error.

  The rules are the training reader's, in `dlrm_jax.data.rows`. Besides, an
  integer must fit the export's int32 input. Every line is a row. An empty
  one is an error, not dropped, so no later row moves.

  Args:
    lines: one row each, str or bytes. A line end at the end is allowed.
    labeled: True for 40 fields with a 0/1 label first, which is checked but
      not used. False for 39 feature fields. None takes the layout of the
      first row of 39 or 40 fields, which every row must then have.
    first_row: the number of `lines[0]` in messages.

  Returns:
    {'int', 'cat', 'cat_present'} of the valid rows in order. And per line,
    None when valid, else `'row N: reason'`.
  """
  if labeled is None:
    for line in lines:
      labeled = rows_lib.layout_of(line)
      if labeled is not None:
        break
  ints, cats, errors = [], [], []
  for i, line in enumerate(lines):
    try:
      if labeled is None:
        n = rows_lib.strip_terminator(rows_lib.to_bytes(line)).count(b'\t')
        raise ValueError(
            rows_lib.EMPTY_LINE if not rows_lib.strip_terminator(
                rows_lib.to_bytes(line)) else
            f'expected 39 or 40 tab-separated fields (unlabeled or labeled),'
            f' got {n + 1}')
      _, row_ints, row_cats = rows_lib.parse_line(line, labeled)
      for name, v in zip(rows_lib.INT_NAMES, row_ints):
        if not -2**31 <= v < 2**31:
          raise ValueError(f'{name} ({v}) is outside int32, the input type of'
                           ' the export')
    except ValueError as e:
      errors.append(f'row {first_row + i}: {e}')
      continue
    errors.append(None)
    ints.append(row_ints)
    cats.append(row_cats)
  cat = np.array(cats, np.int64).reshape(-1, NUM_CAT)
  return {'int': np.array(ints, np.int32).reshape(-1, NUM_INT),
          'cat': np.where(cat >= 0, cat, 0).astype(np.uint32),
          'cat_present': cat >= 0}, errors


def parse_rows(lines: Sequence[str | bytes], *, labeled: bool | None = None
               ) -> dict[str, np.ndarray]:
  """Parses Criteo text rows into inputs, refusing any malformed row.

  A row has 39 feature fields, or 40 with a label first. `parse_rows_checked`
  gives the rules.

  Args:
    lines: one row each, str or bytes.
    labeled: as `parse_rows_checked` takes it.

  Returns:
    {'int', 'cat', 'cat_present'} of the rows.

  Raises:
    RowError: at the first malformed row, as `row N: reason`.
  """
  inputs, errors = parse_rows_checked(lines, labeled=labeled)
  for e in errors:
    if e is not None:
      raise RowError(e)
  return inputs


def score_lines(model: LoadedModel, lines: Sequence[str | bytes], *,
                labeled: bool | None = None, first_row: int = 1
                ) -> list[float | str]:
  """Scores the valid rows of a request. A bad row does not stop the others.

  Args:
    model: the loaded export.
    lines: one row each, str or bytes.
    labeled: as `parse_rows_checked` takes it.
    first_row: the number of `lines[0]` in messages.

  Returns:
    Per line, its probability or its error, `'row N: reason'`.
  """
  inputs, errors = parse_rows_checked(lines, labeled=labeled,
                                      first_row=first_row)
  n = len(inputs['int'])
  probs = np.zeros(0, np.float32)
  if n:
    fixed = model.signature.get('batch_size')
    if fixed is None:
      probs = model.scores(inputs['int'], inputs['cat'], inputs['cat_present'])
    else:  # Whole batches, the last padded with copies of row 0.
      pad = np.concatenate([np.arange(n), np.zeros(-n % fixed, np.int64)])
      padded = {k: v[pad] for k, v in inputs.items()}
      probs = np.concatenate([
          model.scores(*(padded[k][s:s + fixed] for k in INPUTS))
          for s in range(0, len(pad), fixed)])[:n]
  it = iter(probs.tolist())
  return [next(it) if e is None else e for e in errors]
