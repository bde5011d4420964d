"""What a run leaves to look at: metrics.jsonl, TensorBoard events, PNG plots.

`MetricsLogger` appends every train and eval row to `<workdir>/metrics.jsonl`
and writes the same scalars as TensorBoard event files under
`<workdir>/tensorboard/` (tensorboardX, no TensorFlow needed). At the end,
`write_plots` draws `loss.png` (training loss), `eval.png` (eval AUC and log
loss over steps) and `roc.png` (ROC curve of the final eval), and
`summary_text` gives the one-screen summary. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from dlrm_jax.train import metrics as metrics_lib

PLOTS = ('loss.png', 'eval.png', 'roc.png')


class MetricsLogger:
  """Writes a run's metrics.jsonl and TensorBoard scalars.

  Attributes:
    path: `<workdir>/metrics.jsonl`.
    enabled: whether this process writes. Only process 0 does.
  """

  def __init__(self, workdir: str, enabled: bool = True,
               resume_step: int | None = None):
    """Opens the log. Rows a crashed run wrote past `resume_step` are dropped.

    Those steps will be trained again, so each step appears once. TensorBoard
    purges them too.

    Args:
      workdir: the run directory.
      enabled: whether to write at all.
      resume_step: the step the run goes on from. None for a fresh run.
    """
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled
    self._tb = None
    if enabled:
      if resume_step is not None:
        drop_rows_after(self.path, resume_step)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(
          os.path.join(workdir, 'tensorboard'),
          purge_step=None if resume_step is None else resume_step + 1)

  def write(self, row: dict[str, Any]) -> None:
    """Appends a row to metrics.jsonl and its numbers to TensorBoard.

    Args:
      row: the row. It holds 'step', and 'type' is 'train' or 'eval'.
    """
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(row, sort_keys=True) + '\n')
    kind, step = row.get('type', 'train'), int(row['step'])
    for k, v in row.items():
      if k in ('type', 'step', 'time') or not isinstance(v, (int, float)):
        continue
      self._tb.add_scalar(f'{kind}/{k}', float(v), step)
    self._tb.flush()

  def close(self) -> None:
    """Closes the TensorBoard writer."""
    if self._tb is not None:
      self._tb.close()


def drop_rows_after(path: str, step: int) -> int:
  """Rewrites a metrics.jsonl without its rows after `step`.

  The file is replaced atomically.

  Args:
    path: the metrics.jsonl file.
    step: the last step to keep.

  Returns:
    How many rows were dropped.
  """
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep = [l for l in lines if l.strip() and json.loads(l)['step'] <= step]
  if len(keep) == len(lines):
    return 0
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(keep)
  os.replace(tmp, path)
  return len(lines) - len(keep)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Reads the rows of `<workdir>/metrics.jsonl`.

  A later row of the same type and step wins.

  Args:
    workdir: the run directory.

  Returns:
    The rows, sorted by step and type. Empty without the file.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = {}
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      rows[(row['type'], row['step'])] = row
  return sorted(rows.values(), key=lambda r: (r['step'], r['type']))


def write_plots(workdir: str, probs: np.ndarray | None = None,
                labels: np.ndarray | None = None,
                teacher_auc: float | None = None,
                final_step: int | None = None,
                best: dict[str, Any] | None = None) -> list[str]:
  """Draws the run's PNG plots into the workdir.

  Args:
    workdir: the run's directory. Its metrics.jsonl is read.
    probs: the final model's eval probabilities, for the ROC plot.
    labels: their labels.
    teacher_auc: the synthetic teacher's AUC, drawn as a line.
    final_step: the final model's step, for the ROC plot's title.
    best: the best checkpoint as `BestKeeper.summary` gives it. It is marked
      on the eval plot.

  Returns:
    The paths written.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = read_metrics(workdir)
  train = [r for r in rows if r['type'] == 'train']
  evals = [r for r in rows if r['type'] == 'eval']
  written = []

  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r['step'] for r in train], [r['loss'] for r in train], marker='.')
  ax.set_xlabel('step')
  ax.set_ylabel('training loss (log loss)')
  ax.set_title('Training loss')
  ax.grid(alpha=0.3)
  written.append(_save(fig, workdir, 'loss.png'))

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  steps = [r['step'] for r in evals]
  a1.plot(steps, [r['auc'] for r in evals], marker='o', label='model')
  if best and best.get('metric') == 'auc':
    a1.plot([best['step']], [best['value']], marker='*', ms=14, ls='',
            color='C3', label=f'best checkpoint (step {best["step"]})')
  if teacher_auc is not None:
    a1.axhline(teacher_auc, color='gray', ls='--', label='teacher (best)')
  a1.set_xlabel('step')
  a1.set_ylabel('eval AUC')
  a1.legend()
  a1.grid(alpha=0.3)
  a2.plot(steps, [r['log_loss'] for r in evals], marker='o', color='C1')
  a2.set_xlabel('step')
  a2.set_ylabel('eval log loss')
  a2.grid(alpha=0.3)
  fig.suptitle('Evaluation')
  written.append(_save(fig, workdir, 'eval.png'))

  if probs is not None and labels is not None and len(probs):
    fpr, tpr = metrics_lib.roc_curve(probs, labels)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f'AUC {metrics_lib.roc_auc(probs, labels):.4f}')
    ax.plot([0, 1], [0, 1], color='gray', ls='--')
    ax.set_xlabel('false positive rate')
    ax.set_ylabel('true positive rate')
    ax.set_title('ROC of the final model' + (
        f' (step {final_step})' if final_step is not None else ''))
    ax.legend(loc='lower right')
    written.append(_save(fig, workdir, 'roc.png'))
  return written


