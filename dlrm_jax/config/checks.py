"""The rules of a config, in one place.

Every rule about the values of a config is here, and every broken rule is a
ValueError that names the config field, its value and the rule, e.g.
`config.model.dense_mlp.hidden_units[-1] (64) must equal the sparse embedding
dim (16)`. The builder (`config.build`) calls these checks before it turns
each group of the config into its typed spec; the modules below take the
typed specs and check only their own invariants (the typed constructors a
library user may call directly, `MLPSpec.create`, `DCNSpec.create` and
`SparseOptimizerSpec.check`, take the config path from the builder to name
in their errors).

  check_fields          the unknown-field check of every group
  check_positive_int    a count, e.g. an embedding_dim
  validate_numbers      the integer and float fields of the loop, data, mesh
                        and embedding groups (the table `_RULES`)
  check_feature         `config.features.<name>`
  check_feature_groups  `config.model.feature_groups`
  check_model           `config.model` beside the features it groups
  check_tables          features sharing a table, `config.embedding.tables`
  check_sparse_optimizer, check_schedule, check_dense_optimizer
                        `config.embedding.optimizer`, its schedules,
                        `config.optimizer`
  check_sharding        `config.embedding.sharding*`
  check_data_source, check_data, check_multi_hot
                        `config.data`
  check_loop            `config.early_stopping`, `config.keep_best_metric`
  check_admission       `config.admission`
  check_batch_sizes     the batch sizes on a mesh (the Trainer calls it)

Each builder calls `validate_numbers` for its group and then the group's
checks. Configs of other files may lack some fields: `validate_numbers`
passes over absent fields.

`ListFlagParser` lets `--config.<field>=[32,8]` (or `=32,8`) override a list
field, which ml_collections' config_flags cannot by itself (it parses tuples
only); `main.py` registers it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import flags
from ml_collections import config_flags

from dlrm_jax.config import spec as spec_lib
from dlrm_jax.data import features as features_lib
from dlrm_jax.embedding import specs as emb_specs
from dlrm_jax.embedding.ids import admission as admission_lib
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.models.dlrm import INTERACTIONS
from dlrm_jax.train import early_stopping
from dlrm_jax.train import optimizers as dense_optimizers
from dlrm_jax.train import schedules

FEATURE_TYPES = ('raw', 'id', 'combo', 'sequence_id')
COMPUTE_DTYPES = ('float32', 'bfloat16')
DATA_SOURCES = ('auto', 'synthetic', 'criteo_tsv', 'binary', 'tfds', 'table')
DENSE_OPTIMIZERS = tuple(dense_optimizers.KINDS)
MC_POLICIES = ('lru', 'lfu')
TABLE_FIELDS = ('initializer', 'init_scale', 'dtype', 'optimizer')

# (path, type, rule as text, test). Types: 'int' (not bool), 'float' (int or
# float), each optionally 'or None'. A path's group is its first part, or
# 'loop' for a top-level field.
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
GROUPS = ('loop', 'data', 'mesh', 'embedding')

_MISSING = object()


def _get(config, path: str):
  node = config
  for part in path.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def _group(path: str) -> str:
  return path.split('.')[0] if '.' in path else 'loop'


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return _is_int(value) or isinstance(value, float)


def _check_number(value, path: str, kind: str, rule: str,
                  test: Callable[[Any], bool]) -> None:
  """One row of `_RULES` applied to `value` (at config path `path`)."""
  if value is None and kind.endswith('or None'):
    return
  base = kind.split()[0]
  if not (_is_int(value) if base == 'int' else _is_number(value)):
    want = 'an integer' if base == 'int' else 'a number'
    raise ValueError(f'{path} ({value!r}) must be {want}'
                     + (f', {rule}' if rule != 'an integer' else '') + '.')
  if not test(value):
    raise ValueError(f'{path} ({value!r}) must be {rule}.')


def validate_numbers(config, group: str | None = None) -> None:
  """Checks the number fields of `_RULES`.

  Args:
    config: the config.
    group: only this group's fields (one of GROUPS: 'loop' is the top-level
      fields); None: every group.

  Raises:
    ValueError: naming the first field that breaks its rule. Fields absent
      from the config are passed over.
  """
  for path, kind, rule, test in _RULES:
    if group is not None and _group(path) != group:
      continue
    value = _get(config, path)
    if value is not _MISSING:
      _check_number(value, f'config.{path}', kind, rule, test)


def check_fields(cfg: Mapping[str, Any], allowed: Iterable[str], path: str,
                 what: str = 'it') -> None:
  """Checks that a config group has no field it does not take.

  Args:
    cfg: the group, a dict or a ConfigDict.
    allowed: the fields it takes.
    path: its config path, e.g. 'config.model.dcn'.
    what: who takes the fields, for the message (e.g. 'an MLP').

  Raises:
    ValueError: naming the group, its unknown fields and the fields it takes.
  """
  unknown = sorted(set(cfg) - set(allowed))
  if unknown:
    raise ValueError(f'{path} has unknown fields {unknown}; {what} takes'
                     f' {sorted(allowed)}.')


def check_positive_int(value, path: str) -> None:
  """Checks that a field is an integer above 0.

  Args:
    value: the field's value.
    path: its config path.

  Raises:
    ValueError: if it is not (booleans are not integers).
  """
  if not _is_int(value) or value <= 0:
    raise ValueError(f'{path} ({value!r}) must be a positive integer.')


def _check_one_of(value, choices: Sequence[Any], path: str) -> None:
  if value not in choices:
    raise ValueError(f'{path} ({value!r}) must be one of {list(choices)}.')


check_one_of = _check_one_of


# ----- Features and model -----------------------------------------------------


def check_feature(name: str, cfg: Mapping[str, Any]) -> None:
  """Checks one feature, `config.features.<name>`.

  Args:
    name: the feature's name.
    cfg: its config group.

  Raises:
    ValueError: naming the field of the first rule it breaks: its type, its
      input column, the fields its type takes, and their values.
  """
  path = f'config.features.{name}'
  kind = cfg.get('type')
  _check_one_of(kind, FEATURE_TYPES, f'{path}.type')
  fields = set(cfg) - {'type', 'input'}
  if kind == 'combo':
    check_fields(fields, {'inputs', 'embedding_dim', 'num_buckets',
                          'hash_bucket_size', 'embedding_name',
                          'value_dtype'}, path, 'a combo feature')
    inputs = cfg.get('inputs')
    if isinstance(inputs, str) or not inputs or len(inputs) < 2 or not all(
        isinstance(c, str) and c for c in inputs):
      raise ValueError(
          f'{path}.inputs ({inputs!r}) must list two or more columns.')
    check_positive_int(cfg.get('embedding_dim'), f'{path}.embedding_dim')
    _check_value_dtype(cfg, path)
    _check_id_rows(path, cfg)
    return
  column = cfg.get('input') or name
  if not isinstance(column, str):
    raise ValueError(f'{path}.input ({column!r}) must name a column.')
  col_kind = _column_kind(column)
  if kind == 'raw':
    check_fields(fields, {'normalizer', 'boundaries', 'embedding_dim',
                          'embedding_name'}, path, 'a raw feature')
    _check_raw_feature(path, column, col_kind, cfg)
    return
  allowed = {'embedding_dim', 'num_buckets', 'hash_bucket_size',
             'embedding_name'}
  allowed |= ({'max_ids', 'combiner', 'managed_collision', 'value_dtype',
               'separator', 'vocab_list', 'default_bucketize_value',
               'flag_columns'} if kind == 'id' else {'sequence_length'})
  check_fields(fields, allowed, path, f'an {kind} feature')
  if col_kind == 'int':
    raise ValueError(
        f'{path}.input ({column!r}) must be a categorical column (cat_<i>)'
        f' for an {kind} feature.')
  check_positive_int(cfg.get('embedding_dim'), f'{path}.embedding_dim')
  vocab = cfg.get('vocab_list')
  if vocab:
    if cfg.get('num_buckets') is not None or cfg.get(
        'hash_bucket_size') is not None:
      raise ValueError(
          f'{path}: give one of vocab_list, num_buckets and'
          ' hash_bucket_size.')
    if len(set(vocab)) != len(vocab) or not all(
        isinstance(v, str) for v in vocab):
      raise ValueError(f'{path}.vocab_list must hold distinct strings.')
    default = cfg.get('default_bucketize_value') or 0
    if not 0 <= default < len(vocab):
      raise ValueError(
          f'{path}.default_bucketize_value ({default}) must be a row of'
          f' the vocabulary, 0..{len(vocab) - 1}.')
    managed = False
  else:
    managed = _check_id_rows(path, cfg)
  _check_value_dtype(cfg, path)
  flags = cfg.get('flag_columns')
  if flags is not None and (isinstance(flags, str) or not flags):
    raise ValueError(
        f'{path}.flag_columns ({flags!r}) must list the 0/1 columns of the'
        ' bag.')
  if kind == 'id':
    max_ids = cfg.get('max_ids', 1)
    check_positive_int(max_ids, f'{path}.max_ids')
    _check_one_of(cfg.get('combiner') or 'sum', emb_specs.COMBINERS,
                  f'{path}.combiner')
    if managed and max_ids != 1:
      raise ValueError(
          f'{path}: managed_collision takes single-valued features; max_ids'
          f' is {max_ids}.')
    sep = cfg.get('separator')
    if sep is not None and (not isinstance(sep, str) or not sep):
      raise ValueError(f'{path}.separator ({sep!r}) must be a non-empty'
                       ' string.')


VALUE_DTYPES = ('string', 'int', 'hex')


def _check_value_dtype(cfg: Mapping[str, Any], path: str) -> None:
  dtype = cfg.get('value_dtype')
  if dtype is not None:
    _check_one_of(dtype, VALUE_DTYPES, f'{path}.value_dtype')


def _column_kind(column: str) -> str | None:
  """'int' or 'cat' for Criteo's column names, None for any other name."""
  m = re.match(r'^(int|cat)_(\d+)$', column)
  return m.group(1) if m else None


