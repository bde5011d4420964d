"""The training loop: `train_and_evaluate`, behind `python -m dlrm_jax.main`.

A run's lifecycle is three steps over one `_Run`, built whole by `_Run.open`:

  resume  `_Run.open`: the data, the checkpointers, the state (the newest
          good checkpoint's, damaged ones moved aside, or a fresh one), the
          metrics writer, and the step the run ends at (`end`): the
          config's steps, or the step it already ended at (stopped early,
          target AUC reached).
  train   `_Run.train`: steps up to `end`, evaluating, checkpointing and
          logging on their schedules, until the end, an early stop, the
          target AUC or a stop request (SIGINT/SIGTERM: a checkpoint of the
          step reached, then TrainingInterrupted).
  finish  `_Run.finish`: the summary (a finished run keeps its own
          summary.json; one without gets its results again), summary.json,
          the plots and the summary box.

Process 0 holds `<workdir>/.lock` meanwhile (`workdir_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import os
import shutil
import signal
import threading
import time
import zlib
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dlrm_jax.config import build as config_lib
from dlrm_jax.data import inputs
from dlrm_jax.embedding import cache as cache_lib
from dlrm_jax.embedding.ids.host_state import HostState
from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax.train import early_stopping
from dlrm_jax.train import reporting
from dlrm_jax.train import workdir_lock
from dlrm_jax.train.trainer import Trainer, TrainState


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class InvalidIdError(ValueError):
  """Ids outside their tables reached the train step."""


class TrainingInterrupted(Exception):
  """Training stopped on SIGINT or SIGTERM, after saving a checkpoint.

  Attributes:
    signum: the signal.
    step: the step the run stopped at.
    exit_code: what the command line exits with. It is 130 for SIGINT and 0
      for SIGTERM, a requested stop where nothing failed.
  """

  def __init__(self, message: str, signum: int, step: int):
    super().__init__(message)
    self.signum, self.step = signum, step
    self.exit_code = 130 if signum == signal.SIGINT else 0


class StopRequest:
  """Turns SIGINT and SIGTERM into a request the training loop answers.

  Inside the `with` block, the first SIGINT or SIGTERM only sets `signum`.
  The loop then saves a checkpoint at the step it is at and raises
  `TrainingInterrupted`. A second signal stops at once, without saving, as
  KeyboardInterrupt. With several processes, the request is acted on at the
  next log step, when every process has heard of it through one gather. So
  all processes save the same step. When off, it installs nothing. It is off
  with `enabled` False or outside the main thread.

  Attributes:
    enabled: whether to install the signal handlers.
    signum: the signal received, or None.
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
    """Gives the signal to stop for, agreed by every process.

    Args:
      at_log_step: whether this is a log step. With several processes, only a
        log step gathers the request.

    Returns:
      The signal, or None to go on.
    """
    if jax.process_count() == 1:
      return self.signum
    if not at_log_step:
      return None
    every = multihost_utils.process_allgather(np.int32(self.signum or 0))
    return int(np.max(every)) or None


def _fmt_eta(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(0, seconds))))


