"""Direct, vectorised reads of ArrayRecord shards of fixed-size records.

An ArrayRecord file is a Riegeli records file (riegeli/records/README):
64 KiB blocks, each starting with a 24-byte block header, over a stream of
chunks. A chunk is a 40-byte header (header hash, data size, data hash,
chunk type and record count, decoded size: little-endian 64-bit fields)
then its data. The file starts with a signature chunk of no data. Written
uncompressed with one record per chunk (`group_size:1,uncompressed`), as
`tfds_criteo` writes by default, the data of a record of L bytes is
`00 <varint len(varint(L))> <varint L> <record>`. When every record has the
same length, every chunk has the same size C and record i's chunk starts at
`40 + i * C` bytes of the stream without block headers.

`DirectShard` maps such a file and reads a batch of records with one numpy
gather. At open it reads ArrayRecord's footer, the chunk after the last
record's (its header hash checked; ArrayRecord's reader, opened first, has
checked its data): one small record per record chunk whose first field is
the chunk's file offset (a chunk that begins at a block boundary begins
before that block's header). Records are read here only up to the first
whose offset is not the computed one; a file whose records vary in length
has its footer elsewhere and is not read here at all. Each batch's chunks
are then checked against their headers and their data hash, HighwayHash-64
with Riegeli's key, computed here with numpy for all chunks of the batch at
once. Chunks that fail a check are left to the caller (ArrayRecord's own
reader, which raises its error for a corrupt one).
"""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np
from numpy.lib import stride_tricks

BLOCK = 1 << 16
BLOCK_HEADER = 24
CHUNK_HEADER = 40
_USABLE = BLOCK - BLOCK_HEADER
_SIMPLE_ONE_RECORD = 1 << 8 | ord('r')  # Simple chunk of 1 record.
_SIGNATURE = ord('s')  # The file signature chunk's type, 0 records.

# HighwayHash-64 (github.com/google/highwayhash, its portable C version) with
# riegeli/chunk_encoding/hash.cc's key. The state is row-major, uint64
# [n, 4] per vector, so that a lane pair's 16 bytes are adjacent.
_U = np.uint64
_M32 = _U(0xffffffff)
_S32 = _U(32)
_KEY = np.array([0x2f696c6567656952, 0x0a7364726f636572] * 2, np.uint64)
_MUL0 = np.array([0xdbe6d5d5fe4cce2f, 0xa4093822299f31d0,
                  0x13198a2e03707344, 0x243f6a8885a308d3], np.uint64)
_MUL1 = np.array([0x3bd39e10cb0ef593, 0xc0acf169b5f18a8c,
                  0xbe5466cf34e90c6c, 0x452821e638d01377], np.uint64)
# ZipperMerge as a byte permutation of a lane pair (lo bytes 0-7, hi 8-15):
# the new lo is lo3 hi4 lo2 lo5 hi6 lo1 hi7 lo0, the new hi is hi3 lo4 hi2
# hi5 hi1 lo6 hi0 lo7. Then the same for the second pair.
_ZIPPER = np.array([3, 12, 2, 5, 14, 1, 15, 0, 11, 4, 10, 13, 9, 6, 8, 7])
_ZIPPER = np.concatenate([_ZIPPER, _ZIPPER + 16])
_HASH_ROWS = 8192  # Rows hashed at a time (bounds the temporaries).
_SCRATCH = threading.local()


def _update(state, packet) -> None:
  """One HighwayHash packet update, in place.

  Args:
    state: v0, v1, mul0, mul1, each uint64 [n, 4], then three [n, 4] scratch
      arrays.
    packet: uint64 [n, 4], the packet's lanes.
  """
  v0, v1, mul0, mul1, a, b, zipped = state
  v1 += mul0
  v1 += packet
  np.bitwise_and(v1, _M32, out=a)
  np.right_shift(v0, _S32, out=b)
  a *= b
  mul0 ^= a
  v0 += mul1
  np.bitwise_and(v0, _M32, out=a)
  np.right_shift(v1, _S32, out=b)
  a *= b
  mul1 ^= a
  np.take(v1.view(np.uint8), _ZIPPER, axis=1, out=zipped.view(np.uint8))
  v0 += zipped
  np.take(v0.view(np.uint8), _ZIPPER, axis=1, out=zipped.view(np.uint8))
  v1 += zipped


