"""From a config to its RunSpec.

  run_spec(config)      `build(resolve_data(config))`; a RunSpec as it is
  resolve_data(config)  a copy of the config completed from the data
  build(config)         the RunSpec of a resolved config
  load_config(spec)     a config from `path/to/file.py[:variant]`

Each `build_*` turns one group of the config into its typed spec: it calls
the group's rules in `config.checks` (ValueErrors naming the field), then
copies the fields, generically (`_copy`) where the spec's fields are the
config's. The modules downstream take the typed specs, never a ConfigDict.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import importlib.util
import os
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
from absl import logging
from ml_collections import config_dict

from dlrm_jax.config import checks
from dlrm_jax.config import spec as spec_lib
from dlrm_jax.config.spec import (DataSpec, DenseOptimizerSpec, LoopSpec,
                                  MeshSpec, ModelSetup, RunSpec,
                                  ShardingRequest)
from dlrm_jax.data import binary
from dlrm_jax.data import features as features_lib
from dlrm_jax.data import table as table_lib
from dlrm_jax.data import synthetic as synthetic_lib
from dlrm_jax.embedding import specs as emb_specs
from dlrm_jax.embedding.ids import admission as admission_lib
from dlrm_jax.models import DCNSpec, DLRMSpec, MLPSpec
from dlrm_jax.train import early_stopping
from dlrm_jax.train import schedules

# Field types (as the dataclasses annotate them) that `_copy` casts to.
_CASTS = {'bool': bool, 'float': float}


def _type_name(field: dataclasses.Field) -> str:
  """A field's type as written ('float', 'int | None', ...)."""
  return getattr(field.type, '__name__', field.type)


def _to_dict(value) -> dict:
  if isinstance(value, config_dict.ConfigDict):
    return value.to_dict()
  return dict(value or {})


def _copy(cls, cfg: Mapping[str, Any], **given):
  """A `cls` (a dataclass) of the `given` fields and, for each other field,
  `cfg`'s field of the same name (absent: the field's default), cast where
  the field is a bool or a float."""
  values = dict(given)
  for f in dataclasses.fields(cls):
    if f.name in values or (
        f.name not in cfg and f.default is not dataclasses.MISSING):
      continue
    cast = _CASTS.get(_type_name(f))
    values[f.name] = cast(cfg[f.name]) if cast else cfg[f.name]
  return cls(**values)


# ----- Model ------------------------------------------------------------------


def build_feature(name: str, cfg: Mapping[str, Any]) -> features_lib.Feature:
  """One feature, `config.features.<name>`.

  Args:
    name: the feature's name.
    cfg: its config group.

  Returns:
    A RawFeature, IdFeature or SequenceIdFeature, by `cfg['type']`.

  Raises:
    ValueError: naming the field of the first rule it breaks
      (`checks.check_feature`).
  """
  checks.check_feature(name, cfg)
  kind = cfg['type']
  if kind == 'combo':
    return features_lib.ComboFeature(
        name=name, inputs=tuple(cfg['inputs']),
        embedding_dim=cfg['embedding_dim'],
        num_buckets=cfg.get('num_buckets'),
        hash_bucket_size=cfg.get('hash_bucket_size'),
        embedding_name=cfg.get('embedding_name'),
        value_dtype=cfg.get('value_dtype'))
  common = dict(name=name, input=cfg.get('input') or name,
                embedding_name=cfg.get('embedding_name'))
  if kind == 'raw':
    boundaries = cfg.get('boundaries')
    return features_lib.RawFeature(
        normalizer=cfg.get('normalizer') or 'none',
        boundaries=None if boundaries is None else tuple(
            float(b) for b in boundaries),
        embedding_dim=cfg.get('embedding_dim'), **common)
  num_buckets, hash_bucket_size, policy = _id_rows(cfg)
  if cfg.get('vocab_list'):
    num_buckets = hash_bucket_size = None
  common.update(embedding_dim=cfg['embedding_dim'], num_buckets=num_buckets,
                hash_bucket_size=hash_bucket_size)
  if kind == 'sequence_id':
    return features_lib.SequenceIdFeature(
        sequence_length=int(cfg.get('sequence_length') or 1), **common)
  flags = cfg.get('flag_columns')
  vocab = cfg.get('vocab_list')
  return features_lib.IdFeature(
      max_ids=cfg.get('max_ids', 1), combiner=cfg.get('combiner') or 'sum',
      managed_collision=policy, value_dtype=cfg.get('value_dtype'),
      separator=cfg.get('separator'),
      vocab_list=tuple(vocab) if vocab else None,
      default_bucketize_value=int(cfg.get('default_bucketize_value') or 0),
      flag_columns=tuple(flags) if flags else None, **common)


