"""Criteo text files -> the binary format of `dlrm_jax.data.binary`.

  python -m dlrm_jax.data.preprocess --train='/data/criteo/day_{0..22}' \
      --eval=/data/criteo/day_23 --output_dir=/data/criteo_bin \
      --id_scheme=vocab --vocab_threshold=3

Files (plain or gzip) are cut into units: a gzip file is one unit, a plain
file is cut into byte ranges of about `--range_bytes` at line starts. Units
are parsed in parallel (`--workers` processes) with the streaming reader, so
memory stays at a few ranges per worker whatever the input size.

Id schemes, as the peers offer:
  modulo: a categorical value v maps to 1 + v % (num_buckets - 1), missing to
          0 (the same mapping the trainer applies to raw text), with
          `--num_buckets` one size or 26 sizes;
  vocab:  a first pass counts every value; values seen at least
          `--vocab_threshold` times get their own id (2, 3, ... by decreasing
          count), rarer ones share the out-of-vocabulary id 1, missing ones
          0 (NVIDIA's and MLPerf's recipes). The vocabularies are saved in
          `<output_dir>/vocab/cat_<i>.npz` (values in id order, counts).
Table sizes go to `<output_dir>/metadata.json`, which the trainer reads
(`config.data.source='binary'`, `config.data.binary_dir=<output_dir>`).

Table configs (`config.data.source='table'`, `dlrm_jax.data.table`):

  python -m dlrm_jax.data.preprocess --config=configs/avazu.py \
      --config.data.train_path=/data/avazu/train.csv --output_dir=/data/avazu_bin

streams `config.data.train_path` (and `eval_path`) through `TableSource`
once, in one process, and writes the model batches that
`FeatureTransform.apply` gives (label, normalized dense values, packed ids:
`binary.Metadata.layout == 'model'`), with a fingerprint of the features.
Training on it (`config.data.source='binary'`) takes them as they are and
refuses a config whose features differ. `--train`/`--eval` override the
config's paths; the id-scheme flags do not apply (the features map ids).

Each finished unit leaves a marker under `<output_dir>/_work/`; a restarted run
skips finished units (and finished counting passes), so an interrupted run
loses at most the units in flight. Malformed lines follow `--bad_lines`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import resource
import sys
import time
from typing import Sequence

import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dlrm_jax import cli
from dlrm_jax.data import features as features_lib
from dlrm_jax.data import binary
from dlrm_jax.data import criteo

ID_SCHEMES = ('modulo', 'vocab')
OOV_ID = 1  # Values not in the vocabulary (0 is features.MISSING_ID).


@dataclasses.dataclass(frozen=True)
class Unit:
  """A piece of an input file processed by one worker.

  Attributes:
    split: 'train' or 'eval'.
    path: the input file.
    index: the position of the unit in its split.
    start: the start of the byte range of a plain file. None means the whole
      file.
    end: the end of the byte range, or None.
    first_line: the 1-based line number of the range's first line.
    labeled: whether the file has a label field.
  """

  split: str
  path: str
  index: int
  start: int | None
  end: int | None
  first_line: int
  labeled: bool

  @property
  def key(self) -> str:
    """A name unique to the unit, for its files under `_work/`."""
    h = hashlib.sha1(f'{self.path}:{self.start}:{self.end}'.encode())
    return f'{self.split}-{self.index:05d}-{h.hexdigest()[:10]}'

  @property
  def bytes(self) -> int:
    """The input bytes of the unit."""
    if self.start is None:
      return os.path.getsize(self.path)
    return self.end - self.start


@dataclasses.dataclass(frozen=True)
class Options:
  """The settings every worker needs.

  Attributes:
    output_dir: where to write.
    id_scheme: one of ID_SCHEMES.
    num_buckets: the table size of each of the 26 columns, for 'modulo'.
    vocab_threshold: the count a value needs for its own id, for 'vocab'.
    vocab_max_rows: the cap on a vocabulary table's rows. 0 means none.
    bad_lines: 'error' or 'skip'.
  """

  output_dir: str
  id_scheme: str
  num_buckets: tuple[int, ...]
  vocab_threshold: int
  vocab_max_rows: int
  bad_lines: str


def _range_starts(path: str, range_bytes: int) -> list[int]:
  """Byte offsets of line starts about `range_bytes` apart, 0 first.

  A range that starts at byte s ends at the line start after byte
  s + range_bytes, by `criteo.line_start`. Lines end in `\n`, `\r\n` or a
  bare `\r`.
  """
  size = os.path.getsize(path)
  starts = [0]
  pos = range_bytes
  while pos < size:
    start = criteo.line_start(path, pos + 1, size)
    if start >= size:
      break
    starts.append(start)
    pos = start + range_bytes
  return starts


def cut_into_units(split: str, paths: Sequence[str], range_bytes: int,
                   labeled: bool, pool) -> list[Unit]:
  """Cuts a split's files into the units the workers process.

  A gzip file is one unit. A plain file is cut at line starts into byte
  ranges of about `range_bytes`. Their lines are counted, so that errors
  name the lines of the file.

  Args:
    split: the split of the files, 'train' or 'eval'.
    paths: the files, plain or gzip.
    range_bytes: the size at which a plain file is cut.
    labeled: whether the files have a label field.
    pool: an executor. Its `map` counts the ranges' lines.

  Returns:
    The units, in file then byte order.
  """
  pieces = []
  for path in paths:
    if criteo.is_gzip(path):
      pieces.append((path, None, None))
      continue
    starts = _range_starts(path, range_bytes)
    ends = starts[1:] + [os.path.getsize(path)]
    pieces += [(path, s, e) for s, e in zip(starts, ends)]
  # Lines as the reader numbers them (`criteo.count_rows`).
  counts = list(pool.map(
      criteo.count_rows,
      [criteo.FileRange(p, s, e) for p, s, e in pieces if s is not None]))
  units, first, it = [], {}, iter(counts)
  for i, (path, s, e) in enumerate(pieces):
    line = 1
    if s is not None:
      line = first.get(path, 1)
      first[path] = line + next(it)
    units.append(Unit(split, path, i, s, e, line, labeled))
  return units


def _rows(unit: Unit, bad_lines: str) -> tuple[list[dict], criteo.BadLineReport]:
  report = criteo.BadLineReport()
  if unit.start is None:
    chunks = list(criteo.read_criteo([unit.path], labeled=unit.labeled,
                                     bad_lines=bad_lines, report=report,
                                     chunk_rows=1 << 20))
  else:
    chunks = list(criteo.read_criteo_range(
        unit.path, unit.start, unit.end, unit.first_line,
        labeled=unit.labeled, bad_lines=bad_lines, report=report))
  return chunks, report


def _work_dir(opts: Options, *parts: str) -> str:
  d = os.path.join(opts.output_dir, '_work', *parts)
  os.makedirs(d, exist_ok=True)
  return d


def count_unit(unit: Unit, opts: Options) -> dict:
  """Vocab pass 1: counts each categorical value in a unit.

  The counts go to `_work/counts/<key>.npz`. A unit counted before is
  skipped.

  Args:
    unit: the unit.
    opts: the settings.

  Returns:
    A progress record with 'unit', 'skipped', 'bytes' and 'rows'.

  Raises:
    criteo.MalformedLineError: on a malformed line when `opts.bad_lines` is
      'error'.
  """
  out = os.path.join(_work_dir(opts, 'counts'), unit.key + '.npz')
  if os.path.exists(out):
    return {'unit': unit.key, 'skipped': True, 'bytes': unit.bytes, 'rows': 0}
  chunks, _ = _rows(unit, opts.bad_lines)
  cats = (np.concatenate([c['cat'] for c in chunks]) if chunks
          else np.zeros((0, criteo.NUM_CAT), np.int64))
  arrays = {}
  for j in range(criteo.NUM_CAT):
    col = cats[:, j]
    values, counts = np.unique(col[col >= 0], return_counts=True)
    arrays[f'values_{j}'] = values.astype(np.uint32)
    arrays[f'counts_{j}'] = counts.astype(np.int64)
  tmp = out + f'.tmp-{os.getpid()}.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, out)
  return {'unit': unit.key, 'skipped': False, 'bytes': unit.bytes,
          'rows': len(cats)}


def build_vocabularies(units: Sequence[Unit], opts: Options
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Merges the unit counts into one vocabulary per categorical column.

  Each vocabulary is also saved to `vocab/cat_<i>.npz`.

  Args:
    units: the training units, counted by `count_unit`.
    opts: the settings.

  Returns:
    Per column, the values sorted ascending and their ids, for lookups.
  """
  vocab_dir = os.path.join(opts.output_dir, 'vocab')
  os.makedirs(vocab_dir, exist_ok=True)
  lookups = []
  for j in range(criteo.NUM_CAT):
    values = np.zeros(0, np.uint32)
    counts = np.zeros(0, np.int64)
    for u in units:
      with np.load(os.path.join(opts.output_dir, '_work', 'counts',
                                u.key + '.npz')) as z:
        values = np.concatenate([values, z[f'values_{j}']])
        counts = np.concatenate([counts, z[f'counts_{j}']])
      if len(values) > (1 << 22):  # merge as we go: memory ~ distinct values
        values, counts = _merge(values, counts)
    values, counts = _merge(values, counts)
    keep = counts >= opts.vocab_threshold
    values, counts = values[keep], counts[keep]
    order = np.lexsort((values, -counts))  # by count desc, then value
    if opts.vocab_max_rows:
      order = order[:max(0, opts.vocab_max_rows - 2)]
    values, counts = values[order], counts[order]
    tmp = os.path.join(vocab_dir, f'cat_{j}.tmp.npz')
    np.savez(tmp, values=values, counts=counts)
    os.replace(tmp, os.path.join(vocab_dir, f'cat_{j}.npz'))
    ids = np.arange(2, 2 + len(values), dtype=np.int32)
    by_value = np.argsort(values, kind='stable')
    lookups.append((values[by_value], ids[by_value]))
  return lookups


