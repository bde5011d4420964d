"""Early stopping and best-checkpoint keeping by an eval metric.

`config.early_stopping` (metric, mode, patience, min_delta): training stops
after `patience` evaluations in a row without the metric improving on its
best by more than `min_delta` (Keras' `EarlyStopping` semantics; patience 0
is off). Its state (best value, best step, evaluations since) goes into each
checkpoint's metadata, so a resumed run stops where an uninterrupted one
would.

`config.keep_best_metric` ('auc', 'log_loss', ...; None is off) keeps the
checkpoint of the best evaluation so far under `<workdir>/best_checkpoint`
(an orbax CheckpointManager with `best_fn`, `best_mode`, max_to_keep 1),
beside the latest ones that resuming uses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Metrics of `Trainer.evaluate` and the direction in which they improve.
METRIC_MODES = {'auc': 'max', 'accuracy': 'max', 'log_loss': 'min',
                'loss': 'min'}
MODES = ('max', 'min')


def metric_mode(metric: str, mode: str | None = None) -> str:
  """Gives the direction in which `metric` improves.

  Args:
    metric: an eval metric, one of METRIC_MODES.
    mode: 'max' or 'min' to say it. None: the metric's own, from
      METRIC_MODES.

  Returns:
    'max' or 'min'.

  Raises:
    ValueError: the metric is unknown. `config.checks.check_loop` checks the
      config's metric first.
  """
  if metric not in METRIC_MODES:
    raise ValueError(f'metric {metric!r} must be one of'
                     f' {sorted(METRIC_MODES)}.')
  return mode or METRIC_MODES[metric]


@dataclasses.dataclass(frozen=True)
class EarlyStoppingSpec:
  """When to stop: `config.early_stopping` with its mode resolved.

  Attributes:
    metric: the eval metric's name, one of METRIC_MODES.
    mode: 'max' or 'min'.
    patience: how many evaluations without improvement stop training. 0
      never stops.
    min_delta: the least change that counts as an improvement.
  """

  metric: str = 'auc'
  mode: str = 'max'
  patience: int = 0
  min_delta: float = 0.0


@dataclasses.dataclass
class EarlyStopping:
  """Tracks an eval metric. `update` says when to stop.

  Attributes:
    spec: the metric, its mode, the patience and min_delta.
    best: the best value so far. None before the first evaluation.
    best_step: the step of the best value.
    since_best: the evaluations since the best value.
  """

  spec: EarlyStoppingSpec = EarlyStoppingSpec()
  best: float | None = None
  best_step: int | None = None
  since_best: int = 0

  # The spec's fields, read as the tracker's own.
  metric = property(lambda self: self.spec.metric)
  mode = property(lambda self: self.spec.mode)
  patience = property(lambda self: self.spec.patience)
  min_delta = property(lambda self: self.spec.min_delta)

  def improved(self, value: float) -> bool:
    """Says whether a value beats the best by more than min_delta.

    Args:
      value: the metric's new value.

    Returns:
      True when it improves on the best, or when there is no best yet.
    """
    if self.best is None:
      return True
    if self.mode == 'max':
      return value > self.best + self.min_delta
    return value < self.best - self.min_delta

  def update(self, step: int, result: dict[str, float]) -> bool:
    """Records an evaluation.

    A NaN value counts as no improvement.

    Args:
      step: the evaluation's step.
      result: the eval metrics, holding `spec.metric`.

    Returns:
      True when training should stop.
    """
    value = float(result[self.metric])
    if math.isnan(value):
      self.since_best += 1
    elif self.improved(value):
      self.best, self.best_step, self.since_best = value, step, 0
    else:
      self.since_best += 1
    return bool(self.patience) and self.since_best >= self.patience

  def state_dict(self) -> dict[str, Any]:
    """The tracker's state, for a checkpoint: best, best_step, since_best."""
    return {'best': self.best, 'best_step': self.best_step,
            'since_best': self.since_best}

  def load_state_dict(self, state: dict[str, Any] | None) -> None:
    """Restores the state that `state_dict` returned.

    Args:
      state: the saved state. None or empty keeps the fresh state.
    """
    if state:
      self.best = state.get('best')
      self.best_step = state.get('best_step')
      self.since_best = int(state.get('since_best', 0))