def _id_rows(cfg: Mapping[str, Any]
             ) -> tuple[int | None, int | None, str | None]:
  """(num_buckets, hash_bucket_size, managed-collision policy) of an id
  feature: a remapper's num_rows replaces the other two."""
  mc = cfg.get('managed_collision') or {}
  if mc.get('num_rows') is not None:
    return mc['num_rows'], None, mc.get('policy', 'lru')
  return cfg.get('num_buckets'), cfg.get('hash_bucket_size'), None


def build_mlp(cfg, path: str) -> MLPSpec:
  """An MLP, e.g. `config.model.final`.

  Args:
    cfg: its config group; fields left out take `MLPSpec.create`'s defaults.
    path: its config path.

  Returns:
    The MLP's spec.

  Raises:
    ValueError: on an unknown field, or a value `MLPSpec.create` refuses,
      naming it.
  """
  cfg = _to_dict(cfg)
  checks.check_fields(cfg, [f.name for f in dataclasses.fields(MLPSpec)],
                      path, 'an MLP')
  return MLPSpec.create(cfg.pop('hidden_units', None), path=path, **cfg)


def build_model(config) -> ModelSetup:
  """The features, their transform, the model and the tables of a config.

  Args:
    config: the config (its data resolved, `resolve_data`).

  Returns:
    The model's setup.

  Raises:
    ValueError: naming the first field of `config.features`, `config.model`
      or `config.embedding` that breaks a rule.
  """
  features = {name: build_feature(name, cfg)
              for name, cfg in _to_dict(config.features).items()}
  groups = _to_dict(config.model.feature_groups)
  checks.check_feature_groups(groups, features)
  dense = [features[n] for n in groups.get('dense') or []]
  sparse = [features[n] for n in groups['sparse']]
  m = config.model
  checks.check_model(m, dense, sparse)
  dcn = _to_dict(m.dcn)
  model = DLRMSpec(
      num_dense=len(dense), num_sparse=len(sparse),
      embedding_dim=sparse[0].embedding_dim,
      dense_mlp=(build_mlp(m.dense_mlp, 'config.model.dense_mlp') if dense
                 else None),
      final=build_mlp(m.final, 'config.model.final'),
      arch_with_sparse=bool(m.arch_with_sparse),
      interaction_self=bool(m.interaction_self),
      interaction=m.interaction,
      dcn=(DCNSpec.create(dcn.get('num_layers'), dcn.get('rank'),
                          path='config.model.dcn')
           if m.interaction == 'dcn' else None))
  tables, feature_specs = build_tables(config, sparse)
  transform = features_lib.FeatureTransform(tuple(dense), tuple(sparse))
  return ModelSetup(features, transform, model, tables, feature_specs,
                    jnp.dtype(m.compute_dtype))


# ----- Embedding tables -------------------------------------------------------


def build_schedule(cfg, path: str) -> schedules.ScheduleSpec:
  """A learning-rate schedule.

  Args:
    cfg: the `schedule` group of an optimizer; fields left out take
      ScheduleSpec's defaults.
    path: its config path.

  Returns:
    The schedule's spec.

  Raises:
    ValueError: naming the field that breaks a rule
      (`checks.check_schedule`).
  """
  cfg = _to_dict(cfg)
  checks.check_schedule(cfg, path)
  return _copy(schedules.ScheduleSpec, cfg)


