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
import signal
import threading
import time
import zlib
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax.config import build as config_lib
from dlrm_jax.config import checks as config_checks
from dlrm_jax.train import early_stopping
from dlrm_jax.train import metrics as metrics_lib
from dlrm_jax.train import optimizers as dense_optimizers
from dlrm_jax import parallel
from dlrm_jax.train import reporting
from dlrm_jax.train import workdir_lock
from dlrm_jax.data import inputs
from dlrm_jax.data import pipeline
from dlrm_jax.embedding import EmbeddingEngine
from dlrm_jax.embedding.ids import admission as admission_lib
from dlrm_jax.embedding.ids import remapping
from dlrm_jax.embedding import specs as emb_specs
from dlrm_jax.embedding.sharding import planner as plan_lib
from dlrm_jax.embedding import rounding
from dlrm_jax.models import DLRM, MLPSpec


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class InvalidIdError(ValueError):
  """Ids outside their tables reached the train step."""


class TrainingInterrupted(Exception):
  """Training stopped on SIGINT or SIGTERM, after saving a checkpoint.

  Attributes:
    signum: the signal.
    step: the step the run stopped at.
    exit_code: what the command line exits with: 130 for SIGINT, 0 for
      SIGTERM (a requested stop, nothing failed).
  """

  def __init__(self, message: str, signum: int, step: int):
    super().__init__(message)
    self.signum, self.step = signum, step
    self.exit_code = 130 if signum == signal.SIGINT else 0