def _merge(values: np.ndarray, counts: np.ndarray):
  order = np.argsort(values, kind='stable')
  values, counts = values[order], counts[order]
  if not len(values):
    return values, counts
  starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
  return values[starts], np.add.reduceat(counts, starts)


def map_vocab(cats: np.ndarray, lookups) -> np.ndarray:
  """Maps raw categorical values to ids with the vocabularies.

  Args:
    cats: `[n, 26]` raw values, -1 for missing.
    lookups: per column, the sorted values and their ids.

  Returns:
    `[n, 26]` int32 ids. Missing values get 0, values not in the vocabulary
    OOV_ID.
  """
  ids = np.empty(cats.shape, np.int32)
  for j, (values, col_ids) in enumerate(lookups):
    col = cats[:, j]
    ids[:, j] = features_lib.lookup_sorted(
        col.astype(np.uint32), values, col_ids, OOV_ID, col < 0)
  return ids


def map_modulo(cats: np.ndarray, num_buckets: Sequence[int]) -> np.ndarray:
  """Maps raw categorical values to ids by modulo, as the trainer does.

  Args:
    cats: `[n, 26]` raw values, -1 for missing.
    num_buckets: the table size of each column.

  Returns:
    `[n, 26]` int32 ids.
  """
  ids = np.empty(cats.shape, np.int32)
  for j, nb in enumerate(num_buckets):
    f = features_lib.IdFeature(f'cat_{j}', f'cat_{j}', 1, num_buckets=nb)
    ids[:, j] = features_lib.map_ids(cats[:, j], f)
  return ids


