"""Train state, train and eval steps, and the training loop.

`Trainer` holds everything static about a config (model, embedding engine,
optimizers, shardings, compiled steps), so notebooks and tests can drive the
same code as `train_and_evaluate`, the loop behind `python -m dlrm_jax.main`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import time
import zlib
from typing import Any, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlrm_jax import checkpoint as ckpt_lib
from dlrm_jax import config_checks
from dlrm_jax import config_lib
from dlrm_jax import early_stopping
from dlrm_jax import metrics as metrics_lib
from dlrm_jax import parallel
from dlrm_jax import reporting
from dlrm_jax import workdir_lock
from dlrm_jax.data import inputs
from dlrm_jax.data import pipeline
from dlrm_jax.embedding import EmbeddingEngine
from dlrm_jax.embedding import admission as admission_lib
from dlrm_jax.embedding import remapping
from dlrm_jax.embedding import plan as plan_lib
from dlrm_jax.embedding import rounding
from dlrm_jax.models import DLRM


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class InvalidIdError(ValueError):
  """Ids outside their tables reached the train step."""


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: number of steps taken.
    params: dense (MLP) parameters.
    batch_stats: batch-norm running statistics ({} without batch norm).
    opt_state: optax state of the dense parameters.
    emb: embedding stacks and their sparse optimizer state.
    rng: key data of the dropout RNG (folded with the step).
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


def make_plan(config, tables, num_shards: int,
              num_devices: int | None = None,
              features: Sequence[Any] = ()) -> plan_lib.Plan:
  """The embedding sharding plan the config asks for."""
  e = config.embedding
  strategy = e.get('sharding', 'auto')
  overrides = {k: v for k, v in dict(e.get('sharding_overrides') or {}
                                     ).items() if v is not None}  # unset
  if strategy != 'auto':
    if strategy not in plan_lib.STRATEGIES:
      raise ValueError(
          f'config.embedding.sharding ({strategy!r}) must be auto or one of'
          f' {list(plan_lib.STRATEGIES)}.')
    for t in tables:
      overrides.setdefault(t.name, strategy)
  budget = e.get('device_memory_gb')
  return plan_lib.auto_plan(
      tables, num_shards, overrides=overrides,
      replicate_bytes=int(e.get('replicate_bytes', 1 << 20)),
      lookups=_lookups_per_table(features) or None,
      row_group_size=int(e.get('row_group_size', 0) or 0),
      batch_per_device=(config.batch_size // num_devices if num_devices
                        else None),
      device_memory_bytes=None if budget is None else int(budget * 2**30))


def _lookups_per_table(features) -> dict[str, int]:
  """Table name -> ids per example read from it (over its features)."""
  out: dict[str, int] = {}
  for f in features:
    out[f.table] = out.get(f.table, 0) + f.max_ids
  return out


class Trainer:
  """A config's model, embedding engine, optimizers and compiled steps.

  Attributes:
    config: the config.
    setup: typed specs built from the config.
    mesh: the device mesh.
    engine: the embedding engine.
    model: the Flax DLRM (dense and over arches).
    tx: the dense optimizer.
  """

  def __init__(self, config, *, mesh: Mesh | None = None,
               plan: plan_lib.Plan | None = None):
    self.config = config
    self.setup = config_lib.build(config)
    self.mesh = mesh if mesh is not None else parallel.create_mesh(
        config.mesh.data, config.mesh.model)
    n_dev = self.mesh.devices.size
    for field in ('batch_size', 'eval_batch_size'):
      value = config[field]
      if value <= 0 or value % n_dev:
        raise ValueError(
            f'config.{field} ({value}) must be a positive multiple of the'
            f' number of devices ({n_dev}).')
    if plan is None:
      plan = make_plan(config, self.setup.tables, self.mesh.shape['model'],
                       n_dev, self.setup.feature_specs)
    self.engine = EmbeddingEngine(self.setup.tables, self.setup.feature_specs,
                                  self.mesh, plan)
    self.model = DLRM(self.setup.model, dtype=self.setup.compute_dtype)
    self.remapper = self.new_remapper()
    self.admission = self.new_admission(config)
    self.tx = config_lib.build_dense_optimizer(config.optimizer)
    self.has_bn = any(
        m is not None and m.use_bn
        for m in (self.setup.model.dense_mlp, self.setup.model.final))
    self._replicated = NamedSharding(self.mesh, P())
    shardings = self.state_shardings()
    acc_sh = jax.tree.map(lambda _: self._replicated, _zero_acc())
    batch_sh = self.batch_shardings()
    self.train_step = jax.jit(
        self._train_step, in_shardings=(shardings, batch_sh, acc_sh),
        out_shardings=(shardings, acc_sh), donate_argnums=(0, 2))
    self.predict_step = jax.jit(
        self._predict, in_shardings=(shardings, self.batch_shardings(False)),
        out_shardings=NamedSharding(self.mesh, P(parallel.BATCH_AXES)))

  @property
  def plan(self) -> plan_lib.Plan:
    return self.engine.plan

  def new_admission(self, config) -> admission_lib.IdAdmission | None:
    """A fresh rare-id admission filter of `config.admission` (None: off)."""
    return admission_lib.build(config, self.setup.transform,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())

  def new_remapper(self) -> remapping.BatchRemapper:
    """Fresh (empty) managed-collision remappers of the model's features."""
    return remapping.BatchRemapper(
        self.setup.transform, process_index=jax.process_index(),
        process_count=jax.process_count())

  # --------------------------------------------------------------------------
  # State.

  def _init_dense(self, key):
    m = self.setup.model
    dense = jnp.zeros((2, m.num_dense)) if m.num_dense else None
    sparse = jnp.zeros((2, m.num_sparse, m.embedding_dim))
    variables = self.model.init({'params': key, 'dropout': key}, dense, sparse,
                                train=False)
    params = variables['params']
    return params, variables.get('batch_stats', {}), self.tx.init(params)

  def _dense_shapes(self):
    return jax.eval_shape(self._init_dense, jax.random.key(0))

  def state_shardings(self) -> TrainState:
    params, bs, opt = self._dense_shapes()
    rep = lambda tree: jax.tree.map(lambda _: self._replicated, tree)
    return TrainState(step=self._replicated, params=rep(params),
                      batch_stats=rep(bs), opt_state=rep(opt),
                      emb=self.engine.state_shardings(), rng=self._replicated)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the state; allocates nothing."""
    params, bs, opt = self._dense_shapes()

    def with_sharding(x):
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

  def init_state(self, seed: int) -> TrainState:
    key = jax.random.key(seed)
    k_dense, k_emb, k_rng = jax.random.split(key, 3)
    rep = self.state_shardings()
    params, bs, opt = jax.jit(
        self._init_dense,
        out_shardings=(rep.params, rep.batch_stats, rep.opt_state))(k_dense)
    emb = self.engine.init(k_emb)
    put = lambda x: jax.device_put(x, self._replicated)
    return TrainState(step=put(jnp.int32(0)), params=params, batch_stats=bs,
                      opt_state=opt, emb=emb,
                      rng=put(jax.random.key_data(k_rng)))

  def restore(self, ckpt: ckpt_lib.Checkpointer, step: int
              ) -> tuple[TrainState, dict[str, Any]]:
    """Restores a checkpoint onto this trainer's mesh and plan.

    A checkpoint written under another sharding plan (another number of
    devices, say) is restored in its own layout and then moved into this one.

    Raises:
      IncompatibleCheckpointError: if the model signature differs.
    """
    meta = ckpt.read_meta(step)
    saved = plan_lib.Plan.from_json(meta['plan'])
    abstract = self.abstract_state()
    if saved == self.plan:
      return ckpt.restore(step, abstract, self.signature())
    old_stacks = plan_lib.build_layout(saved, self.setup.tables,
                                       self.setup.feature_specs)
    abstract = abstract.replace(emb=self.engine.abstract_state_of_layout(
        old_stacks, saved.num_shards))
    state, meta = ckpt.restore(step, abstract, self.signature())
    logging.info('moving the embedding tables from the checkpoint\'s plan'
                 ' (%d model shards) to this one (%d)', saved.num_shards,
                 self.plan.num_shards)
    return state.replace(emb=self.engine.relayout(old_stacks, state.emb)), meta

  def signature(self) -> dict[str, Any]:
    """What fixes the state's shapes; a checkpoint must match it."""
    m = self.setup.model

    def mlp(spec):
      return None if spec is None else {
          'hidden_units': list(spec.hidden_units), 'use_bn': spec.use_bn,
          'use_ln': spec.use_ln, 'bias': spec.bias}

    model = {
        'num_dense': m.num_dense, 'num_sparse': m.num_sparse,
        'embedding_dim': m.embedding_dim, 'dense_mlp': mlp(m.dense_mlp),
        'final': mlp(m.final), 'arch_with_sparse': m.arch_with_sparse,
        'interaction_self': m.interaction_self}
    if m.interaction != 'dot':  # dot-interaction signatures stay as they were
      model['interaction'] = m.interaction
      model['dcn'] = dataclasses.asdict(m.dcn)
    return {
        'model': model,
        'tables': {t.name: {'num_rows': t.num_rows, 'dim': t.dim,
                            'dtype': t.dtype, 'optimizer': t.optimizer.kind,
                            # 16-bit tables are stored as uint16 bit patterns
                            # (older checkpoints stored them as bf16/f16).
                            **({'storage': 'uint16'} if t.dtype in
                               rounding.LOW_PRECISION else {})}
                   for t in self.setup.tables},
        'dense_optimizer': self.config.optimizer.kind,
        'grad_clip': bool(self.config.optimizer.get('grad_clip_norm', 0.0)),
    }

  # --------------------------------------------------------------------------
  # Batches.

  def batch_shardings(self, with_label: bool = True) -> dict[str, Any]:
    sh = {'ids': parallel.batch_sharding(self.mesh, 2)}
    if self.setup.model.num_dense:
      sh['dense'] = parallel.batch_sharding(self.mesh, 2)
    if with_label:
      sh['label'] = parallel.batch_sharding(self.mesh, 1)
      if self.remapper:
        sh['reset'] = parallel.batch_sharding(self.mesh, 2)
    return sh

  def put_batch(self, host_batch: dict[str, np.ndarray],
                with_label: bool = True) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global, batch-sharded arrays."""
    shardings = self.batch_shardings(with_label)
    return {k: jax.make_array_from_process_local_data(s, host_batch[k])
            for k, s in shardings.items()}

  # --------------------------------------------------------------------------
  # Steps.

  def _apply_model(self, params, batch_stats, dense, sparse, *, train,
                   rng=None):
    variables = {'params': params}
    if self.has_bn:
      variables['batch_stats'] = batch_stats
    rngs = {'dropout': rng} if rng is not None else None
    if train and self.has_bn:
      out, updates = self.model.apply(variables, dense, sparse, train=True,
                                      rngs=rngs, mutable=['batch_stats'])
      return out, updates['batch_stats']
    out = self.model.apply(variables, dense, sparse, train=train, rngs=rngs)
    return out, batch_stats

  def _train_step(self, state: TrainState, batch, acc):
    if 'reset' in batch:  # rows given to new managed-collision values
      state = state.replace(emb=self.engine.reset_rows(state.emb,
                                                       batch['reset']))
    emb, invalid = self.engine.lookup_stacked(state.emb['stacks'],
                                              batch['ids'])
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params, emb):
      out, new_bs = self._apply_model(params, state.batch_stats,
                                      batch.get('dense'), emb, train=True,
                                      rng=rng)
      loss = optax.sigmoid_binary_cross_entropy(out['logits'],
                                                batch['label']).mean()
      return loss, new_bs

    (loss, new_bs), (g_params, g_emb) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, emb)
    updates, opt_state = self.tx.update(g_params, state.opt_state,
                                        state.params)
    params = optax.apply_updates(state.params, updates)
    new_emb = self.engine.apply_gradients(state.emb, batch['ids'], g_emb,
                                          state.step)
    bad = ~jnp.isfinite(loss) & (acc['first_nonfinite'] < 0)
    acc = {
        'loss_sum': acc['loss_sum'] + loss,
        'steps': acc['steps'] + 1,
        'first_nonfinite': jnp.where(bad, state.step + 1,
                                     acc['first_nonfinite']),
        'invalid_ids': acc['invalid_ids'] + invalid,
    }
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=new_bs, opt_state=opt_state,
                              emb=new_emb)
    return new_state, acc

  def _predict(self, state: TrainState, batch):
    emb, _ = self.engine.lookup_stacked(state.emb['stacks'], batch['ids'])
    out, _ = self._apply_model(state.params, state.batch_stats,
                               batch.get('dense'), emb, train=False)
    return out['probs']

  def predict(self, state: TrainState, host_batch) -> np.ndarray:
    """Click probabilities of a batch (this process's rows of it in, the
    whole global batch out), on the host."""
    probs = self.predict_step(state, self.put_batch(
        self._eval_batch(host_batch), False))
    return np.asarray(
        multihost_utils.process_allgather(probs, tiled=True)
        if jax.process_count() > 1 else jax.device_get(probs))

  def evaluate(self, state: TrainState, batches: pipeline.EvalBatches
               ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics over a whole eval set; also returns (probs, labels).

    Each process predicts its own rows (`batches` yields this process's
    rows, padding masked out by the count of real rows); the predictions
    and labels of all processes are gathered at the end and concatenated in
    process order, which is the eval set's order by construction (see
    `pipeline.EvalBatches`), so the metrics equal one process's exactly.
    """
    probs, labels = [], []
    for host_batch, n in batches:
      probs.append(self._process_rows(self.predict_step(
          state, self.put_batch(self._eval_batch(host_batch), False)))[:n])
      labels.append(host_batch['label'][:n])
    probs = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    if jax.process_count() > 1:
      probs, labels = _gather_in_process_order(probs, labels)
    return metrics_lib.evaluate(probs, labels), probs, labels

  def _eval_batch(self, host_batch):
    if 'mc_raw' in host_batch:
      host_batch = self.remapper.eval(host_batch)
    if self.admission is not None:
      host_batch = self.admission.eval(host_batch)
    return host_batch

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