class StopRequest:
  """Turns SIGINT and SIGTERM into a request the training loop answers.

  Inside the `with` block the first SIGINT or SIGTERM only sets `signum`;
  the loop then saves a checkpoint at the step it is at and stops
  (`TrainingInterrupted`). A second one stops at once, without saving
  (KeyboardInterrupt). With several processes the request is acted on at
  the next log step, when every process has heard of it (one gather), so
  that all save the same step. Off (`enabled` False, or outside the main
  thread) it installs nothing.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self) -> 'StopRequest':
    if self.enabled and threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:  # The second one: stop now.
      self.__exit__()
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning(
        '%s received: saving a checkpoint after this step, then stopping'
        ' (send it again to stop at once, without saving).',
        signal.Signals(signum).name)

  def requested(self, at_log_step: bool) -> int | None:
    """The signal to stop for, agreed by every process; None: go on."""
    if jax.process_count() == 1:
      return self.signum
    if not at_log_step:
      return None
    every = multihost_utils.process_allgather(np.int32(self.signum or 0))
    return int(np.max(every)) or None


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
  """The embedding sharding plan a run (`spec`: a RunSpec or a config)
  asks for."""
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
      lookups=_lookups_per_table(features) or None,
      row_group_size=request.row_group_size,
      batch_per_device=(spec.loop.batch_size // num_devices if num_devices
                        else None),
      device_memory_bytes=None if budget is None else int(budget * 2**30))


def _lookups_per_table(features) -> dict[str, int]:
  """Table name -> ids per example read from it (over its features)."""
  out: dict[str, int] = {}
  for f in features:
    out[f.table] = out.get(f.table, 0) + f.max_ids
  return out


class Trainer:
  """A run's model, embedding engine, optimizers and compiled steps.

  Attributes:
    spec: the run's RunSpec (built from the config by
      `config_lib.run_spec`).
    setup: the same spec (its model, tables and feature transform).
    mesh: the device mesh.
    engine: the embedding engine.
    model: the Flax DLRM (dense and over arches).
    tx: the dense optimizer.
    resets_rows: whether batches carry managed-collision row resets.
    needs_host_state: whether `predict`/`evaluate` need a run's HostState.

  It holds nothing of a run: a run's host-side id state is a `HostState`
  (`new_host_state`), so runs can share one Trainer.
  """

  def __init__(self, spec, *, mesh: Mesh | None = None,
               plan: plan_lib.Plan | None = None):
    """`spec`: a RunSpec, or a config to build one from."""
    spec = config_lib.run_spec(spec)
    self.spec = self.setup = spec
    self.mesh = mesh if mesh is not None else parallel.create_mesh(
        spec.mesh.data, spec.mesh.model)
    n_dev = self.mesh.devices.size
    config_checks.check_batch_sizes(spec.loop, n_dev)
    if plan is None:
      plan = make_plan(spec, spec.tables, self.mesh.shape['model'], n_dev,
                       spec.feature_specs)
    self.engine = EmbeddingEngine(self.setup.tables, self.setup.feature_specs,
                                  self.mesh, plan)
    self.model = DLRM(self.setup.model, dtype=self.setup.compute_dtype)
    # Rows given to new managed-collision values are reset by the step.
    self.resets_rows = any(getattr(f, 'managed_collision', None)
                           for f in self.setup.transform.sparse)
    # Host-side id state that eval/predict must be given (HostState).
    self.needs_host_state = self.resets_rows or spec.admission.min_count > 1
    self.tx = dense_optimizers.build_dense_optimizer(spec.dense_optimizer)
    self.has_bn = any(
        m is not None and m.use_bn
        for m in (self.setup.model.dense_mlp, self.setup.model.final))
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

  @property
  def plan(self) -> plan_lib.Plan:
    return self.engine.plan

  def new_host_state(self, spec: config_lib.RunSpec | None = None
                     ) -> HostState:
    """A run's fresh host-side id state: empty managed-collision remappers
    and, with rare-id admission (`admission` of the run's `spec`; default
    the trainer's), an empty sketch."""
    kw = dict(process_index=jax.process_index(),
              process_count=jax.process_count())
    admission = (spec or self.spec).admission
    return HostState(
        remapping.BatchRemapper(self.setup.transform, **kw),
        admission_lib.build(admission, self.setup.transform, **kw))

  def zero_metrics(self) -> dict[str, jax.Array]:
    """The train step's metric accumulator, zeroed, on the mesh."""
    return jax.device_put(_zero_acc(), self._acc_shardings)

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
    # A config mismatch is named as one before the saved plan is read (it may
    # not place this config's tables).
    ckpt.check_signature(step, meta, self.signature())
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
    """What fixes the state's shapes; a checkpoint must match it.

    Derived from the specs (`_shape_fields`): every field is in it except
    the hyperparameters in `_UNSHAPED_FIELDS`, so a field added to a spec is
    checked on restore unless it is named there.
    """
    model = _shape_fields(self.setup.model)
    if self.setup.model.interaction == 'dot':
      # Dot-interaction signatures stay as they were before DCN.
      del model['interaction'], model['dcn']
    tables = {t.name: _shape_fields(t) for t in self.setup.tables}
    for t in self.setup.tables:
      if t.dtype in rounding.LOW_PRECISION:
        # 16-bit tables are stored as uint16 bit patterns (older checkpoints
        # stored them as bf16/f16).
        tables[t.name]['storage'] = 'uint16'
    return {
        'model': model,
        'tables': tables,
        'dense_optimizer': self.spec.dense_optimizer.kind,
        'grad_clip': bool(self.spec.dense_optimizer.grad_clip_norm),
    }

  # --------------------------------------------------------------------------
  # Batches.

  def batch_shardings(self, with_label: bool = True) -> dict[str, Any]:
    sh = {'ids': parallel.batch_sharding(self.mesh, 2)}
    if self.setup.model.num_dense:
      sh['dense'] = parallel.batch_sharding(self.mesh, 2)
    if with_label:
      sh['label'] = parallel.batch_sharding(self.mesh, 1)
      if self.resets_rows:
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

  def predict(self, state: TrainState, host_batch,
              host: HostState | None = None) -> np.ndarray:
    """Click probabilities of a batch (this process's rows of it in, the
    whole global batch out), on the host.

    `host`: the run's remappers and admission sketch (`new_host_state`,
    loaded from the checkpoint); required when the config has either.
    """
    probs = self.predict_step(state, self.put_batch(
        self._eval_batch(host_batch, host), False))
    return np.asarray(
        multihost_utils.process_allgather(probs, tiled=True)
        if jax.process_count() > 1 else jax.device_get(probs))

  def evaluate(self, state: TrainState, batches: pipeline.EvalBatches,
               host: HostState | None = None
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
          state, self.put_batch(self._eval_batch(host_batch, host), False)))[:n])
      labels.append(host_batch['label'][:n])
    probs = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    if jax.process_count() > 1:
      probs, labels = _gather_in_process_order(probs, labels)
    return metrics_lib.evaluate(probs, labels), probs, labels

  def _eval_batch(self, host_batch, host: HostState | None):
    """A host batch with the run's id remapping and admission applied."""
    if host is None and self.needs_host_state:
      raise ValueError(
          'this config has managed-collision features or config.admission:'
          ' pass predict/evaluate the run\'s host state (host=, see'
          ' Trainer.new_host_state and HostState.restore).')
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


