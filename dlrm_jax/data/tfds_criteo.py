"""TFDS builders for the Criteo click logs, and a batched random-access reader.

`CriteoKaggle` (`criteo_kaggle`) and `CriteoTerabyte` (`criteo_terabyte`)
turn the raw text files (see `criteo.py`) into ArrayRecord shards that
`tfds.data_source` reads without TensorFlow:

  import dlrm_jax.data.tfds_criteo  # Registers the builders.
  builder = tfds.builder('criteo_kaggle', data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir='/path/to/criteo'))
  source = tfds.data_source('criteo_kaggle', data_dir=data_dir, split='train')

Each example is {'label': int64 scalar (0 or 1; -1 in the unlabeled Kaggle
test split), 'int': int64 [13] (missing written 0), 'cat': int64 [26] (the
32-bit hash, missing written -1)}: raw values, hashed later by the model.
Rows keep their file and line order: row i of a split is its i-th valid line.

Writing. TFDS's own generator writer serializes one example at a time (about
10k rows/s) and, for a split of more than 1 GB, spills to temporary files
through `tf.io.gfile`, which needs TensorFlow. So these builders write the
shards themselves, streaming: chunks from `criteo.read_criteo` are serialized
with numpy into `tf.train.Example` protos of one fixed layout ('int' and 'cat'
are Tensors with bytes encoding: their little-endian int64 values back to
back) and appended to ArrayRecord shards of `shard_rows` rows each (record
group size 1, as TFDS writes them, for random access).

Reading. `TfdsCriteoSource` opens the split as TFDS lays it out (its file
instructions, so TFDS slices work) and reads a batch a block at a time, with
no Python object per record. A shard whose records are stored as the writer
here stores them by default (uncompressed, one record per Riegeli chunk, all
chunks of one size) is memory-mapped (`riegeli.DirectShard`): record i's
chunk lies at a position computed from i, checked once per shard against
the chunk offsets in ArrayRecord's footer when it is opened. A batch's
chunks are then copied out with one numpy gather and checked together: the header fields against the layout, and the data against
the chunk's HighwayHash, computed vectorised over the batch as Riegeli does
(riegeli/records/README: block headers every 64 KiB, 40-byte chunk headers;
the hash key 'Riegeli/records\n' twice). Any other shard (snappy or zstd
compressed, say), and any chunk that fails a check, is read with
ArrayRecord's own reader, one call per shard (2-3x faster than
`tfds.data_source`, whose per-key Python bookkeeping costs more than the
read). That reader checks every hash too, so a corrupt chunk the direct path
rejects raises its error.

The records of a batch are then decoded together with numpy: a record of the
known layout is checked byte for byte outside its values, so any other
record (one written by TFDS's own serializer, say) goes through TFDS's
decoder instead. A record that cannot be read or decoded raises
`CorruptDataError` naming its shard file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from typing import Any, Iterator, Sequence

from absl import logging
from array_record.python import array_record_module
import numpy as np
import tensorflow_datasets as tfds

from dlrm_jax.data import criteo
from dlrm_jax.data import riegeli

NUM_TERABYTE_DAYS = 24
TERABYTE_EVAL_DAY = NUM_TERABYTE_DAYS - 1
DEFAULT_SHARD_ROWS = 1 << 21  # About 850 MB per shard (uncompressed).
# Uncompressed: read directly (see `TfdsCriteoSource`), about 3x faster than
# snappy through ArrayRecord's reader, 2x end to end through grain; 26%
# larger than snappy.
DEFAULT_COMPRESSION = 'uncompressed'
_COMPRESSION = re.compile(r'(uncompressed|snappy|zstd(:-?\d+)?|brotli(:\d+)?)')
_CHUNK_ROWS = 1 << 16  # Rows read, serialized and written at a time.
_INT_BYTES = 8 * criteo.NUM_INT
_CAT_BYTES = 8 * criteo.NUM_CAT
_UNLABELED = -1  # The label written for the rows of unlabeled files.
# ArrayRecord reader options for random access (its docs' recommendation).
_RANDOM_ACCESS = 'readahead_buffer_size:0,max_parallelism:0'

_CITATION = """\
@misc{criteo_display_advertising_challenge,
  author = {Criteo AI Lab},
  title = {Criteo Display Advertising Challenge and Criteo 1TB Click Logs},
  howpublished = {\\url{https://ailab.criteo.com/ressources/}},
}"""


class CorruptDataError(ValueError):
  """A shard of a prepared dataset cannot be read or decoded. Names the file."""


# tf.train.Example in the protobuf wire format. Example: features = 1;
# Features: map<string, Feature> feature = 1 (entries: key = 1, value = 2);
# Feature: bytes_list = 1, int64_list = 3; BytesList / Int64List: value = 1.
_BYTES_LIST = 1
_INT64_LIST = 3


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field."""
  return (riegeli.varint(number << 3 | 2) + riegeli.varint(len(payload))
          + payload)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """The fixed byte layout of the serialized examples of a split.

  Attributes:
    template: uint8 [length], a record with every value zero and the label of
      unlabeled rows.
    label: the byte of the label in the labeled layout. None for unlabeled,
      where the label is part of the fixed bytes.
    int: the span of the 13 int64 values.
    cat: the span of the 26 int64 values.
    fixed: the indices of the bytes every record of the layout shares.
  """

  template: np.ndarray
  label: int | None
  int: slice
  cat: slice
  fixed: np.ndarray

  @property
  def length(self) -> int:
    """The bytes of a record."""
    return len(self.template)


def _make_layout(labeled: bool) -> _Layout:
  """The layout of labeled records, label 0 or 1, or unlabeled ones, -1."""
  label = riegeli.varint(0 if labeled else _UNLABELED)
  # Map entries in key order. (TFDS's own serializer writes them in the
  # order of its protobuf map, which is not specified; any order parses.)
  values = (('cat', _BYTES_LIST, bytes(_CAT_BYTES)),
            ('int', _BYTES_LIST, bytes(_INT_BYTES)),
            ('label', _INT64_LIST, label))
  entries = [
      _field(1, _field(1, key.encode()) +
             _field(2, _field(kind, _field(1, payload))))
      for key, kind, payload in values
  ]
  features = b''.join(entries)
  record = _field(1, features)
  spans = {}
  end = len(record) - len(features)
  for (key, _, payload), entry in zip(values, entries):
    end += len(entry)  # Each value ends its map entry.
    spans[key] = slice(end - len(payload), end)
  free = np.zeros(len(record), bool)
  free[spans['int']] = free[spans['cat']] = True
  if labeled:
    free[spans['label']] = True
  return _Layout(
      template=np.frombuffer(record, np.uint8).copy(),
      label=spans['label'].start if labeled else None,
      int=spans['int'], cat=spans['cat'], fixed=np.flatnonzero(~free))


_LAYOUTS = {labeled: _make_layout(labeled) for labeled in (True, False)}
# Labeled and unlabeled records differ in length (the label's varint).
_LAYOUT_OF_LENGTH = {layout.length: (labeled, layout)
                     for labeled, layout in _LAYOUTS.items()}


def _serialize(chunk: dict[str, np.ndarray], layout: _Layout) -> list[bytes]:
  """Rows of a `read_criteo` chunk as serialized examples of `layout`."""
  n = len(chunk['int'])
  rows = np.empty((n, layout.length), np.uint8)
  rows[:] = layout.template
  if layout.label is not None:
    rows[:, layout.label] = chunk['label'].astype(np.uint8)  # 0 or 1.
  rows[:, layout.int] = chunk['int'].astype('<i8').view(np.uint8).reshape(
      n, _INT_BYTES)
  rows[:, layout.cat] = chunk['cat'].astype('<i8').view(np.uint8).reshape(
      n, _CAT_BYTES)
  data = rows.tobytes()
  size = layout.length
  return [data[i:i + size] for i in range(0, n * size, size)]


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'label': tfds.features.Scalar(
          dtype=np.int64,
          doc=('1: clicked, 0: not clicked; -1 in unlabeled files (Kaggle'
               ' test.txt).')),
      'int': tfds.features.Tensor(
          shape=(criteo.NUM_INT,), dtype=np.int64,
          encoding=tfds.features.Encoding.BYTES,
          doc='I1..I13 as written (may be negative); missing: 0.'),
      'cat': tfds.features.Tensor(
          shape=(criteo.NUM_CAT,), dtype=np.int64,
          encoding=tfds.features.Encoding.BYTES,
          doc='C1..C26: the 32-bit hash in [0, 2^32); missing: -1.'),
  })


