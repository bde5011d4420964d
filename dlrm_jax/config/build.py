"""From an ml_collections config to typed, validated specs.

Everything a config can get wrong is checked here, and every error is a
ValueError that names the config field and its value, e.g.
`config.model.dense_mlp.hidden_units[-1] (64) must equal the sparse embedding
dim (16)`. The modules downstream take the typed specs, never a ConfigDict.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
from absl import logging
from ml_collections import config_dict

from dlrm_jax.config import checks as config_checks
from dlrm_jax.config.spec import (DataSpec, DenseOptimizerSpec, LoopSpec,
                                  MeshSpec, ModelSetup, RunSpec, ShardingRequest)
from dlrm_jax.train import early_stopping
from dlrm_jax.train import optimizers as dense_optimizers
from dlrm_jax.data import features as features_lib
from dlrm_jax.train import schedules
from dlrm_jax.data import binary
from dlrm_jax.data import synthetic as synthetic_lib
from dlrm_jax.embedding.ids import admission as admission_lib
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding import specs as emb_specs
from dlrm_jax.models import DCNSpec, DLRMSpec, MLPSpec
from dlrm_jax.models.dlrm import INTERACTIONS

FEATURE_TYPES = ('raw', 'id', 'sequence_id')
DENSE_OPTIMIZERS = tuple(dense_optimizers.KINDS)
COMPUTE_DTYPES = ('float32', 'bfloat16')



def _to_dict(value) -> dict:
  if isinstance(value, config_dict.ConfigDict):
    return value.to_dict()
  return dict(value or {})


def _positive_int(value, path: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f'{path} ({value!r}) must be a positive integer.')
  return value


def _build_raw_feature(name: str, path: str, column: str, col_kind: str,
                       cfg: Mapping[str, Any]) -> features_lib.RawFeature:
  _check_fields(path, 'raw', cfg,
                {'normalizer', 'boundaries', 'embedding_dim', 'embedding_name'})
  if col_kind != 'int':
    raise ValueError(
        f'{path}.input ({column!r}) must be an integer column (int_<i>)'
        ' for a raw feature.')
  normalizer = cfg.get('normalizer') or 'none'
  if normalizer not in features_lib.NORMALIZERS:
    raise ValueError(
        f'{path}.normalizer ({normalizer!r}) must be one of'
        f' {list(features_lib.NORMALIZERS)}.')
  boundaries = cfg.get('boundaries')
  dim = cfg.get('embedding_dim')
  if boundaries is not None:
    boundaries = tuple(float(b) for b in boundaries)
    if not boundaries or any(
        b >= c for b, c in zip(boundaries, boundaries[1:])):
      raise ValueError(
          f'{path}.boundaries ({list(boundaries)}) must be a non-empty,'
          ' strictly increasing list.')
    _positive_int(dim, f'{path}.embedding_dim')
  elif dim is not None:
    raise ValueError(
        f'{path}.embedding_dim ({dim}) needs {path}.boundaries: a raw'
        ' feature gets an embedding only when bucketized.')
  return features_lib.RawFeature(
      name=name, input=column, normalizer=normalizer, boundaries=boundaries,
      embedding_dim=dim, embedding_name=cfg.get('embedding_name'))


def _id_rows(path: str, cfg: Mapping[str, Any]
             ) -> tuple[int | None, int | None, str | None]:
  """(num_buckets, hash_bucket_size, managed-collision policy) of an id
  feature, checked: exactly one way to give its rows, at least 2 of them."""
  nb, hb = cfg.get('num_buckets'), cfg.get('hash_bucket_size')
  mc = _to_dict(cfg.get('managed_collision'))
  policy = None
  if mc.get('num_rows') is not None:
    unknown = set(mc) - {'num_rows', 'policy'}
    if unknown:
      raise ValueError(
          f'{path}.managed_collision has unknown fields {sorted(unknown)};'
          ' it takes num_rows and policy.')
    policy = mc.get('policy', 'lru')
    if policy not in ('lru', 'lfu'):
      raise ValueError(
          f"{path}.managed_collision.policy ({policy!r}) must be 'lru' or"
          " 'lfu'.")
    # The remapper's table replaces num_buckets / hash_bucket_size.
    hb = None
    nb = _positive_int(mc.get('num_rows'),
                       f'{path}.managed_collision.num_rows')
  if (nb is None) == (hb is None):
    raise ValueError(
        f'{path}: give exactly one of num_buckets ({nb!r}) and'
        f' hash_bucket_size ({hb!r}).')
  field = ('managed_collision.num_rows' if policy else
           'num_buckets' if nb is not None else 'hash_bucket_size')
  rows = _positive_int(nb if nb is not None else hb, f'{path}.{field}')
  if rows < 2:
    raise ValueError(
        f'{path}.{field} ({rows}) must be at least 2: row 0 holds missing'
        ' values.')
  return nb, hb, policy


def _check_fields(path: str, kind: str, cfg: Mapping[str, Any], allowed):
  unknown = set(cfg) - set(allowed)
  if unknown:
    raise ValueError(
        f'{path} has fields {sorted(unknown)} that a {kind} feature does not'
        f' take; it takes {sorted(allowed)}.')


def build_feature(name: str, cfg: Mapping[str, Any]) -> features_lib.Feature:
  """One feature from `config.features.<name>`."""
  path = f'config.features.{name}'
  cfg = dict(cfg)
  kind = cfg.pop('type', None)
  if kind not in FEATURE_TYPES:
    raise ValueError(
        f'{path}.type ({kind!r}) must be one of {list(FEATURE_TYPES)}.')
  column = cfg.pop('input', None) or name
  col_kind, _ = features_lib.parse_input(column, path=f'{path}.input')
  if kind == 'raw':
    return _build_raw_feature(name, path, column, col_kind, cfg)
  allowed = {'embedding_dim', 'num_buckets', 'hash_bucket_size',
             'embedding_name'}
  if kind == 'id':
    allowed |= {'max_ids', 'combiner', 'managed_collision'}
  else:
    allowed |= {'sequence_length'}
  _check_fields(path, kind, cfg, allowed)
  if col_kind != 'cat':
    raise ValueError(
        f'{path}.input ({column!r}) must be a categorical column (cat_<i>)'
        f' for an {kind} feature.')
  dim = _positive_int(cfg.get('embedding_dim'), f'{path}.embedding_dim')
  nb, hb, policy = _id_rows(path, cfg)
  if kind == 'sequence_id':
    return features_lib.SequenceIdFeature(
        name=name, input=column, embedding_dim=dim, num_buckets=nb,
        hash_bucket_size=hb, embedding_name=cfg.get('embedding_name'),
        sequence_length=int(cfg.get('sequence_length') or 1))
  max_ids = _positive_int(cfg.get('max_ids', 1), f'{path}.max_ids')
  combiner = cfg.get('combiner') or 'sum'
  if combiner not in emb_specs.COMBINERS:
    raise ValueError(
        f'{path}.combiner ({combiner!r}) must be one of'
        f' {list(emb_specs.COMBINERS)}.')
  if policy and max_ids != 1:
    raise ValueError(
        f'{path}: managed_collision takes single-valued features; max_ids is'
        f' {max_ids}.')
  return features_lib.IdFeature(
      name=name, input=column, embedding_dim=dim, num_buckets=nb,
      hash_bucket_size=hb, embedding_name=cfg.get('embedding_name'),
      max_ids=max_ids, combiner=combiner, managed_collision=policy)


def build_mlp(cfg, path: str) -> MLPSpec:
  cfg = _to_dict(cfg)
  allowed = {'hidden_units', 'activation', 'use_bn', 'use_ln',
             'dropout_ratio', 'bias'}
  unknown = set(cfg) - allowed
  if unknown:
    raise ValueError(
        f'{path} has unknown fields {sorted(unknown)}; an MLP takes'
        f' {sorted(allowed)}.')
  # Fields left out take MLPSpec.create's defaults (configs/criteo.py's
  # _mlp sets them all).
  return MLPSpec.create(cfg.pop('hidden_units', None), path=path, **cfg)


def build_interaction(m) -> tuple[str, DCNSpec | None]:
  """`config.model.interaction` and, for 'dcn', `config.model.dcn`."""
  kind = m.interaction
  if kind not in INTERACTIONS:
    raise ValueError(
        f'config.model.interaction ({kind!r}) must be one of'
        f' {list(INTERACTIONS)}.')
  if kind != 'dcn':
    return kind, None
  for field in ('arch_with_sparse', 'interaction_self'):
    if m[field]:
      raise ValueError(
          f'config.model.{field} ({m[field]!r}) must be False with'
          " config.model.interaction 'dcn': the over arch sees the cross"
          ' network output only (TorchRec DLRM_DCN, MLPerf DLRM-DCNv2).')
  cfg = _to_dict(m.dcn)
  path = 'config.model.dcn'
  unknown = set(cfg) - {'num_layers', 'rank'}
  if unknown:
    raise ValueError(
        f'{path} has unknown fields {sorted(unknown)}; it takes num_layers'
        ' and rank.')
  return kind, DCNSpec.create(cfg.get('num_layers'), cfg.get('rank'),
                              path=path)


def build_sparse_optimizer(cfg, path: str) -> emb_specs.SparseOptimizerSpec:
  cfg = _to_dict(cfg)
  kind = cfg.get('kind', 'sgd')
  if kind not in emb_specs.SPARSE_OPTIMIZERS:
    raise ValueError(
        f'{path}.kind ({kind!r}) must be one of'
        f' {list(emb_specs.SPARSE_OPTIMIZERS)}.')
  schedule = schedules.ScheduleSpec.create(
      path=f'{path}.schedule', **_to_dict(cfg.get('schedule')))
  defaults = emb_specs.SparseOptimizerSpec()
  floats = ('initial_accumulator_value', 'eps', 'b1', 'b2', 'l1', 'l2',
            'lr_power', 'beta', 'weight_decay')
  fields = {k: float(cfg.get(k, getattr(defaults, k))) for k in floats}
  opt = emb_specs.SparseOptimizerSpec(
      kind=kind, schedule=schedule,
      weight_decay_mode=cfg.get('weight_decay_mode',
                                defaults.weight_decay_mode),
      stochastic_rounding=bool(cfg.get('stochastic_rounding',
                                       defaults.stochastic_rounding)),
      **fields)
  opt.check(path)
  return opt


def _feature_groups(config, features: Mapping[str, features_lib.Feature]
                    ) -> tuple[list[features_lib.Feature],
                               list[features_lib.Feature]]:
  """The dense and sparse groups of `config.model.feature_groups`, checked."""
  groups = _to_dict(config.model.feature_groups)
  unknown_groups = set(groups) - {'dense', 'sparse'}
  if unknown_groups:
    raise ValueError(
        f'config.model.feature_groups has groups {sorted(unknown_groups)};'
        ' DLRM takes a dense and a sparse group.')
  sparse_names = list(groups.get('sparse') or [])
  dense_names = list(groups.get('dense') or [])
  if not sparse_names:
    raise ValueError(
        'config.model.feature_groups.sparse is missing or empty; DLRM needs a'
        ' sparse group.')
  for group, names in (('dense', dense_names), ('sparse', sparse_names)):
    seen = set()
    for n in names:
      if n not in features:
        raise ValueError(
            f'config.model.feature_groups.{group} lists {n!r}, which is not'
            ' in config.features.')
      if n in seen:
        raise ValueError(
            f'config.model.feature_groups.{group} lists {n!r} twice.')
      seen.add(n)
  dense, sparse = [], []
  for n in dense_names:
    f = features[n]
    if isinstance(f, features_lib.SequenceIdFeature):
      raise ValueError(
          f'config.model.feature_groups.dense lists {n!r}, a sequence feature;'
          ' DLRM groups cannot take sequence features.')
    if not isinstance(f, features_lib.RawFeature) or f.is_sparse:
      raise ValueError(
          f'config.model.feature_groups.dense lists {n!r}, which has ids'
          f' ({type(f).__name__}{", bucketized" if isinstance(f, features_lib.RawFeature) else ""});'
          ' the dense group takes raw features without boundaries; move it'
          ' to the sparse group.')
    dense.append(f)
  for n in sparse_names:
    f = features[n]
    if isinstance(f, features_lib.SequenceIdFeature):
      raise ValueError(
          f'config.model.feature_groups.sparse lists {n!r}, a sequence'
          ' feature; DLRM groups cannot take sequence features.')
    if isinstance(f, features_lib.RawFeature) and not f.is_sparse:
      raise ValueError(
          f'config.model.feature_groups.sparse lists {n!r}, a raw feature'
          ' without boundaries (no embedding); give it boundaries and an'
          ' embedding_dim, or move it to the dense group.')
    sparse.append(f)
  return dense, sparse


def build_model(config) -> ModelSetup:
  """Validates the features, groups, model and embedding configs."""
  if config.model.name != 'dlrm':
    raise ValueError(
        f"config.model.name ({config.model.name!r}) must be 'dlrm'.")
  features = {name: build_feature(name, cfg)
              for name, cfg in _to_dict(config.features).items()}
  dense, sparse = _feature_groups(config, features)
  dims = {f.name: f.embedding_dim for f in sparse}
  if len(set(dims.values())) > 1:
    raise ValueError(
        'config.features: the sparse group\'s features must share one'
        f' embedding_dim, got {dims}.')
  dim = sparse[0].embedding_dim

  m = config.model
  has_dense_mlp = m.dense_mlp is not None and bool(
      _to_dict(m.dense_mlp))
  if dense and not has_dense_mlp:
    raise ValueError(
        f'config.model.feature_groups.dense has {len(dense)} features but'
        ' config.model.dense_mlp is not set.')
  if has_dense_mlp and not dense:
    raise ValueError(
        'config.model.dense_mlp is set but there is no dense feature group'
        ' (config.model.feature_groups.dense); remove dense_mlp or add the'
        ' group.')
  dense_mlp = build_mlp(m.dense_mlp, 'config.model.dense_mlp') if dense else None
  if dense_mlp is not None and dense_mlp.output_dim != dim:
    raise ValueError(
        f'config.model.dense_mlp.hidden_units[-1] ({dense_mlp.output_dim})'
        f' must equal the sparse embedding dim ({dim}).')
  final = build_mlp(m.final, 'config.model.final')
  compute = m.compute_dtype
  if compute not in COMPUTE_DTYPES:
    raise ValueError(
        f'config.model.compute_dtype ({compute!r}) must be one of'
        f' {list(COMPUTE_DTYPES)}.')
  interaction, dcn = build_interaction(m)
  model = DLRMSpec(
      num_dense=len(dense), num_sparse=len(sparse), embedding_dim=dim,
      dense_mlp=dense_mlp, final=final,
      arch_with_sparse=bool(m.arch_with_sparse),
      interaction_self=bool(m.interaction_self),
      interaction=interaction, dcn=dcn)

  tables, feature_specs = build_tables(config, sparse)
  transform = features_lib.FeatureTransform(tuple(dense), tuple(sparse))
  return ModelSetup(features, transform, model, tables, feature_specs,
                    jnp.dtype(compute))


def build_tables(config, sparse) -> tuple[tuple[emb_specs.TableSpec, ...],
                                           tuple[emb_specs.FeatureSpec, ...]]:
  """One table per sparse feature, or shared by features naming one."""
  e = config.embedding
  opt = build_sparse_optimizer(e.optimizer, 'config.embedding.optimizer')
  overrides = {  # Unset (None) fields, and tables without any, dropped.
      name: {k: v for k, v in _to_dict(t).items() if v is not None}
      for name, t in _to_dict(e.tables).items()}
  overrides = {name: t for name, t in overrides.items() if t}
  table_fields: dict[str, dict] = {}
  owner: dict[str, str] = {}
  features_by_name = {f.name: f for f in sparse}
  feature_specs = []
  for f in sparse:
    name = features_lib.table_name(f)
    fields = dict(num_rows=f.num_rows, dim=f.embedding_dim,
                  combiner=f.combiner)
    if name in table_fields and (
        getattr(f, 'managed_collision', None) or getattr(
            features_by_name.get(owner[name]), 'managed_collision', None)):
      raise ValueError(
          f'config.features.{f.name} and config.features.{owner[name]}:'
          f' features with managed_collision cannot share table {name!r}'
          ' (each remapper owns its table\'s rows).')
    if name in table_fields:
      prev = table_fields[name]
      for k in ('num_rows', 'dim', 'combiner'):
        if prev[k] != fields[k]:
          what = {'num_rows': 'table size', 'dim': 'embedding_dim',
                  'combiner': 'combiner'}[k]
          raise ValueError(
              f'config.features.{f.name} and config.features.{owner[name]}'
              f' share table {name!r} but differ in {what}'
              f' ({fields[k]} vs {prev[k]}).')
    else:
      table_fields[name] = fields
      owner[name] = f.name
    feature_specs.append(emb_specs.FeatureSpec(
        name=f.name, table=name, max_ids=f.max_ids, dim=f.embedding_dim))
  for name in overrides:
    if name not in table_fields:
      raise ValueError(
          f'config.embedding.tables.{name} overrides a table that no sparse'
          f' feature uses (tables: {sorted(table_fields)}).')
  tables = []
  for name, fields in table_fields.items():
    over = dict(overrides.get(name, {}))
    path = f'config.embedding.tables.{name}'
    allowed = {'initializer', 'init_scale', 'dtype', 'optimizer'}
    if set(over) - allowed:
      raise ValueError(
          f'{path} has unknown fields {sorted(set(over) - allowed)}; it takes'
          f' {sorted(allowed)}.')
    table_opt = opt
    if 'optimizer' in over:
      merged = _to_dict(e.optimizer)
      merged.update(_to_dict(over['optimizer']))
      table_opt = build_sparse_optimizer(merged, f'{path}.optimizer')
    initializer = over.get('initializer', e.initializer)
    if initializer not in emb_specs.INITIALIZERS:
      src = path if 'initializer' in over else 'config.embedding'
      raise ValueError(
          f'{src}.initializer ({initializer!r}) must be one of'
          f' {list(emb_specs.INITIALIZERS)}.')
    dtype = over.get('dtype', e.dtype)
    if dtype not in emb_specs.TABLE_DTYPES:
      src = path if 'dtype' in over else 'config.embedding'
      raise ValueError(
          f'{src}.dtype ({dtype!r}) must be one of'
          f' {list(emb_specs.TABLE_DTYPES)}.')
    tables.append(emb_specs.TableSpec(
        name=name, num_rows=fields['num_rows'], dim=fields['dim'],
        initializer=initializer,
        init_scale=over.get('init_scale', e.init_scale),
        optimizer=table_opt, combiner=fields['combiner'], dtype=dtype))
  emb_specs.validate(tables, feature_specs)
  return tuple(tables), tuple(feature_specs)


def load_config(spec: str):
  """A config from `path/to/file.py[:variant]`, as `--config=` loads it.

  For notebooks and scripts; the command line uses ml_collections'
  config_flags with the same syntax.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'config file {path!r} does not exist.')
  module_spec = importlib.util.spec_from_file_location('_dlrm_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)



def build_loop(config) -> LoopSpec:
  """`config`'s training loop, validated (ValueErrors name the field)."""
  config_checks.validate_numbers(config)
  steps = config.num_train_steps
  early = _to_dict(config.early_stopping)
  early_stopping.EarlyStopping.from_config(early)  # checks it
  if config.keep_best_metric:
    early_stopping.metric_mode(config.keep_best_metric, None,
                               'config.keep_best_metric')
  return LoopSpec(
      num_train_steps=steps if steps > 0 else None,
      num_epochs=config.num_epochs, min_train_steps=config.min_train_steps,
      batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      seed=config.seed, log_every_steps=config.log_every_steps,
      eval_every_steps=config.eval_every_steps,
      checkpoint_every_steps=config.checkpoint_every_steps,
      max_to_keep=config.max_to_keep,
      target_auc=float(config.target_auc) or None,
      keep_best_metric=config.keep_best_metric or None,
      early_stopping=early,
      record_batches=bool(config.data.record_batches))




def build_sharding_request(config) -> ShardingRequest:
  e = config.embedding
  if e.sharding != 'auto' and e.sharding not in plan_lib.STRATEGIES:
    raise ValueError(
        f'config.embedding.sharding ({e.sharding!r}) must be auto or one of'
        f' {list(plan_lib.STRATEGIES)}.')
  overrides = tuple(sorted(
      (k, v) for k, v in _to_dict(e.sharding_overrides).items()
      if v is not None))  # unset placeholders dropped
  return ShardingRequest(e.sharding, overrides, e.replicate_bytes,
                     e.row_group_size or 0, e.device_memory_gb)



def build_dense_optimizer_spec(cfg) -> DenseOptimizerSpec:
  path = 'config.optimizer'
  cfg = _to_dict(cfg)
  kind = cfg.get('kind')
  if kind == 'adagrad':
    raise ValueError(
        f"{path}.kind ('adagrad') is ambiguous; choose 'optax_adagrad'"
        " (optax.adagrad's formula: g / sqrt(acc + eps), acc from 0.1) or"
        " 'exact_adagrad' (torch.optim.Adagrad and FBGEMM: g / (sqrt(acc) +"
        " eps), acc from 0, as the table optimizer 'adagrad').")
  if kind not in DENSE_OPTIMIZERS:
    raise ValueError(
        f'{path}.kind ({kind!r}) must be one of {list(DENSE_OPTIMIZERS)}.')
  fields = {f.name for f in dataclasses.fields(DenseOptimizerSpec)}
  unknown = set(cfg) - fields
  if unknown:
    raise ValueError(f'{path} has unknown fields {sorted(unknown)}; it takes'
                     f' {sorted(fields)}.')
  missing = fields - set(cfg)
  if missing:
    raise ValueError(f'{path} lacks fields {sorted(missing)} (see'
                     ' configs/criteo.py).')
  spec = DenseOptimizerSpec(
      kind=kind, schedule=schedules.ScheduleSpec.create(
          path=f'{path}.schedule', **_to_dict(cfg['schedule'])),
      **{k: float(cfg[k] or 0.0) for k in fields - {'kind', 'schedule'}})
  for k in ('initial_accumulator_value', 'grad_clip_norm', 'weight_decay',
            'momentum', 'eps'):
    if getattr(spec, k) < 0:
      raise ValueError(f'{path}.{k} ({getattr(spec, k)}) must be >= 0.')
  return spec




DATA_SOURCES = ('auto', 'synthetic', 'criteo_tsv', 'binary', 'tfds')


def _paths(value) -> str | tuple[str, ...]:
  return value if isinstance(value, str) else tuple(value or ())


def _data_source(d) -> str:
  """The source `config.data` (`d`) reads, 'auto' resolved; checks the
  fields that source needs."""
  source = d.source
  if source not in DATA_SOURCES:
    raise ValueError(
        f'config.data.source ({source!r}) must be one of'
        f' {list(DATA_SOURCES)}.')
  if source == 'auto':
    source = 'criteo_tsv' if d.train_path else 'synthetic'
  if source == 'binary' and not d.binary_dir:
    raise ValueError(
        "config.data.source is 'binary' but config.data.binary_dir is"
        ' empty.')
  if source == 'criteo_tsv' and not d.train_path:
    raise ValueError(
        "config.data.train_path is empty but config.data.source is"
        " 'criteo_tsv'; give the Criteo train file(s).")
  return source


def build_data(config) -> DataSpec:
  """`config.data`, checked, its source resolved."""
  d = config.data
  source = _data_source(d)
  if d.bad_lines not in ('error', 'skip'):
    raise ValueError(
        f"config.data.bad_lines ({d.bad_lines!r}) must be 'error' or 'skip'.")
  s = d.synthetic
  return DataSpec(
      source=source, train_path=_paths(d.train_path),
      eval_path=_paths(d.eval_path), eval_fraction=float(d.eval_fraction),
      labeled_eval=bool(d.labeled_eval), bad_lines=d.bad_lines,
      check_ids=bool(d.check_ids), binary_dir=d.binary_dir,
      tfds_name=d.tfds_name, tfds_data_dir=d.tfds_data_dir,
      tfds_train_split=d.tfds_train_split,
      tfds_eval_split=d.tfds_eval_split, shuffle=bool(d.shuffle),
      shuffle_buffer=d.shuffle_buffer, chunk_rows=d.chunk_rows,
      num_threads=d.num_threads, prefetch=d.prefetch,
      multi_hot=bool(d.multi_hot.enabled),
      multi_hot_distribution=d.multi_hot.distribution,
      synthetic=synthetic_lib.SyntheticSpec(
          seed=config.seed, num_train=int(s.num_train),
          num_eval=int(s.num_eval), zipf_exponent=float(s.zipf_exponent),
          logit_scale=float(s.logit_scale))
      if source == 'synthetic' else None)



def build(config) -> RunSpec:
  """The run spec of a config whose data is resolved
  (`resolve_data`): every field checked, ValueErrors naming
  the field."""
  model = build_model(config)
  return RunSpec(
      **{f.name: getattr(model, f.name)
         for f in dataclasses.fields(ModelSetup)},
      sharding=build_sharding_request(config),
      mesh=MeshSpec(config.mesh.data, config.mesh.model),
      dense_optimizer=build_dense_optimizer_spec(config.optimizer),
      data=build_data(config), loop=build_loop(config),
      admission=admission_lib.AdmissionSpec.from_config(config.admission),
      config_json=config.to_json_best_effort())


def resolve_data(config):
  """The data-resolution step before `build`: a copy of the config
  completed from the data, with the table sizes of a preprocessed dataset
  (`config.data.source='binary'`, read from its metadata) and the bag sizes
  of multi-hot data (`config.data.multi_hot.hotness`)."""
  config = copy.deepcopy(config)
  source = _data_source(config.data)
  id_features = [n for n in config.model.feature_groups.sparse
                 if config.features[n].get('type') == 'id']
  if source == 'binary':
    meta = binary.Metadata.load(config.data.binary_dir)
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
  if mh.enabled:
    if len(mh.hotness) != len(id_features):
      raise ValueError(
          f'config.data.multi_hot.hotness has {len(mh.hotness)} values for'
          f' {len(id_features)} id features of the sparse group.')
    for name, h in zip(id_features, mh.hotness):
      config.features[name].max_ids = int(h)
  return config


def run_spec(config) -> RunSpec:
  """A config's RunSpec: `build(resolve_data(config))`. A RunSpec is
  returned as it is, so the entry points (Trainer, train_and_evaluate,
  inference.load, data.inputs.make_data) take either."""
  if isinstance(config, RunSpec):
    return config
  return build(resolve_data(config))
