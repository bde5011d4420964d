"""Input pipeline: sources of raw rows, batching, host-side checks, prefetch.

A *source* yields raw chunks (see `dlrm_jax.data.features`) from a row offset:
`SyntheticSource` (the built-in generator) and `TsvSource` (Criteo text files,
streamed). `TrainBatches` cuts a source into global batches of fixed size,
epoch after epoch, optionally shuffling within fixed windows of rows. Batch k
is a pure function of (source, seed, k), so a run resumed at step k sees the
same batches as a run that never stopped. Each process keeps its own slice of
every global batch, or, in `lockstep` mode, reads a source of its own rows
only. `EvalBatches` walks this process's eval rows once, padding the last
batch. `TrainBatches.iterator()` is the training stream as a
`TextBatchIterator`, whose state, the position, the checkpoint keeps.

`TrainBatches` order: batch k of epoch e takes rows `[j*B, (j+1)*B)`, with
j = k mod batches per epoch, of the epoch's row order. With
`shuffle_window > 0` the order permutes rows within consecutive windows of
that many rows, seeded by (seed, epoch, window). In lockstep mode, several
processes each read a source of their own rows, with `process_count=1` in
`TrainBatches`. Every epoch is then exactly `batches_per_epoch` batches. Rows
past them are dropped. A source that ends sooner, because lines were skipped
as malformed, is read again from its start to fill the epoch. So all
processes take the same steps.

`EvalBatches` order: `source` holds this process's rows only, a contiguous
run of the eval set. Process p's run comes just after process p-1's. So the
runs concatenated in process order are the eval set in order. That is the
order in which `Trainer.evaluate` combines predictions, whatever the mesh.
`counts[p]` is at least the rows of process p, and every process knows it.
Every process yields the same number of batches, `num_batches`, from the
largest count. Batches past its own rows are all padding. With `cache`, the
model batches of the first pass are kept in memory, about 160 bytes a row,
and replayed. That is for an eval set cut from the end of the training
files, which would otherwise be reached by parsing the training rows again
at every evaluation.

`TextBatchIterator` state: grain's orbax handler saves it as it saves a grain
iterator, by `grain.checkpoint.CheckpointSave` and `CheckpointRestore`.
`get_state()` is JSON bytes `{"kind": KIND, "position": k}`, one file per
process. k is the schedule position after the last batch that
`__next__` handed out, as in `TrainBatches.iterate`. Batches prepared ahead
but not handed out are not counted. Restoring calls `set_state(bytes)` then
`start_prefetch()`, and the iterator goes on with the batches an
uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from dlrm_jax.data import features as features_lib
from dlrm_jax.data import criteo
from dlrm_jax.data import loader
from dlrm_jax.data.synthetic import SyntheticCriteo

_SYNTHETIC_CHUNK = 16384


class SyntheticSource:
  """Rows of one split of the synthetic generator.

  Args:
    generator: the generator.
    split: 'train' or 'eval'.

  Attributes:
    generator: the generator.
    split: the split.
    num_rows: the rows of the split.
    description: a line naming the source, for logs.
  """

  def __init__(self, generator: SyntheticCriteo, split: str):
    self.generator = generator
    self.split = split
    self.num_rows = generator.num_rows(split)
    self.description = f'synthetic {split} split ({self.num_rows:,} rows)'

  def iter_rows(self, offset: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Generates the split's rows in order, in chunks.

    Args:
      offset: the first row.

    Yields:
      Raw batches of consecutive rows.
    """
    pos = offset
    while pos < self.num_rows:
      n = min(_SYNTHETIC_CHUNK, self.num_rows - pos)
      yield self.read(np.arange(pos, pos + n))
      pos += n

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Generates rows by index. A contiguous range is fast.

    Args:
      indices: the row indices.

    Returns:
      A raw batch with 'label', 'int' and 'cat'.
    """
    idx = np.asarray(indices, np.int64)
    if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
      rows = self.generator.rows(self.split, int(idx[0]), len(idx))
    else:
      parts = [self.generator.rows(self.split, int(i), 1) for i in idx]
      rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    rows.pop('teacher_prob')
    return rows


class TsvSource:
  """Valid rows `start .. stop` of Criteo text files, streamed.

  Args:
    paths: the files, or `criteo.FileRange`s for a process's byte ranges.
    start: the first valid row.
    stop: the row after the last. None counts them, in one pass over the
      files.
    labeled: whether the files have a label field.
    bad_lines: 'error' or 'skip', as `criteo.read_criteo` takes it.
    chunk_rows: the rows per chunk yielded.
    report: where skipped lines are recorded. None makes a new one.
    counter: a `criteo.LineCounter` of the lines handed to the parser.

  Attributes:
    paths: the files or byte ranges.
    counter: the line counter, or None.
    start: the first valid row.
    stop: the row after the last.
    num_rows: the rows served.
    labeled: whether the files have a label field.
    bad_lines: 'error' or 'skip'.
    chunk_rows: the rows per chunk yielded.
    report: where skipped lines are recorded.
    description: a line naming the files and rows, for logs.
  """

  def __init__(self, paths: Sequence[str | criteo.FileRange], *,
               start: int = 0, stop: int | None = None, labeled: bool = True,
               bad_lines: str = 'error',
               chunk_rows: int = criteo.CHUNK_ROWS,
               report: criteo.BadLineReport | None = None,
               counter: criteo.LineCounter | None = None):
    self.paths = list(paths)
    self.counter = counter
    self.start = start
    if stop is None:  # Valid rows: lines, unless malformed ones are skipped.
      stop = (criteo.count_rows(self.paths) if bad_lines == 'error' else
              criteo.count_valid_rows(self.paths, labeled=labeled))
    self.stop = stop
    self.num_rows = max(0, stop - start)
    self.labeled = labeled
    self.bad_lines = bad_lines
    self.chunk_rows = chunk_rows
    self.report = report if report is not None else criteo.BadLineReport()
    self._reported_through = 0  # rows whose malformed lines are reported
    names = ', '.join(getattr(p, 'name', p) for p in self.paths[:3]) + (
        ' ...' if len(self.paths) > 3 else '')
    self.description = f'{names} (rows {start:,}..{stop:,})'

  def iter_rows(self, offset: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Reads the rows in order, from an offset.

    Each malformed line is reported once, not again every epoch.

    Args:
      offset: the first row, counted from `start`.

    Yields:
      Raw chunks of consecutive rows.

    Raises:
      criteo.MalformedLineError: on a malformed line when `bad_lines` is
        'error'.
    """
    if offset >= self.num_rows:
      return
    # Each malformed line is reported once, not again every epoch.
    fresh = offset >= self._reported_through
    report = self.report if fresh else criteo.BadLineReport()
    pos = offset
    for chunk in criteo.read_criteo(
        self.paths, labeled=self.labeled, bad_lines=self.bad_lines,
        report=report, chunk_rows=self.chunk_rows,
        skip_rows=self.start + offset, max_rows=self.num_rows - offset,
        counter=self.counter):
      pos += len(chunk['int'])
      if fresh:
        self._reported_through = max(self._reported_through, pos)
      yield chunk


