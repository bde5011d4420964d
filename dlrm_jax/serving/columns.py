"""Serving requests in the data's own schema: feature dicts by column name.

A tabular export (`config.data.source='table'`, see `dlrm_jax.data.table`)
takes one input per column its features read (`runtime.column_inputs`).
`ColumnEncoder` turns requests into them with the training reader's own
functions (`table.encode`, `encode_bag`, `encode_flags`, hence
`hash_strings`), so training and serving share one id mapping:

  {"site_id": "1fbe01fe", "C1": 1005, "hour": "14102100", ...}

Each value is taken as the text a CSV field would hold: a string as it is,
an integer as its decimal text (1005 is "1005"), a number for a 'float'
column as its text. null or "" is a missing value, as an empty field is.
A bag column takes a JSON list of values or one string joined by its
separator ("a|b|c"); flag bags (`flag_columns`) take their 0/1 columns.
Keys the model does not read (the label, `id`, ...) are ignored.

Side-table columns (e.g. MovieLens' genres and age, by `item_id` and
`user_id`): give the join key and the side table (copied into the export,
`side/`) is joined through `table.load_side_tables` exactly as in training,
an unknown key giving missing values; or give the side columns themselves,
which then win over the join. A row needs the key only for the side
columns it does not give.

Errors: a request column that is absent, or a value that does not parse for
its column's kind, raises `ColumnError`, one line naming the instance and
the column, e.g. `instances[3].C1 ('x') is not a decimal integer.`
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from dlrm_jax.data import table


class ColumnError(ValueError):
  """A request value that cannot be encoded.

  Attributes:
    row: the index of the offending instance.
  """

  def __init__(self, message: str, row: int):
    super().__init__(message)
    self.row = row


def reads_of(columns: Sequence[dict[str, Any]]) -> tuple[table.ColumnRead,
                                                           ...]:
  """The `ColumnRead`s of signature.json's 'columns'."""
  return tuple(table.ColumnRead(
      c['name'], c['kind'], separator=c['separator'], max_len=c['max_len'],
      flags=tuple(c['flags']) if c['flags'] else None,
      feature=c.get('feature', '')) for c in columns)


def side_tables_of(export_dir: str, sides: Sequence[dict[str, Any]]
                   ) -> tuple[table.SideTable, ...]:
  """The `SideTable`s of signature.json's 'side_tables' (files in the
  export)."""
  out = []
  for s in sides:
    f = s['format']
    out.append(table.SideTable(
        s['name'], os.path.join(export_dir, s['file']), s['key'],
        s['join_on'], table.TableFormat(
            format=f['format'], delimiter=f['delimiter'], header=f['header'],
            columns=tuple(f['columns']), encoding=f['encoding'],
            quote_char=f['quote_char'])))
  return tuple(out)


def _text(v, read: table.ColumnRead, column: str, i: int) -> str | None:
  """One request value as the text of a CSV field (None: missing)."""
  if v is None or isinstance(v, str):
    return v
  if isinstance(v, int) and not isinstance(v, bool):
    return str(v)
  if isinstance(v, float) and read.kind in ('float', 'flags'):
    return repr(v)
  what = ('a number, a string or null' if read.kind in ('float', 'flags')
          else 'a string, an integer or null')
  raise ColumnError(f'instances[{i}].{column} ({v!r}) must be {what}.', i)