# ----------------------------------------------------------------------------
# Loop.


_ADMISSION_KEY = '_id_admission'


def _host_state(trainer: Trainer) -> dict[str, Any] | None:
  """Host-side state saved with each checkpoint (the 'remappers' item): the
  managed-collision remappers and the rare-id admission sketch."""
  out = trainer.remapper.state_dict() if trainer.remapper else {}
  if trainer.admission is not None:
    out[_ADMISSION_KEY] = trainer.admission.state_dict()
  return out or None


def _load_host_state(trainer: Trainer, state: dict[str, Any]) -> None:
  if trainer.remapper:
    trainer.remapper.load_state_dict(
        {k: v for k, v in state.items() if k != _ADMISSION_KEY})
  if trainer.admission is not None:
    if _ADMISSION_KEY not in state:
      raise ckpt_lib.IncompatibleCheckpointError(
          'the checkpoint holds no rare-id admission sketch; it was written'
          ' without config.admission.min_count.')
    trainer.admission.load_state_dict(state[_ADMISSION_KEY])


def _fmt_eta(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(0, seconds))))


def num_train_steps(config, data: inputs.DataSetup) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  if config.num_train_steps == 0 or config.num_epochs <= 0:
    raise ValueError(
        f'config.num_train_steps ({config.num_train_steps}) must be positive,'
        f' or -1 with a positive config.num_epochs ({config.num_epochs}).')
  steps = int(config.num_epochs * data.train.batches_per_epoch)
  # Small data: at least config.min_train_steps (whole epochs), so a small
  # file does not end after a handful of steps (pair it with early stopping).
  min_steps = int(config.get('min_train_steps', 0) or 0)
  if min_steps < 0:
    raise ValueError(
        f'config.min_train_steps ({min_steps}) must be >= 0 (0: off).')
  if steps < min_steps:
    per_epoch = max(1, data.train.batches_per_epoch)
    epochs = -(-min_steps // per_epoch)
    logging.info(
        'small data: %d epoch(s) of %d steps is under config.min_train_steps'
        ' (%d); training %d epochs (%d steps) instead.', config.num_epochs,
        per_epoch, min_steps, epochs, epochs * per_epoch)
    steps = epochs * per_epoch
  elif steps < 100 and not min_steps:
    logging.warning(
        'small data: %d epoch(s) are only %d steps of batch %d. Set'
        ' config.min_train_steps with early stopping, or start from'
        ' configs/criteo.py:small_data (see the README\'s small-data advice).',
        config.num_epochs, steps, config.batch_size)
  return steps


def target_auc(config) -> float | None:
  """`config.target_auc`: the eval AUC that ends training; None when off."""
  value = config.get('target_auc') or 0.0
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      0.0 <= value <= 1.0):
    raise ValueError(
        f'config.target_auc ({value!r}) must be an AUC in (0, 1], or 0 for'
        ' no target.')
  return float(value) or None