class _ShardWriter:
  """Appends records to ArrayRecord shards of a split, `shard_rows` each.

  Shards are written under temporary names. Once `n` is known, `close` gives
  them TFDS's names, `<name>-<split>.array_record-<i:05d>-of-<n:05d>`.
  """

  def __init__(self, template: tfds.core.naming.ShardedFileTemplate,
               shard_rows: int, options: str):
    self._template = template
    self._shard_rows = shard_rows
    self._options = options
    self._writer = None
    self._paths: list[str] = []
    self.shard_lengths: list[int] = []
    self.num_bytes = 0

  def _open(self) -> None:
    final = os.fspath(self._template.sharded_filepath(shard_index=0,
                                                      num_shards=1))
    path = f'{final}.part{len(self._paths):05d}'
    self._writer = array_record_module.ArrayRecordWriter(path, self._options)
    self._paths.append(path)
    self.shard_lengths.append(0)

  def write(self, records: Sequence[bytes]) -> None:
    """Appends records, opening and finishing shards as they fill."""
    pos = 0
    while pos < len(records):
      if self._writer is None:
        self._open()
      take = min(self._shard_rows - self.shard_lengths[-1], len(records) - pos)
      write = self._writer.write
      for record in records[pos:pos + take]:
        write(record)
      self.num_bytes += sum(map(len, records[pos:pos + take]))
      self.shard_lengths[-1] += take
      pos += take
      if self.shard_lengths[-1] == self._shard_rows:
        self._finish_shard()

  def _finish_shard(self) -> None:
    self._writer.close()
    self._writer = None
    logging.info('Wrote shard %d of split %s (%d rows).', len(self._paths) - 1,
                 self._template.split, self.shard_lengths[-1])

  def abort(self) -> None:
    """Closes the open shard, if any, after a failure."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def close(self) -> None:
    """Finishes the open shard and gives every shard its TFDS name."""
    if self._writer is not None:
      self._finish_shard()
    n = len(self._paths)
    for i, path in enumerate(self._paths):
      os.replace(path, os.fspath(self._template.sharded_filepath(
          shard_index=i, num_shards=n)))


class _CriteoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common code of the Criteo builders: the features and the writer."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  _DESCRIPTION = ''
  _HOMEPAGE = 'https://ailab.criteo.com/ressources/'

  def __init__(self, *, bad_lines: str = 'error',
               shard_rows: int = DEFAULT_SHARD_ROWS,
               compression: str = DEFAULT_COMPRESSION,
               file_format: str | tfds.core.FileFormat | None = None,
               **kwargs: Any):
    """Builder of the dataset.

    Args:
      bad_lines: 'error' or 'skip'. With 'error' a malformed line stops the
        preparation, naming its file and line. With 'skip' malformed lines
        are dropped. Their count is logged and recorded in
        `info.metadata['bad_lines']`.
      shard_rows: the rows per ArrayRecord shard file.
      compression: the compression of the ArrayRecord records:
        'zstd[:level]', 'snappy', 'brotli[:level]' or 'uncompressed' (the
        default; only uncompressed shards are read directly, see
        `TfdsCriteoSource`).
      file_format: only 'array_record', the default, can be written.
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder`.

    Raises:
      ValueError: if `bad_lines`, `shard_rows` or `compression` is invalid.
    """
    if bad_lines not in criteo.BAD_LINE_POLICIES:
      raise ValueError(
          f"bad_lines ({bad_lines!r}) must be 'error' or 'skip'.")
    if isinstance(shard_rows, bool) or not isinstance(
        shard_rows, (int, np.integer)) or shard_rows < 1:
      raise ValueError(f'shard_rows ({shard_rows!r}) must be an int >= 1.')
    if not isinstance(compression, str) or not _COMPRESSION.fullmatch(
        compression):
      raise ValueError(
          f"compression ({compression!r}) must be 'zstd[:level]', 'snappy',"
          " 'brotli[:level]' or 'uncompressed'.")
    self._bad_lines = bad_lines
    self._shard_rows = int(shard_rows)
    self._compression = compression
    super().__init__(
        file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD,
        **kwargs)
    # For pickling (DatasetBuilder.__setstate__ calls __init__ with these).
    self._original_state.update(bad_lines=bad_lines, shard_rows=shard_rows,
                                compression=compression)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self._DESCRIPTION,
        features=_features(),
        homepage=self._HOMEPAGE,
        citation=_CITATION,
        # Rows are written in file and line order.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_files(self, manual_dir: str) -> dict[str, tuple[list[str], bool]]:
    """Finds the files of each split in `manual_dir`.

    Returns a dict from split to the files in order and whether they are
    labeled.
    """
    raise NotImplementedError

  def _manual_dir(self, dl_manager: tfds.download.DownloadManager) -> str:
    try:
      return os.fspath(dl_manager.manual_dir)
    except AssertionError as e:
      where = getattr(dl_manager, '_manual_dir', None)
      raise FileNotFoundError(
          f'{self.name}: the manual_dir ({where}) does not exist or is empty.'
          ' Pass download_config=tfds.download.DownloadConfig(manual_dir=...)'
          ' naming the folder of the files.\n' +
          self.MANUAL_DOWNLOAD_INSTRUCTIONS) from e

  def _find(self, manual_dir: str, name: str) -> str | None:
    """`manual_dir/name` or `manual_dir/name.gz`, if one of them exists."""
    found = [p for p in (os.path.join(manual_dir, name),
                         os.path.join(manual_dir, name + '.gz'))
             if os.path.isfile(p)]
    if len(found) > 1:
      raise ValueError(
          f'{self.name}: the manual_dir {manual_dir} holds both {name} and'
          f' {name}.gz; keep one of them.')
    return found[0] if found else None

  def _missing(self, manual_dir: str, expected: str) -> FileNotFoundError:
    present = sorted(os.listdir(manual_dir))
    shown = ', '.join(present[:20]) + (', ...' if len(present) > 20 else '')
    return FileNotFoundError(
        f'{self.name}: the manual_dir {manual_dir} holds no {expected}'
        f' (it holds: {shown or "nothing"}).\n' +
        self.MANUAL_DOWNLOAD_INSTRUCTIONS)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager
                        ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    splits = self._split_files(self._manual_dir(dl_manager))
    return {name: self._generate_examples(paths, labeled)
            for name, (paths, labeled) in splits.items()}

  def _generate_examples(self, paths: Sequence[str], labeled: bool
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields the examples of the files, one at a time.

    This is TFDS's own slow path. `_download_and_prepare` writes the same
    examples under the same keys in bulk.

    Args:
      paths: the files of the split, in order.
      labeled: whether the files have the label field.

    Yields:
      `(index, example)`, with `index` the row's index in the split.
    """
    report = criteo.BadLineReport()
    key = 0
    for chunk in criteo.read_criteo(paths, labeled=labeled,
                                    bad_lines=self._bad_lines, report=report,
                                    chunk_rows=_CHUNK_ROWS):
      labels = (chunk['label'].astype(np.int64) if labeled else
                np.full(len(chunk['int']), _UNLABELED, np.int64))
      for label, ints, cats in zip(labels, chunk['int'], chunk['cat']):
        yield key, {'label': label, 'int': ints, 'cat': cats}
        key += 1
    if report.count:
      logging.warning('%s: %s', self.name, report.summary())

  def _download_and_prepare(
      self, dl_manager: tfds.download.DownloadManager,
      download_config: tfds.download.DownloadConfig) -> None:
    """Writes every split in bulk. The module docstring says why."""
    if self.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise ValueError(
          f'{self.name}: file_format ({self.info.file_format}) must be'
          " 'array_record': the only format these builders write.")
    splits = self._split_files(self._manual_dir(dl_manager))
    max_rows = download_config.max_examples_per_split
    if max_rows == 0:
      return
    infos = []
    bad_lines = {}
    for split, (paths, labeled) in splits.items():
      info, bad_lines[split] = self._write_split(split, paths, labeled,
                                                 max_rows)
      infos.append(info)
    self.info.metadata['bad_lines'] = bad_lines
    self.info.metadata['source_files'] = {
        split: [os.path.basename(p) for p in paths]
        for split, (paths, _) in splits.items()}
    self.info.set_splits(tfds.core.SplitDict(infos))

  def _write_split(self, split: str, paths: Sequence[str], labeled: bool,
                   max_rows: int | None) -> tuple[tfds.core.SplitInfo, int]:
    """Writes the shards of a split. Returns its SplitInfo and bad lines."""
    layout = _LAYOUTS[labeled]
    template = self._get_filename_template(split)
    writer = _ShardWriter(template, self._shard_rows,
                          f'group_size:1,{self._compression}')
    report = criteo.BadLineReport()
    checked = False
    try:
      for chunk in criteo.read_criteo(
          paths, labeled=labeled, bad_lines=self._bad_lines, report=report,
          chunk_rows=_CHUNK_ROWS, max_rows=max_rows):
        records = _serialize(chunk, layout)
        if not checked:
          self._check_record(records[0], chunk, labeled)
          checked = True
        writer.write(records)
    except BaseException:
      writer.abort()  # TFDS deletes the incomplete folder.
      raise
    writer.close()
    rows = sum(writer.shard_lengths)
    if not rows:
      raise ValueError(
          f'{self.name}: the files of split {split!r} hold no valid row:'
          f' {", ".join(paths)} ({report.summary()}).')
    if report.count:
      logging.warning('%s %s: %s', self.name, split, report.summary())
    logging.info('%s %s: %d rows in %d shards from %s (%s).', self.name, split,
                 rows, len(writer.shard_lengths), ', '.join(paths),
                 report.summary())
    info = tfds.core.SplitInfo(
        name=split, shard_lengths=writer.shard_lengths,
        num_bytes=writer.num_bytes, filename_template=template)
    return info, report.count

  def _check_record(self, record: bytes, chunk: dict[str, np.ndarray],
                    labeled: bool) -> None:
    """Checks that TFDS decodes a written record to the row it came from."""
    example = self.info.features.deserialize_example_np(record)
    label = int(chunk['label'][0]) if labeled else _UNLABELED
    if not (int(example['label']) == label and
            np.array_equal(example['int'], chunk['int'][0]) and
            np.array_equal(example['cat'], chunk['cat'][0])):
      raise RuntimeError(
          f'{self.name}: TFDS decodes a written record to {example}, not to'
          ' the row it came from; the record layout no longer matches TFDS.')


class CriteoKaggle(_CriteoBuilder):
  """Criteo Display Advertising Challenge (Kaggle, 2014): 7 days of clicks.

  The builder takes the arguments of `_CriteoBuilder.__init__`. Its splits are
  'train' from train.txt and, when given, the unlabeled 'test' from test.txt.

  Attributes:
    MANUAL_DOWNLOAD_INSTRUCTIONS: what to put in manual_dir.
  """

  _DESCRIPTION = (
      'Criteo Display Advertising Challenge (Kaggle 2014): about 45.8M'
      ' labeled rows of 13 integer and 26 hashed categorical features.'
      ' Splits: train (train.txt) and, when test.txt is given, test'
      ' (unlabeled: label -1).')
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download the Criteo Display Advertising Challenge data set (dac.tar.gz,
  about 4.3 GB; at the time of writing from
  https://go.criteo.net/criteo-research-kaggle-display-advertising-challenge-dataset.tar.gz,
  linked from https://ailab.criteo.com/ressources/), extract it, and put in
  manual_dir:
    train.txt  (required: 40 tab-separated fields, the label first)
    test.txt   (optional: 39 fields, unlabeled; becomes the 'test' split)
  Plain or gzip; gzip files may also be named train.txt.gz / test.txt.gz.
  """

  def _split_files(self, manual_dir: str) -> dict[str, tuple[list[str], bool]]:
    train = self._find(manual_dir, 'train.txt')
    if train is None:
      raise self._missing(manual_dir, 'train.txt (or train.txt.gz)')
    splits = {'train': ([train], True)}
    test = self._find(manual_dir, 'test.txt')
    if test is not None:
      splits['test'] = ([test], False)
    return splits


class CriteoTerabyte(_CriteoBuilder):
  """Criteo 1TB Click Logs: 24 days of clicks, day_0 .. day_23.

  The builder takes the arguments of `_CriteoBuilder.__init__`. Its splits are
  'train' from the days 0..22 given, in day order, and 'eval' from day_23.

  Attributes:
    MANUAL_DOWNLOAD_INSTRUCTIONS: what to put in manual_dir.
  """

  _DESCRIPTION = (
      'Criteo 1TB Click Logs: 24 days (day_0 .. day_23, about 4.4B labeled'
      ' rows) of 13 integer and 26 hashed categorical features. Splits: train'
      ' (the days 0..22 given, in day order) and eval (day_23, when given).')
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download the Criteo 1TB Click Logs (day_0.gz .. day_23.gz, about 350 GB
  compressed; at the time of writing from
  https://ailab.criteo.com/download-criteo-1tb-click-logs-dataset/ or the
  Hugging Face data set criteo/CriteoClickLogs) and put in manual_dir any of:
    day_0 .. day_22  (the 'train' split, in day order)
    day_23           (the 'eval' split)
  Each plain or gzip, named day_N or day_N.gz.
  """

  def _split_files(self, manual_dir: str) -> dict[str, tuple[list[str], bool]]:
    days = {d: self._find(manual_dir, f'day_{d}')
            for d in range(NUM_TERABYTE_DAYS)}
    days = {d: p for d, p in days.items() if p is not None}
    if not days:
      raise self._missing(
          manual_dir, f'day_0 .. day_{NUM_TERABYTE_DAYS - 1} (plain or .gz)')
    splits = {}
    train = [p for d, p in sorted(days.items()) if d != TERABYTE_EVAL_DAY]
    if train:
      splits['train'] = (train, True)
    if TERABYTE_EVAL_DAY in days:
      splits['eval'] = ([days[TERABYTE_EVAL_DAY]], True)
    return splits


class TfdsCriteoSource:
  """Rows of a prepared TFDS Criteo split, for random access in batches.

  Attributes:
    num_rows: the rows of the split.
    description: what is read, for logs.
  """

  def __init__(self, name: str, split: str, data_dir: str):
    """Opens a prepared split.

    Args:
      name: the dataset, 'criteo_kaggle' or 'criteo_terabyte'. A version or
        config may follow as TFDS allows, such as 'criteo_kaggle:1.0.0'.
      split: a split of it, 'train', 'test' or 'eval'. TFDS slices such as
        'train[:90%]' work too.
      data_dir: the TFDS data_dir it was prepared in.

    Raises:
      ValueError: naming name, split and data_dir, when the dataset is not
        prepared there or has no such split.
    """
    data_dir = os.fspath(data_dir)
    where = f'{name!r} in data_dir {data_dir!r}'
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'Cannot open the TFDS dataset {where}: {e}') from e
    if not builder.is_prepared():
      raise ValueError(
          f'The TFDS dataset {where} is not prepared (no {builder.data_dir}):'
          ' prepare it first with builder.download_and_prepare().')
    try:
      split_info = builder.info.splits[split]
    except (KeyError, ValueError) as e:
      raise ValueError(
          f'The TFDS dataset {where} has no split {split!r} (its splits:'
          f' {", ".join(sorted(builder.info.splits))}).') from e
    self._features = builder.info.features
    instructions = split_info.file_instructions
    self._files = [os.fspath(f.filename) for f in instructions]
    self._skips = np.array([f.skip for f in instructions], np.int64)
    takes = np.array([f.take for f in instructions], np.int64)
    self._ends = np.cumsum(takes)
    self._starts = self._ends - takes
    self._readers: dict[int, Any] = {}
    self._direct: dict[int, riegeli.DirectShard | None] = {}
    self._open_lock = threading.Lock()
    self.num_rows = int(self._ends[-1]) if len(takes) else 0
    self.description = (
        f'TFDS {builder.info.full_name} split {split} in {data_dir}'
        f' ({self.num_rows} rows, {len(self._files)} shards)')

  def __len__(self) -> int:
    return self.num_rows

  def _file_of(self, rows: np.ndarray) -> np.ndarray:
    """The shard index of each row index."""
    return np.searchsorted(self._ends, rows, side='right')

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Reads rows by index, in the order given.

    Args:
      indices: 1-D integer row indices in [0, num_rows), in any order.

    Returns:
      {'label': float32 [n], 'int': int64 [n, 13], 'cat': int64 [n, 26]}.

    Raises:
      ValueError: for bad indices.
      CorruptDataError: naming the shard file, when a record cannot be read
        or decoded.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (
        np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
      raise ValueError(
          f'indices must be a 1-D integer array, got {indices.dtype} of shape'
          f' {indices.shape}.')
    n = len(indices)
    if n and (indices.min() < 0 or indices.max() >= self.num_rows):
      raise ValueError(
          f'indices must lie in [0, {self.num_rows}) ({self.description}),'
          f' got [{indices.min()}, {indices.max()}].')
    if not n:
      return {'label': np.zeros(0, np.float32),
              'int': np.zeros((0, criteo.NUM_INT), np.int64),
              'cat': np.zeros((0, criteo.NUM_CAT), np.int64)}
    # Ascending rows are grouped by shard and in file order (faster reads).
    order = np.argsort(indices, kind='stable')
    bounds = np.searchsorted(self._file_of(indices[order]),
                             np.arange(len(self._files) + 1))
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    records: dict[int, bytes] = {}
    for f in np.flatnonzero(np.diff(bounds)):
      rows = order[bounds[f]:bounds[f + 1]]
      positions = indices[rows] - self._starts[f] + self._skips[f]
      direct = self._direct_shard(f)
      if direct is not None:
        mine = positions < direct.num_direct
        got, values = direct.read(positions[mine])
        ok = mine.copy()
        ok[mine] = got
        blocks.append((rows[ok], values))
        rows, positions = rows[~ok], positions[~ok]
        if not rows.size:
          continue
      try:
        got = self._reader(f).read(positions.tolist())
      except Exception as e:  # pylint: disable=broad-except
        raise CorruptDataError(
            f'{self._files[f]}: cannot read records (corrupt or truncated'
            f' ArrayRecord file?): {type(e).__name__}: {e}') from e
      records.update(zip(rows.tolist(), got))
    return self._decode_blocks(n, blocks + _blocks_of(records), records,
                               indices)

  def _reader(self, f: int):
    """ArrayRecord's reader of shard `f`, opened on first use.

    Threads share it. Its reads are const and release the GIL.
    """
    reader = self._readers.get(f)
    if reader is None:
      with self._open_lock:
        reader = self._readers.get(f)
        if reader is None:
          reader = self._readers[f] = self._open_reader(f)
    return reader

  def _open_reader(self, f: int):
    try:
      return array_record_module.ArrayRecordReader(self._files[f],
                                                   _RANDOM_ACCESS)
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptDataError(
          f'{self._files[f]}: cannot open (corrupt or truncated'
          f' ArrayRecord file?): {type(e).__name__}: {e}') from e

  def _direct_shard(self, f: int) -> riegeli.DirectShard | None:
    """The direct reader of shard `f`, or None when it has another layout.

    Opened on first use, after ArrayRecord's reader has opened the file
    (which checks its footer). When every record is read directly, that
    reader is closed again: one open file per shard.
    """
    if f not in self._direct:
      with self._open_lock:
        if f not in self._direct:
          shared = self._readers.get(f)
          reader = shared or self._open_reader(f)
          num_records = reader.num_records()
          try:
            direct = riegeli.DirectShard.open(self._files[f], num_records)
          except (OSError, ValueError):
            direct = None  # Not mappable: ArrayRecord's reader reads it.
          if shared is None:
            if direct is None or direct.num_direct < num_records:
              self._readers[f] = reader
            else:
              reader.close()
          self._direct[f] = direct
    return self._direct[f]

  def __getstate__(self):  # Readers stay in their process (grain workers).
    state = dict(self.__dict__)
    state['_readers'], state['_direct'] = {}, {}
    state['_open_lock'] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open_lock = threading.Lock()

  def _decode(self, records: Sequence[bytes],
              indices: np.ndarray) -> dict[str, np.ndarray]:
    """Decodes a batch of records, checking every byte outside the values.

    Args:
      records: the serialized examples of the rows.
      indices: the row index of each, for errors.

    Returns:
      The rows, as `read` returns them.
    """
    loose = dict(enumerate(records))
    return self._decode_blocks(len(records), _blocks_of(loose), loose,
                               indices)

  def _decode_blocks(self, n: int,
                     blocks: Sequence[tuple[np.ndarray, np.ndarray]],
                     records: dict[int, bytes],
                     indices: np.ndarray) -> dict[str, np.ndarray]:
    """Decodes the rows of a batch, a block of records at a time.

    Args:
      n: the rows of the batch.
      blocks: `(rows, data)` pairs: the rows' positions in the batch and
        uint8 [len(rows), L], their records, all of one length L.
      records: the serialized examples of the rows in no block, by position.
        Rows of a block whose records are not of a known layout are added.
      indices: the row index of each row, for errors.

    Returns:
      The rows, as `read` returns them.
    """
    label = np.empty(n, np.float32)
    ints = np.empty((n, criteo.NUM_INT), np.int64)
    cats = np.empty((n, criteo.NUM_CAT), np.int64)
    done = np.zeros(n, bool)
    for rows, data in blocks:
      labeled, layout = _LAYOUT_OF_LENGTH.get(data.shape[1], (None, None))
      if layout is None or not rows.size:
        continue
      ok = (data[:, layout.fixed] == layout.template[layout.fixed]).all(axis=1)
      if labeled:
        ok &= data[:, layout.label] <= 1
      if not ok.all():
        # Not of a known layout (e.g. written by TFDS's own serializer).
        records.update(zip(rows[~ok].tolist(), map(bytes, data[~ok])))
        rows, data = rows[ok], data[ok]
      if labeled:
        label[rows] = data[:, layout.label]
      else:
        label[rows] = _UNLABELED
      ints[rows] = data[:, layout.int].copy().view('<i8')
      cats[rows] = data[:, layout.cat].copy().view('<i8')
      done[rows] = True
    for i in np.flatnonzero(~done):
      try:
        example = self._features.deserialize_example_np(records[i])
        label[i] = int(example['label'])
        ints[i] = example['int']
        cats[i] = example['cat']
      except Exception as e:  # pylint: disable=broad-except
        f = self._files[self._file_of(indices[i:i + 1])[0]]
        raise CorruptDataError(
            f'{f}: the record of row {indices[i]} cannot be decoded:'
            f' {type(e).__name__}: {e}') from e
    bad = ((cats < -1) | (cats >= 1 << 32)).any(axis=1)
    bad |= (label != 0) & (label != 1) & (label != _UNLABELED)
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      f = self._files[self._file_of(indices[i:i + 1])[0]]
      raise CorruptDataError(
          f'{f}: the record of row {indices[i]} holds values out of range'
          f' (label {label[i]}, cat {cats[i].tolist()}).')
    return {'label': label, 'int': ints, 'cat': cats}


def _blocks_of(records: dict[int, bytes]
               ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Records of the known layouts' lengths, one block per length.

  Args:
    records: serialized examples by their position in the batch.

  Returns:
    `(rows, data)` pairs as `TfdsCriteoSource._decode_blocks` takes them.
  """
  if not records:
    return []
  rows = np.fromiter(records, np.int64, len(records))
  lengths = np.fromiter(map(len, records.values()), np.int64, len(records))
  blocks = []
  for length in _LAYOUT_OF_LENGTH:
    mine = rows[lengths == length]
    if mine.size:
      data = np.frombuffer(b''.join([records[i] for i in mine.tolist()]),
                           np.uint8).reshape(len(mine), length)
      blocks.append((mine, data))
  return blocks