def build_sparse_optimizer(cfg, path: str) -> emb_specs.SparseOptimizerSpec:
  """A table optimizer, `config.embedding.optimizer` or a table's.

  Args:
    cfg: its config group; fields left out take SparseOptimizerSpec's
      defaults.
    path: its config path.

  Returns:
    The optimizer's spec.

  Raises:
    ValueError: naming the field that breaks a rule
      (`checks.check_sparse_optimizer`, `SparseOptimizerSpec.check`).
  """
  cfg = _to_dict(cfg)
  checks.check_sparse_optimizer(cfg, path)
  spec = _copy(emb_specs.SparseOptimizerSpec, cfg, schedule=build_schedule(
      cfg.get('schedule'), f'{path}.schedule'))
  spec.check(path)
  return spec


def build_tables(config, sparse: Sequence[features_lib.Feature]
                 ) -> tuple[tuple[emb_specs.TableSpec, ...],
                            tuple[emb_specs.FeatureSpec, ...]]:
  """The embedding tables and the specs of the sparse features reading them.

  A sparse feature reads a table of its own, or the one it names
  (`embedding_name`), which features naming it share; a table takes
  `config.embedding`'s fields, as `config.embedding.tables.<table>`
  overrides them.

  Args:
    config: the config.
    sparse: the features of the sparse group.

  Returns:
    The tables (in the order the features first read them) and the
    features' specs (in sparse-group order).

  Raises:
    ValueError: naming the field of `config.embedding` (or the features
      sharing a table) that breaks a rule (`checks.check_tables`).
  """
  e = config.embedding
  checks.validate_numbers(config, 'embedding')
  optimizer = build_sparse_optimizer(e.optimizer, 'config.embedding.optimizer')
  readers = _readers(sparse)
  overrides = _table_overrides(e.tables)
  checks.check_tables(e, readers, overrides)
  tables = tuple(_table(e, name, features[0], overrides.get(name, {}),
                        optimizer)
                 for name, features in readers.items())
  feature_specs = tuple(
      emb_specs.FeatureSpec(name=f.name, table=features_lib.table_name(f),
                            max_ids=f.max_ids, dim=f.embedding_dim)
      for f in sparse)
  return tables, feature_specs


def _readers(sparse) -> dict[str, list[features_lib.Feature]]:
  """Table name -> the features reading it, in sparse-group order."""
  out: dict[str, list[features_lib.Feature]] = {}
  for f in sparse:
    out.setdefault(features_lib.table_name(f), []).append(f)
  return out


def _table_overrides(tables_cfg) -> dict[str, dict[str, Any]]:
  """`config.embedding.tables` without its unset (None) fields, and without
  the tables that are then empty."""
  out = {name: {k: v for k, v in _to_dict(t).items() if v is not None}
         for name, t in _to_dict(tables_cfg).items()}
  return {name: t for name, t in out.items() if t}


def _table(e, name: str, feature, over: Mapping[str, Any],
           optimizer: emb_specs.SparseOptimizerSpec) -> emb_specs.TableSpec:
  """Table `name` of (the first of) its features, with its overrides; its
  optimizer is `optimizer` unless it overrides optimizer fields."""
  if 'optimizer' in over:
    optimizer = build_sparse_optimizer(
        {**_to_dict(e.optimizer), **_to_dict(over['optimizer'])},
        f'config.embedding.tables.{name}.optimizer')
  return emb_specs.TableSpec(
      name=name, num_rows=feature.num_rows, dim=feature.embedding_dim,
      initializer=over.get('initializer', e.initializer),
      init_scale=over.get('init_scale', e.init_scale), optimizer=optimizer,
      combiner=feature.combiner, dtype=over.get('dtype', e.dtype))


