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


def metric_mode(metric: str, mode: str | None, path: str) -> str:
  """The mode of `metric` ('max'/'min'), checking both (config path `path`)."""
  if metric not in METRIC_MODES:
    raise ValueError(f'{path}.metric ({metric!r}) must be one of'
                     f' {sorted(METRIC_MODES)}.')
  mode = mode or METRIC_MODES[metric]
  if mode not in MODES:
    raise ValueError(f'{path}.mode ({mode!r}) must be one of {list(MODES)}.')
  return mode


@dataclasses.dataclass
class EarlyStopping:
  """Tracks an eval metric; `update` says when to stop.

  Attributes:
    metric: the eval metric's name.
    mode: 'max' or 'min'.
    patience: evaluations without improvement before stopping (0: never).
    min_delta: the least change that counts as an improvement.
    best: the best value so far (None before the first evaluation).
    best_step: its step.
    since_best: evaluations since it.
  """

  metric: str = 'auc'
  mode: str = 'max'
  patience: int = 0
  min_delta: float = 0.0
  best: float | None = None
  best_step: int | None = None
  since_best: int = 0

  @classmethod
  def from_config(cls, cfg) -> 'EarlyStopping':
    path = 'config.early_stopping'
    cfg = dict(cfg)  # every field, as configs/criteo.py gives them
    metric = cfg['metric']
    mode = metric_mode(metric, cfg['mode'], path)
    patience = cfg['patience']
    if isinstance(patience, bool) or not isinstance(patience, int) or (
        patience < 0):
      raise ValueError(f'{path}.patience ({patience!r}) must be an integer'
                       ' >= 0 (0: off).')
    min_delta = float(cfg['min_delta'])
    if not min_delta >= 0:
      raise ValueError(f'{path}.min_delta ({min_delta}) must be >= 0.')
    return cls(metric, mode, patience, min_delta)

  def improved(self, value: float) -> bool:
    if self.best is None:
      return True
    if self.mode == 'max':
      return value > self.best + self.min_delta
    return value < self.best - self.min_delta

  def update(self, step: int, result: dict[str, float]) -> bool:
    """Records an evaluation; True when training should stop."""
    value = float(result[self.metric])
    if math.isnan(value):
      self.since_best += 1
    elif self.improved(value):
      self.best, self.best_step, self.since_best = value, step, 0
    else:
      self.since_best += 1
    return bool(self.patience) and self.since_best >= self.patience

  def state_dict(self) -> dict[str, Any]:
    return {'best': self.best, 'best_step': self.best_step,
            'since_best': self.since_best}

  def load_state_dict(self, state: dict[str, Any] | None) -> None:
    if state:
      self.best = state.get('best')
      self.best_step = state.get('best_step')
      self.since_best = int(state.get('since_best', 0))