_VOCAB_LOOKUPS = None


def write_unit(unit: Unit, opts: Options) -> dict:
  """Pass 2: parses a unit, maps its ids, writes its part file and marker.

  A unit with a marker and a part file is skipped.

  Args:
    unit: the unit.
    opts: the settings.

  Returns:
    The unit's marker record, with 'skipped' and 'bytes' added.

  Raises:
    criteo.MalformedLineError: on a malformed line when `opts.bad_lines` is
      'error'.
  """
  marker = os.path.join(_work_dir(opts, 'done'), unit.key + '.json')
  part = os.path.join(unit.split, f'part-{unit.index:05d}.bin')
  if os.path.exists(marker):
    with open(marker) as f:
      done = json.load(f)
    if os.path.exists(os.path.join(opts.output_dir, part)):
      return dict(done, skipped=True, bytes=unit.bytes)
  chunks, report = _rows(unit, opts.bad_lines)
  n = sum(len(c['int']) for c in chunks)
  records = np.empty((n, binary.NUM_FIELDS), np.int32)
  pos = 0
  for c in chunks:
    k = len(c['int'])
    rec = records[pos:pos + k]
    rec[:, 0] = c['label'] if 'label' in c else -1
    rec[:, 1:14] = np.clip(c['int'], -2**31, 2**31 - 1)
    if opts.id_scheme == 'modulo':
      rec[:, 14:] = map_modulo(c['cat'], opts.num_buckets)
    else:
      rec[:, 14:] = map_vocab(c['cat'], _vocab_lookups(opts))
    pos += k
  os.makedirs(os.path.join(opts.output_dir, unit.split), exist_ok=True)
  binary.write_part(os.path.join(opts.output_dir, part), records)
  done = {'unit': unit.key, 'file': part, 'rows': n, 'source': unit.path,
          'byte_range': [unit.start, unit.end],
          'bad_lines': report.count, 'bad_examples': report.examples}
  tmp = marker + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(done, f)
  os.replace(tmp, marker)
  return dict(done, skipped=False, bytes=unit.bytes)


