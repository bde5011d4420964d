"""The input pipeline a config asks for: sources, batches, eval sets.

`config.data.source`:
  synthetic:  the built-in generator. Rows by index, no shuffle needed.
  criteo_tsv: Criteo text files, streamed in order, resumed by position.
  binary:     a directory written by `python -m dlrm_jax.data.preprocess`.
  tfds:       a prepared TFDS dataset, `criteo_kaggle` or `criteo_terabyte`.
  auto:       criteo_tsv when `data.train_path` is set, else synthetic.
Random-access sources (all but criteo_tsv) go through the grain pipeline of
`dlrm_jax.data.loader` with a global shuffle.

Several processes: every process reads only its own rows. Random-access
sources read this process's slice of each global batch; criteo_tsv splits
the files over the processes by bytes (`criteo.split_into_shares`:
line-aligned byte ranges of plain files, whole gzip files) and each process
streams and parses its share only, in batches of `batch_size //
process_count` rows.
At start-up each process counts the lines of its own share (a scan for line
ends, no parse; a gzip file of its share is decompressed for it) and one
collective gathers the counts: an epoch is `min(lines of a share) //
(batch_size // process_count)` steps on every process, so all take the same
steps (see `pipeline.TrainBatches`, lockstep mode). Without eval_path, the
eval set is the last `eval_fraction` of the files' bytes (line-aligned;
gzip files whole), not of their rows as with one process. The eval set of
every source is split into one contiguous run of rows per process, in
process order (`pipeline.EvalBatches`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import numpy as np
from absl import logging

from dlrm_jax.config import build as config_lib
from dlrm_jax.config import spec as spec_lib
from dlrm_jax.data import binary
from dlrm_jax.data import criteo
from dlrm_jax.data import loader
from dlrm_jax.data import pipeline
from dlrm_jax.data import synthetic
from dlrm_jax.data import table

_READ_CHUNK = criteo.CHUNK_ROWS


class RandomAccessRows:
  """Adds in-order reading, `iter_rows`, to a random-access source.

  The eval loop reads this way.

  Args:
    source: the random-access source.
    rows: an optional `(lo, hi)` range of its rows to serve.

  Attributes:
    source: the random-access source.
    lo: the first row served.
    hi: the end of the rows served.
    num_rows: the rows served.
    description: a line naming the rows, for logs.
  """

  def __init__(self, source, rows: tuple[int, int] | None = None):
    self.source = source
    self.lo, self.hi = rows if rows is not None else (0, source.num_rows)
    self.num_rows = self.hi - self.lo
    self.description = source.description + (
        f' rows {self.lo:,}..{self.hi:,}' if rows is not None else '')

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Reads rows by index.

    Args:
      indices: row indices within the served range.

    Returns:
      A raw batch of those rows.
    """
    return self.source.read(np.asarray(indices, np.int64) + self.lo)

  def iter_rows(self, offset: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Reads the served rows in order, in chunks.

    Args:
      offset: the first row to read, within the served range.

    Yields:
      Raw batches of consecutive rows.
    """
    for start in range(offset, self.num_rows, _READ_CHUNK):
      stop = min(start + _READ_CHUNK, self.num_rows)
      yield self.read(np.arange(start, stop, dtype=np.int64))


@dataclasses.dataclass
class DataSetup:
  """Train and eval data of a run.

  Attributes:
    train: a `pipeline.TrainBatches` for streamed text, or a
      `loader.GrainTrainData` for random access through grain.
    eval: the eval batches, or None.
    description: what the data is, for the log.
    teacher_auc: the generator's best achievable AUC, or None.
    bad_lines: the malformed training lines skipped.
    eval_bad_lines: the malformed eval lines skipped.
    train_lines: the training lines this process handed to the parser, its
      share only. Set for criteo_tsv over several processes.
    eval_lines: the same for its eval rows.
  """

  train: pipeline.TrainBatches | loader.GrainTrainData
  eval: pipeline.EvalBatches | None
  description: str
  teacher_auc: float | None
  bad_lines: criteo.BadLineReport
  eval_bad_lines: criteo.BadLineReport | None = None
  train_lines: criteo.LineCounter | None = None
  eval_lines: criteo.LineCounter | None = None


def make_batch_maker(spec) -> pipeline.ModelBatchMaker:
  """Builds the maker of a run's model batches from raw rows.

  Args:
    spec: a RunSpec, or a config to build one from.

  Returns:
    The `pipeline.ModelBatchMaker`.
  """
  spec = config_lib.run_spec(spec)
  multi_hot = None
  if spec.data.multi_hot:
    multi_hot = loader.MultiHot(
        hotness=tuple(f.max_ids for f in spec.feature_specs),
        num_rows=spec.table_rows,
        distribution=spec.data.multi_hot_distribution, seed=spec.loop.seed)
  return pipeline.ModelBatchMaker(
      spec.transform, spec.table_rows if spec.data.check_ids else None,
      multi_hot=multi_hot)


def check_sources(spec) -> None:
  """Checks that the files a run reads exist, before anything is built.

  Args:
    spec: a RunSpec, or a config to build one from.

  Raises:
    ValueError: naming the config field and the path that is missing.
  """
  d = config_lib.run_spec(spec).data
  if d.source in ('criteo_tsv', 'table'):
    criteo.expand_paths(d.train_path, field='config.data.train_path')
    if d.eval_path:
      criteo.expand_paths(d.eval_path, field='config.data.eval_path')
  elif d.source == 'tfds' and d.tfds_data_dir and not os.path.isdir(
      d.tfds_data_dir):
    raise ValueError(
        f'config.data.tfds_data_dir: the directory {d.tfds_data_dir} does'
        ' not exist.')


def make_data(spec, *, process_index: int = 0, process_count: int = 1,
              gather=None) -> DataSetup:
  """Builds the train and eval data of a run, as the module docstring says.

  Args:
    spec: a RunSpec, or a config to build one from.
    process_index: this process.
    process_count: the processes of the run.
    gather: `gather(values)` gives the int `values` of every process, as
      `[process_count, len(values)]`. The default is `gather_ints`, a
      collective. criteo_tsv over several processes calls it once.

  Returns:
    The `DataSetup`.

  Raises:
    ValueError: if a file is missing, a dataset is damaged or incomplete, or
      the batch does not divide over the processes.
  """
  spec = config_lib.run_spec(spec)
  d, kind = spec.data, spec.data.source
  if kind == 'binary':
    binary.check_features(d.binary_dir, spec.transform)
  make_batch = make_batch_maker(spec)
  pi, pc = process_index, process_count
  report = criteo.BadLineReport()
  if kind in ('criteo_tsv', 'table') and pc > 1:
    src = _tsv_shared_sources(spec, pi, pc, gather or gather_ints, report)
  elif kind == 'table':
    src = _table_sources(d, report)
  elif kind == 'synthetic':
    src = _synthetic_sources(d.synthetic)
  elif kind == 'criteo_tsv':
    src = _tsv_sources(d, report)
  else:
    src = _random_access_sources(d)
  train = _train_data(spec, src, make_batch, pi, pc)
  eval_src, eval_counts = src.eval, src.eval_counts
  if eval_src is not None and eval_counts is None and pc > 1:
    ranges = split_rows(eval_src.num_rows, pc)  # This process's run only.
    eval_counts = [hi - lo for lo, hi in ranges]
    eval_src = RandomAccessRows(eval_src, ranges[pi])
  evals = pipeline.EvalBatches(
      eval_src, make_batch, spec.loop.eval_batch_size, process_count=pc,
      counts=eval_counts, cache=src.cache_eval
  ) if eval_src is not None and max(eval_counts or [eval_src.num_rows]) else (
      None)
  lines = src.lines
  return DataSetup(train, evals, src.description, src.teacher_auc, report,
                   eval_bad_lines=src.eval_report,
                   train_lines=lines and lines[0],
                   eval_lines=lines and lines[1])


@dataclasses.dataclass
class _Sources:
  """What `make_data` builds for one source kind, before batching.

  Attributes:
    train: the train rows. It is this process's share when
      `batches_per_epoch` is set.
    eval: the eval rows or None.
    description: the log line about them.
    eval_report: the eval reader's bad-line report for text sources, or None.
    teacher_auc: the synthetic teacher's eval AUC, or None.
    cache_eval: whether the eval batches are cached after the first pass.
    iid: whether rows are i.i.d. draws already, which need no shuffle.
    batches_per_epoch: the steps an epoch, for criteo_tsv over several
      processes.
    eval_counts: the eval rows of every process with its own sources, or
      None.
    lines: the train and eval line counters for criteo_tsv over processes,
      or None.
  """

  train: Any
  eval: Any
  description: str
  eval_report: criteo.BadLineReport | None = None
  teacher_auc: float | None = None
  cache_eval: bool = False
  iid: bool = False
  batches_per_epoch: int | None = None
  eval_counts: list[int] | None = None
  lines: tuple[criteo.LineCounter, criteo.LineCounter] | None = None


def _train_data(spec, src: _Sources, make_batch, pi, pc):
  """The train batches over `src.train`.

  Text sources stream in order. The others go through grain.
  """
  d, batch, seed = spec.data, spec.loop.batch_size, spec.loop.seed
  if d.source in ('criteo_tsv', 'table') and pc > 1:
    return pipeline.TrainBatches(
        src.train, make_batch, batch // pc, seed=seed,
        shuffle_window=d.shuffle_buffer // pc,
        batches_per_epoch=src.batches_per_epoch, prefetch=d.prefetch)
  if d.source in ('criteo_tsv', 'table'):
    return pipeline.TrainBatches(
        src.train, make_batch, batch, seed=seed,
        shuffle_window=d.shuffle_buffer, process_index=pi, process_count=pc,
        prefetch=d.prefetch)
  return loader.GrainTrainData(
      src.train, make_batch, batch, num_batches=1 << 40, seed=seed,
      shuffle=d.shuffle and not src.iid, process_index=pi, process_count=pc,
      num_threads=d.num_threads, prefetch=max(1, d.prefetch))


def _tsv_shared_sources(spec, pi, pc, gather, report) -> _Sources:
  """criteo_tsv over `pc` processes. See `_tsv_shares`."""
  d = spec.data
  eval_report = criteo.BadLineReport()
  train_src, eval_src, bpe, eval_counts, lines = _tsv_shares(
      spec, pi, pc, gather, dict(bad_lines=d.bad_lines,
                                 chunk_rows=d.chunk_rows),
      report, eval_report)
  description = (
      f'{_KIND_NAME[d.source]} over {pc} processes, this one\'s share: train'
      f' {train_src.description} ({bpe} steps an epoch)' + (
          f'; eval {eval_src.description}' if eval_src else '; no eval set'))
  return _Sources(train_src, eval_src, description, eval_report,
                  cache_eval=not d.eval_path, batches_per_epoch=bpe,
                  eval_counts=eval_counts, lines=lines)


_KIND_NAME = {'criteo_tsv': 'Criteo files', 'table': 'Table files'}


def _table_sources(d: spec_lib.DataSpec, report) -> _Sources:
  """table in one process: eval from `eval_path` or the train tail."""
  train_paths = table.expand(d.train_path, 'config.data.train_path')
  kw = dict(bad_lines=d.bad_lines, chunk_rows=d.chunk_rows)
  side = table.load_side_tables(d.table, d.bad_lines)
  eval_report = criteo.BadLineReport()
  if d.eval_path:
    eval_paths = table.expand(d.eval_path, 'config.data.eval_path')
    train_src = table.TableSource(train_paths, d.table, report=report,
                                  side=side, **kw)
    eval_src = table.TableSource(
        eval_paths, d.table, report=eval_report, labeled=d.labeled_eval,
        side=side, field='config.data.eval_path', **kw)
    cache_eval = False
  else:
    whole = table.TableSource(train_paths, d.table, report=report,
                              side=side, **kw)
    n_eval = int(whole.num_rows * d.eval_fraction)
    train_src = table.TableSource(train_paths, d.table, report=report,
                                  side=side, stop=whole.num_rows - n_eval,
                                  **kw)
    eval_src = table.TableSource(
        train_paths, d.table, report=eval_report, side=side,
        start=whole.num_rows - n_eval, stop=whole.num_rows, **kw
    ) if n_eval else None
    cache_eval = True
  description = f'Table files: train {train_src.description}' + (
      f'; eval {eval_src.description}' if eval_src else '; no eval set')
  return _Sources(train_src, eval_src, description, eval_report,
                  cache_eval=cache_eval)


def _synthetic_sources(s: synthetic.SyntheticSpec) -> _Sources:
  gen = synthetic.SyntheticCriteo(s)
  train_src = pipeline.SyntheticSource(gen, 'train')
  eval_src = pipeline.SyntheticSource(gen, 'eval')
  teacher_auc = gen.teacher_auc()
  description = (
      f'SYNTHETIC click logs ({train_src.num_rows:,} train rows,'
      f' {eval_src.num_rows:,} eval rows, labels from a hidden teacher'
      f' whose eval AUC is {teacher_auc:.4f}). To train on Criteo, pass'
      ' --config.data.train_path=/path/to/train.txt (and optionally'
      ' --config.data.eval_path=...), or preprocess it first with'
      ' python -m dlrm_jax.data.preprocess.')
  return _Sources(train_src, eval_src, description, teacher_auc=teacher_auc,
                  iid=True)  # rows are i.i.d. draws already


def _tsv_sources(d: spec_lib.DataSpec, report) -> _Sources:
  """criteo_tsv in one process: eval from `eval_path` or the train tail."""
  train_paths = criteo.expand_paths(d.train_path,
                                    field='config.data.train_path')
  kw = dict(bad_lines=d.bad_lines, chunk_rows=d.chunk_rows, report=report)
  eval_report = criteo.BadLineReport()
  cache_eval = False
  if d.eval_path:
    eval_paths = criteo.expand_paths(d.eval_path,
                                     field='config.data.eval_path')
    train_src = pipeline.TsvSource(train_paths, **kw)
    eval_src = pipeline.TsvSource(
        eval_paths, labeled=True, **dict(kw, report=eval_report)
    ) if d.labeled_eval else None
  else:
    frac = d.eval_fraction
    # The split is of valid rows (what the reader counts), so lines
    # skipped as malformed do not move it past the end.
    total = (criteo.count_rows(train_paths) if kw['bad_lines'] == 'error'
             else criteo.count_valid_rows(train_paths))
    n_eval = int(total * frac)
    train_src = pipeline.TsvSource(train_paths, stop=total - n_eval, **kw)
    eval_src = pipeline.TsvSource(
        train_paths, start=total - n_eval, stop=total,
        **dict(kw, report=eval_report)) if n_eval else None
    cache_eval = True
  description = f'Criteo files: train {train_src.description}' + (
      f'; eval {eval_src.description}' if eval_src else '; no eval set')
  return _Sources(train_src, eval_src, description, eval_report,
                  cache_eval=cache_eval)


def _random_access_sources(d: spec_lib.DataSpec) -> _Sources:
  """binary or tfds: eval from its own split or the train tail."""
  kind = d.source
  if kind == 'binary':
    train_all = binary.BinarySource(d.binary_dir, 'train')
    eval_all = (binary.BinarySource(d.binary_dir, 'eval')
                if 'eval' in train_all.metadata.splits else None)
  else:
    from dlrm_jax.data import tfds_criteo  # pylint: disable=g-import-not-at-top
    name, data_dir = d.tfds_name, d.tfds_data_dir or None
    train_all = tfds_criteo.TfdsCriteoSource(name, d.tfds_train_split,
                                             data_dir)
    split = d.tfds_eval_split
    eval_all = tfds_criteo.TfdsCriteoSource(name, split, data_dir) if (
        split) else None
  if eval_all is not None:
    train_src, eval_src = RandomAccessRows(train_all), RandomAccessRows(
        eval_all)
  else:
    n = train_all.num_rows
    n_eval = int(n * d.eval_fraction)
    train_src = RandomAccessRows(train_all, (0, n - n_eval))
    eval_src = RandomAccessRows(train_all, (n - n_eval, n)) if n_eval else (
        None)
  description = f'{kind}: train {train_src.description}' + (
      f'; eval {eval_src.description}' if eval_src else '; no eval set')
  return _Sources(train_src, eval_src, description)


def split_rows(n: int, parts: int) -> list[tuple[int, int]]:
  """Cuts `[0, n)` into contiguous runs, in order.

  Args:
    n: the rows.
    parts: the number of runs.

  Returns:
    `(lo, hi)` of each run. Their sizes differ by at most 1.
  """
  return [(p * n // parts, (p + 1) * n // parts) for p in range(parts)]


def gather_ints(values) -> np.ndarray:
  """Gathers int values from every process, by one `process_allgather`.

  The values are sent as 31-bit halves, since int64 would need jax x64.

  Args:
    values: this process's ints.

  Returns:
    `[process_count, len(values)]` int64 values.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  v = np.asarray(values, np.int64)
  halves = np.stack([v >> 31, v & ((1 << 31) - 1)]).astype(np.int32)
  out = np.asarray(multihost_utils.process_allgather(halves))
  return (out[:, 0].astype(np.int64) << 31) | out[:, 1]


def _tsv_shares(spec, pi, pc, gather, kw, report, eval_report):
  """criteo_tsv over `pc` processes: this process's own sources.

  Returns the train source, the eval source or None, the steps an epoch,
  the eval rows of every process, and the train and eval line counters. See
  the module doc.
  """
  d, batch = spec.data, spec.loop.batch_size
  if batch % pc:
    raise ValueError(
        f'config.batch_size ({batch}) must divide evenly over {pc}'
        ' processes.')
  kind = _ShareKind(d)
  train_paths = criteo.expand_paths(d.train_path,
                                    field='config.data.train_path')
  if d.eval_path:
    train = kind.split(train_paths, pc)
    evals = kind.split(
        criteo.expand_paths(d.eval_path, field='config.data.eval_path'),
        pc) if d.labeled_eval else None
    eval_field = 'config.data.eval_path'
  else:
    frac = d.eval_fraction
    train = kind.split(train_paths, pc, span=(0.0, 1.0 - frac))
    evals = kind.split(
        train_paths, pc, span=(1.0 - frac, 1.0)) if frac else None
    eval_field = 'config.data.eval_fraction'
    if evals is not None and not any(evals):
      evals = None
  for shares, field in ((train, 'config.data.train_path'),
                        (evals, eval_field)):
    if shares is not None and (error := criteo.share_error(shares, field)):
      raise ValueError(error)
  counts = gather([kind.count(train[pi]),
                   kind.count(evals[pi]) if evals else 0])
  per = batch // pc
  bpe = int(counts[:, 0].min()) // per
  logging.info('%s over %d processes: train lines per process %s'
               ' (%d steps an epoch of %d rows each), eval lines %s',
               d.source, pc,
               counts[:, 0].tolist(), bpe, per, counts[:, 1].tolist())
  lines = criteo.LineCounter(), criteo.LineCounter()
  train_src = kind.source(train[pi], stop=int(counts[pi, 0]),
                          counter=lines[0], report=report, **kw)
  eval_src = kind.source(
      evals[pi], stop=int(counts[pi, 1]), counter=lines[1],
      report=eval_report, **kw) if evals else None
  return (train_src, eval_src, bpe,
          counts[:, 1].tolist() if evals else None, lines)



class _ShareKind:
  """How criteo_tsv and table sources cut, count and read shares."""

  def __init__(self, d: spec_lib.DataSpec):
    self.d = d
    self.side = (table.load_side_tables(d.table, d.bad_lines)
                 if d.source == 'table' else None)

  def split(self, paths, pc, span=(0.0, 1.0)):
    """Each process's share of the files."""
    if self.d.source == 'table':
      return table.shares(paths, self.d.table.format, pc, span=span)
    return criteo.split_into_shares(paths, pc, span=span)

  def count(self, share) -> int:
    """The lines (rows) of a share, without a parse."""
    if self.d.source == 'table':
      return table.TableSource(share, self.d.table, side=self.side,
                               stop=0).count(valid=False)
    return criteo.count_rows(share)

  def source(self, share, **kw):
    """The streamed source of a share."""
    if self.d.source == 'table':
      return table.TableSource(share, self.d.table, side=self.side, **kw)
    return pipeline.TsvSource(share, **kw)