def num_train_steps(loop: config_lib.LoopSpec, data: inputs.DataSetup
                    ) -> int:
  """Gives the steps a run trains: `loop.num_train_steps`, else its epochs.

  Small data trains at least `loop.min_train_steps`, in whole epochs.

  Args:
    loop: the loop spec.
    data: the run's data.

  Returns:
    The number of steps.
  """
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
  """Checks the train steps `first..last` through their host-side accumulator.

  Args:
    acc: the accumulator of the steps, on the host.
    first: the first step of the window.
    last: the last step of the window.
    ckpt: the run's checkpointer, to name the last good checkpoint.

  Raises:
    NonFiniteLossError: a loss was not finite. It names the first bad step
      and the last checkpoint.
    InvalidIdError: ids outside their tables reached the step. It gives their
      number.
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
  """Records what each step consumed, for `config.data.record_batches`.

  Each line of `<workdir>/batches.jsonl` holds the step, the process and the
  crc32 of the ids. It serves tests and debugging. Disabled, it does nothing.

  Args:
    workdir: the run directory.
    enabled: whether to record.
  """

  def __init__(self, workdir: str, enabled: bool):
    self._file = (open(os.path.join(workdir, 'batches.jsonl'), 'a',
                       buffering=1) if enabled else None)

  def record(self, step: int, host_batch: dict[str, np.ndarray]) -> None:
    """Appends a step's line.

    Args:
      step: the step.
      host_batch: the batch on the host, with its 'ids'.
    """
    if self._file is not None:
      self._file.write(json.dumps({
          'step': step, 'process': jax.process_index(),
          'ids_crc32': zlib.crc32(np.ascontiguousarray(
              host_batch['ids']).tobytes())}) + '\n')

  def close(self) -> None:
    """Closes the file."""
    if self._file is not None:
      self._file.close()


class Throughput:
  """Measures examples per second since the last `reset`, and the ETA.

  The first step compiles, so it is kept out of the figure.

  Attributes:
    total_steps: the step the run ends at.
    batch_size: the global batch size.
  """

  def __init__(self, step: int, total_steps: int, batch_size: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self._compiled = False
    self.reset(step)

  def reset(self, step: int) -> None:
    """Starts a new measurement at `step`.

    Args:
      step: the current step.
    """
    self._start, self._step = time.time(), step

  def stepped(self, step: int, acc) -> None:
    """Notes a step. After the first one, it waits for it and starts again.

    Args:
      step: the step reached.
      acc: the step's metrics accumulator, to wait for.
    """
    if not self._compiled:
      jax.block_until_ready(acc)
      self._compiled = True
      self.reset(step)

  def rate(self, step: int) -> tuple[float, str]:
    """Gives the rate since the last reset, and the ETA.

    Args:
      step: the current step.

    Returns:
      The examples per second and the ETA as h:mm:ss.
    """
    rate = (step - self._step) * self.batch_size / max(
        time.time() - self._start, 1e-9)
    eta = (self.total_steps - step) * self.batch_size / max(rate, 1e-9)
    return rate, _fmt_eta(eta)


class BestKeeper:
  """Keeps the state of the best eval so far, for `config.keep_best_metric`.

  The state goes to `<workdir>/best_checkpoint`.

  Attributes:
    metric: the eval metric it ranks by.
    tracker: the EarlyStopping that tracks the best value.
    ckpt: the BestCheckpointer.
  """

  def __init__(self, workdir: str, metric: str):
    self.metric = metric
    self.tracker = early_stopping.EarlyStopping(
        early_stopping.EarlyStoppingSpec(
            metric, early_stopping.metric_mode(metric)))
    self.ckpt = ckpt_lib.BestCheckpointer(workdir, metric, self.tracker.mode)

  @classmethod
  def of(cls, loop: config_lib.LoopSpec, workdir: str
         ) -> 'BestKeeper | None':
    """Builds the keeper a loop spec asks for.

    Args:
      loop: the loop spec.
      workdir: the run directory.

    Returns:
      The keeper, or None when the config keeps no best checkpoint.
    """
    metric = loop.keep_best_metric
    return cls(workdir, metric) if metric else None

  def update(self, step: int, result: dict[str, float], state: TrainState,
             meta: dict[str, Any], host: HostState) -> None:
    """Keeps this step's state when its eval is the best.

    Args:
      step: the step.
      result: the eval metrics.
      state: the train state.
      meta: the checkpoint meta.
      host: the host-side id state.
    """
    if not self.tracker.improved(result[self.metric]):
      return
    self.tracker.update(step, result)
    logging.info('best %s so far (%.5f) at step %d: kept in %s', self.metric,
                 result[self.metric], step, self.ckpt.directory)
    self.ckpt.save(step, state, dict(meta, best_metric=self.metric,
                                     best_eval=result),
                   remappers=host.state_dict(), metrics=result)

  def summary(self) -> dict[str, Any] | None:
    """Describes the best checkpoint.

    Returns:
      Its step, metric, value and folder. None if no eval was kept.
    """
    t = self.tracker
    if t.best is None:
      return None
    return {'step': t.best_step, 'metric': self.metric, 'value': t.best,
            'path': os.fspath(self.ckpt.directory / str(t.best_step))}


@dataclasses.dataclass
class _Run:
  """One run of `train_and_evaluate`, whole from `open` on.

  Attributes:
    spec: the run spec.
    workdir: the run's directory.
    trainer: its Trainer.
    data: its train and eval data.
    ckpt: the checkpointer of `<workdir>/checkpoints`.
    stopper: the early stopper (its state restored on resume).
    best: the best-checkpoint keeper, or None.
    host: the host-side id state.
    data_iter: the training data iterator (grain's or a text stream's).
    writer: metrics.jsonl and TensorBoard.
    state: the train state.
    end: the step the run ends at.
    ended_by: why it ends there: 'steps' (the config's), 'early stopping'
      or 'target AUC'.
    last_loss: the last logged training loss.
    last_eval: the last eval's metrics.
    final_eval: the last eval's probabilities and labels (for the plots).
  """

  spec: config_lib.RunSpec
  workdir: str
  trainer: Trainer
  data: inputs.DataSetup
  ckpt: ckpt_lib.Checkpointer
  stopper: early_stopping.EarlyStopping
  best: BestKeeper | None
  host: HostState
  data_iter: Any
  writer: reporting.MetricsLogger
  state: TrainState
  end: int
  ended_by: str = 'steps'
  last_loss: float | None = None
  last_eval: dict[str, float] | None = None
  final_eval: dict[str, Any] = dataclasses.field(default_factory=dict)

  # --------------------------------------------------------------------------
  # Resume.

  @classmethod
  def open(cls, spec: config_lib.RunSpec, workdir: str, trainer: Trainer
           ) -> '_Run':
    """Opens the run, resumed from its newest good checkpoint or started afresh.

    Args:
      spec: the run spec.
      workdir: the run's directory.
      trainer: a Trainer of the spec.

    Returns:
      The run, every field set. `close` it.
    """
    logging.info('mesh: %s; %d device(s), %d process(es)',
                 dict(trainer.mesh.shape), trainer.mesh.devices.size,
                 jax.process_count())
    trainer.attach_store(workdir)
    logging.info('embedding plan:\n%s', trainer.describe_plan())
    data = inputs.make_data(spec, process_index=jax.process_index(),
                            process_count=jax.process_count())
    logging.info('data: %s', data.description)
    loop, is_chief = spec.loop, jax.process_index() == 0
    closing = contextlib.ExitStack()
    try:
      ckpt = closing.enter_context(contextlib.closing(
          ckpt_lib.Checkpointer(workdir, max_to_keep=loop.max_to_keep)))
      best = BestKeeper.of(loop, workdir)
      if best is not None:
        closing.enter_context(contextlib.closing(best.ckpt))
      data_iter = closing.enter_context(contextlib.closing(
          data.train.iterator()))
      stopper = early_stopping.EarlyStopping(loop.early_stopping)
      host = trainer.new_host_state(spec)
      if trainer.cached and best is not None:
        raise ValueError(
            'config.keep_best_metric: a best checkpoint is not kept for'
            ' cached tables (config.embedding.cache.tables) yet; unset one.')
      step, state, meta = _resume(trainer, ckpt, data_iter, host, loop.seed)
      if meta is not None:
        stopper.load_state_dict(meta.get('early_stopping'))
        if best is not None:
          best.tracker.load_state_dict(meta.get('best_checkpoint'))
      end, ended_by = num_train_steps(loop, data), 'steps'
      if meta is not None and meta.get('target_auc_reached'):
        end, ended_by = step, 'target AUC'
      elif stopper.patience and stopper.since_best >= stopper.patience:
        end, ended_by = step, 'early stopping'
      if is_chief:
        ckpt_lib.write_json(os.path.join(workdir, 'config.json'),
                            json.loads(spec.config_json))
      writer = closing.enter_context(contextlib.closing(
          reporting.MetricsLogger(workdir, enabled=is_chief,
                                  resume_step=step)))
    except BaseException:
      closing.close()
      raise
    run = cls(spec=spec, workdir=workdir, trainer=trainer, data=data,
              ckpt=ckpt, stopper=stopper, best=best, host=host,
              data_iter=data_iter, writer=writer, state=state, end=end,
              ended_by=ended_by)
    run._closing = closing  # pylint: disable=attribute-defined-outside-init
    return run

  def close(self) -> None:
    """Waits for the checkpoints being written and stops the input threads."""
    self._closing.close()

  @property
  def loop(self) -> config_lib.LoopSpec:
    """The loop spec."""
    return self.spec.loop

  @property
  def step(self) -> int:
    """The state's step, on the host."""
    return int(jax.device_get(self.state.step))

  @property
  def finished(self) -> bool:
    """Whether the run is at its end already, with nothing left to train."""
    return self.step >= self.end

  # --------------------------------------------------------------------------
  # Train.

  def train(self, stop: StopRequest) -> None:
    """Trains from the current step to `end`, an early stop or the target AUC.

    `ended_by` says which.

    Args:
      stop: the stop request to answer.

    Raises:
      TrainingInterrupted: a stop was requested. A checkpoint of the step
        reached is saved first.
      NonFiniteLossError: the loss became NaN or infinite.
      InvalidIdError: ids outside their tables reached the train step.
    """
    loop, trainer, step = self.loop, self.trainer, self.step
    recorder = BatchRecorder(self.workdir, loop.record_batches)
    acc = trainer.zero_metrics()
    throughput = Throughput(step, self.end, loop.batch_size)
    window_start = step
    feed = (_CachedFeed(self, step) if trainer.cached else None)
    self._feed = feed
    try:
      while step < self.end:
        if feed is None:
          host_batch = next(self.data_iter)
          recorder.record(step + 1, host_batch)
          host_batch = self.host.train(host_batch, step)  # in step order
        else:  # mapped to cache slots, the rows swapped in
          host_batch = feed.next(recorder, step)
        self.state, acc = trainer.train_step(
            self.state, trainer.put_batch(host_batch), acc)
        step += 1
        throughput.stepped(step, acc)
        last = step == self.end
        do_log = step % loop.log_every_steps == 0 or last
        do_eval = step % loop.eval_every_steps == 0 or last
        do_ckpt = step % loop.checkpoint_every_steps == 0 or last
        saved = False
        if do_log or do_ckpt or do_eval:
          self.ckpt.check_for_errors()  # An asynchronous save that failed.
          host_acc, acc = jax.device_get(acc), trainer.zero_metrics()
          check_window(host_acc, window_start + 1, step, self.ckpt)
          if int(host_acc['steps']):
            self._log_train(step, host_acc, throughput)
          ended_by = self._evaluate_and_decide(step) if do_eval else None
          saved = do_ckpt or ended_by is not None
          if saved:
            self.save(step, reached=ended_by == 'target AUC')
          window_start = step
          throughput.reset(step)
          if ended_by is not None:
            self.end, self.ended_by = step, ended_by
            break
        if feed is not None:
          feed.after_step()
        signum = stop.requested(do_log)
        if signum:
          if not saved:
            self.ckpt.check_for_errors()
            check_window(jax.device_get(acc), window_start + 1, step,
                         self.ckpt)
            self.save(step)
          raise TrainingInterrupted(
              f'interrupted by {signal.Signals(signum).name} at step {step}:'
              f' saved checkpoint {step} in {self.ckpt.directory}; run the'
              ' same command again to resume.', signum, step)
    finally:
      recorder.close()
      if feed is not None:
        feed.close()
        self._feed = None

  def _log_train(self, step: int, host_acc, throughput: Throughput) -> None:
    self.last_loss = float(host_acc['loss_sum']) / int(host_acc['steps'])
    rate, eta = throughput.rate(step)
    cache = self._cache_window()
    logging.info('step %d/%d | %s ex/s | loss %.4f%s | eta %s', step,
                 self.end, f'{rate:,.0f}', self.last_loss,
                 f' | cache hit {cache["cache_hit_rate"]:.3f}' if cache
                 else '', eta)
    self.writer.write({'type': 'train', 'step': step, 'loss': self.last_loss,
                       'examples_per_sec': rate, 'time': time.time(),
                       **cache})

  _cache_counts = None  # the cache counts at the log window's start

  def _cache_window(self) -> dict[str, Any]:
    """Cache hit rates over the log window, and a warning when low.

    The id hit rate is the share of lookups whose row was cached
    (TorchRec's `cache_hit_rate`); misses are the unique rows loaded.
    """
    if not self.trainer.cached:
      return {}
    now = self.trainer.cached.counts()
    before = self._cache_counts or {n: (0, 0, 0, 0) for n in now}
    self._cache_counts = now
    d = {n: [a - b for a, b in zip(now[n], before[n])] for n in now}
    ids = sum(v[3] for v in d.values())
    by_table = {n: (v[2] / v[3] if v[3] else 1.0) for n, v in d.items()}
    out = {'cache_hit_rate': (sum(v[2] for v in d.values()) / ids
                              if ids else 1.0),
           'cache_misses': int(sum(v[1] for v in d.values())),
           'cache_hit_rate_by_table': by_table}
    floor = self.spec.sharding.cache.min_hit_rate
    low = sorted((r, n) for n, r in by_table.items() if r < floor)
    if low:
      logging.warning(
          'cached tables hit below config.embedding.cache.min_hit_rate=%g:'
          ' %s; a larger config.embedding.cache.fraction (or rows) makes'
          ' fewer loads.', floor,
          ', '.join(f'{n} {r:.3f}' for r, n in low[:5]))
    return out

  def _evaluate_and_decide(self, step: int) -> str | None:
    """Evaluates, keeps the best state, and asks the early stopper and the
    target AUC; returns why the run ends here, or None."""
    result = self.evaluate(step)
    if result is None:
      return None
    if self.best is not None:
      self.best.update(step, result, self.state, self.base_meta(step),
                       self.host)
    stopper = self.stopper
    ended_by = None
    if stopper.update(step, result):
      logging.info(
          'early stopping at step %d: eval %s has not improved on %.5f'
          ' (step %d) by more than %g for %d evaluations.', step,
          stopper.metric, stopper.best, stopper.best_step, stopper.min_delta,
          stopper.patience)
      ended_by = 'early stopping'
    # MLPerf: training stops at the first eval that reaches the target.
    target = self.loop.target_auc
    if target and result['auc'] >= target:
      logging.info('eval AUC %.5f reached config.target_auc %.5f at step'
                   ' %d: stopping.', result['auc'], target, step)
      ended_by = 'target AUC'
    return ended_by

  def evaluate(self, step: int) -> dict[str, float] | None:
    """Evaluates, logs and records the metrics.

    Args:
      step: the current step.

    Returns:
      The metrics, or None without eval data.
    """
    data = self.data
    if data.eval is None:
      return None
    t = time.time()
    if self.trainer.cached:
      if self._feed is not None:
        self._feed.pipe.drain()
      result, probs, labels, self.state = self.trainer.evaluate_cached(
          self.state, data.eval, self.host)
    else:
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
    self.last_eval = result
    return result

  def base_meta(self, step: int) -> dict[str, Any]:
    """Gives the checkpoint meta every save holds.

    Args:
      step: the step.

    Returns:
      The step, the signature, the plan and the config.
    """
    return {'step': step, 'signature': self.trainer.signature(),
            'plan': self.trainer.plan.to_json(),
            'cache_rows': self.trainer.cache_rows(),
            'config': self.spec.config_json}

  def save(self, step: int, reached: bool = False) -> None:
    """Checkpoints the state, the data position and the host state.

    Args:
      step: the step.
      reached: whether the target AUC was reached at this step.
    """
    meta = {**self.base_meta(step), 'target_auc_reached': reached,
            'early_stopping': self.stopper.state_dict(),
            'best_checkpoint': (self.best.tracker.state_dict() if self.best
                                else None)}
    data_iter = self.data_iter
    if self.trainer.cached:
      data_iter = self._save_stores(step)
    self.ckpt.save(step, self.state, meta, data_iter=data_iter,
                   remappers=self.host.state_dict())
    if self.trainer.cached:
      _prune_store_checkpoints(self.ckpt, step)

  _feed = None  # the `_CachedFeed` while `train` runs with cached tables

  def _save_stores(self, step: int) -> Any:
    """Writes the stores of step `step` beside its checkpoint.

    Every write-back lands first, then every cached row is flushed to the
    stores, then they are saved in chunks (`CachedTables.save`).

    Returns:
      What the checkpoint saves as the data position: the input's position
      after this step's batch (the pipeline has read one further).
    """
    cached = self.trainer.cached
    position = None
    if self._feed is not None:
      self._feed.pipe.drain()
      position = self._feed.position
    cached.flush(self.state.emb, self.trainer.engine)
    where = cache_lib.store_checkpoint_dir(self.ckpt.directory, step)
    t = time.time()
    cached.save(where)
    logging.info('cached tables: stores of step %d saved to %s in %.1fs',
                 step, where, time.time() - t)
    return self.data_iter if position is None else _SavedPosition(position)

  # --------------------------------------------------------------------------
  # Finish.

  def finish(self, kept: dict[str, Any] | None = None) -> dict[str, Any]:
    """Reports the run on process 0.

    It logs the summary, writes summary.json and the plots, and logs the
    summary box.

    Args:
      kept: a finished run's own summary.json. It is kept as it is, with its
        plots.

    Returns:
      The summary.
    """
    summary = kept or self.summary()
    if jax.process_index() != 0:
      return summary
    workdir = self.workdir
    # The results first, then the writes that could fail.
    logging.info('summary: %s', json.dumps(summary, sort_keys=True))
    if kept is None:
      ckpt_lib.write_json(os.path.join(workdir, 'summary.json'), summary)
      plots = reporting.write_plots(
          workdir, self.final_eval.get('probs'),
          self.final_eval.get('labels'), self.data.teacher_auc,
          final_step=summary['step'], best=summary.get('best_checkpoint'))
    else:
      plots = [p for p in (os.path.join(workdir, n) for n in reporting.PLOTS)
               if os.path.exists(p)]
    logging.info('%s', reporting.summary_text(summary, workdir, plots))
    return summary

  def summary(self) -> dict[str, Any]:
    """Collects the run's results.

    Returns:
      The step, losses, evals, best checkpoint and targets.
    """
    data, stopper = self.data, self.stopper
    eval_bad = data.eval_bad_lines
    if data.bad_lines.count:
      logging.warning('malformed training lines: %s',
                      data.bad_lines.summary())
    if eval_bad is not None and eval_bad.count:
      logging.warning('malformed eval lines: %s', eval_bad.summary())
    return {
        'step': self.step, 'train_loss': self.last_loss,
        'eval': self.last_eval, 'target_auc': self.loop.target_auc,
        'target_auc_reached': self.ended_by == 'target AUC',
        'teacher_auc': data.teacher_auc,
        'stopped_early': self.ended_by == 'early stopping',
        'best_eval': ({'step': stopper.best_step, stopper.metric:
                       stopper.best} if stopper.best is not None else None),
        'best_checkpoint': self.best.summary() if self.best else None,
        'malformed_lines_skipped': data.bad_lines.count + (
            eval_bad.count if eval_bad is not None else 0)}

  def results_again(self) -> None:
    """Gets a finished run's results again when its summary.json is missing.

    It evaluates again and reads the last training loss from metrics.jsonl.
    """
    step = self.step
    self.evaluate(step)
    losses = [r['loss'] for r in reporting.read_metrics(self.workdir)
              if r['type'] == 'train' and r['step'] <= step]
    self.last_loss = losses[-1] if losses else None


class _CachedFeed:
  """Training batches for cached tables, prepared one ahead.

  A `cache.CachePipeline` over the run's data maps each batch to cache slots
  on its thread; `next` swaps the rows in on the device and gives the host
  batch with slot ids. The pipeline pauses after the batch of each eval
  step, so an evaluation can swap rows itself.

  Args:
    run: the run.
    step: the step training starts from.
  """

  def __init__(self, run: '_Run', step: int):
    self.run = run
    loop, start, end = run.loop, step, run.end

    def pause_after(j: int) -> bool:
      s = start + j + 1
      return s % loop.eval_every_steps == 0 or s == end

    self.pipe = cache_lib.CachePipeline(
        run.trainer.cached,
        itertools.islice(run.data_iter, max(end - step, 0)),
        position_fn=run.data_iter.get_state, pause_after=pause_after)
    self.position, self.index = None, -1

  def next(self, recorder: BatchRecorder, step: int) -> dict[str, Any]:
    """The next host batch, its rows swapped into the caches."""
    prepared, host_batch = next(self.pipe)
    recorder.record(step + 1, host_batch)
    trainer = self.run.trainer
    emb, evicted = trainer.swap_step(self.run.state.emb, prepared.swaps)
    self.run.state = self.run.state.replace(emb=emb)
    self.pipe.evicted(prepared, evicted)
    self.position, self.index = prepared.position, prepared.index
    return dict(host_batch, ids=prepared.ids)

  def after_step(self) -> None:
    """Lets the pipeline go on after an eval step's bookkeeping."""
    self.pipe.resume(self.index)

  def close(self) -> None:
    """Writes back what is handed over and stops the thread."""
    self.pipe.finish()


class _SavedPosition:
  """A data iterator's saved position, in the form grain's checkpoint
  handler saves (`get_state()` bytes)."""

  def __init__(self, state):
    self._state = state

  def get_state(self) -> bytes:
    if isinstance(self._state, bytes):
      return self._state
    return json.dumps(self._state, indent=4).encode()


def _prune_store_checkpoints(ckpt: ckpt_lib.Checkpointer, step: int) -> None:
  """Removes the store checkpoints of steps the checkpointer no longer
  keeps."""
  root = os.path.dirname(cache_lib.store_checkpoint_dir(ckpt.directory, 0))
  keep = set(ckpt.all_steps()) | {step}
  for name in os.listdir(root) if os.path.isdir(root) else ():
    if name.isdigit() and int(name) not in keep and int(name) < step:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _resume(trainer: Trainer, ckpt: ckpt_lib.Checkpointer, data_iter,
            host: HostState, seed: int
            ) -> tuple[int, TrainState, dict[str, Any] | None]:
  """(step, state, meta) of the newest good checkpoint (damaged ones moved
  aside), with the data iterator and host state set to it; or a fresh
  state at step 0 and meta None."""

  restore = functools.partial(trainer.restore, ckpt, host=host,
                              data_iter=data_iter)
  latest, restored = ckpt.restore_newest_good(restore)
  if latest is None:
    return 0, trainer.init_state(seed), None
  logging.info('resumed from the checkpoint at step %d (%s)', latest,
               ckpt.directory)
  state, meta = restored
  return latest, state, meta


def _log_finished(run: _Run) -> None:
  """Says why a finished run is not trained further."""
  if run.ended_by == 'early stopping':
    s = run.stopper
    logging.info('this run stopped early at step %d (eval %s best %.5f at'
                 ' step %d); not training further.', run.step, s.metric,
                 s.best, s.best_step)
  elif run.ended_by == 'target AUC':
    logging.info('this run reached its target AUC at step %d; not training'
                 ' further.', run.step)
  else:
    logging.info('already trained for %d steps, all the config asks for.',
                 run.step)


def train_and_evaluate(config, workdir: str, trainer: Trainer | None = None,
                       *, handle_signals: bool = False) -> dict[str, Any]:
  """Trains and evaluates, resuming from `workdir` if it holds checkpoints.

  Process 0 holds `<workdir>/.lock` meanwhile, from `workdir_lock`. A second
  run on the same workdir gets WorkdirLockedError naming the first.

  Args:
    config: a config or its RunSpec, from `config_lib.run_spec`.
    workdir: the run's directory, absolute or relative to the current
      directory.
    trainer: optionally a Trainer built from a config with the same model.
      Several runs then share compiled steps, as tests and notebooks do.
    handle_signals: whether SIGINT and SIGTERM save a checkpoint and stop,
      raising TrainingInterrupted. That is the command line's way.

  Returns:
    The run's summary, as `_Run.summary` gives it.

  Raises:
    ValueError: the config breaks a rule, or `trainer` serves another model.
    IncompatibleCheckpointError: the checkpoints are of another config.
    DamagedCheckpointError: every checkpoint is damaged.
    WorkdirLockedError: another run holds the workdir.
    TrainingInterrupted: a signal stopped training.
    NonFiniteLossError: the loss became NaN or infinite.
    InvalidIdError: ids outside their tables reached the train step.
  """
  spec = config_lib.run_spec(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  lock = (workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock, StopRequest(enabled=handle_signals) as stop:
    run = _Run.open(spec, workdir, _trainer_for(spec, trainer))
    kept = None
    try:
      if run.finished:
        _log_finished(run)
        kept = _finished_summary(workdir, run.step)
        if kept is None:
          run.results_again()
      else:
        run.train(stop)
    finally:
      run.close()
    return run.finish(kept)
