"""Using a trained run: evaluate a checkpoint, predict scores, export.

These back `python -m dlrm_jax.main --mode=eval|predict|export` and the
inference notebook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from absl import logging

from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax.config import build as config_lib
from dlrm_jax.config import spec as spec_lib
from dlrm_jax.train import metrics as metrics_lib
from dlrm_jax.serving import export as serving
from dlrm_jax.train import trainer as trainer_lib
from dlrm_jax.train import workdir_lock
from dlrm_jax.embedding.ids import host_state
from dlrm_jax.data import binary
from dlrm_jax.data import criteo
from dlrm_jax.data import inputs
from dlrm_jax.data import pipeline
from dlrm_jax.data import rows as rows_lib
from dlrm_jax.data import preprocess
from dlrm_jax.data import table as table_lib


@dataclasses.dataclass
class TrainedModel:
  """A restored run: its spec, trainer, state and host-side id state.

  The host-side id state holds the managed-collision remappers and the
  admission sketch.

  Attributes:
    spec: the run spec.
    trainer: the Trainer of the spec.
    state: the restored train state.
    step: the step of the checkpoint.
    host: the run's host-side id state as of that step.
    which: 'best' for the run's best checkpoint. 'latest' or 'step' for one
      of its checkpoints.
    directory: the checkpoint's folder.
    best_metric: for the best checkpoint, the metric it is best by.
    best_eval: for the best checkpoint, its eval metrics.
  """

  spec: spec_lib.RunSpec
  trainer: trainer_lib.Trainer
  state: trainer_lib.TrainState
  step: int
  host: host_state.HostState | None = None
  which: str = 'latest'
  directory: str = ''
  best_metric: str | None = None
  best_eval: dict[str, float] | None = None

  @property
  def description(self) -> str:
    """What was restored, in words, for the log."""
    what = {'best': 'the best checkpoint', 'latest': 'the latest checkpoint',
            'step': 'the checkpoint'}[self.which]
    extra = ''
    if self.best_eval and self.best_metric in self.best_eval:
      extra = (f', eval {self.best_metric}'
               f' {self.best_eval[self.best_metric]:.4f}')
    return f'{what} (step {self.step}{extra}): {self.directory}'

  def raw_to_model_rows(self, rows: dict[str, np.ndarray]
                        ) -> dict[str, np.ndarray]:
    """Maps reader rows of raw hashes to a raw batch for the feature transform.

    Ids are mapped as the training data mapped them. That matters for the
    vocabularies of preprocessed data.

    Args:
      rows: the reader's rows.

    Returns:
      The rows the batch maker takes.
    """
    d = self.spec.data
    if d.source == 'binary':
      meta = binary.Metadata.load(d.binary_dir)
      if meta.id_scheme == 'vocab':
        rows = dict(rows)
        rows['ids'] = preprocess.map_vocab(
            rows.pop('cat'), preprocess.load_vocab_lookups(d.binary_dir))
    return rows

  def admission(self) -> dict[str, tuple[np.ndarray, int]]:
    """Gives the rare-id admission filter for the export.

    Returns:
      Per filtered feature, its admitted rows and the shared row of the
      others. {} without `config.admission`.
    """
    return self.host.admitted_rows(self.spec) if self.host else {}

  def id_tables(self) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Gives the raw hash to row tables for the export.

    They come from the vocabularies of preprocessed data and from the
    remappers.

    Returns:
      Per feature name, the sorted raw values, their rows and the row of values
      not in the table.
    """
    tables = {}
    d = self.spec.data
    if d.source == 'binary':
      meta = binary.Metadata.load(d.binary_dir)
      if meta.id_scheme == 'vocab':
        tables.update(preprocess.vocab_id_tables(
            preprocess.load_vocab_lookups(d.binary_dir),
            self.trainer.spec.transform))
    host = self.host or self.trainer.new_host_state()
    tables.update(host.export_id_tables())
    return tables


