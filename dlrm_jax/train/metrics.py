"""Evaluation metrics on the host: exact ROC AUC, log loss, accuracy, calibration.

All take `[E]` arrays of predicted click probabilities and 0/1 labels over the
whole evaluation set.
"""

from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Computes the exact ROC AUC.

  That is the chance that a random positive scores above a random negative.
  Ties count one half, as in the Mann-Whitney statistic and sklearn's
  `roc_auc_score`. It takes O(E log E) time for E examples.

  Args:
    scores: the scores, any shape.
    labels: the labels, 0 or 1, as many as the scores.

  Returns:
    The AUC, or NaN when a class is absent.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1) > 0.5
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  order = np.argsort(scores, kind='mergesort')
  s = scores[order]
  y = labels[order]
  # Groups of tied scores, in increasing order.
  starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
  pos = np.add.reduceat(y.astype(np.int64), starts)
  size = np.diff(np.concatenate((starts, [s.size])))
  neg = size - pos
  neg_below = np.cumsum(neg) - neg
  wins = np.sum(pos * (neg_below + 0.5 * neg), dtype=np.float64)
  return float(wins / (n_pos * n_neg))


def log_loss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
  """Computes the mean binary cross-entropy of probabilities.

  Args:
    probs: the predicted probabilities. They are clipped to [eps, 1 - eps].
    labels: the labels, 0 or 1.
    eps: the clipping margin.

  Returns:
    The mean log loss.
  """
  p = np.clip(np.asarray(probs, np.float64).reshape(-1), eps, 1.0 - eps)
  y = np.asarray(labels, np.float64).reshape(-1)
  return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
  """Computes the share of examples whose rounded prediction equals the label.

  A prediction above 0.5 counts as 1.

  Args:
    probs: the predicted probabilities.
    labels: the labels, 0 or 1.

  Returns:
    The accuracy.
  """
  p = np.asarray(probs).reshape(-1) > 0.5
  y = np.asarray(labels).reshape(-1) > 0.5
  return float(np.mean(p == y))


def calibration(probs: np.ndarray, labels: np.ndarray) -> float:
  """Computes the mean prediction over the mean label.

  Args:
    probs: the predicted probabilities.
    labels: the labels, 0 or 1.

  Returns:
    The ratio. 1.0 is calibrated. NaN when no label is 1.
  """
  y = float(np.mean(labels))
  return float(np.mean(probs) / y) if y > 0 else float('nan')


def evaluate(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Computes all eval metrics of a set of predictions.

  Args:
    probs: the predicted probabilities.
    labels: the labels, 0 or 1.

  Returns:
    {'auc', 'log_loss', 'accuracy', 'calibration', 'num_examples'}.
  """
  return {
      'auc': roc_auc(probs, labels),
      'log_loss': log_loss(probs, labels),
      'accuracy': accuracy(probs, labels),
      'calibration': calibration(probs, labels),
      'num_examples': int(np.asarray(labels).size),
  }


def roc_curve(scores: np.ndarray, labels: np.ndarray,
              max_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """Computes the ROC curve, thinned to at most `max_points` points.

  Args:
    scores: the scores.
    labels: the labels, 0 or 1.
    max_points: the most points to keep.

  Returns:
    The false positive rates and the true positive rates, both from 0.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  y = np.asarray(labels).reshape(-1) > 0.5
  order = np.argsort(-scores, kind='mergesort')
  s, y = scores[order], y[order]
  last = np.flatnonzero(np.concatenate((s[1:] != s[:-1], [True])))
  tp = np.cumsum(y)[last]
  fp = (last + 1) - tp
  tpr = np.concatenate(([0.0], tp / max(1, y.sum())))
  fpr = np.concatenate(([0.0], fp / max(1, (~y).sum())))
  if tpr.size > max_points:
    keep = np.unique(np.linspace(0, tpr.size - 1, max_points).astype(int))
    tpr, fpr = tpr[keep], fpr[keep]
  return fpr, tpr