def _save(fig, workdir: str, name: str) -> str:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def calibration_curve(probs: np.ndarray, labels: np.ndarray, bins: int = 10
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Bins predictions into equal-count bins.

  Args:
    probs: the predicted probabilities.
    labels: the labels, 0 or 1.
    bins: the number of bins.

  Returns:
    Per non-empty bin, the mean prediction, the click rate and the count.
  """
  order = np.argsort(probs, kind='mergesort')
  groups = np.array_split(order, bins)
  mean_p = np.array([probs[g].mean() for g in groups if len(g)])
  rate = np.array([labels[g].mean() for g in groups if len(g)])
  count = np.array([len(g) for g in groups if len(g)])
  return mean_p, rate, count


def summary_text(summary: dict[str, Any], workdir: str,
                 plots: Sequence[str] = ()) -> str:
  """Formats the one-screen summary printed at the end of a run.

  Args:
    summary: the run's summary, as summary.json holds it.
    workdir: the run directory.
    plots: the plot files written.

  Returns:
    The text, several lines.
  """
  lines = ['', '=' * 64, f'  run finished at step {summary["step"]}']
  if summary.get('train_loss') is not None:
    lines.append(f'  last training loss   {summary["train_loss"]:.4f}')
  ev = summary.get('eval')
  if ev:
    lines.append(f'  final eval, step {summary["step"]}:')
    lines.append(f'  eval AUC             {ev["auc"]:.4f}' + (
        f'   (teacher, the best achievable: {summary["teacher_auc"]:.4f})'
        if summary.get('teacher_auc') is not None else ''))
    lines.append(f'  eval log loss        {ev["log_loss"]:.4f}')
    lines.append(f'  eval accuracy        {ev["accuracy"]:.4f}')
    lines.append(f'  calibration          {ev["calibration"]:.3f}'
                 '   (mean prediction / click rate)')
    lines.append(f'  eval examples        {int(ev["num_examples"]):,}')
  best = summary.get('best_checkpoint')
  if best:
    lines.append(f'  best eval            {best["metric"]} {best["value"]:.4f}'
                 f' at step {best["step"]}, kept in {best["path"]}')
    lines.append('                       (what eval, predict and export use'
                 ' by default; --checkpoint=latest for the final model)')
  if summary.get('target_auc'):
    lines.append(f'  target AUC           {summary["target_auc"]:.5f} ' + (
        'reached: training stopped' if summary.get('target_auc_reached')
        else 'not reached'))
  if summary.get('malformed_lines_skipped'):
    lines.append(f'  malformed lines skipped: '
                 f'{summary["malformed_lines_skipped"]}')
  lines.append(f'  workdir              {workdir}')
  lines.append('  files                checkpoints/, metrics.jsonl, '
               'tensorboard/, config.json, summary.json')
  if plots:
    lines.append('  plots                ' + ', '.join(
        os.path.basename(p) for p in plots))
  lines.append(f'  tensorboard --logdir {os.path.join(workdir, "tensorboard")}')
  lines.append('=' * 64)
  return '\n'.join(lines)