class ColumnEncoder:
  """Encodes feature dicts into a tabular export's inputs.

  Attributes:
    reads: the columns the features read.
    side_tables: the side tables, joined on their keys.
    side: the loaded side tables, by name.
  """

  def __init__(self, reads: Sequence[table.ColumnRead],
               side_tables: Sequence[table.SideTable] = ()):
    """Loads the side tables.

    Args:
      reads: the column reads (`TableSpec.reads`).
      side_tables: the side tables (`TableSpec.side_tables`).

    Raises:
      ValueError: a side table cannot be read.
    """
    self.reads = tuple(reads)
    self.side_tables = tuple(side_tables)
    self.side = table.load_side_tables(table.TableSpec(
        table.TableFormat(), None, self.reads, self.side_tables))
    self._side_of = {}  # read name -> its side table
    for t in self.side_tables:
      for name in self.side[t.name].values:
        self._side_of.setdefault(name, t)

  @classmethod
  def from_spec(cls, spec: table.TableSpec) -> ColumnEncoder:
    """The encoder of a run's `spec.data.table`."""
    return cls(spec.reads, spec.side_tables)

  @classmethod
  def from_export(cls, export_dir: str, signature: dict[str, Any]
                  ) -> ColumnEncoder:
    """The encoder of a tabular export (its signature.json)."""
    return cls(reads_of(signature['columns']),
               side_tables_of(export_dir, signature.get('side_tables', [])))

  @property
  def columns(self) -> list[str]:
    """The request columns, side-table columns included."""
    return list(dict.fromkeys(c for r in self.reads for c in r.sources))

  def encode(self, instances: Sequence[Any]) -> dict[str, np.ndarray]:
    """Encodes instances into the export's inputs.

    Args:
      instances: one dict per row, keyed by column name.

    Returns:
      The inputs of `runtime.column_inputs`: float32 `[B]` per 'float' read;
      uint32 `[B]` or `[B, L]` values and bool `<column>:present` masks.

    Raises:
      ColumnError: an instance is not a dict, a column is absent (and no
        join key gives it), or a value does not parse; the first such
        instance, in one line.
    """
    n = len(instances)
    for i, inst in enumerate(instances):
      if not isinstance(inst, dict):
        raise ColumnError(f'instances[{i}] must be an object of columns, got'
                          f' {type(inst).__name__}.', i)
    joined = self._join(instances)
    errors: list[tuple[int, str]] = []
    out: dict[str, np.ndarray] = {}
    for r in self.reads:
      given = np.array([all(c in inst for c in r.sources)
                        for inst in instances], bool)
      side = self._side_of.get(r.name)
      if side is not None:
        lacking = ~given & ~np.array([side.join_on in inst
                                      for inst in instances], bool)
      else:
        lacking = ~given
      for i in np.flatnonzero(lacking):
        c = next(c for c in r.sources if c not in instances[i])
        hint = (f' (give it, or the join key {side.join_on!r} of side table'
                f' {side.name!r})' if side is not None else '')
        errors.append((int(i), f'instances[{i}]: column {c!r} is'
                       f' missing{hint}.'))
      if side is not None:
        values = joined[side.name][r.name].copy()
      else:
        shape = (n, r.max_len) if r.is_bag else (n,)
        values = np.full(shape, 0.0 if r.kind == 'float' else -1,
                         np.float64 if r.kind == 'float' else np.int64)
      rows = np.flatnonzero(given)
      if len(rows):
        try:
          got, bad, reason = self._encode_rows(r, [instances[i] for i in rows],
                                               rows)
        except ColumnError as e:
          errors.append((e.row, str(e)))
        else:
          for k in np.flatnonzero(bad):
            i = int(rows[k])
            c = self._bad_column(r, instances[i])
            errors.append((i, f'instances[{i}].{c}'
                           f' ({instances[i][c]!r}) is not {reason}.'))
          values[rows] = got
      if r.kind == 'float':
        out[r.name] = values.astype(np.float32)
      else:
        out[r.name] = np.where(values >= 0, values, 0).astype(np.uint32)
        out[r.name + ':present'] = values >= 0
    if errors:
      i, message = min(errors, key=lambda e: e[0])
      raise ColumnError(message, i)
    return out

  def _join(self, instances) -> dict[str, dict[str, np.ndarray]]:
    """Each side table's columns, joined on the instances' keys (missing
    where a key is absent, null or unknown)."""
    out = {}
    for t in self.side_tables:
      keys = []
      for i, inst in enumerate(instances):
        v = inst.get(t.join_on)
        if isinstance(v, bool) or not isinstance(v, (str, int, type(None))):
          raise ColumnError(
              f'instances[{i}].{t.join_on} ({v!r}) must be a string, an'
              ' integer or null (the key of side table'
              f' {t.name!r}).', i)
        keys.append(None if v is None else str(v))
      out[t.name] = self.side[t.name].join(pa.array(keys, pa.string()))
    return out

  @staticmethod
  def _bad_column(r: table.ColumnRead, inst: dict) -> str:
    """The first source column of a bad value (for flags, the one that does
    not parse, else the first)."""
    if r.kind != 'flags':
      return r.name
    for c in r.sources:
      _, bad, _ = table.encode(pa.array([_text(inst[c], r, c, 0)],
                                        pa.string()), 'float')
      if bad.any():
        return c
    return r.sources[0]

  def _encode_rows(self, r: table.ColumnRead, insts, rows):
    """Encodes one read's values of some instances, with the reader's
    functions: `(values, bad, reason)` as `table.encode` gives them."""
    if r.kind == 'flags':
      arrays = [pa.array([_text(inst[c], r, c, int(i))
                          for inst, i in zip(insts, rows)], pa.string())
                for c in r.sources]
      return table.encode_flags(arrays, r)
    if not r.is_bag:
      texts = []
      for inst, i in zip(insts, rows):
        v = inst[r.name]
        if isinstance(v, list):
          raise ColumnError(f'instances[{i}].{r.name} is a list, but column'
                            f' {r.name!r} takes one value.', int(i))
        texts.append(_text(v, r, r.name, int(i)))
      return table.encode(pa.array(texts, pa.string()), r.kind)
    # A bag: lists and separator-joined strings, encoded apart and merged.
    is_list = np.array([isinstance(inst[r.name], list) for inst in insts])
    values = np.full((len(insts), r.max_len), -1, np.int64)
    bad = np.zeros(len(insts), bool)
    reason = ''
    for part, mask in ((True, is_list), (False, ~is_list)):
      idx = np.flatnonzero(mask)
      if not len(idx):
        continue
      if part:
        arr = pa.array([[_text(x, r, r.name, int(rows[k]))
                         for x in insts[k][r.name]] for k in idx],
                       pa.list_(pa.string()))
      else:
        arr = pa.array([_text(insts[k][r.name], r, r.name, int(rows[k]))
                        for k in idx], pa.string())
      v, b, reason = table.encode_bag(arr, r)
      values[idx], bad[idx] = v, b
    return values, bad, reason


def score_instances(model, encoder: ColumnEncoder, instances: Sequence[Any],
                    first: int = 0) -> list[float | str]:
  """Scores the valid instances of a tabular export; a bad one does not stop
  the others.

  Args:
    model: the loaded export (`runtime.LoadedModel`).
    encoder: its encoder.
    instances: one dict per row.
    first: the index of `instances[0]` in messages.

  Returns:
    Per instance, its probability or its one-line error,
    `instances[N]...`.
  """
  from dlrm_jax.serving import server  # pylint: disable=g-import-not-at-top
  errors: dict[int, str] = {}
  live = list(range(len(instances)))
  while live:
    try:
      inputs = encoder.encode([instances[i] for i in live])
      break
    except ColumnError as e:
      i = live[e.row]
      errors[i] = str(e).replace(f'instances[{e.row}]',
                                 f'instances[{first + i}]', 1)
      live.remove(i)
  probs = iter(server.padded_scorer(model)(inputs).tolist() if live else [])
  return [errors[i] if i in errors else next(probs)
          for i in range(len(instances))]