def build_sharding_request(config, table_names: Sequence[str]
                           ) -> ShardingRequest:
  """What `config.embedding` asks of the sharding planner.

  Args:
    config: the config.
    table_names: the embedding tables.

  Returns:
    The request (unset overrides dropped).

  Raises:
    ValueError: naming the field that breaks a rule
      (`checks.check_sharding`).
  """
  checks.check_sharding(config, table_names)
  e = config.embedding
  overrides = tuple(sorted(
      (k, v) for k, v in _to_dict(e.sharding_overrides).items()
      if v is not None))
  return ShardingRequest(
      strategy=e.sharding, overrides=overrides,
      replicate_bytes=e.replicate_bytes, row_group_size=e.row_group_size or 0,
      device_memory_gb=e.device_memory_gb)


def build_cache_request(config, tables, features) -> spec_lib.CacheRequest:
  """`config.embedding.cache`: which tables are cached, and their cache rows.

  Args:
    config: the config.
    tables: the table specs.
    features: the feature specs (their ids per example).

  Returns:
    The request. A table's cache rows are `cache.rows`, else
    `ceil(cache.fraction * rows)` but at least the most unique rows two
    training batches, or one eval batch, can hold (its ids per example
    times the larger of 2 * batch_size and eval_batch_size), so the cache
    never runs out; at most its rows.

  Raises:
    ValueError: naming the field (`checks.check_cache`).
  """
  e = config.embedding
  cfg = e.get('cache') if hasattr(e, 'get') else None
  if cfg is None or not cfg.get('tables'):
    return spec_lib.CacheRequest()
  checks.check_cache(cfg, tables)
  names = ([t.name for t in tables] if cfg.tables == 'all' else
           [n.strip() for n in cfg.tables.split(',') if n.strip()])
  by_name = {t.name: t for t in tables}
  ids_per_example = {t.name: 0 for t in tables}
  for f in features:
    ids_per_example[f.table] += f.max_ids
  batch = max(2 * config.batch_size, config.eval_batch_size)
  rows = []
  for n in names:
    r = by_name[n].num_rows
    if cfg.get('rows') is not None:
      c = cfg.rows
    else:
      c = max(math.ceil(cfg.fraction * r), batch * ids_per_example[n])
    rows.append((n, int(min(max(c, 1), r))))
  return spec_lib.CacheRequest(rows=tuple(rows),
                               directory=cfg.get('directory') or '',
                               min_hit_rate=float(cfg.get('min_hit_rate',
                                                          0.5)))


# ----- Mesh, dense optimizer, data, loop, admission ---------------------------


def build_mesh(config) -> MeshSpec:
  """`config.mesh`.

  Args:
    config: the config.

  Returns:
    The mesh's axis sizes.

  Raises:
    ValueError: naming an axis size that is neither -1 nor positive.
  """
  checks.validate_numbers(config, 'mesh')
  return _copy(MeshSpec, config.mesh)


def build_dense_optimizer_spec(cfg) -> DenseOptimizerSpec:
  """`config.optimizer`, the optimizer of the dense (MLP) parameters.

  Args:
    cfg: `config.optimizer`; an unset (None) number is 0.

  Returns:
    The optimizer's spec (`train.optimizers.build_dense_optimizer` makes the
    optax optimizer of it).

  Raises:
    ValueError: naming the field that breaks a rule
      (`checks.check_dense_optimizer`), e.g. the kind 'adagrad', which is
      'optax_adagrad' or 'exact_adagrad'.
  """
  cfg = _to_dict(cfg)
  checks.check_dense_optimizer(cfg)
  numbers = {k: v or 0.0 for k, v in cfg.items()}
  return _copy(DenseOptimizerSpec, numbers, kind=cfg['kind'],
               schedule=build_schedule(cfg['schedule'],
                                       'config.optimizer.schedule'))


def _paths(value) -> str | tuple[str, ...]:
  return value if isinstance(value, str) else tuple(value or ())


def _data_source(d) -> str:
  """The source `config.data` (`d`) reads, 'auto' resolved, checked with
  the fields it needs."""
  source = d.source
  if source == 'auto':
    source = 'criteo_tsv' if d.train_path else 'synthetic'
  checks.check_data_source(d, source)
  return source


_TABLE_FORMAT_FIELDS = ('format', 'delimiter', 'header', 'columns',
                        'encoding', 'quote_char')


