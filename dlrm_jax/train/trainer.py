"""The trainer: train state, the compiled train, predict and eval steps.

`Trainer` holds everything static about a run spec (model, embedding
engine, optimizers, shardings, compiled steps) and nothing of a run, so
several runs, notebooks and tests can share one; `dlrm_jax.train.loop`
drives it (`train_and_evaluate`, the loop behind `python -m dlrm_jax.main`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from absl import logging

from dlrm_jax import parallel
from dlrm_jax.config import build as config_lib
from dlrm_jax.config import checks as config_checks
from dlrm_jax.data import pipeline
from dlrm_jax.embedding import cache as cache_lib
from dlrm_jax.embedding import rounding
from dlrm_jax.embedding.lookup import STATE_KEY
from dlrm_jax.embedding import specs as emb_specs
from dlrm_jax.embedding.ids.host_state import HostState
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.models import DLRM, DLRMModel, MLPSpec, SparseEmbed
from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax.train import metrics as metrics_lib
from dlrm_jax.train import optimizers as dense_optimizers
from dlrm_jax.train import table_updates


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: the number of steps taken.
    params: the dense parameters (the model's 'arches').
    batch_stats: the batch-norm running statistics. {} without batch norm.
    opt_state: the optax state of the dense parameters.
    emb: the embedding stacks and their sparse optimizer state (the model's
      'embed/sparse_state').
    rng: the key data of the dropout RNG. It is folded with the step.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  emb: Any
  rng: jax.Array


def _zero_acc() -> dict[str, jax.Array]:
  return {
      'loss_sum': jnp.zeros((), jnp.float32),
      'steps': jnp.zeros((), jnp.int32),
      'first_nonfinite': jnp.full((), -1, jnp.int32),
      'invalid_ids': jnp.zeros((), jnp.int32),
  }


# Spec fields that fix no state shape (hyperparameters a resumed run may
# change), left out of `Trainer.signature`; a sparse optimizer's state is
# fixed by its kind alone.
_UNSHAPED_FIELDS = {
    MLPSpec: ('activation', 'dropout_ratio'),
    emb_specs.TableSpec: ('name', 'initializer', 'init_scale', 'combiner'),
}


def _shape_fields(spec) -> Any:
  """`dataclasses.asdict(spec)` as JSON values, less `_UNSHAPED_FIELDS`."""
  if isinstance(spec, emb_specs.SparseOptimizerSpec):
    return spec.kind
  if dataclasses.is_dataclass(spec):
    skip = _UNSHAPED_FIELDS.get(type(spec), ())
    return {f.name: _shape_fields(getattr(spec, f.name))
            for f in dataclasses.fields(spec) if f.name not in skip}
  if isinstance(spec, (tuple, list)):
    return [_shape_fields(x) for x in spec]
  return spec


def make_plan(spec, tables, num_shards: int,
              num_devices: int | None = None,
              features: Sequence[Any] = ()) -> plan_lib.Plan:
  """Builds the embedding sharding plan a run asks for.

  Args:
    spec: a RunSpec, or a config to build one from.
    tables: the table specs.
    num_shards: the number of model shards.
    num_devices: the number of devices, to size the batch per device. None
      leaves it out.
    features: the feature specs. They give the lookups per table.

  Returns:
    The plan.

  Raises:
    ValueError: the tables do not fit the request, for example the device
      memory budget.
  """
  spec = config_lib.run_spec(spec)
  request = spec.sharding
  overrides = dict(request.overrides)
  if request.strategy != 'auto':
    for t in tables:
      overrides.setdefault(t.name, request.strategy)
  budget = request.device_memory_gb
  return plan_lib.auto_plan(
      tables, num_shards, overrides=overrides,
      replicate_bytes=request.replicate_bytes,
      lookups=plan_lib.lookups_per_table(features) or None,
      row_group_size=request.row_group_size,
      batch_per_device=(spec.loop.batch_size // num_devices if num_devices
                        else None),
      device_memory_bytes=None if budget is None else int(budget * 2**30))


class Trainer:
  """Holds a run's model, embedding engine, optimizers and compiled steps.

  It holds nothing of a run. A run's host-side id state is a `HostState`,
  made by `new_host_state`. So runs can share one Trainer.

  Attributes:
    spec: the run's RunSpec, built from the config by `config_lib.run_spec`.
    mesh: the device mesh.
    engine: the embedding engine of the model's `SparseEmbed`.
    model: the Flax model, `DLRMModel`: ids to logits.
    arches: its dense and over arches, `DLRM` (pooled embeddings to logits).
    tx: the dense optimizer.
    resets_rows: whether batches carry managed-collision row resets.
    needs_host_state: whether `predict` and `evaluate` need a run's
      HostState.
    has_bn: whether an MLP uses batch norm.
    train_step: the compiled train step. It takes the state, a batch and the
      metrics accumulator, and returns the new state and accumulator.
    predict_step: the compiled predict step. It returns the probabilities.
  """

  def __init__(self, spec, *, mesh: Mesh | None = None,
               plan: plan_lib.Plan | None = None):
    """Builds the model, the engine, the optimizers and the compiled steps.

    Args:
      spec: a RunSpec, or a config to build one from.
      mesh: the device mesh. Default: one made from `spec.mesh`.
      plan: the embedding sharding plan. Default: `make_plan`'s.

    Raises:
      ValueError: the batch sizes do not fit the devices, or the plan cannot
        place the tables.
    """
    spec = config_lib.run_spec(spec)
    self.spec = spec
    self.mesh = mesh if mesh is not None else parallel.create_mesh(
        spec.mesh.data, spec.mesh.model)
    n_dev = self.mesh.devices.size
    config_checks.check_batch_sizes(spec.loop, n_dev)
    # Cached tables: the engine holds their caches; the host their stores.
    self.cached = None
    if spec.sharding.cache.rows:
      self._check_cacheable(spec)
      self.cached = cache_lib.CachedTables(
          spec.tables, spec.feature_specs, dict(spec.sharding.cache.rows),
          max(spec.loop.batch_size, spec.loop.eval_batch_size))
      for c in self.cached.caches.values():
        c.hint = (' (raise config.embedding.cache.fraction or'
                  ' config.embedding.cache.rows)')
    self.device_tables = (self.cached.device_tables if self.cached
                          else spec.tables)
    if plan is None:
      plan = make_plan(spec, self.device_tables, self.mesh.shape['model'],
                       n_dev, spec.feature_specs)
    embed = SparseEmbed(self.device_tables, self.spec.feature_specs,
                        self.mesh, plan)
    self.engine = embed.engine
    self.swap_step = (cache_lib.swap_fn(self.engine, self.cached.cached)
                      if self.cached else None)
    self.arches = DLRM(self.spec.model, dtype=self.spec.compute_dtype)
    self.model = DLRMModel(self.spec.model, embed,
                           dtype=self.spec.compute_dtype)
    # Rows given to new managed-collision values are reset by the step.
    self.resets_rows = any(getattr(f, 'managed_collision', None)
                           for f in self.spec.transform.sparse)
    # Host-side id state that eval/predict must be given (HostState).
    self.needs_host_state = self.resets_rows or spec.admission.min_count > 1
    self.tx = dense_optimizers.build_dense_optimizer(spec.dense_optimizer)
    self.has_bn = any(
        m is not None and m.use_bn
        for m in (self.spec.model.dense_mlp, self.spec.model.final))
    self._replicated = NamedSharding(self.mesh, P())
    shardings = self.state_shardings()
    acc_sh = jax.tree.map(lambda _: self._replicated, _zero_acc())
    self._acc_shardings = acc_sh
    batch_sh = self.batch_shardings()
    self.train_step = jax.jit(
        self._train_step, in_shardings=(shardings, batch_sh, acc_sh),
        out_shardings=(shardings, acc_sh), donate_argnums=(0, 2))
    self.predict_step = jax.jit(
        self._predict, in_shardings=(shardings, self.batch_shardings(False)),
        out_shardings=NamedSharding(self.mesh, P(parallel.BATCH_AXES)))

  @staticmethod
  def _check_cacheable(spec) -> None:
    """Refuses what cached tables do not support yet, naming the field."""
    if any(getattr(f, 'managed_collision', None)
           for f in spec.transform.sparse) or spec.admission.min_count > 1:
      raise ValueError(
          'config.embedding.cache.tables: cached tables do not work with'
          ' managed-collision features or config.admission yet (both map ids'
          ' on the host in step order, which the cache runs one batch'
          ' ahead of).')
    if jax.process_count() > 1:
      raise ValueError('config.embedding.cache.tables: cached tables run in'
                       ' a single process for now.')

  def attach_store(self, workdir: str | None) -> None:
    """Places the cached tables' stores (`config.embedding.cache.directory`).

    A relative directory is taken under `workdir`; '' (or no workdir)
    keeps the stores in host memory. Call it before `init_state` or
    `restore`.

    Args:
      workdir: the run's directory, or None.
    """
    if not self.cached:
      return
    d = self.spec.sharding.cache.directory
    if d and not os.path.isabs(d):
      d = os.path.join(workdir, d) if workdir else ''
    self.cached.directory = d or None

  def describe_plan(self) -> str:
    """The embedding plan as text (`planner.describe`): cached tables show
    their caches, counted in device memory, and their stores apart."""
    stores = None
    if self.cached:
      where = self.cached.directory or 'host memory'
      stores = {t.name: (t.num_rows, cache_lib.HostStore.bytes_of(t), where)
                for t in self.spec.tables if t.name in self.cached.caches}
    return plan_lib.describe(self.plan, self.device_tables,
                             self.mesh.shape['data'], stores=stores)

  @property
  def plan(self) -> plan_lib.Plan:
    """The embedding sharding plan."""
    return self.engine.plan

  def new_host_state(self, spec: config_lib.RunSpec | None = None
                     ) -> HostState:
    """Makes a run's fresh host-side id state.

    It holds empty managed-collision remappers. With rare-id admission, it also
    holds an empty sketch.

    Args:
      spec: the run's spec, whose `admission` counts. Default: the trainer's.

    Returns:
      The HostState.
    """
    return HostState.of(spec or self.spec, process_index=jax.process_index(),
                        process_count=jax.process_count())

  def zero_metrics(self) -> dict[str, jax.Array]:
    """The train step's metric accumulator, zeroed, on the mesh."""
    return jax.device_put(_zero_acc(), self._acc_shardings)

  # --------------------------------------------------------------------------
  # State.

  def _init_dense(self, key):
    m = self.spec.model
    dense = jnp.zeros((2, m.num_dense)) if m.num_dense else None
    sparse = jnp.zeros((2, m.num_sparse, m.embedding_dim))
    variables = self.arches.init({'params': key, 'dropout': key}, dense,
                                 sparse, train=False)
    params = variables['params']
    return params, variables.get('batch_stats', {}), self.tx.init(params)

  def _dense_shapes(self):
    return jax.eval_shape(self._init_dense, jax.random.key(0))

  def state_shardings(self) -> TrainState:
    """The shardings of a TrainState, as a TrainState."""
    params, bs, opt = self._dense_shapes()
    rep = lambda tree: jax.tree.map(lambda _: self._replicated, tree)
    return TrainState(step=self._replicated, params=rep(params),
                      batch_stats=rep(bs), opt_state=rep(opt),
                      emb=self.engine.state_shardings(), rng=self._replicated)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the state, with shardings. It allocates nothing."""
    params, bs, opt = self._dense_shapes()

    def with_sharding(x):
      """Gives an array's ShapeDtypeStruct, replicated.

      Args:
        x: the array or its shape.

      Returns:
        The ShapeDtypeStruct.
      """
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated)

    key = jax.random.key_data(jax.random.key(0))
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=self._replicated),
        params=jax.tree.map(with_sharding, params),
        batch_stats=jax.tree.map(with_sharding, bs),
        opt_state=jax.tree.map(with_sharding, opt),
        emb=self.engine.abstract_state(),
        rng=jax.ShapeDtypeStruct(key.shape, key.dtype,
                                 sharding=self._replicated))

  def check_memory(self) -> None:
    """Refuses, before allocating, tables that this process cannot hold.

    On an accelerator each local device must hold its shard in its own
    memory (`memory_stats()['bytes_limit']`); on CPU the local devices share
    the host's available memory. Unknown limits pass. The dense parameters
    and activations are small next to such tables and are not counted.

    Raises:
      ValueError: one line naming the need, the memory and the largest
        tables (`planner.check_fits`).
    """
    model_axis = list(self.mesh.axis_names).index(parallel.MODEL)
    shard_of = {d.id: int(i[model_axis])
                for i, d in np.ndenumerate(self.mesh.devices)}
    local = [d for d in self.mesh.devices.flat
             if d.process_index == jax.process_index()]
    cpu = [d for d in local if d.platform == 'cpu']
    if cpu:
      available = plan_lib.host_available_bytes()
      if available is not None:
        plan_lib.check_fits(self.plan, self.device_tables,
                            [shard_of[d.id] for d in cpu], available,
                            f'host memory for {len(cpu)} CPU device(s)',
                            extra_bytes=self._store_ram_bytes())
    for d in local:
      if d.platform == 'cpu':
        continue
      stats = d.memory_stats() or {}
      if 'bytes_limit' in stats:
        plan_lib.check_fits(self.plan, self.device_tables, [shard_of[d.id]],
                            stats['bytes_limit'], f'{d.device_kind} {d.id}')

  def init_state(self, seed: int) -> TrainState:
    """Makes a fresh train state at step 0.

    Args:
      seed: seeds the dense params, the tables and the dropout RNG.

    Returns:
      The state, on the mesh.

    Raises:
      ValueError: if the tables cannot fit (`check_memory`).
    """
    self.check_memory()
    key = jax.random.key(seed)
    k_dense, k_emb, k_rng = jax.random.split(key, 3)
    rep = self.state_shardings()
    params, bs, opt = jax.jit(
        self._init_dense,
        out_shardings=(rep.params, rep.batch_stats, rep.opt_state))(k_dense)
    emb = self.engine.init(k_emb)
    if self.cached:  # every row in the store, as the engine would make it
      for c in self.cached.caches.values():
        c.clear()
      self.cached.create(k_emb)
    put = lambda x: jax.device_put(x, self._replicated)
    return TrainState(step=put(jnp.int32(0)), params=params, batch_stats=bs,
                      opt_state=opt, emb=emb,
                      rng=put(jax.random.key_data(k_rng)))

  def restore(self, ckpt: ckpt_lib.Checkpointer, step: int, *,
              host: HostState | None = None, data_iter: Any = None
              ) -> tuple[TrainState, dict[str, Any]]:
    """Restores a checkpoint onto this trainer's mesh and plan.

    A checkpoint written under another sharding plan is restored in its own
    layout, then moved into this one. That happens with another number of
    devices, say.

    Args:
      ckpt: the checkpointer.
      step: the checkpoint step.
      host: a run's host-side id state, set to the step's if given.
      data_iter: a training data iterator, set to the step's position if
        given.

    Returns:
      The state and the meta item.

    Raises:
      IncompatibleCheckpointError: the model signature differs.
      DamagedCheckpointError: the arrays differ from their fingerprints.
      ValueError: if the tables cannot fit (`check_memory`).
    """
    state, meta = self._restore_state(ckpt, step)
    self.restore_store(ckpt, step)
    if data_iter is not None:
      ckpt.restore_data_iterator(step, data_iter)
    if host is not None:
      ckpt.restore_host_state(step, host)
    return state, meta

  def _restore_state(self, ckpt: ckpt_lib.Checkpointer, step: int
                     ) -> tuple[TrainState, dict[str, Any]]:
    meta = ckpt.read_meta(step)
    # A config mismatch is named as one before the saved plan is read (it may
    # not place this config's tables).
    ckpt.check_signature(step, meta, self.signature())
    self.check_memory()
    saved = plan_lib.Plan.from_json(meta['plan'])
    saved_cache = dict(meta.get('cache_rows') or {})
    if self.cached or saved_cache:
      self._check_saved_cache(ckpt, step, saved_cache)
    abstract = self.abstract_state()
    if saved == self.plan and saved_cache == self.cache_rows():
      return ckpt.restore(step, abstract, self.signature())
    old_tables = tuple(
        cache_lib.cache_table_spec(t, saved_cache[t.name])
        if t.name in saved_cache else t for t in self.spec.tables)
    old_stacks = plan_lib.build_layout(saved, old_tables,
                                       self.spec.feature_specs)
    abstract = abstract.replace(emb=self.engine.abstract_state_of_layout(
        old_stacks, saved.num_shards))
    state, meta = ckpt.restore(step, abstract, self.signature())
    logging.info('moving the embedding tables from the checkpoint\'s plan'
                 ' (%d model shards) to this one (%d)', saved.num_shards,
                 self.plan.num_shards)
    return state.replace(emb=self.engine.relayout(old_stacks, state.emb)), meta

  def cache_rows(self) -> dict[str, int]:
    """The cached tables' cache rows, for the checkpoint meta."""
    return dict(self.spec.sharding.cache.rows) if self.cached else {}

  def _store_ram_bytes(self) -> int:
    """The bytes of the stores kept in host memory (none on disk)."""
    if not self.cached or self.cached.directory:
      return 0
    return sum(cache_lib.HostStore.bytes_of(t) for t in self.spec.tables
               if t.name in self.cached.caches)

  def _check_saved_cache(self, ckpt, step: int, saved: dict[str, int]):
    """A checkpoint's cached tables must be this config's, and its store
    checkpoint complete."""
    if set(saved) != set(self.cache_rows()):
      raise ckpt_lib.IncompatibleCheckpointError(
          f'checkpoint {step} in {ckpt.directory} has cached tables'
          f' {sorted(saved)}, but config.embedding.cache.tables gives'
          f' {sorted(self.cache_rows())}; the placement of a table cannot'
          ' change on resume.')
    where = cache_lib.store_checkpoint_dir(ckpt.directory, step)
    if saved and not os.path.exists(os.path.join(where, 'complete')):
      raise ckpt_lib.DamagedCheckpointError(
          f'checkpoint {step} has cached tables but its store checkpoint'
          f' {where} is missing or incomplete.')

  def restore_store(self, ckpt: ckpt_lib.Checkpointer, step: int) -> None:
    """Loads the cached tables' stores saved with checkpoint `step`.

    The caches start empty, so the cache size may differ from the saved
    run's.

    Args:
      ckpt: the checkpointer.
      step: the checkpoint step.
    """
    if not self.cached:
      return
    self.cached.allocate()
    self.cached.load(cache_lib.store_checkpoint_dir(ckpt.directory, step))

  def signature(self) -> dict[str, Any]:
    """Says what fixes the state's shapes. A checkpoint must match it.

    It is derived from the specs by `_shape_fields`. Every field is in it
    except the hyperparameters in `_UNSHAPED_FIELDS`. So a field added to a
    spec is checked on restore unless it is named there.

    Returns:
      The model, the tables, the dense optimizer's kind and whether gradients
      are clipped.
    """
    model = _shape_fields(self.spec.model)
    tables = {t.name: _shape_fields(t) for t in self.spec.tables}
    for t in self.spec.tables:
      if t.dtype in rounding.LOW_PRECISION:
        # 16-bit tables are stored in float16 arrays (rounding.CARRIER).
        tables[t.name]['storage'] = 'float16'
    return {
        'model': model,
        'tables': tables,
        'dense_optimizer': self.spec.dense_optimizer.kind,
        'grad_clip': bool(self.spec.dense_optimizer.grad_clip_norm),
    }

  # --------------------------------------------------------------------------
  # Batches.

  def batch_shardings(self, with_label: bool = True) -> dict[str, Any]:
    """Gives the shardings of a batch.

    Args:
      with_label: whether the batch holds labels and row resets.

    Returns:
      {name: sharding}. 'dense' is there only with dense features.
    """
    sh = {'ids': parallel.batch_sharding(self.mesh, 2)}
    if self.spec.model.num_dense:
      sh['dense'] = parallel.batch_sharding(self.mesh, 2)
    if with_label:
      sh['label'] = parallel.batch_sharding(self.mesh, 1)
      if self.resets_rows:
        sh['reset'] = parallel.batch_sharding(self.mesh, 2)
    return sh

  def put_batch(self, host_batch: dict[str, np.ndarray],
                with_label: bool = True) -> dict[str, jax.Array]:
    """Turns this process's rows of a batch into global, batch-sharded arrays.

    Args:
      host_batch: this process's rows, numpy.
      with_label: whether to include the labels and row resets.

    Returns:
      {name: jax.Array}.
    """
    shardings = self.batch_shardings(with_label)
    return {k: jax.make_array_from_process_local_data(s, host_batch[k])
            for k, s in shardings.items()}

  # --------------------------------------------------------------------------
  # Steps.

  def _variables(self, params, batch_stats, emb) -> dict[str, Any]:
    """The model's variables, from the parts a TrainState keeps."""
    variables = {'params': {'arches': params, 'embed': {STATE_KEY: emb}}}
    if self.has_bn:
      variables['batch_stats'] = {'arches': batch_stats}
    return variables

  def _train_step(self, state: TrainState, batch, acc):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      """The loss of a batch.

      Args:
        params: the model's parameters: 'arches' (dense) and 'embed' (the
          tables and slots, whose gradient is their new value).

      Returns:
        The mean loss, and the new batch stats and the invalid-id count.
      """
      variables = self._variables(params['arches'], state.batch_stats,
                                  params['embed'][STATE_KEY])
      out, mutated = self.model.apply(
          variables, batch['ids'], batch.get('dense'), train=True,
          step=state.step, resets=batch.get('reset'), rngs={'dropout': rng},
          mutable=['batch_stats', 'intermediates'])
      loss = optax.sigmoid_binary_cross_entropy(out['logits'],
                                                batch['label']).mean()
      new_bs = (mutated['batch_stats']['arches'] if self.has_bn
                else state.batch_stats)
      invalid = mutated['intermediates']['embed']['invalid_ids'][0]
      return loss, (new_bs, invalid)

    params = {'arches': state.params, 'embed': {STATE_KEY: state.emb}}
    (loss, (new_bs, invalid)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    dense_updates, opt_state = self.tx.update(
        grads['arches'], state.opt_state, state.params)
    params = table_updates.apply_updates(
        params, {'arches': dense_updates, 'embed': grads['embed']})
    bad = ~jnp.isfinite(loss) & (acc['first_nonfinite'] < 0)
    acc = {
        'loss_sum': acc['loss_sum'] + loss,
        'steps': acc['steps'] + 1,
        'first_nonfinite': jnp.where(bad, state.step + 1,
                                     acc['first_nonfinite']),
        'invalid_ids': acc['invalid_ids'] + invalid,
    }
    new_state = state.replace(step=state.step + 1, params=params['arches'],
                              batch_stats=new_bs, opt_state=opt_state,
                              emb=params['embed'][STATE_KEY])
    return new_state, acc

  def _predict(self, state: TrainState, batch):
    out = self.model.apply(
        self._variables(state.params, state.batch_stats, state.emb),
        batch['ids'], batch.get('dense'), train=False, step=state.step)
    return out['probs']

  def predict(self, state: TrainState, host_batch,
              host: HostState | None = None) -> np.ndarray:
    """Computes the click probabilities of a batch, on the host.

    This process's rows go in. The whole global batch comes out.

    Args:
      state: the train state.
      host_batch: this process's rows.
      host: the run's remappers and admission sketch, from `new_host_state`
        and loaded from the checkpoint. Required when the config has either.

    Returns:
      The probabilities of the global batch.

    Raises:
      ValueError: `host` is missing but the config needs it.
    """
    if self.cached:
      raise ValueError(
          'this trainer has cached tables (config.embedding.cache.tables):'
          ' predict through the export, which reads the stores.')
    probs = self.predict_step(state, self.put_batch(
        self._eval_batch(host_batch, host), False))
    return np.asarray(
        multihost_utils.process_allgather(probs, tiled=True)
        if jax.process_count() > 1 else jax.device_get(probs))

  def evaluate(self, state: TrainState, batches: pipeline.EvalBatches,
               host: HostState | None = None
               ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Computes the metrics over a whole eval set.

    Each process predicts its own rows. `batches` yields this process's rows,
    with the padding masked out by the count of real rows. The predictions and
    labels of all processes are gathered at the end, in process order. That is
    the eval set's order by construction, as `pipeline.EvalBatches` explains.
    So the metrics equal one process's exactly.

    Args:
      state: the train state.
      batches: the eval batches of this process.
      host: the run's host state, as `predict` takes it.

    Returns:
      The metrics, the probabilities and the labels.

    Raises:
      ValueError: `host` is missing but the config needs it.
    """
    if self.cached:
      raise ValueError(
          'this trainer has cached tables (config.embedding.cache.tables):'
          ' evaluate with Trainer.evaluate_cached, which returns the new'
          ' state, or export the model.')
    probs, labels = [], []
    for host_batch, n in batches:
      probs.append(self._process_rows(self.predict_step(
          state, self.put_batch(self._eval_batch(host_batch, host), False)))[:n])
      labels.append(host_batch['label'][:n])
    probs = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    if jax.process_count() > 1:
      probs, labels = _gather_in_process_order(probs, labels)
    return metrics_lib.evaluate(probs, labels), probs, labels

  def evaluate_cached(self, state: TrainState, batches: pipeline.EvalBatches,
                      host: HostState | None = None
                      ) -> tuple[dict[str, float], np.ndarray, np.ndarray,
                                 TrainState]:
    """`evaluate` for a trainer with cached tables; it also returns the state.

    Each batch's rows are swapped into the caches first, as in training,
    with the evicted rows written back at once; nothing is trained. Call it
    with no prepared batch pending (`CachePipeline`'s `pause_after`) and
    every write-back done (`CachePipeline.drain`).

    Args:
      state: the train state. It is donated: use the one returned.
      batches: the eval batches.
      host: the run's host state, as `predict` takes it.

    Returns:
      The metrics, the probabilities, the labels and the new state.
    """
    probs, labels = [], []
    for host_batch, n in batches:
      p, state = self.predict_cached(state, host_batch, host)
      probs.append(p[:n])
      labels.append(host_batch['label'][:n])
    probs = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    return metrics_lib.evaluate(probs, labels), probs, labels, state

  def predict_cached(self, state: TrainState, host_batch,
                     host: HostState | None = None
                     ) -> tuple[np.ndarray, TrainState]:
    """`predict` for a trainer with cached tables; it also returns the state.

    The batch's rows are swapped into the caches first, as in training,
    and the evicted rows written back at once; nothing is trained.

    Args:
      state: the train state. It is donated: use the one returned.
      host_batch: the batch.
      host: the run's host state, as `predict` takes it.

    Returns:
      The probabilities and the new state.
    """
    host_batch = self._eval_batch(host_batch, host)
    self._eval_batches += 1
    prepared = self.cached.prepare(-self._eval_batches, host_batch['ids'],
                                   None, count=False)
    emb, evicted = self.swap_step(state.emb, prepared.swaps)
    state = state.replace(emb=emb)
    self.cached.swapped(prepared)
    self.cached.write_back(prepared, evicted)
    probs = self.predict_step(state, self.put_batch(
        dict(host_batch, ids=prepared.ids), False))
    return self._process_rows(probs), state

  _eval_batches = 0  # eval swaps so far: their batch numbers are negative

  def _eval_batch(self, host_batch, host: HostState | None):
    """A host batch with the run's id remapping and admission applied."""
    if host is None and self.needs_host_state:
      raise ValueError(
          'this config has managed-collision features or config.admission:'
          ' pass predict/evaluate the run\'s host state (host=, see'
          ' Trainer.new_host_state and Checkpointer.restore_host_state).')
    return host_batch if host is None else host.eval(host_batch)

  @staticmethod
  def _process_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in the order
    `put_batch` (`make_array_from_process_local_data`) took them from its
    host batch: its addressable shards by global row, replicas once."""
    shards = {}
    for s in x.addressable_shards:
      shards.setdefault(s.index[0].indices(x.shape[0])[0], s)
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def _gather_in_process_order(*arrays: np.ndarray) -> list[np.ndarray]:
  """1-D arrays of every process (lengths may differ), each concatenated in
  process order: padded to the longest, gathered, then cut."""
  n = len(arrays[0])
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(n)))
  longest = int(sizes.max())
  out = []
  for a in arrays:
    padded = np.zeros(longest, a.dtype)
    padded[:n] = a
    every = np.asarray(multihost_utils.process_allgather(padded))
    out.append(np.concatenate([every[p, :int(k)]
                               for p, k in enumerate(sizes)]))
  return out