def _finished_summary(workdir: str, step: int) -> dict[str, Any] | None:
  """summary.json of a run that ended at `step`, if it holds its results."""
  try:
    with open(os.path.join(workdir, 'summary.json')) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if summary.get('step') == step else None


def train_and_evaluate(config, workdir: str, trainer: Trainer | None = None
                       ) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates.

  Process 0 holds `<workdir>/.lock` meanwhile (`dlrm_jax.workdir_lock`): a
  second run on the same workdir gets WorkdirLockedError naming the first.
  See `_train_and_evaluate` for the arguments.
  """
  config_checks.validate_numbers(config)
  os.makedirs(workdir, exist_ok=True)
  lock = (workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    return _train_and_evaluate(config, workdir, trainer)


def _train_and_evaluate(config, workdir: str, trainer: Trainer | None = None
                        ) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates.

  Args:
    config: the config.
    workdir: checkpoints, metrics.jsonl, config.json and summary.json go here.
    trainer: optionally, a Trainer built from a config with the same model,
      so that several runs share compiled steps (tests, notebooks).

  Returns:
    A summary: final step, last train loss, final eval metrics, teacher AUC.
  """
  os.makedirs(workdir, exist_ok=True)
  config = inputs.prepare_config(config)
  if trainer is None:
    trainer = Trainer(config)
  else:
    same = (trainer.setup == config_lib.build(config) and all(
        trainer.config[k].to_dict() == config[k].to_dict()
        for k in ('optimizer', 'embedding', 'mesh')) and all(
            trainer.config[k] == config[k]
            for k in ('batch_size', 'eval_batch_size')))
    if not same:
      raise ValueError(
          'the trainer passed to train_and_evaluate was built from a config'
          ' with another model, optimizer, mesh or batch size.')
  is_chief = jax.process_index() == 0
  logging.info('mesh: %s; %d device(s), %d process(es)',
               dict(trainer.mesh.shape), trainer.mesh.devices.size,
               jax.process_count())
  logging.info('embedding plan:\n%s',
               plan_lib.describe(trainer.plan, trainer.setup.tables))
  data = inputs.make_data(config, trainer.setup,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
  logging.info('data: %s', data.description)
  total_steps = num_train_steps(config, data)
  target = target_auc(config)
  target_reached = False

  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.max_to_keep)
  stopper = early_stopping.EarlyStopping.from_config(
      config.get('early_stopping'))
  best_metric = config.get('keep_best_metric')
  best_ckpt = best_tracker = None
  if best_metric:
    best_tracker = early_stopping.EarlyStopping(
        best_metric, early_stopping.metric_mode(
            best_metric, None, 'config.keep_best_metric'))
    best_ckpt = ckpt_lib.BestCheckpointer(workdir, best_metric,
                                          best_tracker.mode)
  signature = trainer.signature()
  data_iter = data.train.iterator() if data.uses_grain else None
  trainer.remapper = trainer.new_remapper()  # this run's
  trainer.admission = trainer.new_admission(config)

  def restore(step):  # The newest good checkpoint; damaged ones moved aside.
    state, meta = trainer.restore(ckpt, step)
    if data_iter is not None:
      ckpt.restore_data_iterator(step, data_iter)
    if trainer.remapper or trainer.admission is not None:
      _load_host_state(trainer, ckpt.restore_remappers(step))
    return state, meta

  latest, restored = ckpt.restore_newest_good(restore)
  if latest is not None:
    state, meta = restored
    position = int(meta.get('data_position') or 0)  # text sources
    stopper.load_state_dict(meta.get('early_stopping'))
    if best_tracker is not None:
      best_tracker.load_state_dict(meta.get('best_checkpoint'))
    logging.info('resumed from the checkpoint at step %d (%s)', latest,
                 ckpt.directory)
    if meta.get('target_auc_reached'):  # that run ended at its target
      total_steps, target_reached = latest, True
  else:
    state = trainer.init_state(config.seed)
    position = 0
  if is_chief:
    ckpt_lib.write_json(os.path.join(workdir, 'config.json'),
                        json.loads(config.to_json_best_effort()))
  step = int(jax.device_get(state.step))
  writer = reporting.MetricsLogger(workdir, enabled=is_chief,
                                   resume_step=step)
  final_eval = {}  # the last eval's predictions, for the ROC plot
  previous = None  # A finished run's summary, kept when it is run again.
  if stopper.patience and stopper.since_best >= stopper.patience:
    logging.info('this run stopped early at step %d (eval %s best %.5f at'
                 ' step %d); not training further.', step, stopper.metric,
                 stopper.best, stopper.best_step)
    total_steps = step
  if step >= total_steps:
    logging.info('already trained for %d steps (config asks for %d).', step,
                 total_steps)
    previous = _finished_summary(workdir, step)

  def save(step, position, reached=False):
    meta = {'signature': signature, 'plan': trainer.plan.to_json(),
            'data_position': position, 'step': step,
            'config': config.to_json_best_effort(),
            'target_auc_reached': reached,
            'early_stopping': stopper.state_dict(),
            'best_checkpoint': best_tracker.state_dict() if best_tracker
            else None}
    ckpt.save(step, state, meta, data_iter=data_iter,
              remappers=_host_state(trainer))
    return meta

  def save_best(step, result):
    """Keeps this step's state under best_checkpoint when it is the best."""
    if best_tracker is None or not best_tracker.improved(
        result[best_metric]):
      return
    best_tracker.update(step, result)
    logging.info('best %s so far (%.5f) at step %d: kept in %s', best_metric,
                 result[best_metric], step, best_ckpt.directory)
    best_ckpt.save(step, state, {'step': step, 'signature': signature,
                                 'plan': trainer.plan.to_json(),
                                 'config': config.to_json_best_effort()},
                   remappers=_host_state(trainer), metrics=result)

  def run_eval(step):
    if data.eval is None:
      return None
    t = time.time()
    result, probs, labels = trainer.evaluate(state, data.eval)
    final_eval.update(probs=probs, labels=labels)
    result = {k: float(v) for k, v in result.items()}
    extra = ''
    if data.teacher_auc is not None:
      result['teacher_auc'] = data.teacher_auc
      extra = f' (teacher, the best achievable: {data.teacher_auc:.4f})'
    logging.info(
        'eval at step %d: auc %.4f%s | log_loss %.4f | accuracy %.4f |'
        ' calibration %.3f | %d examples in %.1fs', step, result['auc'], extra,
        result['log_loss'], result['accuracy'], result['calibration'],
        result['num_examples'], time.time() - t)
    writer.write({'type': 'eval', 'step': step, 'time': time.time(),
                  **result})
    return result

  acc = jax.device_put(_zero_acc(), trainer._replicated)  # pylint: disable=protected-access
  if data_iter is not None:  # grain prefetches in its own threads
    batches = ((None, b) for b in data_iter)
  else:
    batches = pipeline.prefetch(data.train.iterate(position),
                                int(config.data.get('prefetch', 2)))
  record = (open(os.path.join(workdir, 'batches.jsonl'), 'a', buffering=1)
            if config.data.get('record_batches') else None)
  last_eval = None
  last_loss = None
  stopped_early = False
  if step >= total_steps and previous is None:  # No summary: make it anew.
    last_eval = run_eval(step)
    losses = [r['loss'] for r in reporting.read_metrics(workdir)
              if r['type'] == 'train' and r['step'] <= step]
    last_loss = losses[-1] if losses else None
  window_step = step
  rate_start, rate_step = time.time(), step
  first_step = True
  try:
    while step < total_steps:
      position, host_batch = next(batches)
      if record is not None:  # what each step consumed (tests, debugging)
        record.write(json.dumps({
            'step': step + 1, 'process': jax.process_index(),
            'ids_crc32': zlib.crc32(np.ascontiguousarray(
                host_batch['ids']).tobytes())}) + '\n')
      if trainer.remapper:  # in step order: the remappers keep state
        host_batch = trainer.remapper.train(host_batch, step)
      if trainer.admission is not None:  # counts ids: in step order too
        host_batch = trainer.admission.train(host_batch)
      batch = trainer.put_batch(host_batch)
      state, acc = trainer.train_step(state, batch, acc)
      step += 1
      if first_step:
        # Keep the compilation out of the examples/s figure.
        jax.block_until_ready(acc)
        first_step = False
        rate_start, rate_step = time.time(), step
      last = step == total_steps
      do_log = step % config.log_every_steps == 0 or last
      do_eval = step % config.eval_every_steps == 0 or last
      do_ckpt = step % config.checkpoint_every_steps == 0 or last
      if do_log or do_ckpt or do_eval:
        ckpt.check_for_errors()  # An asynchronous save that failed stops here.
        host_acc = jax.device_get(acc)
        acc = jax.device_put(_zero_acc(), trainer._replicated)  # pylint: disable=protected-access
        first_bad = int(host_acc['first_nonfinite'])
        if first_bad >= 0:
          good = ckpt.latest_step()
          raise NonFiniteLossError(
              f'the training loss became non-finite at step {first_bad}'
              f' (checked over steps {window_step + 1}..{step}); nothing was'
              ' saved after it'
              + (f'; the last good checkpoint is step {good}' if good
                 is not None else '') +
              '. Lower the learning rates or check the input data.')
        if int(host_acc['invalid_ids']):
          raise InvalidIdError(
              f'{int(host_acc["invalid_ids"])} ids outside their tables'
              f' reached the train step between steps {window_step + 1} and'
              f' {step}; they were ignored. Keep config.data.check_ids on to'
              ' find the feature and value.')
        n = int(host_acc['steps'])
        if n:
          last_loss = float(host_acc['loss_sum']) / n
          now = time.time()
          rate = (step - rate_step) * config.batch_size / max(
              now - rate_start, 1e-9)
          eta = (total_steps - step) * config.batch_size / max(rate, 1e-9)
          logging.info('step %d/%d | %s ex/s | loss %.4f | eta %s', step,
                       total_steps, f'{rate:,.0f}', last_loss, _fmt_eta(eta))
          writer.write({'type': 'train', 'step': step, 'loss': last_loss,
                        'examples_per_sec': rate, 'time': now})
        reached = False
        if do_eval:
          last_eval = run_eval(step)
          if last_eval is not None:
            save_best(step, last_eval)
            stopped_early = stopper.update(step, last_eval)
            if stopped_early:
              logging.info(
                  'early stopping at step %d: eval %s has not improved on'
                  ' %.5f (step %d) by more than %g for %d evaluations.',
                  step, stopper.metric, stopper.best, stopper.best_step,
                  stopper.min_delta, stopper.patience)
          # MLPerf: training stops at the first eval that reaches the target.
          reached = bool(target and last_eval and last_eval['auc'] >= target)
        if do_ckpt or reached or stopped_early:
          save(step, position, reached)
        window_step = step
        rate_start, rate_step = time.time(), step
        if reached:
          target_reached = True
          logging.info('eval AUC %.5f reached config.target_auc %.5f at step'
                       ' %d: stopping.', last_eval['auc'], target, step)
        if reached or stopped_early:
          break
  finally:
    ckpt.close()
    if best_ckpt is not None:
      best_ckpt.close()
    writer.close()
    if record is not None:
      record.close()
  eval_bad = data.eval_bad_lines
  if data.bad_lines.count:
    logging.warning('malformed training lines: %s', data.bad_lines.summary())
  if eval_bad is not None and eval_bad.count:
    logging.warning('malformed eval lines: %s', eval_bad.summary())
  summary = {'step': step, 'train_loss': last_loss, 'eval': last_eval,
             'target_auc': target, 'target_auc_reached': target_reached,
             'teacher_auc': data.teacher_auc,
             'stopped_early': stopped_early,
             'best_eval': ({'step': stopper.best_step, stopper.metric:
                            stopper.best} if stopper.best is not None
                           else None),
             'malformed_lines_skipped': data.bad_lines.count + (
                 eval_bad.count if eval_bad is not None else 0)}
  if previous is not None:
    summary = previous
  if is_chief:
    # The results first, then the writes that could fail.
    logging.info('summary: %s', json.dumps(summary, sort_keys=True))
    if previous is None:
      ckpt_lib.write_json(os.path.join(workdir, 'summary.json'), summary)
      plots = reporting.write_plots(workdir, final_eval.get('probs'),
                                    final_eval.get('labels'),
                                    data.teacher_auc)
    else:  # A finished run's plots are its own.
      plots = [p for p in (os.path.join(workdir, n) for n in reporting.PLOTS)
               if os.path.exists(p)]
    logging.info('%s', reporting.summary_text(summary, workdir, plots))
  return summary