def _check_raw_feature(path: str, column: str, col_kind: str | None,
                       cfg: Mapping[str, Any]) -> None:
  if col_kind == 'cat':
    raise ValueError(
        f'{path}.input ({column!r}) must be an integer column (int_<i>)'
        ' for a raw feature.')
  _check_one_of(cfg.get('normalizer') or 'none', features_lib.NORMALIZERS,
                f'{path}.normalizer')
  boundaries, dim = cfg.get('boundaries'), cfg.get('embedding_dim')
  if boundaries is not None:
    boundaries = [float(b) for b in boundaries]
    if not boundaries or any(
        b >= c for b, c in zip(boundaries, boundaries[1:])):
      raise ValueError(
          f'{path}.boundaries ({boundaries}) must be a non-empty, strictly'
          ' increasing list.')
    check_positive_int(dim, f'{path}.embedding_dim')
  elif dim is not None:
    raise ValueError(
        f'{path}.embedding_dim ({dim}) needs {path}.boundaries: a raw'
        ' feature gets an embedding only when bucketized.')


def _check_id_rows(path: str, cfg: Mapping[str, Any]) -> bool:
  """Checks the rows of an id feature: one way to give them (num_buckets,
  hash_bucket_size or managed_collision.num_rows), at least 2 of them.
  Returns whether the feature has a managed-collision remapper."""
  nb, hb = cfg.get('num_buckets'), cfg.get('hash_bucket_size')
  mc = cfg.get('managed_collision') or {}
  managed = mc.get('num_rows') is not None
  if managed:
    mc_path = f'{path}.managed_collision'
    check_fields(mc, ('num_rows', 'policy'), mc_path)
    policy = mc.get('policy', 'lru')
    if policy not in MC_POLICIES:
      raise ValueError(
          f"{mc_path}.policy ({policy!r}) must be 'lru' or 'lfu'.")
    check_positive_int(mc['num_rows'], f'{mc_path}.num_rows')
    nb, hb = mc['num_rows'], None  # The remapper's rows replace them.
  if (nb is None) == (hb is None):
    raise ValueError(
        f'{path}: give exactly one of num_buckets ({nb!r}) and'
        f' hash_bucket_size ({hb!r}).')
  field = ('managed_collision.num_rows' if managed else
           'num_buckets' if nb is not None else 'hash_bucket_size')
  rows = nb if nb is not None else hb
  check_positive_int(rows, f'{path}.{field}')
  if rows < 2:
    raise ValueError(
        f'{path}.{field} ({rows}) must be at least 2: row 0 holds missing'
        ' values.')
  return managed