def _table_format(cfg: Mapping[str, Any], path: str) -> table_lib.TableFormat:
  """A `TableFormat` of `config.data.table` or of a side table."""
  fmt = cfg.get('format', 'auto')
  checks.check_one_of(fmt, table_lib.FORMATS, f'{path}.format')
  return table_lib.TableFormat(
      format=fmt, delimiter=cfg.get('delimiter') or '',
      header=bool(cfg.get('header', True)),
      columns=tuple(cfg.get('columns') or ()),
      encoding=cfg.get('encoding') or 'utf8',
      quote_char=cfg.get('quote_char', '"') or '')


def build_table(config, features) -> table_lib.TableSpec:
  """`config.data.table`: what the tabular source reads.

  Args:
    config: the config.
    features: the features of the model's groups.

  Returns:
    The table's spec.

  Raises:
    ValueError: naming the field of `config.data.table` that breaks a rule.
  """
  t = _to_dict(config.data.get('table') or {})
  path = 'config.data.table'
  checks.check_fields(t, _TABLE_FORMAT_FIELDS + (
      'label', 'label_rule', 'side_tables'), path)
  label = table_lib.LabelRule(t['label'], t.get('label_rule') or '') if (
      t.get('label')) else None
  if label is not None:
    label.parse()
  sides = []
  for name, side in (t.get('side_tables') or {}).items():
    side = _to_dict(side)
    side_path = f'{path}.side_tables.{name}'
    checks.check_fields(side, _TABLE_FORMAT_FIELDS + (
        'path', 'key', 'join_on'), side_path)
    for field in ('path', 'key'):
      if not side.get(field):
        raise ValueError(f'{side_path}.{field} is empty.')
    file_path = os.path.abspath(os.path.expanduser(side['path']))
    if not os.path.isfile(file_path):
      raise ValueError(
          f'{side_path}.path: the file {file_path} does not exist.')
    sides.append(table_lib.SideTable(
        name, file_path, side['key'], side.get('join_on') or side['key'],
        _table_format(side, side_path)))
  return table_lib.TableSpec(_table_format(t, path), label,
                             table_lib.column_reads(features), tuple(sides))


def build_data(config, features=()) -> DataSpec:
  """`config.data`, its source resolved.

  Args:
    config: the config.

  Returns:
    The data's spec.

  Raises:
    ValueError: naming the field that breaks a rule
      (`checks.check_data_source`, `checks.check_data`).
  """
  d = config.data
  source = _data_source(d)
  checks.validate_numbers(config, 'data')
  checks.check_data(config, source)
  return _copy(
      DataSpec, d, source=source, train_path=_paths(d.train_path),
      eval_path=_paths(d.eval_path), multi_hot=bool(d.multi_hot.enabled),
      multi_hot_distribution=d.multi_hot.distribution,
      table=build_table(config, features) if source == 'table' else None,
      synthetic=(_copy(synthetic_lib.SyntheticSpec, d.synthetic,
                       seed=config.seed)
                 if source == 'synthetic' else None))


def build_loop(config) -> LoopSpec:
  """The training loop of a config (its top-level fields).

  Args:
    config: the config.

  Returns:
    The loop's spec.

  Raises:
    ValueError: naming the field that breaks a rule (`validate_numbers`,
      `checks.check_loop`).
  """
  checks.validate_numbers(config, 'loop')
  checks.check_loop(config)
  early = config.early_stopping
  steps = config.num_train_steps
  return _copy(
      LoopSpec, config, num_train_steps=steps if steps > 0 else None,
      target_auc=float(config.target_auc) or None,
      keep_best_metric=config.keep_best_metric or None,
      early_stopping=_copy(
          early_stopping.EarlyStoppingSpec, early,
          mode=early_stopping.metric_mode(early.metric, early.mode)),
      record_batches=bool(config.data.record_batches))