def _vocab_lookups(opts: Options):
  """The vocabularies, loaded once per worker process."""
  global _VOCAB_LOOKUPS
  if _VOCAB_LOOKUPS is None or _VOCAB_LOOKUPS[0] != opts.output_dir:
    _VOCAB_LOOKUPS = (opts.output_dir, load_vocab_lookups(opts.output_dir))
  return _VOCAB_LOOKUPS[1]


def vocab_id_tables(lookups, transform: features_lib.FeatureTransform
                    ) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
  """Gives the vocabularies as the export's id tables.

  These are `serving.ServingModel`'s `id_tables`. The mapping is that of
  `map_vocab`.

  Args:
    lookups: per column, the sorted values and their ids.
    transform: the feature transform.

  Returns:
    Per feature that reads a cat column, a triple of the sorted values,
    their ids and OOV_ID.
  """
  return {f.name: lookups[int(f.input[4:])] + (OOV_ID,)
          for f in transform.sparse if f.input.startswith('cat_')}


def load_vocab_lookups(output_dir: str
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Loads the vocabularies written to `output_dir`.

  Args:
    output_dir: the preprocessed dataset.

  Returns:
    Per column, the sorted values and their ids, as `map_vocab` takes them.
  """
  lookups = []
  for j in range(criteo.NUM_CAT):
    with np.load(os.path.join(output_dir, 'vocab', f'cat_{j}.npz')) as z:
      values = z['values']
    ids = np.arange(2, 2 + len(values), dtype=np.int32)
    order = np.argsort(values, kind='stable')
    lookups.append((values[order], ids[order]))
  return lookups


class _Progress:
  """A tqdm progress bar over input bytes, with rows/s and ETA."""

  def __init__(self, total_bytes: int, desc: str):
    import tqdm  # pylint: disable=g-import-not-at-top
    self.bar = tqdm.tqdm(total=total_bytes, desc=desc, unit='B',
                         unit_scale=True, unit_divisor=1024,
                         file=sys.stderr, dynamic_ncols=True)
    self.rows = 0
    self.t0 = time.time()

  def update(self, result: dict) -> None:
    self.rows += int(result.get('rows', 0))
    rate = self.rows / max(time.time() - self.t0, 1e-9)
    self.bar.set_postfix_str(f'{self.rows:,} rows, {rate:,.0f} rows/s')
    self.bar.update(result['bytes'])

  def close(self):
    self.bar.close()


def run(train: Sequence[str], output_dir: str, *,
        eval_paths: Sequence[str] = (), id_scheme: str = 'modulo',
        num_buckets: Sequence[int] | int = 40_000_000,
        vocab_threshold: int = 1, vocab_max_rows: int = 0,
        bad_lines: str = 'error', labeled_eval: bool = True,
        workers: int | None = None, range_bytes: int = 128 << 20,
        progress: bool = True) -> binary.Metadata:
  """Preprocesses the files.

  Args:
    train: the training files or globs.
    output_dir: where to write.
    eval_paths: the eval files or globs.
    id_scheme: one of ID_SCHEMES.
    num_buckets: the table size for 'modulo', one for all or 26.
    vocab_threshold: the count a value needs for its own id, for 'vocab'.
    vocab_max_rows: the cap on a vocabulary table's rows. 0 means none.
    bad_lines: 'error' or 'skip'.
    labeled_eval: whether the eval files have labels.
    workers: the worker processes. None takes the CPU count.
    range_bytes: the size at which plain files are cut.
    progress: show progress bars.

  Returns:
    The metadata it wrote.

  Raises:
    ValueError: if a setting is invalid, a file is missing, or a line is
      malformed when `bad_lines` is 'error'.
  """
  if id_scheme not in ID_SCHEMES:
    raise ValueError(f'--id_scheme ({id_scheme!r}) must be one of'
                     f' {list(ID_SCHEMES)}.')
  if bad_lines not in criteo.BAD_LINE_POLICIES:
    raise ValueError(f"--bad_lines ({bad_lines!r}) must be 'error' or 'skip'.")
  if isinstance(num_buckets, int):
    num_buckets = [num_buckets] * criteo.NUM_CAT
  num_buckets = [int(n) for n in num_buckets]
  if len(num_buckets) != criteo.NUM_CAT or min(num_buckets) < 2:
    raise ValueError(
        f'--num_buckets needs one size >= 2 or {criteo.NUM_CAT} of them, got'
        f' {num_buckets}.')
  if vocab_threshold < 1:
    raise ValueError(f'--vocab_threshold ({vocab_threshold}) must be >= 1.')
  train = criteo.expand_paths(train, field='--train')
  eval_paths = criteo.expand_paths(eval_paths, field='--eval') if (
      eval_paths) else []
  os.makedirs(output_dir, exist_ok=True)
  opts = Options(output_dir, id_scheme, tuple(num_buckets), vocab_threshold,
                 vocab_max_rows, bad_lines)
  workers = workers or os.cpu_count() or 1
  # Forking a process that runs JAX's threads can deadlock: spawn then.
  context = multiprocessing.get_context(
      'spawn' if 'jax' in sys.modules else None)
  with concurrent.futures.ProcessPoolExecutor(workers,
                                              mp_context=context) as pool:
    units = cut_into_units('train', train, range_bytes, True, pool)
    if eval_paths:
      units += cut_into_units('eval', eval_paths, range_bytes, labeled_eval,
                              pool)
    total = sum(u.bytes for u in units)
    logging.info('%d input file(s), %.2f GB, in %d unit(s), %d worker(s)',
                 len(train) + len(eval_paths), total / 1e9, len(units),
                 workers)
    if id_scheme == 'vocab':
      bar = _Progress(total, 'counting') if progress else None
      for result in pool.map(count_unit, units, [opts] * len(units)):
        if bar:
          bar.update(result)
      if bar:
        bar.close()
      train_units = [u for u in units if u.split == 'train']
      lookups = build_vocabularies(train_units, opts)
      num_buckets = [2 + len(v) for v, _ in lookups]
    bar = _Progress(total, 'writing') if progress else None
    results = []
    for result in pool.map(write_unit, units, [opts] * len(units)):
      results.append(result)
      if bar:
        bar.update(result)
    if bar:
      bar.close()
  splits: dict[str, list[dict]] = {}
  bad = {'count': 0, 'examples': []}
  for u, r in zip(units, results):
    splits.setdefault(u.split, []).append(
        {'file': r['file'], 'rows': r['rows'], 'source': r['source'],
         'byte_range': r['byte_range']})
    bad['count'] += r['bad_lines']
    bad['examples'] += r['bad_examples'][:max(0, 10 - len(bad['examples']))]
  meta = binary.Metadata(
      id_scheme=id_scheme, num_buckets=num_buckets, splits=splits,
      threshold=vocab_threshold if id_scheme == 'vocab' else None,
      bad_lines=bad,
      sources={'train': train, 'eval': eval_paths})
  meta.save(output_dir)
  if bad['count']:
    logging.warning('%d malformed line(s) skipped; first: %s', bad['count'],
                    '; '.join(bad['examples']))
  return meta


def run_table(config, output_dir: str, *, train: Sequence[str] = (),
              eval_paths: Sequence[str] = (), bad_lines: str | None = None,
              part_rows: int = 1 << 20,
              progress: bool = True) -> binary.Metadata:
  """Preprocesses a table config's files into model batches.

  Rows are streamed through `table.TableSource` and mapped by the config's
  `FeatureTransform.apply` once; the binary parts hold the model layout
  (`binary.model_records`), `part_rows` rows each.

  Args:
    config: a config with `data.source='table'`.
    output_dir: where to write.
    train: the training files or globs; empty takes
      `config.data.train_path`.
    eval_paths: the eval files or globs; empty takes
      `config.data.eval_path` (none: the trainer takes the train tail).
    bad_lines: 'error' or 'skip'; None takes `config.data.bad_lines`.
    part_rows: the rows of each part file.
    progress: log progress.

  Returns:
    The metadata it wrote.

  Raises:
    ValueError: if the config is not a table config, has managed-collision
      features (their ids are assigned while training), a file is missing,
      or a row is bad under bad_lines='error'.
  """
  from dlrm_jax.config import build as config_lib  # pylint: disable=g-import-not-at-top
  from dlrm_jax.data import table as table_lib  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references() if hasattr(
      config, 'copy_and_resolve_references') else config
  if config.data.source != 'table':
    raise ValueError(
        f"config.data.source ({config.data.source!r}) must be 'table' for"
        ' --config; Criteo text takes --train without --config.')
  if part_rows < 1:
    raise ValueError(f'part_rows ({part_rows}) must be >= 1.')
  with config.unlocked() if hasattr(config, 'unlocked') else _null():
    if train:
      config.data.train_path = ','.join(train)
    if eval_paths:
      config.data.eval_path = ','.join(eval_paths)
    if bad_lines:
      config.data.bad_lines = bad_lines
    config.data.multi_hot.enabled = False  # bags are expanded when training
  spec = config_lib.run_spec(config)
  d, transform = spec.data, spec.transform
  mc = [f.name for f in transform.sparse
        if getattr(f, 'managed_collision', None)]
  if mc:
    raise ValueError(
        f'config.features.{mc[0]}.managed_collision: managed-collision ids'
        ' are assigned while training, so they cannot be preprocessed; use'
        " config.data.source='table'.")
  os.makedirs(output_dir, exist_ok=True)
  side = table_lib.load_side_tables(d.table, d.bad_lines)
  todo = [('train', table_lib.expand(d.train_path, 'config.data.train_path'),
           'config.data.train_path', True)]
  if d.eval_path:
    todo.append(('eval', table_lib.expand(d.eval_path, 'config.data.eval_path'),
                 'config.data.eval_path', d.labeled_eval))
  num_dense, num_ids = transform.num_dense, transform.num_id_columns
  fields = 1 + num_dense + num_ids
  splits: dict[str, list[dict]] = {}
  unlabeled = []
  bad = {'count': 0, 'examples': []}
  t0 = time.time()
  for split, paths, field, labeled in todo:
    report = criteo.BadLineReport()
    src = table_lib.TableSource(paths, d.table, labeled=labeled,
                                bad_lines=d.bad_lines, report=report,
                                field=field, side=side, stop=1 << 62)
    if not src.labeled:
      unlabeled.append(split)
    os.makedirs(os.path.join(output_dir, split), exist_ok=True)
    pending, count, parts = [], 0, []
    rows = 0

    def flush(pending=pending, parts=parts, split=split):
      if not pending:
        return
      records = np.concatenate(pending)
      pending.clear()
      name = os.path.join(split, f'part-{len(parts):05d}.bin')
      binary.write_part(os.path.join(output_dir, name), records,
                        fields=fields)
      parts.append({'file': name, 'rows': len(records), 'source': paths,
                    'byte_range': [None, None]})

    for raw in src.iter_rows():
      batch = transform.apply(raw)
      transform.check_ids(batch['ids'], spec.table_rows)
      rec = binary.model_records(batch, num_dense, num_ids)
      while len(rec):
        take = rec[:part_rows - count]
        pending.append(take)
        count += len(take)
        rows += len(take)
        rec = rec[len(take):]
        if count == part_rows:
          flush()
          count = 0
      if progress:
        logging.log_every_n_seconds(
            logging.INFO, '%s: %s rows, %.0f rows/s', 30, split,
            f'{rows:,}', rows / max(time.time() - t0, 1e-9))
    flush()
    splits[split] = parts
    bad['count'] += report.count
    bad['examples'] += report.examples[:max(0, 10 - len(bad['examples']))]
  meta = binary.Metadata(
      id_scheme='table', num_buckets=list(spec.table_rows), splits=splits,
      bad_lines=bad, sources={'train': d.train_path, 'eval': d.eval_path},
      layout='model', num_dense=num_dense, num_id_columns=num_ids,
      features=[f.name for f in transform.dense + transform.sparse],
      features_fingerprint=binary.features_fingerprint(transform),
      unlabeled_splits=unlabeled)
  meta.save(output_dir)
  if bad['count']:
    logging.warning('%d bad row(s) skipped; first: %s', bad['count'],
                    '; '.join(bad['examples']))
  return meta


class _null:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def define_flags() -> dict:
  """The command line's flags (defined only when run as a program)."""
  return dict(
      train=flags.DEFINE_list('train', None, 'Training files or globs.'),
      eval=flags.DEFINE_list('eval', [], 'Eval files or globs (optional).'),
      output_dir=flags.DEFINE_string('output_dir', None, 'Where to write.'),
      id_scheme=flags.DEFINE_enum('id_scheme', 'modulo', ID_SCHEMES,
                                  'How categorical values become table ids.'),
      num_buckets=flags.DEFINE_list(
          'num_buckets', ['40000000'],
          'modulo: table size, one for all or 26 comma-separated.'),
      vocab_threshold=flags.DEFINE_integer(
          'vocab_threshold', 1,
          'vocab: values seen fewer times share the OOV id.'),
      vocab_max_rows=flags.DEFINE_integer(
          'vocab_max_rows', 0, 'vocab: cap on table rows (0: none).'),
      bad_lines=flags.DEFINE_enum(
          'bad_lines', 'error', criteo.BAD_LINE_POLICIES,
          'Malformed lines: stop or skip and count.'),
      labeled_eval=flags.DEFINE_bool('labeled_eval', True,
                                     'Eval files have labels (40 fields).'),
      workers=flags.DEFINE_integer('workers', None,
                                   'Processes (default: CPUs).'),
      range_mb=flags.DEFINE_integer(
          'range_mb', 128, 'Plain files are cut into ranges of this size.'),
      part_rows=flags.DEFINE_integer(
          'part_rows', 1 << 20, 'Table configs: rows per part file.'),
      config=config_flags.DEFINE_config_file(
          'config', None, 'A table config (config.data.source=table), with'
          ' --config.<field> overrides; without it, Criteo text.',
          lock_config=False),
  )


def main(argv):
  """Runs `run` from the command line's flags.

  Args:
    argv: the command line. It takes no positional arguments.

  Raises:
    app.UsageError: on positional arguments.
  """
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  f = {k: v.value for k, v in _FLAGS.items()}
  if not f['output_dir']:
    raise app.UsageError('--output_dir is required.')
  # Paths relative to the current directory, made absolute once.
  f['train'] = cli.absolute_spec(list(f['train'] or []))
  f['eval'] = cli.absolute_spec(list(f['eval']))
  f['output_dir'] = cli.absolute(f['output_dir'])
  t0 = time.time()
  if f['config'] is not None:
    bad_lines = 'skip' if f['bad_lines'] == 'skip' else None
    meta = run_table(f['config'], f['output_dir'], train=f['train'],
                     eval_paths=f['eval'], bad_lines=bad_lines,
                     part_rows=f['part_rows'])
    rows = sum(p['rows'] for parts in meta.splits.values() for p in parts)
    dt = time.time() - t0
    logging.info('%s rows in %.1fs (%.0f rows/s): model batches of %d dense'
                 ' and %d id columns; metadata in %s', f'{rows:,}', dt,
                 rows / max(dt, 1e-9), meta.num_dense, meta.num_id_columns,
                 os.path.join(f['output_dir'], binary.METADATA))
    return
  if not f['train']:
    raise app.UsageError('--train is required without --config.')
  buckets = [int(b) for b in f['num_buckets']]
  meta = run(f['train'], f['output_dir'], eval_paths=f['eval'],
             id_scheme=f['id_scheme'],
             num_buckets=buckets[0] if len(buckets) == 1 else buckets,
             vocab_threshold=f['vocab_threshold'],
             vocab_max_rows=f['vocab_max_rows'], bad_lines=f['bad_lines'],
             labeled_eval=f['labeled_eval'], workers=f['workers'],
             range_bytes=f['range_mb'] << 20)
  rows = sum(p['rows'] for parts in meta.splits.values() for p in parts)
  dt = time.time() - t0
  peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
             resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1e6
  logging.info('%s rows in %.1fs (%.0f rows/s), peak memory of a process'
               ' %.2f GB; table sizes %s; metadata in %s', f'{rows:,}', dt,
               rows / max(dt, 1e-9), peak, meta.num_buckets,
               os.path.join(f['output_dir'], binary.METADATA))


_FLAGS: dict = {}

if __name__ == '__main__':
  _FLAGS = define_flags()
  cli.run_app(main)