def check_feature_groups(groups: Mapping[str, Any],
                         features: Mapping[str, features_lib.Feature]
                         ) -> None:
  """Checks `config.model.feature_groups` against the features.

  Args:
    groups: `config.model.feature_groups`.
    features: the built features, by name.

  Raises:
    ValueError: if a group is unknown, the sparse group is missing or
      empty, a group lists a feature twice or one that does not exist, or a
      feature is in the wrong group (a sequence feature in either, a feature
      with ids in the dense one, a raw feature without boundaries in the
      sparse one).
  """
  path = 'config.model.feature_groups'
  check_fields(groups, ('dense', 'sparse'), path, 'DLRM')
  if not groups.get('sparse'):
    raise ValueError(f'{path}.sparse is missing or empty; DLRM needs a'
                     ' sparse group.')
  for group in ('dense', 'sparse'):
    names = list(groups.get(group) or [])
    for i, n in enumerate(names):
      if n not in features:
        raise ValueError(f'{path}.{group} lists {n!r}, which is not in'
                         ' config.features.')
      if n in names[:i]:
        raise ValueError(f'{path}.{group} lists {n!r} twice.')
  for n in groups.get('dense') or []:
    f = features[n]
    if isinstance(f, features_lib.SequenceIdFeature):
      raise ValueError(
          f'{path}.dense lists {n!r}, a sequence feature; DLRM groups cannot'
          ' take sequence features.')
    if not isinstance(f, features_lib.RawFeature) or f.is_sparse:
      raw = isinstance(f, features_lib.RawFeature)
      raise ValueError(
          f'{path}.dense lists {n!r}, which has ids'
          f' ({type(f).__name__}{", bucketized" if raw else ""}); the dense'
          ' group takes raw features without boundaries; move it to the'
          ' sparse group.')
  for n in groups['sparse']:
    f = features[n]
    if isinstance(f, features_lib.SequenceIdFeature):
      raise ValueError(
          f'{path}.sparse lists {n!r}, a sequence feature; DLRM groups'
          ' cannot take sequence features.')
    if isinstance(f, features_lib.RawFeature) and not f.is_sparse:
      raise ValueError(
          f'{path}.sparse lists {n!r}, a raw feature without boundaries (no'
          ' embedding); give it boundaries and an embedding_dim, or move it'
          ' to the dense group.')