def build_admission(cfg, transform: features_lib.FeatureTransform
                    ) -> admission_lib.AdmissionSpec:
  """`config.admission`, the rare-id filter.

  Args:
    cfg: `config.admission`; fields left out take AdmissionSpec's defaults.
    transform: the features it may filter.

  Returns:
    The filter's spec (`min_count <= 1`: off).

  Raises:
    ValueError: naming the field that breaks a rule
      (`checks.check_admission`).
  """
  cfg = _to_dict(cfg)
  checks.check_admission(cfg, transform.sparse)
  features = cfg.get('features') or ()
  return _copy(admission_lib.AdmissionSpec, cfg, features=(
      (features,) if isinstance(features, str) else tuple(features)))


# ----- The run ----------------------------------------------------------------


def build(config) -> RunSpec:
  """The RunSpec of a config whose data is resolved (`resolve_data`).

  Args:
    config: the config.

  Returns:
    The run's spec; it keeps the config as JSON, for the record.

  Raises:
    ValueError: naming the first field that breaks a rule of
      `config.checks`.
  """
  model = build_model(config)
  sharding = build_sharding_request(config, [t.name for t in model.tables])
  sharding = dataclasses.replace(
      sharding, cache=build_cache_request(config, model.tables,
                                          model.feature_specs))
  return RunSpec(
      **{f.name: getattr(model, f.name)
         for f in dataclasses.fields(ModelSetup)},
      sharding=sharding,
      mesh=build_mesh(config),
      dense_optimizer=build_dense_optimizer_spec(config.optimizer),
      data=build_data(config, model.transform.dense + model.transform.sparse),
      loop=build_loop(config),
      admission=build_admission(config.admission, model.transform),
      config_json=config.to_json_best_effort())


def resolve_data(config):
  """The step before `build`: the config completed from its data.

  Args:
    config: the config.

  Returns:
    A copy of it with the table sizes of a preprocessed dataset
    (`config.data.source='binary'`, read from its metadata) and the bag
    sizes of multi-hot data (`config.data.multi_hot.hotness`).

  Raises:
    ValueError: if the data source lacks a field it needs, or the bag sizes
      do not match the id features.
  """
  config = copy.deepcopy(config)
  source = _data_source(config.data)
  id_features = [n for n in config.model.feature_groups.sparse
                 if (config.features.get(n) or {}).get('type') == 'id']
  meta = (binary.Metadata.load(config.data.binary_dir)
          if source == 'binary' else None)
  if meta is not None and meta.layout == 'criteo':
    for name in id_features:
      f = config.features[name]
      index = int(f.get('input', name).split('_')[-1])
      size = int(meta.num_buckets[index])
      if f.get('num_buckets') != size:
        logging.info('config.features.%s.num_buckets: %s -> %d (from %s)',
                     name, f.get('num_buckets'), size,
                     config.data.binary_dir)
      f.num_buckets = size
      f.hash_bucket_size = None
  mh = config.data.multi_hot
  checks.check_multi_hot(mh, id_features)
  if mh.enabled:
    for name, h in zip(id_features, mh.hotness):
      config.features[name].max_ids = int(h)
  return config


def run_spec(config) -> RunSpec:
  """A config's RunSpec: `build(resolve_data(config))`.

  The entry points (Trainer, train_and_evaluate, inference.load,
  data.inputs.make_data) call it, so they take either.

  Args:
    config: a config, or a RunSpec.

  Returns:
    The RunSpec; a RunSpec is returned as it is.

  Raises:
    ValueError: naming the first field of the config that breaks a rule.
  """
  if isinstance(config, RunSpec):
    return config
  return build(resolve_data(config))


def load_config(spec: str) -> config_dict.ConfigDict:
  """A config from `path/to/file.py[:variant]`, as `--config=` loads it.

  For notebooks and scripts; the command line uses ml_collections'
  config_flags with the same syntax.

  Args:
    spec: the config file's path, optionally with `:variant`.

  Returns:
    Its `get_config(variant)`.

  Raises:
    ValueError: if the file does not exist.
  """
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'config file {path!r} does not exist.')
  module_spec = importlib.util.spec_from_file_location('_dlrm_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)