def _rotate32(lanes: np.ndarray, count: int) -> np.ndarray:
  """Rotates both 32-bit halves of each lane left by `count` (1..31)."""
  def rot(half):
    return ((half << _U(count)) | (half >> _U(32 - count))) & _M32
  return rot(lanes & _M32) | (rot(lanes >> _S32) << _S32)


def _scratch(key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
  """A per-thread buffer of `shape`, reused from call to call.

  Fresh arrays of megabytes come from mmap and cost a page fault per 4 KiB
  at first touch (a third of a batch's read, measured); these are kept.
  Contents are left from the last use.
  """
  cache = _SCRATCH.__dict__
  size = int(np.prod(shape)) * np.dtype(dtype).itemsize
  buf = cache.get(key)
  if buf is None or len(buf) < size:
    buf = cache[key] = np.empty(size, np.uint8)
  return buf[:size].view(dtype).reshape(shape)


def _packets(data: np.ndarray) -> np.ndarray:
  """The hash's 32-byte packets of each row, the remainder's last: [n, P, 4]."""
  n, size = data.shape
  full, r = divmod(size, 32)
  packets = _scratch('packets', (n, full + (r > 0), 32), np.uint8)
  packets[:, :full] = data[:, :full * 32].reshape(n, full, 32)
  if r:
    body, mod4 = r & ~3, r & 3
    rest, last = data[:, full * 32:], packets[:, full]
    last[:] = 0
    last[:, :body] = rest[:, :body]
    if r & 16:
      last[:, 28:32] = rest[:, body + mod4 - 4:body + mod4]
    elif mod4:
      last[:, 16] = rest[:, body]
      last[:, 17] = rest[:, body + (mod4 >> 1)]
      last[:, 18] = rest[:, body + mod4 - 1]
  return packets.view('<u8')


def highway_hash(data: np.ndarray) -> np.ndarray:
  """Riegeli's HighwayHash-64 of each row.

  Args:
    data: uint8 [n, size], one message per row, all of one size.

  Returns:
    uint64 [n], the hash of each row.
  """
  data = np.asarray(data, np.uint8)
  n, size = data.shape
  out = np.empty(n, np.uint64)
  r = size % 32
  start = (_MUL0 ^ _KEY, _MUL1 ^ ((_KEY >> _S32) | (_KEY << _S32)), _MUL0,
           _MUL1)
  with np.errstate(over='ignore'):
    for lo in range(0, n, _HASH_ROWS):
      packets = _packets(data[lo:lo + _HASH_ROWS])
      m = len(packets)
      state = list(_scratch('state', (7, m, 4), np.uint64))
      for vector, value in zip(state, start):
        vector[:] = value
      for p in range(size // 32):
        _update(state, packets[:, p])
      if r:
        state[0] += _U((r << 32) + r)
        state[1][:] = _rotate32(state[1], r)
        _update(state, packets[:, -1])
      for _ in range(4):
        v0 = state[0][:, [2, 3, 0, 1]]
        _update(state, (v0 >> _S32) | (v0 << _S32))
      out[lo:lo + m] = sum(v[:, 0] for v in state[:4])
  return out


def varint(value: int) -> bytes:
  """Protobuf/Riegeli varint of an int64. Negatives: their 64-bit complement."""
  value &= (1 << 64) - 1
  out = bytearray()
  while value >= 0x80:
    out.append(value & 0x7f | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _physical(stream: np.ndarray) -> np.ndarray:
  """File offsets of stream offsets (the stream skips the block headers)."""
  return stream // _USABLE * BLOCK + BLOCK_HEADER + stream % _USABLE


def _varints_at(buf: np.ndarray, starts: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray] | None:
  """The varints that begin at `starts` in `buf`, and where each ends.

  Returns:
    `(values, ends)`, uint64 and int64 [len(starts)], or None when one runs
    past the buffer or past 10 bytes.
  """
  padded = np.concatenate([buf, np.zeros(10, np.uint8)])  # Zero ends one.
  byte = padded[starts]
  values = (byte & 0x7f).astype(np.uint64)
  ends = starts + 1
  rest = np.flatnonzero(byte >= 0x80)  # The varints still going.
  for j in range(1, 10):
    if not rest.size:
      break
    byte = padded[starts[rest] + j]
    values[rest] |= (byte & 0x7f).astype(np.uint64) << _U(7 * j)
    ends[rest] += 1
    rest = rest[byte >= 0x80]
  if rest.size or (ends > len(buf)).any():
    return None
  return values, ends


class DirectShard:
  """Reads the records of one shard with numpy, as the module docstring says.

  Attributes:
    path: the file.
    record_bytes: L, the bytes of every record.
    num_direct: the records, from the first, whose chunks were found at
      their computed positions. Others are not read here.
  """

  def __init__(self, path: str, data: np.ndarray, record_bytes: int):
    self.path = path
    self.record_bytes = record_bytes
    self._data = data
    self._prefix = np.frombuffer(
        b'\0' + varint(len(varint(record_bytes))) + varint(record_bytes),
        np.uint8)
    self._data_size = len(self._prefix) + record_bytes
    self._chunk = CHUNK_HEADER + self._data_size
    self._window = stride_tricks.sliding_window_view(data, self._chunk)
    self.num_direct = 0

  @classmethod
  def open(cls, path: str, num_records: int) -> DirectShard | None:
    """Maps a shard, or returns None when it is not of the layout.

    Args:
      path: the ArrayRecord file.
      num_records: its records, as ArrayRecord's reader counts them.

    Returns:
      The shard, or None when its first record chunk is not an uncompressed
      one-record chunk (a compressed file, say) or its footer is not where
      the layout puts it.
    """
    if num_records < 1:
      return None
    with open(path, 'rb') as f:
      size = os.fstat(f.fileno()).st_size
      if size < BLOCK_HEADER + 2 * CHUNK_HEADER + 1:
        return None
      mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mapped, np.uint8)
    first = BLOCK_HEADER + CHUNK_HEADER  # After the signature chunk.
    sig = data[BLOCK_HEADER:first].view('<u8')
    head = data[first:first + CHUNK_HEADER].view('<u8')
    if (sig[1] != 0 or sig[3] != _SIGNATURE or
        head[3] != _SIMPLE_ONE_RECORD or data[first + CHUNK_HEADER] != 0 or
        not 0 < head[4] < size):
      return None
    shard = cls(path, data, int(head[4]))
    if head[1] != shard._data_size or shard._chunk > size:
      return None
    offsets = shard._footer_offsets(num_records)
    if offsets is None:
      return None
    stream = shard._stream(np.arange(num_records))
    # A chunk that begins at a block boundary begins before its header.
    computed = _physical(stream) - BLOCK_HEADER * (stream % _USABLE == 0)
    wrong = np.flatnonzero(offsets != computed)
    shard.num_direct = int(wrong[0]) if wrong.size else num_records
    return shard

  def _headers(self, stream: np.ndarray) -> np.ndarray:
    """uint64 [n, 5], the header fields of the chunks at `stream` offsets."""
    return self._bytes(stream, CHUNK_HEADER).view('<u8')

  def _bytes(self, stream: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, size], the bytes from each stream offset; 0 past the end."""
    where = _physical(stream[:, None] + np.arange(size))
    inside = where < len(self._data)
    got = np.zeros(where.shape, np.uint8)
    got[inside] = self._data[where[inside]]
    return got

  def _footer_offsets(self, num_records: int) -> np.ndarray | None:
    """The chunk offsets of ArrayRecord's footer, if it is where computed.

    The footer is a simple chunk, uncompressed as the records are, of
    `num_records + 1` records: the writer's options, then one
    `ArrayRecordFooter` proto per record chunk, its field 1 the offset.
    """
    at = self._stream(np.array([num_records]))
    head = self._bytes(at, CHUNK_HEADER)
    fields = head.view('<u8')[0]
    if (highway_hash(head[:, 8:])[0] != fields[0] or
        fields[3] != (num_records + 1) << 8 | ord('r') or
        not 1 < fields[1] < len(self._data)):
      return None
    # The footer's data, without the block headers inside it.
    begin = int(_physical(at + CHUNK_HEADER)[0])
    end = int(_physical(at + CHUNK_HEADER + int(fields[1]) - 1)[0]) + 1
    if end > len(self._data):
      return None
    cuts = [begin] + list(range(begin // BLOCK * BLOCK + BLOCK, end, BLOCK))
    body = np.concatenate([
        self._data[max(c, c // BLOCK * BLOCK + BLOCK_HEADER):
                   min(end, c // BLOCK * BLOCK + BLOCK)] for c in cuts])
    if body[0] != 0:  # Compressed.
      return None
    got = _varints_at(body, np.array([1]))  # The sizes' byte count.
    if got is None:
      return None
    sizes_begin = int(got[1][0])
    sizes_end = sizes_begin + int(got[0][0])
    # The sizes: back-to-back varints, one per record.
    last = np.flatnonzero(body[sizes_begin:sizes_end] < 0x80)
    if len(last) != num_records + 1 or sizes_end > len(body) or (
        last[-1] != sizes_end - sizes_begin - 1):
      return None
    got = _varints_at(body, sizes_begin + np.concatenate([[0], last[:-1] + 1]))
    if got is None:
      return None
    sizes = got[0].astype(np.int64)
    starts = sizes_end + np.cumsum(sizes)[:-1]
    if starts[-1] + sizes[-1] != len(body) or not (
        body[starts] == 0x08).all():  # Field 1, a varint.
      return None
    got = _varints_at(body, starts + 1)
    return None if got is None else got[0]

  def _header_ok(self, head: np.ndarray) -> np.ndarray:
    return ((head[:, 1] == self._data_size) &
            (head[:, 3] == _SIMPLE_ONE_RECORD) &
            (head[:, 4] == self.record_bytes))

  def _stream(self, records: np.ndarray) -> np.ndarray:
    return CHUNK_HEADER + records.astype(np.int64) * self._chunk

  def read(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reads records of the shard that pass every check.

    Args:
      records: int [n], record numbers in the shard, below `num_direct`.

    Returns:
      `(ok, values)`: bool [n], whether each record was read here, and uint8
      [ok.sum(), record_bytes], the records read, in order.
    """
    stream = self._stream(records)
    # One window copy per chunk, then the chunks that straddle a block
    # header (about C / 64 KiB of them) gathered byte by byte.
    start = np.minimum(_physical(stream), len(self._data) - self._chunk)
    chunks = self._window[start]
    across = np.flatnonzero(stream % _USABLE + self._chunk > _USABLE)
    if across.size:
      chunks[across] = self._data[_physical(
          stream[across, None] + np.arange(self._chunk))]
    head = chunks[:, :CHUNK_HEADER].copy().view('<u8')
    body = chunks[:, CHUNK_HEADER:]
    good = self._header_ok(head) & (
        body[:, :len(self._prefix)] == self._prefix).all(axis=1)
    good &= highway_hash(body) == head[:, 2]
    return good, body[good, len(self._prefix):]