def _take(chunk: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
  return {k: v[idx] for k, v in chunk.items()}


def pad_rows(rows: dict[str, np.ndarray], size: int
             ) -> dict[str, np.ndarray]:
  """Pads a short last batch to `size` rows with copies of its first row.

  The caller's row count masks the padding out.

  Args:
    rows: the batch's columns.
    size: the rows wanted.

  Returns:
    The columns with `size` rows, or `rows` itself when not short.
  """
  n = len(next(iter(rows.values())))
  if n >= size:
    return rows
  pad = np.zeros(size - n, np.int64)
  return {k: np.concatenate([v, v[pad]]) for k, v in rows.items()}


@dataclasses.dataclass
class ModelBatchMaker:
  """Maps raw rows to a model batch.

  It applies the transform and the multi-hot bags, then checks the ids on
  the host. Call it on a raw batch.

  Attributes:
    transform: the feature transform.
    table_rows: the table rows of each sparse feature. None skips the id
      check.
    multi_hot: the multi-hot bags, or None.
  """

  transform: features_lib.FeatureTransform
  table_rows: Sequence[int] | None  # None: no id check
  multi_hot: loader.MultiHot | None = None

  def __call__(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch = self.transform.apply(raw)
    if self.multi_hot is not None:
      batch['ids'] = self.multi_hot.expand(batch['ids'])
    if self.table_rows is not None:
      self.transform.check_ids(batch['ids'], self.table_rows)
    return batch


class TrainBatches:
  """Global training batches, this process's slice of each, from step k on.

  The order and lockstep mode are in the module docstring.

  Args:
    source: the rows, with `num_rows`, `description` and `iter_rows`.
    make_batch: maps raw rows to a model batch.
    batch_size: B, the global batch size.
    seed: the seed of the shuffle.
    shuffle_window: the rows of each shuffle window. 0 turns shuffling off.
      It is rounded up to a multiple of the batch size.
    process_index: this process.
    process_count: the processes that share each batch.
    batches_per_epoch: the batches of an epoch in lockstep mode. None counts
      full batches of the source.
    prefetch: the batches that `iterator()` prepares ahead.

  Attributes:
    source: the rows.
    make_batch: maps raw rows to a model batch.
    batch_size: B.
    seed: the seed of the shuffle.
    prefetch: the batches that `iterator()` prepares ahead.
    window: the rows of each shuffle window, 0 when off.
    process_index: this process.
    process_count: the processes that share each batch.
    lockstep: whether `batches_per_epoch` was given.
    batches_per_epoch: the batches of an epoch.

  Raises:
    ValueError: if the batch does not divide over the processes, or if an
      epoch would hold no batch.
  """

  def __init__(self, source, make_batch: ModelBatchMaker, batch_size: int, *,
               seed: int = 0, shuffle_window: int = 0,
               process_index: int = 0, process_count: int = 1,
               batches_per_epoch: int | None = None, prefetch: int = 0):
    if batch_size % process_count:
      raise ValueError(
          f'config.batch_size ({batch_size}) must divide evenly over'
          f' {process_count} processes.')
    self.source = source
    self.make_batch = make_batch
    self.batch_size = batch_size
    self.seed = seed
    self.prefetch = prefetch
    self.window = int(shuffle_window)
    if self.window and self.window % batch_size:
      self.window = -(-self.window // batch_size) * batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.lockstep = batches_per_epoch is not None
    self.batches_per_epoch = (source.num_rows // batch_size
                              if batches_per_epoch is None else
                              int(batches_per_epoch))
    if self.batches_per_epoch == 0:
      raise ValueError(
          f'the training data ({source.description}) has fewer rows than one'
          f' batch (config.batch_size={batch_size}'
          + (' over the processes' if self.lockstep else '') + ').')

  def _epoch_rows(self, epoch: int, offset: int):
    """Raw rows of an epoch in training order, from row `offset`."""
    if not self.window:
      yield from self.source.iter_rows(offset)
      return
    w0 = offset // self.window * self.window
    skip = offset - w0
    for i, window in enumerate(criteo.rechunk(self.source.iter_rows(w0),
                                              self.window)):
      n = len(window['label'])
      rng = np.random.default_rng([self.seed, epoch, w0 // self.window + i])
      window = _take(window, rng.permutation(n))
      if skip:
        window = _take(window, slice(skip, None))
        skip = 0
      yield window

  def _refill(self, epoch: int):
    """The epoch's rows again and again (lockstep mode)."""
    while True:
      empty = True
      for window in self._epoch_rows(epoch, 0):
        empty = False
        yield window
      if empty:
        return

  def iterate(self, position: int = 0
              ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yields model batches without end, from a schedule position on.

    A position is an index into the batch schedule. It equals the train step
    unless an epoch ended early, when rows were skipped as malformed. Saving
    the position of the last batch used and resuming from it repeats the
    stream exactly.

    Args:
      position: the schedule position to start at.

    Yields:
      `(position, batch)` pairs. `position` is the position after the batch.

    Raises:
      ValueError: if a whole epoch gives not one batch of valid rows.
    """
    per = self.batch_size // self.process_count
    lo, hi = self.process_index * per, (self.process_index + 1) * per
    step = position
    while True:
      epoch, j = divmod(step, self.batches_per_epoch)
      rows = self._epoch_rows(epoch, j * self.batch_size)
      if self.lockstep:  # Refilled from the start if the data ends early.
        rows = itertools.chain(rows, self._refill(epoch))
      start = step
      for raw in criteo.rechunk(rows, self.batch_size):
        if len(raw['label']) < self.batch_size:
          break  # the epoch's remainder is dropped
        step += 1
        yield step, self.make_batch(_take(raw, slice(lo, hi)))
        if step % self.batches_per_epoch == 0:
          break
      if step == start and j == 0:  # Not one batch in a whole epoch.
        report = getattr(self.source, 'report', None)
        raise ValueError(
            f'the training data ({self.source.description}) gave not one'
            f' batch of {self.batch_size} valid rows in epoch {epoch}'
            + (f' ({report.summary()})' if report is not None else '') + '.')
      # Data that ends before the counted number of batches also ends the
      # epoch. That happens when rows are skipped as malformed.
      step = max(step, (epoch + 1) * self.batches_per_epoch)

  def iterator(self, prefetch: int | None = None) -> 'TextBatchIterator':
    """Makes a checkpointable iterator of the batches from position 0.

    Call its `set_state` to resume.

    Args:
      prefetch: the batches prepared ahead in a thread. None takes
        `self.prefetch`.

    Returns:
      The `TextBatchIterator`.
    """
    return TextBatchIterator(
        self, self.prefetch if prefetch is None else prefetch)


class EvalBatches:
  """One pass over this process's eval rows in order, the last batch padded.

  Iterating yields `(model batch, number of real rows in it)` pairs. The
  order across processes and the cache are in the module docstring.

  Args:
    source: this process's eval rows, with `num_rows`, `description` and
      `iter_rows`.
    make_batch: maps raw rows to a model batch.
    batch_size: the global eval batch size.
    process_count: the processes of the run.
    counts: at least the rows of each process. None takes `source.num_rows`.
    cache: keep the first pass's batches in memory and replay them.

  Attributes:
    source: this process's eval rows.
    make_batch: maps raw rows to a model batch.
    batch_size: the global eval batch size.
    process_count: the processes of the run.
    per_process: the rows of each process in a batch.
    num_batches: the batches every process yields.

  Raises:
    ValueError: if the batch does not divide over the processes, or if
      `counts` does not have one count per process.
  """

  def __init__(self, source, make_batch: ModelBatchMaker, batch_size: int, *,
               process_count: int = 1, counts: Sequence[int] | None = None,
               cache: bool = False):
    if batch_size % process_count:
      raise ValueError(
          f'config.eval_batch_size ({batch_size}) must divide evenly over'
          f' {process_count} processes.')
    counts = [source.num_rows] if counts is None else list(counts)
    if len(counts) != process_count:
      raise ValueError(f'{len(counts)} row counts for {process_count}'
                       ' processes.')
    self.source = source
    self.make_batch = make_batch
    self.batch_size = batch_size
    self.process_count = process_count
    self.per_process = batch_size // process_count
    self.num_batches = max(-(-c // self.per_process) for c in counts)
    self._cache = [] if cache else None
    self._cached = False

  def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    if self._cached:
      yield from self._cache
      return
    for item in self._read():
      if self._cache is not None:
        self._cache.append(item)
      yield item
    self._cached = self._cache is not None

  def _read(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    per = self.per_process
    done = 0
    last = None
    for raw in criteo.rechunk(self.source.iter_rows(0), per):
      if done == self.num_batches:
        raise ValueError(
            f'the eval data ({self.source.description}) has more rows than'
            f' counted ({self.num_batches} batches of {per}).')
      n = len(raw['label'])
      raw = pad_rows(raw, per)
      last = self.make_batch(raw)
      done += 1
      yield last, n
    if done < self.num_batches and last is None:
      raise ValueError(
          f'the eval data of this process ({self.source.description}) has no'
          f' row, but others have {self.num_batches} batches: fewer eval rows'
          ' than processes?')
    for _ in range(self.num_batches - done):  # Other processes' rows left.
      yield last, 0


class _Failed:
  """The producer's exception, queued for the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


_DONE = object()


def _produce(iterator: Iterator[Any], q: queue.Queue,
             stop: threading.Event) -> None:
  """The producer thread of `Prefetcher` (it holds no reference to it)."""

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  try:
    for item in iterator:
      if not put(item):
        return
    put(_DONE)
  except BaseException as e:  # pylint: disable=broad-except
    put(_Failed(e))
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:  # its files, in the thread that ran it
      close()


class Prefetcher:
  """Runs `iterator` in a background daemon thread, `size` items ahead.

  Exceptions in the producer are re-raised in the consumer. `close()` stops
  the thread and waits for it. Dropping the prefetcher stops it too.

  Args:
    iterator: the items.
    size: the items made ahead. With `size <= 0` there is no thread, and
      each item is made when asked for.

  Attributes:
    THREAD_NAME: the name of the producer thread.
  """

  THREAD_NAME = 'dlrm_jax prefetch'

  def __init__(self, iterator: Iterator[Any], size: int):
    self._iterator = iterator
    self._end: Any = None  # _DONE or a _Failed, once reached
    self._thread = None
    if size > 0:
      self._queue: queue.Queue = queue.Queue(maxsize=size)
      self._stop = threading.Event()
      self._thread = threading.Thread(
          target=_produce, args=(iterator, self._queue, self._stop),
          name=self.THREAD_NAME, daemon=True)
      self._thread.start()

  def __iter__(self) -> 'Prefetcher':
    return self

  def __next__(self) -> Any:
    if self._thread is None:
      return next(self._iterator)
    item = self._end if self._end is not None else self._queue.get()
    if item is _DONE or isinstance(item, _Failed):
      self._end = item
      if item is _DONE:
        raise StopIteration
      raise item.error
    return item

  def close(self, wait: bool = True) -> None:
    """Stops the producer.

    Args:
      wait: wait until its thread has ended.
    """
    if self._thread is None:
      close = getattr(self._iterator, 'close', None)
      if close is not None:
        close()
      return
    self._stop.set()
    if wait:
      self._thread.join()
    self._end = self._end or _Failed(ValueError('the prefetcher is closed.'))

  def __del__(self):
    if self._thread is not None:
      self._stop.set()


class TextBatchIterator:
  """`TrainBatches`' model batches as an iterator with checkpointable state.

  A checkpoint keeps its state as it keeps grain's `DatasetIterator`'s. The
  state is described in the module docstring. `prefetch` batches are
  prepared ahead in a background `Prefetcher` thread. The first `__next__`
  or `start_prefetch()` starts it.

  Args:
    batches: the training batches.
    prefetch: the batches prepared ahead.
    position: the schedule position to start at.

  Attributes:
    KIND: the 'kind' of the state.
    batches: the training batches.
    prefetch: the batches prepared ahead.
    position: the schedule position after the last batch handed out.
  """

  KIND = 'text_stream'

  def __init__(self, batches: 'TrainBatches', prefetch: int = 0,
               position: int = 0):
    self._ahead: Prefetcher | None = None
    self.batches = batches
    self.prefetch = int(prefetch)
    self.position = int(position)  # after the last batch handed out

  def __iter__(self) -> 'TextBatchIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    self.start_prefetch()
    self.position, batch = next(self._ahead)
    return batch

  def start_prefetch(self) -> None:
    """Starts preparing batches from `position` on, if not started."""
    if self._ahead is None:
      self._ahead = Prefetcher(self.batches.iterate(self.position),
                               self.prefetch)

  @classmethod
  def state_at(cls, position: int) -> bytes:
    """Gives the state of an iterator whose next batch follows `position`.

    Args:
      position: the schedule position.

    Returns:
      The JSON state bytes.
    """
    return json.dumps({'kind': cls.KIND, 'position': int(position)}).encode()

  def get_state(self) -> bytes:
    """The JSON state bytes of the current position."""
    return self.state_at(self.position)

  def set_state(self, state: bytes) -> None:
    """Goes to the position of a `get_state()`.

    Batches prepared ahead for the old position are dropped. The thread is
    stopped. The next `__next__` or `start_prefetch()` starts it again from
    the new position.

    Args:
      state: the JSON state bytes.

    Raises:
      ValueError: if `state` is not a text stream's state.
    """
    try:
      value = json.loads(state)
    except (TypeError, ValueError):
      value = None
    if not isinstance(value, dict):
      value = {}
    position = value.get('position')
    if (value.get('kind') != self.KIND or isinstance(position, bool) or
        not isinstance(position, int) or position < 0):
      raise ValueError(
          f'{state[:200]!r} is not the state of a text stream (JSON'
          f' {{"kind": "{self.KIND}", "position": k >= 0}}).')
    self.close()
    self.position = position

  def close(self) -> None:
    """Stops the prefetch thread and waits for it."""
    if self._ahead is not None:
      self._ahead.close()
      self._ahead = None

  def __del__(self):
    if self._ahead is not None:
      self._ahead.close(wait=False)