# ----------------------------------------------------------------------------
# Loop.


class HostState:
  """A run's host-side id state, saved as each checkpoint's 'remappers' item.

  Attributes:
    remapper: the managed-collision remappers (empty without such features).
    admission: the rare-id admission filter, None without config.admission.
  """

  _ADMISSION_KEY = '_id_admission'

  def __init__(self, remapper: remapping.BatchRemapper,
               admission: admission_lib.IdAdmission | None):
    self.remapper = remapper
    self.admission = admission

  def __bool__(self) -> bool:
    return bool(self.remapper) or self.admission is not None

  def train(self, host_batch: dict[str, Any], step: int) -> dict[str, Any]:
    """Maps a training batch, updating the state: call in step order."""
    if self.remapper:
      host_batch = self.remapper.train(host_batch, step)
    if self.admission is not None:  # counts ids
      host_batch = self.admission.train(host_batch)
    return host_batch

  def eval(self, host_batch: dict[str, Any]) -> dict[str, Any]:
    """Maps an eval/serving batch without changing the state."""
    if 'mc_raw' in host_batch:
      host_batch = self.remapper.eval(host_batch)
    if self.admission is not None:
      host_batch = self.admission.eval(host_batch)
    return host_batch

  def state_dict(self) -> dict[str, Any] | None:
    out = self.remapper.state_dict() if self.remapper else {}
    if self.admission is not None:
      out[self._ADMISSION_KEY] = self.admission.state_dict()
    return out or None

  def load_state_dict(self, state: dict[str, Any]) -> None:
    if self.remapper:
      self.remapper.load_state_dict(
          {k: v for k, v in state.items() if k != self._ADMISSION_KEY})
    if self.admission is not None:
      if self._ADMISSION_KEY not in state:
        raise ckpt_lib.IncompatibleCheckpointError(
            'the checkpoint holds no rare-id admission sketch; it was written'
            ' without config.admission.min_count.')
      self.admission.load_state_dict(state[self._ADMISSION_KEY])

  def restore(self, ckpt: ckpt_lib.Checkpointer, step: int) -> None:
    """Loads the state saved with checkpoint `step` (nothing when empty)."""
    if self:
      self.load_state_dict(ckpt.restore_remappers(step))


def _fmt_eta(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(0, seconds))))


