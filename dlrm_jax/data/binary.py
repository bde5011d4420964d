"""The preprocessed binary format: fixed-width int32 records, checksummed.

A part file holds `num_rows` records of 40 little-endian int32 fields: the
label, the 13 integer features (raw counts, missing written 0) and the 26
table ids (already mapped by modulo or by a vocabulary, see `preprocess`):

  header  64 bytes: magic b'DLRMBIN1', uint64 rows, uint32 fields (40),
          uint32 chunk_rows, uint32 chunks, zero padding
  records rows x 40 x int32
  footer  chunks x uint32 CRC32 of each chunk of `chunk_rows` records, then
          the magic b'DLRMEND1'

A file whose size disagrees with its header (truncated, or grown) is rejected
when opened; a chunk whose CRC32 disagrees is rejected when first read. Both
errors name the file, so a damaged file is never read as data.
"""

from __future__ import annotations

import dataclasses
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


class CorruptFileError(ValueError):
  """A binary part file is truncated, damaged or not one."""


def _file_size(rows: int, chunk_rows: int) -> tuple[int, int]:
  chunks = -(-rows // chunk_rows) if rows else 0
  return HEADER_BYTES + rows * NUM_FIELDS * 4 + 4 * chunks + len(END_MAGIC), (
      chunks)


def write_part(path: str, records: np.ndarray,
               chunk_rows: int = CHUNK_ROWS) -> None:
  """Writes int32 records to a part file, atomically.

  The file is written under a temporary name, then renamed.

  Args:
    path: the part file.
    records: `[n, 40]` int32 records.
    chunk_rows: the records per checksummed chunk.

  Raises:
    ValueError: if `records` is not `[n, 40]`.
  """
  records = np.ascontiguousarray(records, dtype='<i4')
  if records.ndim != 2 or records.shape[1] != NUM_FIELDS:
    raise ValueError(f'records must be [n, {NUM_FIELDS}], got {records.shape}.')
  rows = records.shape[0]
  _, chunks = _file_size(rows, chunk_rows)
  crcs = np.array([
      zlib.crc32(records[c * chunk_rows:(c + 1) * chunk_rows].tobytes())
      for c in range(chunks)], '<u4')
  header = _HEADER.pack(MAGIC, rows, NUM_FIELDS, chunk_rows, chunks)
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

  Attributes:
    path: the part file.
    num_rows: its records.
    chunk_rows: the records per checksummed chunk.
    records: the `[num_rows, 40]` int32 records, memory-mapped.

  Raises:
    CorruptFileError: if the file cannot be read, or if its header, size or
      footer is wrong.
  """

  def __init__(self, path: str):
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
    _, rows, fields, chunk_rows, chunks = _HEADER.unpack(
        head[:_HEADER.size])
    want, want_chunks = _file_size(rows, chunk_rows)
    if fields != NUM_FIELDS or chunks != want_chunks or size != want:
      raise CorruptFileError(
          f'{path}: {size} bytes, but its header describes {rows} records'
          f' ({want} bytes); the file is truncated or damaged. Delete it and'
          ' re-run preprocessing, which redoes missing parts.')
    self.num_rows = rows
    self.chunk_rows = chunk_rows
    with open(path, 'rb') as f:
      f.seek(HEADER_BYTES + rows * NUM_FIELDS * 4)
      self._crcs = np.frombuffer(f.read(4 * chunks), '<u4')
      if f.read(len(END_MAGIC)) != END_MAGIC:
        raise CorruptFileError(f'{path}: bad footer; the file is damaged.')
    self.records = np.memmap(path, dtype='<i4', mode='r',
                             offset=HEADER_BYTES,
                             shape=(rows, NUM_FIELDS)) if rows else np.zeros(
                                 (0, NUM_FIELDS), '<i4')
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
  """

  id_scheme: str
  num_buckets: list[int]
  splits: dict[str, list[dict]]
  threshold: int | None = None
  bad_lines: dict | None = None
  sources: dict | None = None
  version: int = 1

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
  {'label': float32 [n], 'int': int64 [n, 13], 'ids': int32 [n, 26]}.

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
    self.parts = [PartFile(os.path.join(directory, p['file']))
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
    out = np.empty((len(idx), NUM_FIELDS), np.int32)
    for p in np.unique(part):
      sel = part == p
      out[sel] = self.parts[p].read(idx[sel] - self._starts[p])
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
