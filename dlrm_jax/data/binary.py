"""The preprocessed binary format: fixed-width int32 records, checksummed.

A part file holds `num_rows` records of 40 little-endian int32 fields: the
label, the 13 integer features (raw counts, missing written 0) and the 26
table ids (already mapped by modulo or by a vocabulary, see `preprocess`):

  header  64 bytes: magic b'DLRMBIN1', uint64 rows, uint32 fields (40),
          uint32 chunk_rows, uint32 chunks, zero padding
  records rows x 40 x int32
  footer  chunks x uint32 CRC32 of each chunk of `chunk_rows` records, then
          the magic b'DLRMEND1'

Tabular configs (`preprocess --config=...` with `config.data.source='table'`)
write the model batch instead (`Metadata.layout == 'model'`): records of
1 + F + T int32 fields, the label and the F normalized dense values as
float32 bit patterns, then the T packed ids of `FeatureTransform.apply`.
`BinarySource` gives them back as a model batch (`MODEL_BATCH` marks it),
which the transform passes through unchanged; `check_features` refuses a
config whose features differ from those the data was written with.

A file whose size disagrees with its header (truncated, or grown) is rejected
when opened; a chunk whose CRC32 disagrees is rejected when first read. Both
errors name the file, so a damaged file is never read as data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zlib
from typing import Sequence

import numpy as np

MAGIC = b'DLRMBIN1'
END_MAGIC = b'DLRMEND1'
HEADER_BYTES = 64
NUM_FIELDS = 40  # label, 13 ints, 26 ids
CHUNK_ROWS = 65536
_HEADER = struct.Struct('<8sQIII')
METADATA = 'metadata.json'
LAYOUTS = ('criteo', 'model')
MODEL_BATCH = '_model_batch'  # raw-batch key: rows already model batches


class CorruptFileError(ValueError):
  """A binary part file is truncated, damaged or not one."""


def _file_size(rows: int, chunk_rows: int,
               fields: int = NUM_FIELDS) -> tuple[int, int]:
  chunks = -(-rows // chunk_rows) if rows else 0
  return HEADER_BYTES + rows * fields * 4 + 4 * chunks + len(END_MAGIC), (
      chunks)


def write_part(path: str, records: np.ndarray,
               chunk_rows: int = CHUNK_ROWS,
               fields: int = NUM_FIELDS) -> None:
  """Writes int32 records to a part file, atomically.

  The file is written under a temporary name, then renamed.

  Args:
    path: the part file.
    records: `[n, fields]` int32 records.
    chunk_rows: the records per checksummed chunk.
    fields: the int32 fields of a record: 40 for Criteo's layout, 1 + F + T
      for the model layout.

  Raises:
    ValueError: if `records` is not `[n, fields]`.
  """
  records = np.ascontiguousarray(records, dtype='<i4')
  if records.ndim != 2 or records.shape[1] != fields:
    raise ValueError(f'{path}: records must be [n, {fields}], got'
                     f' {records.shape}.')
  rows = records.shape[0]
  _, chunks = _file_size(rows, chunk_rows, fields)
  crcs = np.array([
      zlib.crc32(records[c * chunk_rows:(c + 1) * chunk_rows].tobytes())
      for c in range(chunks)], '<u4')
  header = _HEADER.pack(MAGIC, rows, fields, chunk_rows, chunks)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(header.ljust(HEADER_BYTES, b'\0'))
    f.write(records.tobytes())
    f.write(crcs.tobytes())
    f.write(END_MAGIC)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class PartFile:
  """A part file, memory-mapped. Chunks are checked on first read.

  Args:
    path: the part file.
    fields: the int32 fields of a record the metadata expects.

  Attributes:
    path: the part file.
    num_rows: its records.
    chunk_rows: the records per checksummed chunk.
    records: the `[num_rows, fields]` int32 records, memory-mapped.

  Raises:
    CorruptFileError: if the file cannot be read, or if its header, size or
      footer is wrong.
  """

  def __init__(self, path: str, fields: int = NUM_FIELDS):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, 'rb') as f:
        head = f.read(HEADER_BYTES)
    except OSError as e:
      raise CorruptFileError(f'{path}: cannot be read: {e}') from e
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
      raise CorruptFileError(
          f'{path}: not a dlrm_jax binary part (bad header); re-run'
          ' preprocessing for it.')
    _, rows, have_fields, chunk_rows, chunks = _HEADER.unpack(
        head[:_HEADER.size])
    if have_fields != fields:
      raise CorruptFileError(
          f'{path}: records of {have_fields} fields, but {METADATA} describes'
          f' {fields}; re-run preprocessing for it.')
    want, want_chunks = _file_size(rows, chunk_rows, fields)
    if chunks != want_chunks or size != want:
      raise CorruptFileError(
          f'{path}: {size} bytes, but its header describes {rows} records'
          f' ({want} bytes); the file is truncated or damaged. Delete it and'
          ' re-run preprocessing, which redoes missing parts.')
    self.num_rows = rows
    self.chunk_rows = chunk_rows
    with open(path, 'rb') as f:
      f.seek(HEADER_BYTES + rows * fields * 4)
      self._crcs = np.frombuffer(f.read(4 * chunks), '<u4')
      if f.read(len(END_MAGIC)) != END_MAGIC:
        raise CorruptFileError(f'{path}: bad footer; the file is damaged.')
    self.records = np.memmap(path, dtype='<i4', mode='r',
                             offset=HEADER_BYTES,
                             shape=(rows, fields)) if rows else np.zeros(
                                 (0, fields), '<i4')
    self._checked = np.zeros(chunks, bool)

  def check_chunks(self, chunks: np.ndarray) -> None:
    """Checks the CRC32 of chunks not checked yet.

    Args:
      chunks: chunk indices. Repeats are fine.

    Raises:
      CorruptFileError: if a chunk fails its checksum.
    """
    for c in np.unique(chunks):
      if self._checked[c]:
        continue
      block = self.records[c * self.chunk_rows:(c + 1) * self.chunk_rows]
      if zlib.crc32(np.ascontiguousarray(block).tobytes()) != self._crcs[c]:
        raise CorruptFileError(
            f'{self.path}: records {c * self.chunk_rows}..'
            f'{c * self.chunk_rows + len(block) - 1} fail their checksum; the'
            ' file is damaged. Delete it and re-run preprocessing.')
      self._checked[c] = True

  def read(self, local: np.ndarray) -> np.ndarray:
    """Reads records, checking their chunks first.

    Args:
      local: row indices in this file, sorted or not.

    Returns:
      `[n, 40]` int32 records.

    Raises:
      CorruptFileError: if a chunk fails its checksum.
    """
    self.check_chunks(local // self.chunk_rows)
    return self.records[local]

  def check_all(self) -> None:
    """Checks every chunk. Raises CorruptFileError on a damaged one."""
    self.check_chunks(np.arange(len(self._checked)))


@dataclasses.dataclass
class Metadata:
  """`metadata.json` of a preprocessed dataset.

  Attributes:
    id_scheme: how the ids were mapped, 'modulo' or 'vocab'.
    num_buckets: the table rows of each of the 26 id columns.
    splits: split name -> its part files. Each is a dict with 'file', 'rows',
      'source' and 'byte_range'.
    threshold: the vocabulary's count threshold, None for 'modulo'.
    bad_lines: the 'count' of skipped malformed lines and a few 'examples'.
    sources: the 'train' and 'eval' text files.
    version: the format version.
    layout: 'criteo' (label, 13 ints, 26 ids) or 'model' (label, F dense
      values, T packed ids: model batches of a table config).
    num_dense: the model layout's F.
    num_id_columns: the model layout's T.
    features: the model layout's features, dense then sparse, by name.
    features_fingerprint: the model layout's `features_fingerprint`.
    unlabeled_splits: the model layout's splits written without labels.
  """

  id_scheme: str
  num_buckets: list[int]
  splits: dict[str, list[dict]]
  threshold: int | None = None
  bad_lines: dict | None = None
  sources: dict | None = None
  version: int = 1
  layout: str = 'criteo'
  num_dense: int = 0
  num_id_columns: int = 0
  features: list[str] | None = None
  features_fingerprint: str | None = None
  unlabeled_splits: list[str] | None = None

  @property
  def fields(self) -> int:
    """The int32 fields of a record."""
    if self.layout == 'model':
      return 1 + self.num_dense + self.num_id_columns
    return NUM_FIELDS

  @classmethod
  def load(cls, directory: str) -> 'Metadata':
    """Reads a dataset's metadata.

    Args:
      directory: the preprocessed dataset.

    Returns:
      The metadata. Unknown keys are ignored.

    Raises:
      ValueError: if `metadata.json` is missing.
    """
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
      raise ValueError(
          f'{directory} is not a preprocessed dataset: {METADATA} is missing'
          ' (create one with python -m dlrm_jax.data.preprocess).')
    with open(path) as f:
      d = json.load(f)
    return cls(**{k: v for k, v in d.items()
                  if k in {f.name for f in dataclasses.fields(cls)}})

  def save(self, directory: str) -> None:
    """Writes `metadata.json` into a directory, atomically.

    Args:
      directory: the preprocessed dataset.
    """
    path = os.path.join(directory, METADATA)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(dataclasses.asdict(self), f, indent=2)
    os.replace(tmp, path)


class BinarySource:
  """Rows of one split of a preprocessed dataset, with random access.

  `read(indices)` returns a raw batch with mapped ids:
  {'label': float32 [n], 'int': int64 [n, 13], 'ids': int32 [n, 26]}; of
  the model layout, a model batch: {'label': float32 [n], 'dense': float32
  [n, F] (when F > 0), 'ids': int32 [n, T], MODEL_BATCH: int8 [n]}.

  Args:
    directory: the preprocessed dataset.
    split: the split's name.
    rows: an optional `(lo, hi)` range of the split's rows to serve.

  Attributes:
    directory: the preprocessed dataset.
    metadata: its `Metadata`.
    split: the split's name.
    parts: the split's `PartFile`s.
    offset: the first row served.
    num_rows: the rows served.
    description: a line naming the source, for logs.

  Raises:
    ValueError: if `metadata.json` is missing, the split is unknown, or
      `rows` is outside the split.
    CorruptFileError: if a part file is damaged or disagrees with the
      metadata.
  """

  def __init__(self, directory: str, split: str, *,
               rows: tuple[int, int] | None = None):
    self.directory = directory
    self.metadata = Metadata.load(directory)
    if split not in self.metadata.splits:
      raise ValueError(
          f'{directory} has no split {split!r}; it has'
          f' {sorted(self.metadata.splits)}.')
    self.split = split
    if self.metadata.layout not in LAYOUTS:
      raise ValueError(
          f'{directory}/{METADATA}: layout {self.metadata.layout!r} is not'
          f' one of {", ".join(LAYOUTS)}.')
    self.parts = [PartFile(os.path.join(directory, p['file']),
                           self.metadata.fields)
                  for p in self.metadata.splits[split]]
    for part, info in zip(self.parts, self.metadata.splits[split]):
      if part.num_rows != info['rows']:
        raise CorruptFileError(
            f'{part.path}: holds {part.num_rows} rows but {METADATA} says'
            f' {info["rows"]}.')
    self._starts = np.cumsum([0] + [p.num_rows for p in self.parts])
    total = int(self._starts[-1])
    lo, hi = rows if rows is not None else (0, total)
    if not 0 <= lo <= hi <= total:
      raise ValueError(f'row range {rows} is outside the {total} rows of'
                       f' {directory}/{split}.')
    self.offset, self.num_rows = lo, hi - lo
    self.description = (f'preprocessed {directory} split {split!r} rows'
                        f' {lo:,}..{hi:,}')

  def __len__(self) -> int:
    return self.num_rows

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Reads rows by index.

    Args:
      indices: row indices within the served range.

    Returns:
      A raw batch with 'label', 'int' and 'ids'.

    Raises:
      CorruptFileError: if a chunk fails its checksum.
    """
    idx = np.asarray(indices, np.int64) + self.offset
    part = np.searchsorted(self._starts, idx, side='right') - 1
    out = np.empty((len(idx), self.metadata.fields), np.int32)
    for p in np.unique(part):
      sel = part == p
      out[sel] = self.parts[p].read(idx[sel] - self._starts[p])
    if self.metadata.layout == 'model':
      return model_batch(out, self.metadata.num_dense,
                         self.split not in (self.metadata.unlabeled_splits
                                            or ()))
    return {'label': out[:, 0].astype(np.float32),
            'int': out[:, 1:14].astype(np.int64),
            'ids': out[:, 14:]}

  def read_range(self, start: int, count: int) -> dict[str, np.ndarray]:
    """Reads consecutive rows.

    Args:
      start: the first row, within the served range.
      count: the number of rows.

    Returns:
      A raw batch, as `read` gives.
    """
    return self.read(np.arange(start, start + count))