def num_train_steps(loop: config_lib.LoopSpec, data: inputs.DataSetup
                    ) -> int:
  """The steps a run trains: `loop.num_train_steps`, else its epochs."""
  if loop.num_train_steps is not None:
    return loop.num_train_steps
  steps = int(loop.num_epochs * data.train.batches_per_epoch)
  # Small data: at least config.min_train_steps (whole epochs), so a small
  # file does not end after a handful of steps (pair it with early stopping).
  min_steps = loop.min_train_steps
  if steps < min_steps:
    per_epoch = max(1, data.train.batches_per_epoch)
    epochs = -(-min_steps // per_epoch)
    logging.info(
        'small data: %d epoch(s) of %d steps is under config.min_train_steps'
        ' (%d): the run is up to %d epochs (%d steps)%s.', loop.num_epochs,
        per_epoch, min_steps, epochs, epochs * per_epoch,
        ', or less with early stopping' if loop.early_stopping.patience
        else '')
    steps = epochs * per_epoch
  elif steps < 100 and not min_steps:
    logging.warning(
        'small data: %d epoch(s) are only %d steps of batch %d. Set'
        ' config.min_train_steps with early stopping, or start from'
        ' configs/criteo.py:small_data (see the README\'s small-data advice).',
        loop.num_epochs, steps, loop.batch_size)
  return steps


def _finished_summary(workdir: str, step: int) -> dict[str, Any] | None:
  """summary.json of a run that ended at `step`, if it holds its results."""
  try:
    with open(os.path.join(workdir, 'summary.json')) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if summary.get('step') == step else None


def train_and_evaluate(config, workdir: str, trainer: Trainer | None = None,
                       *, handle_signals: bool = False) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates.

  Process 0 holds `<workdir>/.lock` meanwhile (`dlrm_jax.train.workdir_lock`): a
  second run on the same workdir gets WorkdirLockedError naming the first.

  Args:
    config: a config or its RunSpec (`config_lib.run_spec`).
    workdir: the run's directory (relative to the current directory, or
      absolute).
    trainer: optionally, a Trainer built from a config with the same model,
      so that several runs share compiled steps (tests, notebooks).
    handle_signals: whether SIGINT and SIGTERM save a checkpoint and stop
      (`StopRequest`, raising TrainingInterrupted); the command line's way.

  Returns:
    The run's summary (see `_summary`).
  """
  spec = config_lib.run_spec(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  lock = (workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock, StopRequest(enabled=handle_signals) as stop:
    return _train_and_evaluate(spec, workdir, trainer, stop)


def _trainer_for(spec: config_lib.RunSpec, trainer: Trainer | None
                 ) -> Trainer:
  """`trainer`, checked to serve `spec`; a new one when None."""
  if trainer is None:
    return Trainer(spec)
  if not trainer.spec.same_trainer(spec):
    raise ValueError(
        'the trainer passed to train_and_evaluate was built from a config'
        ' with another model, optimizer, mesh or batch size.')
  return trainer


def check_window(acc: dict[str, Any], first: int, last: int,
                 ckpt: ckpt_lib.Checkpointer) -> None:
  """Raises if the train steps `first..last` (their host-side accumulator
  `acc`) had a non-finite loss or ids outside their tables.

  Raises:
    NonFiniteLossError: naming the first bad step and the last checkpoint.
    InvalidIdError: with the number of invalid ids.
  """
  first_bad = int(acc['first_nonfinite'])
  if first_bad >= 0:
    good = ckpt.latest_step()
    raise NonFiniteLossError(
        f'the training loss became non-finite at step {first_bad}'
        f' (checked over steps {first}..{last}); nothing was saved after it'
        + (f'; the last good checkpoint is step {good}' if good is not None
           else '') + '. Lower the learning rates or check the input data.')
  if int(acc['invalid_ids']):
    raise InvalidIdError(
        f'{int(acc["invalid_ids"])} ids outside their tables reached the'
        f' train step between steps {first} and {last}; they were ignored.'
        ' Keep config.data.check_ids on to find the feature and value.')


class BatchRecorder:
  """`config.data.record_batches`: appends what each step consumed (step,
  process, crc32 of the ids) to `<workdir>/batches.jsonl`, for tests and
  debugging. Disabled, it does nothing."""

  def __init__(self, workdir: str, enabled: bool):
    self._file = (open(os.path.join(workdir, 'batches.jsonl'), 'a',
                       buffering=1) if enabled else None)

  def record(self, step: int, host_batch: dict[str, np.ndarray]) -> None:
    if self._file is not None:
      self._file.write(json.dumps({
          'step': step, 'process': jax.process_index(),
          'ids_crc32': zlib.crc32(np.ascontiguousarray(
              host_batch['ids']).tobytes())}) + '\n')

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class Throughput:
  """Examples/s since the last `reset` and the ETA of the remaining steps;
  the first step (compilation) is kept out of the figure."""

  def __init__(self, step: int, total_steps: int, batch_size: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self._compiled = False
    self.reset(step)

  def reset(self, step: int) -> None:
    self._start, self._step = time.time(), step

  def stepped(self, step: int, acc) -> None:
    if not self._compiled:
      jax.block_until_ready(acc)
      self._compiled = True
      self.reset(step)

  def rate(self, step: int) -> tuple[float, str]:
    """(examples per second, ETA as h:mm:ss) at `step`."""
    rate = (step - self._step) * self.batch_size / max(
        time.time() - self._start, 1e-9)
    eta = (self.total_steps - step) * self.batch_size / max(rate, 1e-9)
    return rate, _fmt_eta(eta)


class BestKeeper:
  """`config.keep_best_metric`: keeps the state of the best eval so far in
  `<workdir>/best_checkpoint` (None when the config keeps none)."""

  def __init__(self, workdir: str, metric: str):
    self.metric = metric
    self.tracker = early_stopping.EarlyStopping(
        early_stopping.EarlyStoppingSpec(
            metric, early_stopping.metric_mode(metric)))
    self.ckpt = ckpt_lib.BestCheckpointer(workdir, metric, self.tracker.mode)

  @classmethod
  def of(cls, loop: config_lib.LoopSpec, workdir: str
         ) -> 'BestKeeper | None':
    metric = loop.keep_best_metric
    return cls(workdir, metric) if metric else None

  def update(self, step: int, result: dict[str, float], state: TrainState,
             meta: dict[str, Any], host: HostState) -> None:
    """Keeps this step's state when its eval is the best."""
    if not self.tracker.improved(result[self.metric]):
      return
    self.tracker.update(step, result)
    logging.info('best %s so far (%.5f) at step %d: kept in %s', self.metric,
                 result[self.metric], step, self.ckpt.directory)
    self.ckpt.save(step, state, dict(meta, best_metric=self.metric,
                                     best_eval=result),
                   remappers=host.state_dict(), metrics=result)

  def summary(self) -> dict[str, Any] | None:
    """The best checkpoint's step, metric, value and folder; None if no eval
    was kept."""
    t = self.tracker
    if t.best is None:
      return None
    return {'step': t.best_step, 'metric': self.metric, 'value': t.best,
            'path': os.fspath(self.ckpt.directory / str(t.best_step))}