def check_model(m: Mapping[str, Any],
                dense: Sequence[features_lib.RawFeature],
                sparse: Sequence[features_lib.Feature]) -> None:
  """Checks `config.model` beside the features of its groups.

  The MLPs' own fields are checked by `MLPSpec.create`, the cross network's
  numbers by `DCNSpec.create`.

  Args:
    m: `config.model`.
    dense: the features of the dense group.
    sparse: the features of the sparse group.

  Raises:
    ValueError: if the model is not 'dlrm'; the sparse features differ in
      embedding_dim; dense_mlp is set without a dense group or missing with
      one, or its last width is not the embedding dim; the compute dtype or
      interaction is unknown; or the dcn interaction comes with
      arch_with_sparse, interaction_self or unknown dcn fields.
  """
  if m['name'] != 'dlrm':
    raise ValueError(f"config.model.name ({m['name']!r}) must be 'dlrm'.")
  dims = {f.name: f.embedding_dim for f in sparse}
  if len(set(dims.values())) > 1:
    raise ValueError(
        "config.features: the sparse group's features must share one"
        f' embedding_dim, got {dims}.')
  dense_mlp = m.get('dense_mlp')
  if dense and not dense_mlp:
    raise ValueError(
        f'config.model.feature_groups.dense has {len(dense)} features but'
        ' config.model.dense_mlp is not set.')
  if dense_mlp and not dense:
    raise ValueError(
        'config.model.dense_mlp is set but there is no dense feature group'
        ' (config.model.feature_groups.dense); remove dense_mlp or add the'
        ' group.')
  units = list((dense_mlp or {}).get('hidden_units') or [])
  if dense and units and _is_int(units[-1]) and (
      units[-1] != sparse[0].embedding_dim):
    raise ValueError(
        f'config.model.dense_mlp.hidden_units[-1] ({units[-1]}) must equal'
        f' the sparse embedding dim ({sparse[0].embedding_dim}).')
  _check_one_of(m['compute_dtype'], COMPUTE_DTYPES,
                'config.model.compute_dtype')
  _check_one_of(m['interaction'], INTERACTIONS, 'config.model.interaction')
  if m['interaction'] == 'dcn':
    for field in ('arch_with_sparse', 'interaction_self'):
      if m[field]:
        raise ValueError(
            f'config.model.{field} ({m[field]!r}) must be False with'
            " config.model.interaction 'dcn': the over arch sees the cross"
            ' network output only (TorchRec DLRM_DCN, MLPerf DLRM-DCNv2).')
    check_fields(m.get('dcn') or {}, ('num_layers', 'rank'),
                 'config.model.dcn')