def load(config, workdir: str, step: int | None = None,
         checkpoint: str | int | None = None, mesh=None) -> TrainedModel:
  """Restores a checkpoint of a run.

  Args:
    config: the run's config or RunSpec.
    workdir: the run's directory.
    step: a checkpoint step, the same as `checkpoint=step`.
    checkpoint: 'best', 'latest' or a step. 'best' is
      `<workdir>/best_checkpoint`, kept with `config.keep_best_metric`.
      'latest' is the newest good one of `<workdir>/checkpoints`. Damaged
      ones are skipped, never moved. None: 'best' where the run keeps one,
      else 'latest'.
    mesh: the device mesh of the restored Trainer; None: its default (all
      devices).

  Returns:
    The restored model. Its `description` says which checkpoint it is.

  Raises:
    ValueError: the workdir holds no such checkpoint.
    IncompatibleCheckpointError: the checkpoint is of another config.
    DamagedCheckpointError: it cannot be read back.
  """
  spec = config_lib.run_spec(config)
  if step is not None:
    checkpoint = step
  if checkpoint is None:
    checkpoint = 'best' if _best_steps(workdir) else 'latest'
  subdir = 'best_checkpoint' if checkpoint == 'best' else 'checkpoints'
  ckpt = ckpt_lib.Checkpointer(workdir, subdir=subdir, create=False)
  trainer = trainer_lib.Trainer(spec, mesh=mesh)
  host = trainer.new_host_state()
  lock = contextlib.nullcontext()
  if trainer.cached:
    # The checkpoint's stores are loaded into the run's store files, as a
    # resume does: not while the run trains (a resume reloads them).
    trainer.attach_store(workdir)
    lock = workdir_lock.WorkdirLock(workdir)

  restore = functools.partial(trainer.restore, ckpt, host=host)

  with lock:
    try:
      steps = ckpt.all_steps()
      if checkpoint == 'latest':  # The newest good one, damaged ones left.
        step, restored = ckpt.restore_newest_good(restore, move_aside=False)
        if step is None:
          raise ValueError(
              f'{workdir} holds no checkpoint (looked in {ckpt.directory});'
              ' train first, or pass the --workdir of a run.')
      else:
        step = steps[-1] if checkpoint == 'best' and steps else checkpoint
        if step not in steps:
          raise ValueError(
              f'{workdir} holds no checkpoint {checkpoint} (it has'
              f' {steps or "none"} in {ckpt.directory}).')
        restored = _restore_step(ckpt, step, restore)
    finally:
      ckpt.close()
  state, meta = restored
  which = ('best' if checkpoint == 'best' else
           'latest' if checkpoint == 'latest' else 'step')
  return TrainedModel(spec, trainer, state, step, host, which=which,
                      directory=os.fspath(ckpt.directory / str(step)),
                      best_metric=meta.get('best_metric'),
                      best_eval=meta.get('best_eval'))


def _best_steps(workdir: str) -> list[int]:
  """The steps under `<workdir>/best_checkpoint` (none: [])."""
  path = os.path.join(workdir, 'best_checkpoint')
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def _restore_step(ckpt: ckpt_lib.Checkpointer, step: int, restore):
  try:
    return restore(step)
  except ckpt_lib.IncompatibleCheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ckpt_lib.DamagedCheckpointError(
        f'checkpoint {step} at {ckpt.directory / str(step)} is damaged:'
        f' {ckpt_lib._one_line(e)}') from e  # pylint: disable=protected-access


def _labeled(path: str) -> bool:
  """Whether a Criteo file has the 40-field (labeled) layout."""
  with criteo.open_file(path) as f:
    head = f.read(1 << 16)
  first = (rows_lib.split_lines(head) or [b''])[0]  # Ends at \n, \r\n, \r.
  n = first.count(b'\t') + 1
  if n not in (39, 40):
    raise ValueError(
        f'{path}:1: expected 40 (labeled) or 39 (unlabeled) tab-separated'
        f' fields, got {n}.')
  return n == 40