@dataclasses.dataclass
class _Run:
  """One run of `train_and_evaluate`: its parts and the state it saves."""

  spec: config_lib.RunSpec
  workdir: str
  trainer: Trainer
  data: inputs.DataSetup
  ckpt: ckpt_lib.Checkpointer
  stopper: early_stopping.EarlyStopping
  best: BestKeeper | None
  host: HostState
  data_iter: Any  # `data.train.iterator()`: grain's or a text stream's
  total_steps: int
  state: Any = None
  target_reached: bool = False
  writer: Any = None
  final_eval: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def loop(self) -> config_lib.LoopSpec:
    return self.spec.loop

  @property
  def target(self) -> float | None:
    """The eval AUC that ends training (`loop.target_auc`), or None."""
    return self.loop.target_auc

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state.step))

  def base_meta(self, step: int) -> dict[str, Any]:
    return {'step': step, 'signature': self.trainer.signature(),
            'plan': self.trainer.plan.to_json(),
            'config': self.spec.config_json}

  def save(self, step: int, reached: bool = False) -> None:
    meta = {**self.base_meta(step), 'target_auc_reached': reached,
            'early_stopping': self.stopper.state_dict(),
            'best_checkpoint': (self.best.tracker.state_dict() if self.best
                                else None)}
    self.ckpt.save(step, self.state, meta, data_iter=self.data_iter,
                   remappers=self.host.state_dict())

  def resume(self) -> None:
    """The newest good checkpoint's state (damaged ones moved aside), or a
    fresh one."""

    def restore(step):
      state, meta = self.trainer.restore(self.ckpt, step)
      # A text-source checkpoint written before the text stream's iterator
      # was saved as the 'data' item holds its position as
      # meta['data_position'] instead: the iterator is set from that.
      old = meta.get('data_position')
      self.ckpt.restore_data_iterator(
          step, self.data_iter, old_state=None if old is None else
          pipeline.TextBatchIterator.state_at(old))
      self.host.restore(self.ckpt, step)
      return state, meta

    latest, restored = self.ckpt.restore_newest_good(restore)
    if latest is None:
      self.state = self.trainer.init_state(self.loop.seed)
      return
    self.state, meta = restored
    self.stopper.load_state_dict(meta.get('early_stopping'))
    if self.best is not None:
      self.best.tracker.load_state_dict(meta.get('best_checkpoint'))
    logging.info('resumed from the checkpoint at step %d (%s)', latest,
                 self.ckpt.directory)
    if meta.get('target_auc_reached'):  # that run ended at its target
      self.total_steps, self.target_reached = latest, True

  def evaluate(self, step: int) -> dict[str, float] | None:
    """Evaluates, logs and records the metrics; None without eval data."""
    data = self.data
    if data.eval is None:
      return None
    t = time.time()
    result, probs, labels = self.trainer.evaluate(self.state, data.eval,
                                                  self.host)
    self.final_eval.update(probs=probs, labels=labels)
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
    self.writer.write({'type': 'eval', 'step': step, 'time': time.time(),
                       **result})
    return result

  def after_eval(self, step: int, result: dict[str, float] | None
                 ) -> tuple[bool, bool]:
    """Keeps the best state and asks the early stopper and the target AUC;
    returns (stopped early, target reached)."""
    if result is None:
      return False, False
    if self.best is not None:
      self.best.update(step, result, self.state, self.base_meta(step),
                       self.host)
    stopper = self.stopper
    stopped = stopper.update(step, result)
    if stopped:
      logging.info(
          'early stopping at step %d: eval %s has not improved on %.5f'
          ' (step %d) by more than %g for %d evaluations.', step,
          stopper.metric, stopper.best, stopper.best_step, stopper.min_delta,
          stopper.patience)
    # MLPerf: training stops at the first eval that reaches the target.
    reached = bool(self.target and result['auc'] >= self.target)
    if reached:
      logging.info('eval AUC %.5f reached config.target_auc %.5f at step'
                   ' %d: stopping.', result['auc'], self.target, step)
    return stopped, reached

  def close(self) -> None:
    self.data_iter.close()  # its prefetch threads
    self.ckpt.close()
    if self.best is not None:
      self.best.ckpt.close()
    if self.writer is not None:
      self.writer.close()