# ----- Embedding tables and optimizers ----------------------------------------


def check_tables(e: Mapping[str, Any],
                 tables: Mapping[str, Sequence[features_lib.Feature]],
                 overrides: Mapping[str, Mapping[str, Any]]) -> None:
  """Checks the embedding tables: their features and per-table overrides.

  Args:
    e: `config.embedding`.
    tables: each table's name -> the sparse features reading it, in order.
    overrides: `config.embedding.tables`, its unset (None) fields dropped.

  Raises:
    ValueError: if features sharing a table differ in rows, dim or combiner
      or have managed collisions; an override names a table no feature uses
      or a field a table does not take; or a table's initializer, dtype or
      init_scale is not one it can take.
  """
  what = {'num_rows': 'table size', 'embedding_dim': 'embedding_dim',
          'combiner': 'combiner'}
  for name, (first, *others) in tables.items():
    for f in others:
      pair = f'config.features.{f.name} and config.features.{first.name}'
      if (getattr(f, 'managed_collision', None) or
          getattr(first, 'managed_collision', None)):
        raise ValueError(
            f'{pair}: features with managed_collision cannot share table'
            f" {name!r} (each remapper owns its table's rows).")
      for k, label in what.items():
        if getattr(f, k) != getattr(first, k):
          raise ValueError(
              f'{pair} share table {name!r} but differ in {label}'
              f' ({getattr(f, k)} vs {getattr(first, k)}).')
  for name in overrides:
    if name not in tables:
      raise ValueError(
          f'config.embedding.tables.{name} overrides a table that no sparse'
          f' feature uses (tables: {sorted(tables)}).')
  for name in tables:
    over = overrides.get(name, {})
    path = f'config.embedding.tables.{name}'
    check_fields(over, TABLE_FIELDS, path)
    for field, choices in (('initializer', emb_specs.INITIALIZERS),
                           ('dtype', emb_specs.TABLE_DTYPES)):
      src = path if field in over else 'config.embedding'
      _check_one_of(over.get(field, e[field]), choices, f'{src}.{field}')
    if 'init_scale' in over:
      _check_number(over['init_scale'], f'{path}.init_scale', 'float',
                    'at least 0', lambda v: v >= 0)


def check_sparse_optimizer(cfg: Mapping[str, Any], path: str) -> None:
  """Checks a table optimizer's fields.

  Its schedule is `check_schedule`'s; its kinds and ranges are
  `SparseOptimizerSpec.check`'s, which the builder calls with the same path.

  Args:
    cfg: `config.embedding.optimizer`, or a table's optimizer merged over it.
    path: its config path.

  Raises:
    ValueError: on an unknown field, or a number field that is not a
      number.
  """
  fields = dataclasses.fields(emb_specs.SparseOptimizerSpec)
  check_fields(cfg, [f.name for f in fields], path)
  for f in fields:
    if (getattr(f.type, '__name__', f.type) == 'float' and f.name in cfg
        and not _is_number(cfg[f.name])):
      raise ValueError(
          f'{path}.{f.name} ({cfg[f.name]!r}) must be a number.')


def check_schedule(cfg: Mapping[str, Any], path: str) -> None:
  """Checks a learning-rate schedule (fields absent take their defaults).

  Args:
    cfg: the `schedule` group of an optimizer.
    path: its config path.

  Raises:
    ValueError: on an unknown field or kind, a learning rate that is not
      positive, negative step counts, or a cosine schedule without
      decay_steps.
  """
  default = schedules.ScheduleSpec()
  get = lambda k: cfg.get(k, getattr(default, k))
  check_fields(cfg, [f.name for f in dataclasses.fields(default)], path)
  _check_one_of(get('kind'), schedules.SCHEDULES, f'{path}.kind')
  if not _is_number(get('learning_rate')) or not get('learning_rate') > 0:
    raise ValueError(
        f"{path}.learning_rate ({get('learning_rate')}) must be positive.")
  for name in ('warmup_steps', 'decay_start_step', 'decay_steps'):
    if not _is_number(get(name)) or get(name) < 0:
      raise ValueError(f'{path}.{name} ({get(name)}) must be >= 0.')
  if get('kind') == 'cosine' and get('decay_steps') <= 0:
    raise ValueError(
        f"{path}.decay_steps ({get('decay_steps')}) must be positive for a"
        ' cosine schedule.')