def _batches(model: TrainedModel, paths: Sequence[str], labeled: bool
             ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """Model batches of the files in order; the last is padded."""
  b = model.spec.loop.eval_batch_size
  maker = inputs.make_batch_maker(model.spec)
  for chunk in criteo.read_criteo(paths, labeled=labeled, chunk_rows=b):
    n = len(chunk['int'])
    chunk = pipeline.pad_rows(chunk, b)
    if not labeled:
      chunk['label'] = np.zeros(b, np.float32)
    yield maker(model.raw_to_model_rows(chunk)), n


def _table_batches(model: TrainedModel, paths: Sequence[str],
                   labeled: bool | None = None
                   ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """Model batches of a tabular config's files in order (the training
  reader, `table.TableSource`, side tables joined); the last is padded.

  Args:
    model: the restored model.
    paths: the files.
    labeled: whether to read the label; None: where the first file has the
      label column.
  """
  b = model.spec.loop.eval_batch_size
  spec = model.spec.data.table
  if labeled is None:
    labeled = spec.label is not None and spec.label.column in (
        table_lib.file_columns(paths[0], spec.format))
  src = table_lib.TableSource(paths, spec, labeled=labeled,
                              bad_lines='error', field='--input')
  maker = inputs.make_batch_maker(model.spec)
  held: list[dict[str, np.ndarray]] = []
  count = 0

  def cut(rows: dict[str, np.ndarray]):
    n = len(next(iter(rows.values())))
    rows = pipeline.pad_rows(rows, b)
    if not labeled:
      rows['label'] = np.zeros(b, np.float32)
    return maker(rows), n

  for chunk in src.iter_rows():
    held.append(chunk)
    count += len(next(iter(chunk.values())))
    while count >= b:
      rows = {k: np.concatenate([h[k] for h in held]) for k in held[0]}
      yield cut({k: v[:b] for k, v in rows.items()})
      held, count = [{k: v[b:] for k, v in rows.items()}], count - b
  if count:
    rows = {k: np.concatenate([h[k] for h in held]) for k in held[0]}
    yield cut(rows)


def predict(model: TrainedModel, paths: Sequence[str] | str,
            output: str) -> int:
  """Writes one score per input row, in input order.

  Malformed lines stop it, because a skipped line would shift every later
  score.

  Args:
    model: the restored model.
    paths: the Criteo files, or a glob; for a tabular config
      (`config.data.source='table'`), files of its table, read as training
      reads them (side tables joined), labeled or not.
    output: the scores file, one probability a line.

  Returns:
    The number of rows scored.

  Raises:
    ValueError: the files mix labeled and unlabeled layouts, a line is
      malformed, or the run has several processes.
  """
  paths = criteo.expand_paths(paths, field='--input')
  if model.spec.data.source == 'table':
    batches = _table_batches(model, paths)
  else:
    labeled = {_labeled(p) for p in paths}
    if len(labeled) != 1:
      raise ValueError(f'--input mixes labeled and unlabeled files: {paths}.')
    batches = _batches(model, paths, labeled.pop())
  if jax.process_count() > 1:
    raise ValueError('--mode=predict runs in one process.')
  total = 0
  tmp = output + '.tmp'
  try:
    with open(tmp, 'w') as out:
      for batch, n in batches:
        probs = _predict(model, batch)[:n]
        out.write(''.join(f'{p:.7f}\n' for p in probs))
        total += n
    os.replace(tmp, output)
  except BaseException:
    if os.path.exists(tmp):  # No half file left behind.
      os.remove(tmp)
    raise
  logging.info('wrote %d scores to %s', total, output)
  return total


def eval_predictions(model: TrainedModel,
                     paths: Sequence[str] | str | None = None
                     ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """Evaluates the checkpoint on labeled files, or on the config's eval set.

  Args:
    model: the restored model.
    paths: labeled Criteo files. None: the config's eval set.

  Returns:
    The metrics, the probabilities and the labels.

  Raises:
    ValueError: no files are given and the config has no eval set.
  """
  if paths:
    paths = criteo.expand_paths(paths, field='--input')
    probs, labels = [], []
    batches = (_table_batches(model, paths, True)
               if model.spec.data.source == 'table' else
               _batches(model, paths, True))
    for batch, n in batches:
      probs.append(_predict(model, batch)[:n])
      labels.append(batch['label'][:n])
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    return metrics_lib.evaluate(probs, labels), probs, labels
  data = inputs.make_data(model.spec, process_index=jax.process_index(),
                          process_count=jax.process_count())
  if data.eval is None:
    raise ValueError('the config has no eval set; pass --input files.')
  if model.trainer.cached:
    result, probs, labels, model.state = model.trainer.evaluate_cached(
        model.state, data.eval, model.host)
    return result, probs, labels
  return model.trainer.evaluate(model.state, data.eval, model.host)


def _predict(model: TrainedModel, batch) -> np.ndarray:
  """A batch's probabilities; cached tables swap their rows in first."""
  if model.trainer.cached:
    probs, model.state = model.trainer.predict_cached(model.state, batch,
                                                      model.host)
    return probs
  return model.trainer.predict(model.state, batch, model.host)


def evaluate(model: TrainedModel, paths: Sequence[str] | str | None = None
             ) -> dict[str, float]:
  """Computes the eval metrics of the checkpoint.

  Args:
    model: the restored model.
    paths: labeled Criteo files. None: the config's eval set.

  Returns:
    The metrics.

  Raises:
    ValueError: no files are given and the config has no eval set.
  """
  return eval_predictions(model, paths)[0]


def evaluate_and_report(model: TrainedModel, workdir: str,
                        paths: Sequence[str] | str | None = None,
                        print_fn=print, output: str | None = None
                        ) -> dict[str, float]:
  """Runs `--mode=eval`: prints the metrics as JSON and writes them to a file.

  A file that cannot be written gets a warning. The printed metrics stand.

  Args:
    model: the restored model.
    workdir: the run's directory.
    paths: labeled files to evaluate on. None: the config's eval set.
    print_fn: where the lines go.
    output: the metrics file. For the config's eval set, it defaults to
      `<workdir>/eval_step<N>.json`. For files, it defaults to
      `<workdir>/eval_step<N>_<first input's name>.json`. So an eval on other
      data never overwrites the run's own.

  Returns:
    The metrics.
  """
  result = {k: float(v) for k, v in evaluate(model, paths).items()}
  if jax.process_index() != 0:
    return result
  print_fn(json.dumps(result, sort_keys=True))
  if output is None:
    suffix = ''
    if paths:
      names = [paths] if isinstance(paths, str) else list(paths)
      stem = re.sub(r'(\.(tsv|txt|csv))?(\.gz)?$', '',
                    os.path.basename(os.fspath(names[0])))
      suffix = '_' + re.sub(r'[^A-Za-z0-9._-]+', '_', stem) + (
          f'_and_{len(names) - 1}_more' if len(names) > 1 else '')
    output = os.path.join(workdir, f'eval_step{model.step}{suffix}.json')
  try:
    ckpt_lib.write_json(output, result)
    print_fn(f'metrics written to {output}')
  except OSError as e:
    logging.warning('could not write %s (%s); the metrics are the line'
                    ' printed above.', output, e)
  return result


def export(model: TrainedModel, out_dir: str, *, batch_size: int | None = None,
           request_columns: Sequence[str] = (),
           quantize: str | None = None) -> str:
  """Exports the inference function, as `dlrm_jax.serving.export` describes.

  Args:
    model: the restored model.
    out_dir: the export directory.
    batch_size: the function's fixed batch size. None makes it symbolic.
    request_columns: the columns the tiled function takes once per request.
    quantize: how the tables are stored: None, 'fp16' or 'int8'. See
      `dlrm_jax.serving.tables`.

  Returns:
    `out_dir`.

  Raises:
    ValueError: `ServingModel` refuses the model or the arguments.
  """
  sm = serving.ServingModel(model.trainer, model.state,
                            id_tables=model.id_tables(),
                            admission=model.admission(),
                            request_columns=request_columns,
                            quantize=quantize,
                            multi_hot=inputs.make_batch_maker(
                                model.spec).multi_hot)
  return sm.export(out_dir, batch_size=batch_size)