def _open_run(spec: config_lib.RunSpec, workdir: str, trainer: Trainer
              ) -> _Run:
  """The run's data, checkpointers and (resumed or fresh) state."""
  logging.info('mesh: %s; %d device(s), %d process(es)',
               dict(trainer.mesh.shape), trainer.mesh.devices.size,
               jax.process_count())
  logging.info('embedding plan:\n%s',
               plan_lib.describe(trainer.plan, trainer.setup.tables,
                                 trainer.mesh.shape['data']))
  data = inputs.make_data(spec, process_index=jax.process_index(),
                          process_count=jax.process_count())
  logging.info('data: %s', data.description)
  loop = spec.loop
  run = _Run(
      spec=spec, workdir=workdir, trainer=trainer, data=data,
      ckpt=ckpt_lib.Checkpointer(workdir, max_to_keep=loop.max_to_keep),
      stopper=early_stopping.EarlyStopping(loop.early_stopping),
      best=BestKeeper.of(loop, workdir),
      host=trainer.new_host_state(spec),
      data_iter=data.train.iterator(),
      total_steps=num_train_steps(loop, data))
  try:
    run.resume()
  except BaseException:
    run.close()
    raise
  return run


def _train(run: _Run, step: int, stop: StopRequest | None = None
           ) -> tuple[int, float | None, dict | None, bool]:
  """Trains from `step` to the run's end, an early stop or the target AUC;
  returns (step, last train loss, last eval, stopped early).

  Raises:
    TrainingInterrupted: when `stop` was requested (a checkpoint of the
      step reached is saved first).
  """
  loop, trainer = run.loop, run.trainer
  stop = stop or StopRequest(enabled=False)
  recorder = BatchRecorder(run.workdir, loop.record_batches)
  acc = trainer.zero_metrics()
  throughput = Throughput(step, run.total_steps, loop.batch_size)
  window_start, last_loss, last_eval, stopped = step, None, None, False
  try:
    while step < run.total_steps:
      host_batch = next(run.data_iter)
      recorder.record(step + 1, host_batch)
      host_batch = run.host.train(host_batch, step)  # in step order
      run.state, acc = trainer.train_step(run.state,
                                          trainer.put_batch(host_batch), acc)
      step += 1
      throughput.stepped(step, acc)
      last = step == run.total_steps
      do_log = step % loop.log_every_steps == 0 or last
      do_eval = step % loop.eval_every_steps == 0 or last
      do_ckpt = step % loop.checkpoint_every_steps == 0 or last
      saved = reached = False
      if do_log or do_ckpt or do_eval:
        run.ckpt.check_for_errors()  # An asynchronous save that failed stops.
        host_acc, acc = jax.device_get(acc), trainer.zero_metrics()
        check_window(host_acc, window_start + 1, step, run.ckpt)
        if int(host_acc['steps']):
          last_loss = float(host_acc['loss_sum']) / int(host_acc['steps'])
          rate, eta = throughput.rate(step)
          logging.info('step %d/%d | %s ex/s | loss %.4f | eta %s', step,
                       run.total_steps, f'{rate:,.0f}', last_loss, eta)
          run.writer.write({'type': 'train', 'step': step, 'loss': last_loss,
                            'examples_per_sec': rate, 'time': time.time()})
        if do_eval:
          last_eval = run.evaluate(step)
          stopped, reached = run.after_eval(step, last_eval)
        saved = do_ckpt or reached or stopped
        if saved:
          run.save(step, reached)
        window_start = step
        throughput.reset(step)
        if reached:
          run.target_reached = True
        if reached or stopped:
          break
      signum = stop.requested(do_log)
      if signum:
        if not saved:
          run.ckpt.check_for_errors()
          check_window(jax.device_get(acc), window_start + 1, step, run.ckpt)
          run.save(step)
        raise TrainingInterrupted(
            f'interrupted by {signal.Signals(signum).name} at step {step}:'
            f' saved checkpoint {step} in {run.ckpt.directory}; run the same'
            ' command again to resume.', signum, step)
  finally:
    recorder.close()
  return step, last_loss, last_eval, stopped