def check_dense_optimizer(cfg: Mapping[str, Any]) -> None:
  """Checks `config.optimizer`, the dense (MLP) optimizer.

  Its schedule is `check_schedule`'s.

  Args:
    cfg: `config.optimizer`; it must give every field (configs/criteo.py
      does); an unset (None) number is 0.

  Raises:
    ValueError: on the ambiguous kind 'adagrad' (naming the two Adagrads to
      choose from) or an unknown kind, unknown or missing fields, a number
      field that is not a number, or a negative accumulator start, epsilon,
      decay, momentum or clip norm.
  """
  path = 'config.optimizer'
  kind = cfg.get('kind')
  if kind == 'adagrad':
    raise ValueError(
        f"{path}.kind ('adagrad') is ambiguous; choose 'optax_adagrad'"
        " (optax.adagrad's formula: g / sqrt(acc + eps), acc from 0.1) or"
        " 'exact_adagrad' (torch.optim.Adagrad and FBGEMM: g / (sqrt(acc) +"
        " eps), acc from 0, as the table optimizer 'adagrad').")
  _check_one_of(kind, DENSE_OPTIMIZERS, f'{path}.kind')
  fields = [f.name for f in dataclasses.fields(spec_lib.DenseOptimizerSpec)]
  check_fields(cfg, fields, path)
  missing = sorted(set(fields) - set(cfg))
  if missing:
    raise ValueError(f'{path} lacks fields {missing} (see'
                     ' configs/criteo.py).')
  for k in sorted(set(fields) - {'kind', 'schedule'}):
    if cfg[k] is not None and not _is_number(cfg[k]):
      raise ValueError(f'{path}.{k} ({cfg[k]!r}) must be a number.')
  for k in ('initial_accumulator_value', 'grad_clip_norm', 'weight_decay',
            'momentum', 'eps'):
    if float(cfg[k] or 0.0) < 0:
      raise ValueError(f'{path}.{k} ({float(cfg[k])}) must be >= 0.')


def check_cache(cache, tables) -> None:
  """Checks `config.embedding.cache` (tables placed `cached`).

  Args:
    cache: `config.embedding.cache`, with `tables` set.
    tables: the table specs.

  Raises:
    ValueError: naming the field: an unknown table, a fraction outside
      (0, 1], rows below 1, a hit rate outside [0, 1], or a table that
      cannot be cached (not float32).
  """
  by_name = {t.name: t for t in tables}
  names = (list(by_name) if cache['tables'] == 'all' else
           [n.strip() for n in cache['tables'].split(',') if n.strip()])
  for n in names:
    if n not in by_name:
      raise ValueError(
          f'config.embedding.cache.tables names unknown table {n!r}; the'
          f' tables are {sorted(by_name)} (or use \'all\').')
    if by_name[n].dtype != 'float32':
      raise ValueError(
          f'config.embedding.cache.tables: table {n!r} is'
          f' {by_name[n].dtype}; cached tables must be float32.')
  fraction = cache.get('fraction', 0.2)
  if not (_is_number(fraction) and 0 < fraction <= 1):
    raise ValueError(
        f'config.embedding.cache.fraction ({fraction!r}) must be in (0, 1].')
  rows = cache.get('rows')
  if rows is not None and not (_is_int(rows) and rows >= 1):
    raise ValueError(
        f'config.embedding.cache.rows ({rows!r}) must be an integer, at'
        ' least 1, or None (use the fraction).')
  hit = cache.get('min_hit_rate', 0.5)
  if not (_is_number(hit) and 0 <= hit <= 1):
    raise ValueError(
        f'config.embedding.cache.min_hit_rate ({hit!r}) must be in [0, 1].')


def check_sharding(config, table_names: Iterable[str]) -> None:
  """Checks what `config.embedding` asks of the sharding planner.

  Its numbers are `validate_numbers`' (group 'embedding'); what depends on
  the mesh (row_group_size dividing the model axis, the device memory) the
  planner checks when it places the tables.

  Args:
    config: the config.
    table_names: the embedding tables.

  Raises:
    ValueError: on an unknown strategy, or an override of an unknown table.
  """
  e = config['embedding']
  if e['sharding'] != 'auto' and e['sharding'] not in plan_lib.STRATEGIES:
    raise ValueError(
        f"config.embedding.sharding ({e['sharding']!r}) must be auto or one"
        f' of {list(plan_lib.STRATEGIES)}.')
  names = set(table_names)
  for name, strategy in (e.get('sharding_overrides') or {}).items():
    if strategy is None:
      continue  # an unset placeholder
    if name not in names:
      raise ValueError(
          f'config.embedding.sharding_overrides names unknown table'
          f' {name!r}.')
    _check_one_of(strategy, plan_lib.STRATEGIES,
                  f'config.embedding.sharding_overrides.{name}')


