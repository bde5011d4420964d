"""The RunSpec: a run, typed and frozen, as `config.build` makes it.

A `RunSpec` is everything a run is: the model (`ModelSetup`'s fields), the
sharding request, the mesh, the dense optimizer, the data, the loop and the
rare-id admission. `config.build.run_spec` makes it from a config, once;
nothing downstream reads the ConfigDict. Its parts are the typed specs of
the modules below (`DLRMSpec`, `TableSpec`, `SyntheticSpec`,
`EarlyStoppingSpec`, `AdmissionSpec`, ...) and the specs of this module,
each field named as the config field it comes from; the fields' defaults and
comments are in configs/criteo.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dlrm_jax.data import features as features_lib
from dlrm_jax.data import synthetic as synthetic_lib
from dlrm_jax.data import table as table_lib
from dlrm_jax.embedding import specs as emb_specs
from dlrm_jax.embedding.ids import admission as admission_lib
from dlrm_jax.models import DLRMSpec
from dlrm_jax.train import early_stopping as early_stopping_lib
from dlrm_jax.train import schedules


@dataclasses.dataclass(frozen=True)
class ModelSetup:
  """Everything static about a model.

  Attributes:
    features: every feature of `config.features`, by name.
    transform: raw batches -> model batches (the dense and sparse groups).
    model: the DLRM's dense and over arches.
    tables: the embedding tables.
    feature_specs: the sparse features' specs (which table, how many ids),
      in sparse-group order.
    compute_dtype: the MLPs' compute dtype (`config.model.compute_dtype`).
  """

  features: dict[str, features_lib.Feature]
  transform: features_lib.FeatureTransform
  model: DLRMSpec
  tables: tuple[emb_specs.TableSpec, ...]
  feature_specs: tuple[emb_specs.FeatureSpec, ...]
  compute_dtype: Any

  @property
  def table_rows(self) -> tuple[int, ...]:
    """Rows of the table of each sparse feature, in sparse-group order."""
    rows = {t.name: t.num_rows for t in self.tables}
    return tuple(rows[f.table] for f in self.feature_specs)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """The training loop: the config's top-level fields of the same names.

  Attributes:
    num_train_steps: steps to train; None: `num_epochs` over the train rows.
    num_epochs: epochs when `num_train_steps` is None.
    min_train_steps: with epochs, at least this many steps (whole epochs).
    batch_size: global train batch.
    eval_batch_size: global eval batch.
    seed: seeds parameters, dropout and data.
    log_every_steps: progress line and metrics row.
    eval_every_steps: full evaluation (and at the end).
    checkpoint_every_steps: checkpoint (and at the end).
    max_to_keep: checkpoints kept.
    target_auc: the eval AUC that ends training; None when off.
    keep_best_metric: eval metric whose best state is kept; None when off.
    early_stopping: `config.early_stopping`, its mode resolved.
    record_batches: `config.data.record_batches`: log a digest of each
      step's ids to batches.jsonl.
  """

  num_train_steps: int | None
  num_epochs: float
  min_train_steps: int
  batch_size: int
  eval_batch_size: int
  seed: int
  log_every_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  max_to_keep: int
  target_auc: float | None
  keep_best_metric: str | None
  early_stopping: early_stopping_lib.EarlyStoppingSpec
  record_batches: bool


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """`config.mesh`: the device mesh's axis sizes.

  Attributes:
    data: devices along the data axis (replicas of the table shards); -1:
      the rest.
    model: devices along the model axis (sharing the tables); -1: the rest.
  """

  data: int
  model: int


@dataclasses.dataclass(frozen=True)
class CacheRequest:
  """`config.embedding.cache`: tables placed `cached` (`embedding.cache`).

  Attributes:
    rows: (table, cache rows) pairs, one per cached table.
    directory: where the stores' memmap files live: absolute, or relative
      to the workdir. '' keeps the stores in host memory.
    min_hit_rate: a warning is logged when a table's hit rate over a log
      window is below this.
  """

  rows: tuple[tuple[str, int], ...] = ()
  directory: str = ''
  min_hit_rate: float = 0.5


@dataclasses.dataclass(frozen=True)
class ShardingRequest:
  """What `config.embedding` asks of the sharding planner.

  `trainer.make_plan` hands it to the planner, which makes the `Plan`.

  Attributes:
    strategy: `config.embedding.sharding`: 'auto' (the planner) or a
      strategy for every table.
    overrides: `config.embedding.sharding_overrides`: (table, strategy)
      pairs that override it, unset ones dropped.
    replicate_bytes: auto: tables this small are replicated.
    row_group_size: >0: big tables row-wise over groups of this size.
    device_memory_gb: auto: the per-device budget; None: none.
    cache: the tables placed `cached`, with their cache sizes.
  """

  strategy: str
  overrides: tuple[tuple[str, str], ...]
  replicate_bytes: int
  row_group_size: int
  device_memory_gb: float | None
  cache: CacheRequest = CacheRequest()


@dataclasses.dataclass(frozen=True)
class DenseOptimizerSpec:
  """`config.optimizer`: the optimizer of the dense (MLP) parameters.

  `dlrm_jax.train.optimizers` makes the optax optimizer of it and gives the
  formula of each kind.

  Attributes:
    kind: 'sgd', 'optax_adagrad' (optax.adagrad), 'exact_adagrad'
      (torch.optim.Adagrad), 'adam' or 'adamw'.
    schedule: the learning-rate schedule.
    eps: adam/adamw/adagrad epsilon.
    b1: adam/adamw first-moment decay.
    b2: adam/adamw second-moment decay.
    weight_decay: adamw's decoupled weight decay.
    initial_accumulator_value: optax_adagrad's accumulator start.
    momentum: sgd momentum (0: none).
    grad_clip_norm: clip the gradients' global norm to this (0: off).
  """

  kind: str
  schedule: schedules.ScheduleSpec
  eps: float
  b1: float
  b2: float
  weight_decay: float
  initial_accumulator_value: float
  momentum: float
  grad_clip_norm: float


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """`config.data`, its source resolved: the fields of the same names.

  Attributes:
    source: 'synthetic', 'criteo_tsv', 'binary', 'tfds' or 'table' (never
      'auto').
    train_path: criteo_tsv: file, glob or comma list, or a tuple of those.
    eval_path: criteo_tsv: the same; empty: the eval_fraction split.
    eval_fraction: share of the train rows held out for eval.
    labeled_eval: eval files carry labels.
    bad_lines: malformed lines: 'error' (stop) or 'skip'.
    check_ids: reject ids outside their table on the host.
    binary_dir: binary: the output_dir of `dlrm_jax.data.preprocess`.
    tfds_name: tfds: criteo_kaggle or criteo_terabyte.
    tfds_data_dir: tfds: data_dir of the prepared dataset.
    tfds_train_split: tfds: the training split.
    tfds_eval_split: tfds: the eval split; empty: eval_fraction.
    shuffle: global shuffle of random-access sources.
    shuffle_buffer: criteo_tsv: rows per seeded shuffle window.
    chunk_rows: criteo_tsv: rows per read.
    num_threads: grain: threads preparing batches.
    prefetch: batches prepared ahead.
    multi_hot: `config.data.multi_hot.enabled`: MLPerf multi-hot bags.
    multi_hot_distribution: `config.data.multi_hot.distribution`.
    synthetic: the generator of `config.data.synthetic`, seeded by
      `config.seed`, when the source is 'synthetic'; None otherwise.
    table: what the tabular source reads (`config.data.table` and the
      features' columns), when the source is 'table'; None otherwise.
  """

  source: str
  train_path: str | tuple[str, ...]
  eval_path: str | tuple[str, ...]
  eval_fraction: float
  labeled_eval: bool
  bad_lines: str
  check_ids: bool
  binary_dir: str
  tfds_name: str
  tfds_data_dir: str
  tfds_train_split: str
  tfds_eval_split: str
  shuffle: bool
  shuffle_buffer: int
  chunk_rows: int
  num_threads: int
  prefetch: int
  multi_hot: bool
  multi_hot_distribution: str
  synthetic: synthetic_lib.SyntheticSpec | None
  table: table_lib.TableSpec | None = None


@dataclasses.dataclass(frozen=True)
class RunSpec(ModelSetup):
  """Everything a run is, typed and checked: `ModelSetup`'s fields and these.

  Built once from the config by `config.build.run_spec`; nothing downstream
  reads the ConfigDict.

  Attributes:
    sharding: what the sharding planner is asked for.
    mesh: the device mesh's axis sizes.
    dense_optimizer: the MLPs' optimizer.
    data: the input data.
    loop: the training loop.
    admission: rare-id admission (`min_count <= 1`: off).
    config_json: the config as JSON, written to config.json and the
      checkpoints' meta for the record (never read back by the run).
  """

  sharding: ShardingRequest
  mesh: MeshSpec
  dense_optimizer: DenseOptimizerSpec
  data: DataSpec
  loop: LoopSpec
  admission: admission_lib.AdmissionSpec
  config_json: str = dataclasses.field(default='{}', compare=False)

  def same_trainer(self, other: RunSpec) -> bool:
    """Whether a Trainer of `other` serves this spec.

    Args:
      other: the spec the Trainer was made for.

    Returns:
      True if the model, tables, sharding request, mesh, optimizers and
      batch sizes are the same (the data, loop and admission are the run's
      own).
    """
    keep = ('features', 'transform', 'model', 'tables', 'feature_specs',
            'compute_dtype', 'sharding', 'mesh', 'dense_optimizer')
    return all(getattr(self, k) == getattr(other, k) for k in keep) and (
        (self.loop.batch_size, self.loop.eval_batch_size) ==
        (other.loop.batch_size, other.loop.eval_batch_size))