def _summary(run: _Run, step: int, last_loss, last_eval, stopped_early
             ) -> dict[str, Any]:
  data, stopper = run.data, run.stopper
  eval_bad = data.eval_bad_lines
  if data.bad_lines.count:
    logging.warning('malformed training lines: %s', data.bad_lines.summary())
  if eval_bad is not None and eval_bad.count:
    logging.warning('malformed eval lines: %s', eval_bad.summary())
  return {'step': step, 'train_loss': last_loss, 'eval': last_eval,
          'target_auc': run.target, 'target_auc_reached': run.target_reached,
          'teacher_auc': data.teacher_auc, 'stopped_early': stopped_early,
          'best_eval': ({'step': stopper.best_step, stopper.metric:
                         stopper.best} if stopper.best is not None else None),
          'best_checkpoint': run.best.summary() if run.best else None,
          'malformed_lines_skipped': data.bad_lines.count + (
              eval_bad.count if eval_bad is not None else 0)}


def _report(run: _Run, summary: dict[str, Any], finished: bool) -> None:
  """Process 0: logs the summary, writes summary.json and the plots (a run
  already `finished` keeps its own)."""
  if jax.process_index() != 0:
    return
  workdir = run.workdir
  # The results first, then the writes that could fail.
  logging.info('summary: %s', json.dumps(summary, sort_keys=True))
  if not finished:
    ckpt_lib.write_json(os.path.join(workdir, 'summary.json'), summary)
    plots = reporting.write_plots(workdir, run.final_eval.get('probs'),
                                  run.final_eval.get('labels'),
                                  run.data.teacher_auc,
                                  final_step=summary['step'],
                                  best=summary.get('best_checkpoint'))
  else:
    plots = [p for p in (os.path.join(workdir, n) for n in reporting.PLOTS)
             if os.path.exists(p)]
  logging.info('%s', reporting.summary_text(summary, workdir, plots))