def model_records(batch: dict[str, np.ndarray], num_dense: int,
                  num_id_columns: int) -> np.ndarray:
  """Packs a model batch into the model layout's int32 records.

  Args:
    batch: `FeatureTransform.apply`'s 'label' (absent: -1 is written),
      'dense' `[n, F]` and 'ids' `[n, T]`.
    num_dense: F.
    num_id_columns: T.

  Returns:
    `[n, 1 + F + T]` int32 records; label and dense as float32 bits.
  """
  ids = np.asarray(batch['ids'])
  n = len(ids)
  rec = np.empty((n, 1 + num_dense + num_id_columns), np.int32)
  label = np.asarray(batch['label'], np.float32) if 'label' in batch else (
      np.full(n, -1, np.float32))
  rec[:, 0] = label.view(np.int32)
  if num_dense:
    rec[:, 1:1 + num_dense] = np.ascontiguousarray(
        batch['dense'], np.float32).view(np.int32)
  rec[:, 1 + num_dense:] = ids.astype(np.int32)
  return rec


def model_batch(records: np.ndarray, num_dense: int,
                labeled: bool = True) -> dict[str, np.ndarray]:
  """Unpacks model-layout records (`model_records`) into a model batch.

  Args:
    records: `[n, 1 + F + T]` int32 records.
    num_dense: F.
    labeled: whether to give the label.

  Returns:
    'label' (when labeled), 'dense' (when F > 0), 'ids' and MODEL_BATCH.
  """
  records = np.ascontiguousarray(records, np.int32)
  out = {}
  if labeled:
    out['label'] = records[:, 0].copy().view(np.float32)
  if num_dense:
    out['dense'] = np.ascontiguousarray(
        records[:, 1:1 + num_dense]).view(np.float32)
  out['ids'] = np.ascontiguousarray(records[:, 1 + num_dense:])
  out[MODEL_BATCH] = np.zeros(len(records), np.int8)
  return out