# ----- Data -------------------------------------------------------------------


def check_data_source(d: Mapping[str, Any], source: str) -> None:
  """Checks `config.data.source` and the fields its source needs.

  Args:
    d: `config.data`.
    source: the source it reads ('auto' resolved).

  Raises:
    ValueError: on an unknown source, a binary source without binary_dir or
      a criteo_tsv source without train_path.
  """
  _check_one_of(d['source'], DATA_SOURCES, 'config.data.source')
  if source == 'binary' and not d['binary_dir']:
    raise ValueError(
        "config.data.source is 'binary' but config.data.binary_dir is"
        ' empty.')
  if source in ('criteo_tsv', 'table') and not d['train_path']:
    raise ValueError(
        "config.data.train_path is empty but config.data.source is"
        f" {source!r}; give the train file(s).")


def check_data(config, source: str) -> None:
  """Checks `config.data` beyond its source and numbers.

  Args:
    config: the config.
    source: the source it reads ('auto' resolved).

  Raises:
    ValueError: on an unknown bad_lines, or a synthetic source without eval
      rows.
  """
  d = config['data']
  if d['bad_lines'] not in ('error', 'skip'):
    raise ValueError(
        f"config.data.bad_lines ({d['bad_lines']!r}) must be 'error' or"
        " 'skip'.")
  if source != 'table' and not (source == 'binary'
                                and _model_layout(d['binary_dir'])):
    _check_criteo_columns(config, source)
  num_eval = _get(config, 'data.synthetic.num_eval')
  if source == 'synthetic' and num_eval is not _MISSING and num_eval < 1:
    raise ValueError(
        f'config.data.synthetic.num_eval ({num_eval}) must be at least 1'
        " with config.data.source 'synthetic'.")


def _model_layout(binary_dir) -> bool:
  """Whether a preprocessed dataset holds a table config's model batches
  (`binary.Metadata.layout == 'model'`), whose features name any column."""
  path = os.path.join(binary_dir or '', 'metadata.json')
  if not binary_dir or not os.path.isfile(path):
    return False
  with open(path) as f:
    return json.load(f).get('layout') == 'model'


def _check_criteo_columns(config, source: str) -> None:
  """Criteo's sources have the columns int_<i> and cat_<i> only."""
  groups = config['model']['feature_groups']
  names = list(groups.get('dense') or []) + list(groups.get('sparse') or [])
  for name in names:
    cfg = config['features'].get(name)
    if cfg is None:
      continue
    path = f'config.features.{name}'
    for field in ('separator', 'flag_columns', 'value_dtype', 'vocab_list'):
      if cfg.get(field) is not None and (field != 'vocab_list' or cfg.get(
          field)):
        raise ValueError(
            f'{path}.{field} is for the tabular source'
            f" (config.data.source='table'), not {source!r}.")
    columns = cfg.get('inputs') if cfg.get('type') == 'combo' else [
        cfg.get('input') or name]
    for column in columns:
      if _column_kind(column) is None:
        field = 'inputs' if cfg.get('type') == 'combo' else 'input'
        raise ValueError(
            f'{path}.{field} ({column!r}): {source} data has Criteo\'s'
            " columns only, int_<i> and cat_<i>; read a table's own"
            " columns with config.data.source='table'.")


def check_multi_hot(mh: Mapping[str, Any], id_features: Sequence[str]
                    ) -> None:
  """Checks `config.data.multi_hot` against the sparse group.

  Args:
    mh: `config.data.multi_hot`.
    id_features: the names of the id features of the sparse group.

  Raises:
    ValueError: if it is enabled with a bag size for other than each id
      feature.
  """
  if mh['enabled'] and len(mh['hotness']) != len(id_features):
    raise ValueError(
        f"config.data.multi_hot.hotness has {len(mh['hotness'])} values for"
        f' {len(id_features)} id features of the sparse group.')


# ----- Loop -------------------------------------------------------------------


