"""Exported inference: raw Criteo features in, click probability out.

`ServingModel.export` (`dlrm_jax.serving.offline.export` for a trained
model) serializes the inference function with `jax.export` (StableHLO),
preprocessing included, to a directory:

  model.stablehlo   the function, for a fixed or a symbolic batch size
  params.npz        its small parameters (dense weights, id lookup tables)
  tables/           the embedding tables, one `.npy` per table (or per part
                    of an int8 table), streamed from the devices holding
                    them and read back with memory mapping
                    (`dlrm_jax.serving.tables`; `quantize=int8|fp16`)
  signature.json    input names, shapes and dtypes, the file of each
                    parameter in the order the function takes them
                    (`param_files`), and the request-level columns of the
                    tiled function
  tiled.stablehlo   (with request-level features) the tiled function

The function takes, for B rows:
  int:         int32  [B, 13]  Criteo's integer columns, missing written 0
  cat:         uint32 [B, 26]  the categorical hashes (the 8 hex digits)
  cat_present: bool   [B, 26]  False where a categorical value is missing
and returns float32 [B] probabilities. For a config of the tabular source
(`config.data.source='table'`) it takes instead one input per column the
features read (`dlrm_jax.data.table.ColumnRead`), in the order of
`signature['columns']`, encoded on the host by `dlrm_jax.serving.columns`
with the training reader's own functions:
  <column>:         float32 [B] for a 'float' read (missing written 0);
                    uint32 [B] (or [B, L] for a bag) encoded values, else
  <column>:present  bool, the same shape: False where a value is missing
                    (or a bag slot is padding)
and maps them to rows with `FeatureTransform.apply(raw, xp=jnp)`, the
transform of training; the side tables are copied into `side/` for the
host's join. `load_export` loads it with jax and
numpy only (`dlrm_jax.serving.runtime`, a file without other dlrm_jax
imports), checks inputs and calls it.

Inside, each sparse feature's raw value is mapped to a table row as in
training (`sparse_ids`), expanded into its bag for a multi-hot model
(`dlrm_jax.data.multi_hot`), passed through the admission filter, and its
rows are pooled by the table's combiner with the engine's own weights
(`dlrm_jax.embedding.pooling`).

Input tiling (TorchEasyRec's INPUT_TILE): request-level columns (the user's,
the same for every candidate of a request) go in once, as `[1, n]` arrays,
with K candidates for the other columns; their embeddings are looked up once
and tiled. The scores equal those of the untiled function on the full rows.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlrm_jax.data import features as features_lib
from dlrm_jax.data import multi_hot as multi_hot_lib
from dlrm_jax.embedding import pooling
from dlrm_jax.embedding import table_access
from dlrm_jax.serving import tables as export_tables
from dlrm_jax.serving.runtime import INPUTS, NUM_CAT, NUM_INT  # pylint: disable=unused-import
from dlrm_jax.serving.runtime import LoadedModel, load_export, parse_rows  # pylint: disable=unused-import
from dlrm_jax.serving.runtime import column_inputs


class ServingModel:
  """The inference function of a trained model, in plain jax.numpy.

  Attributes:
    trainer: the Trainer it came from.
    transform: the feature transform of the trainer's spec.
    multi_hot: the multi-hot scheme, or None.
    id_tables: per feature name, the table that maps raw values to rows.
    request_columns: the columns the tiled function takes once per request.
    quantize: how the tables are stored: None, 'fp16' or 'int8'.
    params: the pytree of arrays the function takes. `forward` says how.
  """

  def __init__(self, trainer, state, *, id_tables: dict[str, Any] | None = None,
               request_columns: Sequence[str] = (),
               quantize: str | None = None, multi_hot=None,
               admission: dict[str, tuple[np.ndarray, int]] | None = None):
    """Builds it from a Trainer and a TrainState.

    Args:
      trainer: the `dlrm_jax.train.trainer.Trainer`.
      state: its trained state.
      id_tables: per feature name, the sorted raw values, their rows, and the
        row of values not in the table. They map raw hashes to table rows. A
        vocabulary maps an unknown value to the out-of-vocabulary row 1. A
        managed collision maps it to row 0. Other id features use their modulo
        or hash mapping. Missing values always read row 0.
      request_columns: input columns, `int_<i>` or `cat_<j>`, that are the same
        for every candidate of a request. The tiled function takes them once.
      quantize: None, 'fp16' or 'int8'. It says how the tables are stored and
        served, as `dlrm_jax.serving.tables` describes. The in-process scores
        use the same dequantized rows.
      multi_hot: the training data's `loader.MultiHot`, for a model trained on
        synthetic multi-hot bags. The function expands each raw value into the
        same bag, as `dlrm_jax.data.multi_hot` does.
      admission: per feature name, the admitted rows as bool `[num_rows]` and
        the shared row of the others. They come from the run's rare-id
        admission filter, `admission.IdAdmission.admitted_rows`. They apply
        after the id mapping and bag expansion, as in training and eval.

    Raises:
      ValueError: a feature with several ids per example but no multi-hot
        scheme. Or a managed-collision feature without its table in
        `id_tables`, a request column that names no input column, or an
        unknown `quantize`.
    """
    setup = trainer.spec
    self.trainer = trainer
    self.transform = setup.transform
    self.multi_hot = multi_hot
    self._packed_index = {f.name: k for k, f in enumerate(setup.feature_specs)}
    self._table_of = {f.name: f.table for f in setup.feature_specs}
    self._combiner = {t.name: t.combiner for t in setup.tables}
    self.id_tables = dict(id_tables or {})
    data = getattr(setup, 'data', None)
    self.table = data.table if getattr(data, 'source', None) == 'table' else (
        None)
    self._check_sparse_features()
    if self.table is not None and request_columns:
      raise ValueError(
          f'request_columns ({list(request_columns)}): input tiling takes'
          " Criteo's int_<i>/cat_<j> columns; a tabular config has none.")
    for c in request_columns:
      features_lib.parse_input(c, path='request_columns')
    self.request_columns = tuple(request_columns)
    export_tables.check_quantize(quantize)
    self.quantize = quantize
    self._emb = state.emb  # tables are read when needed (see `params`)
    self._small = _small_params(trainer, state, self.id_tables, admission)
    self._params = None

  def _check_sparse_features(self) -> None:
    """Each sparse feature can be computed from one raw value per row (a
    tabular config's bags are inputs themselves)."""
    for f in self.transform.sparse:
      if self.table is not None:
        break
      hot = (1 if self.multi_hot is None else
             self.multi_hot.hotness[self._packed_index[f.name]])
      if f.max_ids != hot:
        raise ValueError(
            f'feature {f.name!r} has max_ids {f.max_ids}: the export takes one'
            ' raw value per feature, expanded into a bag only by the'
            ' synthetic multi-hot scheme (pass multi_hot=).')
    for f in self.transform.sparse:
      if isinstance(f, features_lib.IdFeature) and f.managed_collision and (
          f.name not in self.id_tables):
        raise ValueError(
            f'feature {f.name!r} uses managed collisions: pass its remapper\'s'
            ' table in id_tables.')

  @property
  def params(self) -> dict[str, Any]:
    """The function's parameters, with the tables on the host.

    They serve `__call__`, for small models only. `export` streams the tables
    instead.
    """
    if self._params is None:
      engine, stores = self.trainer.engine, self._stores()
      self._params = dict(self._small, tables={
          t.name: export_tables.quantize_rows(
              np.asarray(stores[t.name].arrays['weights']) if t.name in stores
              else table_access.get_table(engine, self._emb, t.name),
              self.quantize)
          for t in self.trainer.spec.tables})
    return self._params

  def _stores(self) -> dict[str, Any]:
    """The cached tables' stores, flushed: where their rows are."""
    cached = self.trainer.cached
    if not cached:
      return {}
    cached.flush(self._emb, self.trainer.engine)
    return cached.stores

  def _abstract_params(self) -> dict[str, Any]:
    """`params` with ShapeDtypeStructs for the tables (nothing read)."""
    return dict(self._small, tables={
        t.name: export_tables.stored_structs(t, self.quantize)
        for t in self.trainer.spec.tables})

  # --------------------------------------------------------------------------
  # The function.

  def _embedding(self, params, f, ints, cat, present) -> jax.Array:
    """`[B, D]` embedding of one sparse feature of raw rows: its rows, its
    bag's rows pooled by its table's combiner for a multi-hot feature."""
    ids = sparse_ids(f, ints, cat, present, params['id_tables'])
    table = params['tables'][self._table_of[f.name]]
    admitted = params['admission'].get(f.name)
    if f.max_ids == 1:
      return export_tables.take_rows(table, _admit(ids, admitted))
    bag = multi_hot_lib.bags(ids.astype(jnp.int32), self.multi_hot,
                             self._packed_index[f.name])
    bag = _admit(bag, admitted)
    return pooling.pool(export_tables.take_rows(table, bag), bag >= 0,
                        self._combiner[self._table_of[f.name]])

  def _sparse(self, params, ints, cat, present, features):
    """`[B, len(features), D]` embeddings of some sparse features."""
    return jnp.stack([self._embedding(params, f, ints, cat, present)
                      for f in features], axis=1)

  def _dense(self, ints):
    if not self.transform.dense:
      return None
    return jnp.stack([features_lib.normalize(ints[:, int(f.input[4:])],
                                             f.normalizer, jnp)
                      for f in self.transform.dense], axis=1)

  def forward(self, params, ints, cat, present) -> jax.Array:
    """Computes the probabilities of raw rows.

    Args:
      params: the function's parameters, as `params` holds them.
      ints: the integer columns, int32 `[B, 13]`.
      cat: the categorical hashes, uint32 `[B, 26]`.
      present: whether each hash is present, bool `[B, 26]`.

    Returns:
      The probabilities, `[B]`.
    """
    sparse = self._sparse(params, ints, cat, present, self.transform.sparse)
    out = self.trainer.arches.apply(params['variables'], self._dense(ints),
                                   sparse, train=False)
    return out['probs']

  def columns_signature(self) -> list[dict[str, Any]]:
    """The column reads of a tabular config, as signature.json holds them."""
    return [{'name': r.name, 'kind': r.kind, 'separator': r.separator,
             'max_len': r.max_len, 'bag': r.is_bag,
             'flags': list(r.flags) if r.flags else None,
             'feature': r.feature} for r in self.table.reads]

  def forward_columns(self, params, *columns) -> jax.Array:
    """Computes the probabilities of encoded columns (a tabular config).

    Args:
      params: the function's parameters, as `params` holds them.
      *columns: the inputs of `runtime.column_inputs`, in its order: float32
        `[B]` per 'float' read; uint32 `[B]` or `[B, L]` values and their
        bool present mask per other read.

    Returns:
      The probabilities, `[B]`.
    """
    args = dict(zip((n for n, _, _ in column_inputs(
        self.columns_signature())), columns))
    # The id mapping runs on int64 values, -1 missing, as on the host; the
    # inputs stay uint32 so that the export is called without x64.
    with jax.enable_x64(True):
      raw = {}
      for r in self.table.reads:
        if r.kind == 'float':
          raw[r.name] = args[r.name]
        else:
          raw[r.name] = jnp.where(args[r.name + ':present'],
                                  args[r.name].astype(jnp.int64), -1)
      batch = self.transform.apply(raw, xp=jnp)
      ids = batch['ids'].astype(jnp.int32)
      for name, values in batch.get('mc_raw', {}).items():
        ids = self._remap(params, ids, name, values)
      dense = batch.get('dense')
    embs = []
    for f, off in zip(self.transform.sparse, self.transform.id_offsets):
      cols = ids[:, off:off + f.max_ids]
      admitted = params['admission'].get(f.name)
      if admitted is not None:
        cols = jnp.where(cols >= 0, _admit(jnp.maximum(cols, 0), admitted),
                         cols)
      table = params['tables'][self._table_of[f.name]]
      if f.max_ids == 1:
        embs.append(export_tables.take_rows(table, cols[:, 0]))
      else:
        embs.append(pooling.pool(
            export_tables.take_rows(table, jnp.maximum(cols, 0)), cols >= 0,
            self._combiner[self._table_of[f.name]]))
    out = self.trainer.arches.apply(params['variables'], dense,
                                   jnp.stack(embs, axis=1), train=False)
    return out['probs']

  def _remap(self, params, ids, name: str, values):
    """`ids` with a managed-collision feature's columns mapped by its table
    (`[B, L]` int64 raw values, -1 missing or padding)."""
    k = self._packed_index[name]
    off = self.transform.id_offsets[k]
    width = self.transform.id_widths[k]
    keys, rows, unknown = params['id_tables'][name]
    missing = values < 0
    mapped = features_lib.lookup_sorted(
        jnp.where(missing, 0, values).astype(jnp.uint32).reshape(-1), keys,
        rows, unknown, missing.reshape(-1), jnp).reshape(values.shape)
    if width > 1:
      mapped = jnp.where(missing, -1, mapped)
    pad = width - mapped.shape[1]
    if pad:
      mapped = jnp.concatenate(
          [mapped, jnp.full((mapped.shape[0], pad), -1, jnp.int32)], axis=1)
    return ids.at[:, off:off + width].set(mapped.astype(jnp.int32))

  def _split(self, kind: str) -> tuple[list[int], list[int]]:
    """The request-level and the candidate columns of one kind ('int' or
    'cat'), as column numbers."""
    n = NUM_INT if kind == 'int' else NUM_CAT
    req = sorted(int(c.split('_')[1]) for c in self.request_columns
                 if c.startswith(kind + '_'))
    return req, [i for i in range(n) if i not in req]

  def forward_tiled(self, params, req_int, req_cat, req_present, cand_int,
                    cand_cat, cand_present) -> jax.Array:
    """Computes the probabilities of one request and its K candidates.

    Sparse features of request-level columns are looked up once and tiled.

    Args:
      params: the function's parameters.
      req_int: the request's integer columns, `[1, n]`.
      req_cat: the request's categorical hashes, `[1, m]`.
      req_present: whether each of them is present, `[1, m]`.
      cand_int: the candidates' other integer columns, `[K, n']`.
      cand_cat: the candidates' other categorical hashes, `[K, m']`.
      cand_present: whether each of them is present, `[K, m']`.

    Returns:
      The probabilities, `[K]`.
    """
    k = cand_int.shape[0]
    ri, ci = self._split('int')
    rc, cc = self._split('cat')

    def assemble(req, cand, req_cols, cand_cols, n, rows):
      """Puts request and candidate columns back in column order.

      Args:
        req: the request's columns, `[1, len(req_cols)]`.
        cand: the candidates' columns, `[rows, len(cand_cols)]`.
        req_cols: the column numbers of `req`.
        cand_cols: the column numbers of `cand`.
        n: the number of columns.
        rows: the number of rows.

      Returns:
        The full columns, `[rows, n]`.
      """
      full = [None] * n
      for j, c in enumerate(req_cols):
        full[c] = jnp.broadcast_to(req[:, j], (rows,))
      for j, c in enumerate(cand_cols):
        full[c] = cand[:, j]
      return jnp.stack(full, axis=1)

    ints = assemble(req_int, cand_int, ri, ci, NUM_INT, k)
    cat = assemble(req_cat, cand_cat, rc, cc, NUM_CAT, k)
    present = assemble(req_present, cand_present, rc, cc, NUM_CAT, k)
    req_feats = [f for f in self.transform.sparse
                 if f.input in self.request_columns]
    once = {}
    if req_feats:  # the request's own row (candidate columns zero)
      r_int = assemble(req_int, jnp.zeros((1, len(ci)), jnp.int32), ri, ci,
                       NUM_INT, 1)
      r_cat = assemble(req_cat, jnp.zeros((1, len(cc)), jnp.uint32), rc, cc,
                       NUM_CAT, 1)
      r_pre = assemble(req_present, jnp.zeros((1, len(cc)), bool), rc, cc,
                       NUM_CAT, 1)
      emb = self._sparse(params, r_int, r_cat, r_pre, req_feats)  # [1, n, D]
      for j, f in enumerate(req_feats):
        once[f.name] = jnp.broadcast_to(emb[:, j], (k, emb.shape[-1]))
    cand_feats = [f for f in self.transform.sparse if f.name not in once]
    cand_emb = self._sparse(params, ints, cat, present, cand_feats)
    per = dict(once)
    for j, f in enumerate(cand_feats):
      per[f.name] = cand_emb[:, j]
    sparse = jnp.stack([per[f.name] for f in self.transform.sparse], axis=1)
    out = self.trainer.arches.apply(params['variables'], self._dense(ints),
                                   sparse, train=False)
    return out['probs']

  # --------------------------------------------------------------------------
  # In-process scores and the export.

  def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """In-process scores (the reference the export is checked against).

    Args:
      inputs: {'int', 'cat', 'cat_present'}, or for a tabular config the
        encoded columns (`dlrm_jax.serving.columns.ColumnEncoder`).

    Returns:
      The probabilities, `[B]`.
    """
    if self.table is not None:
      names = [n for n, _, _ in column_inputs(self.columns_signature())]
      return np.asarray(jax.jit(self.forward_columns)(
          self.params, *(jnp.asarray(inputs[k]) for k in names)))
    return np.asarray(jax.jit(self.forward)(
        self.params, *(jnp.asarray(inputs[k]) for k in INPUTS)))

  def export(self, out_dir: str, batch_size: int | None = None) -> str:
    """Writes the export directory that the module docstring describes.

    With several processes, it is collective. Every process calls it and
    writes the table rows its devices hold. Process 0 writes the other files.

    Args:
      out_dir: the directory. It is created if missing.
      batch_size: the function's fixed batch size. None makes it symbolic.

    Returns:
      `out_dir`.
    """
    os.makedirs(out_dir, exist_ok=True)
    chief = jax.process_index() == 0
    leaves, treedef = jax.tree.flatten(self._abstract_params())
    b = jax.export.symbolic_shape('b')[0] if batch_size is None else int(
        batch_size)
    if self.table is not None:
      exported = _export(self.forward_columns, leaves, treedef,
                         _column_specs(b, self.columns_signature()))
    else:
      exported = _export(self.forward, leaves, treedef,
                         _row_specs(b, NUM_INT, NUM_CAT))
    if chief:
      _write(os.path.join(out_dir, 'model.stablehlo'), exported.serialize())
    table_files = export_tables.write_tables(self.trainer.engine, self._emb,
                                             out_dir, self.quantize,
                                             stores=self._stores())
    files = _param_files(leaves, treedef, table_files)
    sig = self._signature(len(leaves), batch_size, files)
    if self.request_columns:
      (ri, ci), (rc, cc) = self._split('int'), self._split('cat')
      k = jax.export.symbolic_shape('k')[0]
      tiled = _export(self.forward_tiled, leaves, treedef,
                      _row_specs(1, len(ri), len(rc)) +
                      _row_specs(k, len(ci), len(cc)))
      if chief:
        _write(os.path.join(out_dir, 'tiled.stablehlo'), tiled.serialize())
      sig['tiled'] = {'request_int': ri, 'request_cat': rc,
                      'candidate_int': ci, 'candidate_cat': cc}
    if self.table is not None:
      sig['inputs'] = {n: [*shape, dtype] for n, shape, dtype in
                       column_inputs(self.columns_signature())}
      sig['source'] = 'table'
      sig['columns'] = self.columns_signature()
      sig['side_tables'] = _side_tables(self.table, out_dir, chief)
    if chief:
      _write_small_params(out_dir, leaves, files)
      with open(os.path.join(out_dir, 'signature.json'), 'w') as f:
        json.dump(sig, f, indent=2)
    return out_dir

  def _signature(self, num_params: int, batch_size: int | None,
                 files: list[str]) -> dict[str, Any]:
    """signature.json's contents, but for the tiled function's columns."""
    return {'format': 'dlrm_jax.export', 'version': 2,
            'num_params': num_params, 'batch_size': batch_size,
            'quantize': self.quantize, 'param_files': files,
            'inputs': {'int': ['B', NUM_INT, 'int32'],
                       'cat': ['B', NUM_CAT, 'uint32'],
                       'cat_present': ['B', NUM_CAT, 'bool']},
            'output': ['B', 'float32'],
            'request_columns': list(self.request_columns)}


def _small_params(trainer, state, id_tables, admission) -> dict[str, Any]:
  """The function's parameters but the tables, on the host: the dense
  variables, the id tables and the admission masks."""
  variables = {'params': state.params}
  if trainer.has_bn:
    variables['batch_stats'] = state.batch_stats
  return {
      'variables': jax.device_get(variables),
      'id_tables': {k: (np.asarray(v[0], np.uint32),
                        np.asarray(v[1], np.int32),
                        np.asarray(v[2], np.int32))
                    for k, v in id_tables.items()},
      'admission': {k: (np.asarray(mask, bool), np.asarray(oov, np.int32))
                    for k, (mask, oov) in (admission or {}).items()},
  }


def _row_specs(rows, num_int: int, num_cat: int) -> list[jax.ShapeDtypeStruct]:
  """The (int, cat, cat_present) inputs of `rows` rows."""
  return [jax.ShapeDtypeStruct((rows, num_int), np.int32),
          jax.ShapeDtypeStruct((rows, num_cat), np.uint32),
          jax.ShapeDtypeStruct((rows, num_cat), np.bool_)]


def _column_specs(rows, reads: list[dict[str, Any]]
                  ) -> list[jax.ShapeDtypeStruct]:
  """The column inputs of `rows` rows (`runtime.column_inputs`)."""
  return [jax.ShapeDtypeStruct((rows,) + tuple(shape[1:]), np.dtype(dtype))
          for _, shape, dtype in column_inputs(reads)]


def _side_tables(spec, out_dir: str, chief: bool) -> list[dict[str, Any]]:
  """Copies a table spec's side tables into `out_dir/side/` (process 0) and
  says how to read them back (signature.json's 'side_tables')."""
  out = []
  for t in spec.side_tables:
    rel = os.path.join('side', t.name + '_' + os.path.basename(t.path))
    if chief:
      os.makedirs(os.path.join(out_dir, 'side'), exist_ok=True)
      shutil.copyfile(t.path, os.path.join(out_dir, rel))
    f = t.format
    out.append({'name': t.name, 'file': rel, 'key': t.key,
                'join_on': t.join_on,
                'format': {'format': f.format, 'delimiter': f.delimiter,
                           'header': f.header, 'columns': list(f.columns),
                           'encoding': f.encoding,
                           'quote_char': f.quote_char}})
  return out


def _export(fn: Callable, leaves: list, treedef,
            input_specs: list[jax.ShapeDtypeStruct]) -> jax.export.Exported:
  """`fn(params, *inputs)` exported as a function of the params' leaves (in
  `jax.tree.flatten` order), then the inputs."""

  def flat(*args):
    """Calls `fn` on the params rebuilt from their leaves, then the inputs.

    Args:
      *args: the params' leaves, then the inputs.

    Returns:
      What `fn` returns.
    """
    params = jax.tree.unflatten(treedef, args[:len(leaves)])
    return fn(params, *args[len(leaves):])

  leaf_specs = [x if isinstance(x, jax.ShapeDtypeStruct) else
                jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                for x in leaves]
  return jax.export.export(jax.jit(flat))(*leaf_specs, *input_specs)


def _param_files(leaves: list, treedef, table_files) -> list[str]:
  """The file of each parameter leaf: its table file, else its entry in
  params.npz."""
  files = [f'params.npz:p{i:05d}' for i in range(len(leaves))]
  index = jax.tree.unflatten(treedef, list(range(len(leaves))))
  for i, rel in zip(jax.tree.leaves(index['tables']),
                    jax.tree.leaves(table_files)):
    files[i] = rel
  return files


def _write_small_params(out_dir: str, leaves: list, files: list[str]) -> None:
  """params.npz: the leaves that are not in a table file."""
  np.savez(os.path.join(out_dir, 'params.npz'),
           **{f'p{i:05d}': np.asarray(x) for i, x in enumerate(leaves)
              if files[i].startswith('params.npz:')})


def _admit(ids, admitted):
  """`ids` with the rows the admission filter does not admit replaced by its
  shared row (`admitted`: (mask, row), or None: all admitted)."""
  if admitted is None:
    return ids
  mask, oov = admitted
  return jnp.where(mask[ids], ids, oov.astype(ids.dtype))


def _write(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)


def sparse_ids(f, ints, cat, present, id_tables, xp=jnp):
  """Maps one sparse feature of raw rows to table rows, as the export does.

  It uses the feature transform's mappers. `features.bucketize` serves raw
  features with boundaries. `features.lookup_sorted` serves the `id_tables`
  features. `features.map_ids` serves the others.

  Args:
    f: the feature, a `features.RawFeature` with boundaries or an
      `IdFeature`.
    ints: the integer columns, `[B, 13]`.
    cat: the raw hashes, uint32 `[B, 26]`.
    present: whether each hash is present, `[B, 26]`.
    id_tables: per feature name, the sorted raw values, their rows and the
      row of values not in the table.
    xp: jax.numpy for the export, or numpy.

  Returns:
    The rows, int32 `[B]`.
  """
  if isinstance(f, features_lib.RawFeature):
    return features_lib.bucketize(ints[:, int(f.input[4:])], f, xp)
  index = int(f.input[4:])
  values, missing = cat[:, index], ~present[:, index]
  if f.name in id_tables:
    keys, rows, unknown = id_tables[f.name]
    return features_lib.lookup_sorted(values, keys, rows, unknown, missing,
                                      xp)
  return features_lib.map_ids(values, f, xp, missing=missing)
