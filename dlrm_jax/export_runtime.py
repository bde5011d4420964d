"""Loading and calling a dlrm_jax export, with jax and numpy only.

This file imports nothing else from dlrm_jax, so a serving process needs
neither the model code nor flax: it can even be copied next to the export.
See `dlrm_jax.serving` for what an export holds, and
`examples/serve_stdin.py` for a complete scorer.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

NUM_INT, NUM_CAT = 13, 26
INPUTS = ('int', 'cat', 'cat_present')
_DTYPES = {'int': np.int32, 'cat': np.uint32, 'cat_present': np.bool_}


class LoadedModel:
  """An exported model: `scores(int, cat, cat_present)` and, with
  request-level columns, `scores_tiled(request, candidates)`."""

  def __init__(self, export_dir: str):
    with open(os.path.join(export_dir, 'signature.json')) as f:
      self.signature = json.load(f)
    if self.signature.get('format') != 'dlrm_jax.export':
      raise ValueError(f'{export_dir} is not a dlrm_jax export.')
    with open(os.path.join(export_dir, 'model.stablehlo'), 'rb') as f:
      self._fn = jax.export.deserialize(bytearray(f.read()))
    self._params = load_params(export_dir, self.signature)
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
    """Probabilities of B raw rows."""
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

  def scores_tiled(self, request: dict[str, np.ndarray],
                   candidates: dict[str, np.ndarray]) -> np.ndarray:
    """Probabilities of K candidates of one request.

    `request` holds 'int', 'cat', 'cat_present' for the request-level columns
    only (`[1, n]`), `candidates` the same for the other columns (`[K, m]`);
    the column lists are in `signature['tiled']`.
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
  """The function's parameters, in order, placed on the default device once.

  Version 2 exports list each parameter's file in `param_files`: an entry
  of `params.npz` (`params.npz:p00003`) or a table's `.npy`, read with
  memory mapping, so a table is paged in from disk rather than read whole
  into this process's heap before it goes to the device.
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
  return LoadedModel(export_dir)


def parse_rows(lines: Sequence[str]) -> dict[str, np.ndarray]:
  """Criteo text lines (39 feature fields, or 40 with a label first) ->
  inputs. Pure Python, for small requests."""
  ints = np.zeros((len(lines), NUM_INT), np.int32)
  cat = np.zeros((len(lines), NUM_CAT), np.uint32)
  present = np.zeros((len(lines), NUM_CAT), bool)
  for i, line in enumerate(lines):
    fields = line.rstrip('\n').split('\t')
    if len(fields) == 40:
      fields = fields[1:]
    if len(fields) != 39:
      raise ValueError(f'row {i + 1}: expected 39 or 40 tab-separated'
                       f' fields, got {len(fields)}.')
    for j in range(NUM_INT):
      ints[i, j] = int(fields[j]) if fields[j] else 0
    for j in range(NUM_CAT):
      v = fields[NUM_INT + j]
      if v:
        cat[i, j] = int(v, 16)
        present[i, j] = True
  return {'int': ints, 'cat': cat, 'cat_present': present}