def _check_metric(metric, mode, path: str) -> None:
  if metric not in early_stopping.METRIC_MODES:
    raise ValueError(f'{path} ({metric!r}) must be one of'
                     f' {sorted(early_stopping.METRIC_MODES)}.')
  if mode is not None and mode not in early_stopping.MODES:
    raise ValueError(f'{path.rsplit(".", 1)[0]}.mode ({mode!r}) must be one'
                     f' of {list(early_stopping.MODES)}.')


def check_loop(config) -> None:
  """Checks the training loop's early stopping and best keeping.

  Args:
    config: the config.

  Raises:
    ValueError: on an unknown metric or mode, or a negative patience or
      min_delta, in config.early_stopping; or an unknown
      config.keep_best_metric.
  """
  path = 'config.early_stopping'
  early = config['early_stopping']
  _check_metric(early['metric'], early['mode'], f'{path}.metric')
  patience = early['patience']
  if not _is_int(patience) or patience < 0:
    raise ValueError(f'{path}.patience ({patience!r}) must be an integer'
                     ' >= 0 (0: off).')
  min_delta = early['min_delta']
  if not _is_number(min_delta) or not min_delta >= 0:
    raise ValueError(f'{path}.min_delta ({min_delta!r}) must be >= 0.')
  if config['keep_best_metric']:
    _check_metric(config['keep_best_metric'], None, 'config.keep_best_metric')


def check_batch_sizes(loop, num_devices: int) -> None:
  """Checks that the batches split evenly over the devices.

  Args:
    loop: the run's `LoopSpec`.
    num_devices: the devices of the mesh.

  Raises:
    ValueError: naming config.batch_size or config.eval_batch_size if it is
      not a positive multiple of `num_devices`.
  """
  for field in ('batch_size', 'eval_batch_size'):
    value = getattr(loop, field)
    if value <= 0 or value % num_devices:
      raise ValueError(
          f'config.{field} ({value}) must be a positive multiple of the'
          f' number of devices ({num_devices}).')


# ----- Rare-id admission ------------------------------------------------------


def check_admission(cfg: Mapping[str, Any],
                    sparse: Sequence[features_lib.Feature]) -> None:
  """Checks `config.admission` (fields absent take AdmissionSpec's defaults).

  Args:
    cfg: `config.admission`.
    sparse: the features of the sparse group.

  Raises:
    ValueError: if a count is not an integer of its range, or, with the
      filter on (min_count > 1), it names features that are not sparse ones
      or its oov_row is outside the table of a feature it filters.
  """
  path = 'config.admission'
  default = admission_lib.AdmissionSpec()
  check_fields(cfg, [f.name for f in dataclasses.fields(default)], path)
  get = lambda k: cfg.get(k, getattr(default, k))
  for field, low in (('min_count', 0), ('oov_row', 0), ('depth', 1),
                     ('width', 1)):
    if not _is_int(get(field)) or get(field) < low:
      raise ValueError(
          f'{path}.{field} ({get(field)!r}) must be an integer >= {low}.')
  if get('min_count') <= 1:
    return
  names = [f.name for f in sparse]
  listed = get('features') or ()
  listed = (listed,) if isinstance(listed, str) else tuple(listed)
  unknown = sorted(set(listed) - set(names))
  if unknown:
    raise ValueError(
        f'{path}.features names {unknown}, which are not sparse features'
        f' (features: {names}).')
  for f in sparse:
    if ((not listed or f.name in listed) and
        not getattr(f, 'managed_collision', None) and
        get('oov_row') >= f.num_rows):
      raise ValueError(
          f"{path}.oov_row ({get('oov_row')}) is outside the {f.num_rows}"
          f' rows of feature {f.name!r}.')


# ----- Command line -----------------------------------------------------------


class ListFlagParser(flags.ArgumentParser):
  """The parser of list config fields on the command line.

  `[32, 8]`, `(32, 8)`, `32,8`, `32` or `[]` -> a list of literals (numbers,
  strings, booleans; a bare word is a string).
  """

  syntactic_help = 'a list: [a,b,...] or a,b,...'

  def parse(self, argument):
    """A flag's value as a list.

    Args:
      argument: the text after `=`, or a list or tuple.

    Returns:
      The list.

    Raises:
      ValueError: on an empty item (`1,,2`).
    """
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
    """The type named in `--help`."""
    return 'list'


def register_list_parser() -> None:
  """Makes config_flags parse list fields with ListFlagParser.

  `main.py` calls it before the flags are defined.
  """
  config_flags.register_flag_parser_for_type(list, ListFlagParser())