_NOT_DATA = ('embedding_dim', 'embedding_name', 'combiner')


def features_fingerprint(transform) -> str:
  """A digest of what a transform makes of raw rows.

  The features' fields, in group order, less those that do not change the
  model batch (embedding width and name, combiner).

  Args:
    transform: a `features.FeatureTransform`.

  Returns:
    16 hex digits.
  """
  parts = []
  for group, feats in (('dense', transform.dense),
                       ('sparse', transform.sparse)):
    for f in feats:
      d = {k: v for k, v in dataclasses.asdict(f).items()
           if k not in _NOT_DATA}
      parts.append([group, type(f).__name__, d])
  text = json.dumps(parts, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_features(directory: str, transform) -> None:
  """Refuses a config whose features differ from a model-layout dataset's.

  Args:
    directory: the preprocessed dataset.
    transform: the run's `features.FeatureTransform`.

  Raises:
    ValueError: naming both fingerprints, when they differ.
  """
  meta = Metadata.load(directory)
  if meta.layout != 'model':
    return
  have = features_fingerprint(transform)
  if have != meta.features_fingerprint:
    names = [f.name for f in transform.dense + transform.sparse]
    raise ValueError(
        f'config.features (fingerprint {have}, features {names}) differ from'
        f' those {directory} was preprocessed with (fingerprint'
        f' {meta.features_fingerprint}, features {meta.features}); re-run'
        ' python -m dlrm_jax.data.preprocess with this config.')


def split_files(directory: str, split: str) -> Sequence[str]:
  """Lists the part files of a split.

  Args:
    directory: the preprocessed dataset.
    split: the split's name.

  Returns:
    The paths of its part files, in order.
  """
  return [os.path.join(directory, p['file'])
          for p in Metadata.load(directory).splits[split]]