def _already_done(run: _Run, step: int) -> dict[str, Any] | None:
  """At a run's end already (stopped early, or all steps taken): the finished
  run's summary when it has one; the run is then not trained further."""
  stopper = run.stopper
  early = bool(stopper.patience and stopper.since_best >= stopper.patience)
  if early:
    logging.info('this run stopped early at step %d (eval %s best %.5f at'
                 ' step %d); not training further.', step, stopper.metric,
                 stopper.best, stopper.best_step)
    run.total_steps = step
  if step < run.total_steps:
    return None
  if run.target_reached:
    logging.info('this run reached its target AUC at step %d; not training'
                 ' further.', step)
  elif not early:
    logging.info('already trained for %d steps, all the config asks for.',
                 step)
  return _finished_summary(run.workdir, step)


def _train_and_evaluate(spec: config_lib.RunSpec, workdir: str,
                        trainer: Trainer | None = None,
                        stop: StopRequest | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates.

  Args:
    spec: the run spec.
    workdir: checkpoints, metrics.jsonl, config.json and summary.json go here.
    trainer: optionally, a Trainer built from a config with the same model,
      so that several runs share compiled steps (tests, notebooks).

  Returns:
    A summary: final step, last train loss, final eval metrics, teacher AUC.
  """
  os.makedirs(workdir, exist_ok=True)
  run = _open_run(spec, workdir, _trainer_for(spec, trainer))
  is_chief = jax.process_index() == 0
  try:
    if is_chief:
      ckpt_lib.write_json(os.path.join(workdir, 'config.json'),
                          json.loads(spec.config_json))
    step = run.step
    run.writer = reporting.MetricsLogger(workdir, enabled=is_chief,
                                         resume_step=step)
    previous = _already_done(run, step)  # A finished run's summary, kept.
    last_loss = last_eval = None
    if step >= run.total_steps and previous is None:  # Make it anew.
      last_eval = run.evaluate(step)
      losses = [r['loss'] for r in reporting.read_metrics(workdir)
                if r['type'] == 'train' and r['step'] <= step]
      last_loss = losses[-1] if losses else None
    step, loss, evaluated, stopped_early = _train(run, step, stop)
    last_loss = last_loss if loss is None else loss
    last_eval = last_eval if evaluated is None else evaluated
  finally:
    run.close()
  summary = _summary(run, step, last_loss, last_eval, stopped_early)
  if previous is not None:
    summary = previous
  _report(run, summary, finished=previous is not None)
  return summary
