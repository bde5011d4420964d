"""Tests of `dlrm_jax.data.riegeli` against files ArrayRecord itself writes.

The reference for the hash is the one ArrayRecord's writer stores in each
chunk header; the reference for a read is ArrayRecord's own reader.
"""

from __future__ import annotations

import os

from absl.testing import absltest
from array_record.python import array_record_module
import numpy as np

from dlrm_jax.data import riegeli


def _write(path: str, records: list[bytes], options: str = 'uncompressed'):
  writer = array_record_module.ArrayRecordWriter(path,
                                                 f'group_size:1,{options}')
  for record in records:
    writer.write(record)
  writer.close()


def _chunks(path: str, count: int) -> list[np.ndarray]:
  """The first `count` chunks after the signature, walked one by one."""
  data = np.fromfile(path, np.uint8)
  keep = np.ones(len(data), bool)
  keep[np.arange(0, len(data), riegeli.BLOCK)[:, None] +
       np.arange(riegeli.BLOCK_HEADER)] = False  # Drop the block headers.
  stream = data[keep]
  out, pos = [], riegeli.CHUNK_HEADER  # After the signature chunk.
  for _ in range(count):
    size = riegeli.CHUNK_HEADER + int(stream[pos + 8:pos + 16].view('<u8')[0])
    out.append(stream[pos:pos + size])
    pos += size
  return out


class HighwayHashTest(absltest.TestCase):

  def test_matches_the_hashes_array_record_stores(self):
    # Record lengths 0..70: every remainder of the 32-byte packets.
    path = os.path.join(self.create_tempdir().full_path, 'f.array_record')
    rng = np.random.default_rng(0)
    records = [rng.integers(0, 256, n, np.uint8).tobytes() for n in range(71)]
    _write(path, records)
    for chunk in _chunks(path, len(records)):
      header = chunk[:riegeli.CHUNK_HEADER].view('<u8')
      self.assertEqual(riegeli.highway_hash(chunk[None, 8:40])[0], header[0])
      self.assertEqual(
          riegeli.highway_hash(chunk[None, riegeli.CHUNK_HEADER:])[0],
          header[2], msg=f'data of {len(chunk)} bytes')

  def test_rows_hash_independently(self):
    data = np.random.default_rng(1).integers(0, 256, (5, 45), np.uint8)
    both = riegeli.highway_hash(data)
    for i in range(5):
      self.assertEqual(riegeli.highway_hash(data[i:i + 1])[0], both[i])
    self.assertLen(set(both.tolist()), 5)


class DirectShardTest(absltest.TestCase):

  def _file(self, records, options='uncompressed'):
    path = os.path.join(self.create_tempdir().full_path, 'f.array_record')
    _write(path, records, options)
    return path, array_record_module.ArrayRecordReader(path)

  def test_reads_what_array_record_reads(self):
    # Chunks of 40 + 3 + L bytes over 1-2 MB: some straddle a block header,
    # and with L = 53 (chunks of 96 bytes, which divide 65512 - 40) chunk 682
    # begins exactly at a block boundary. The footer spans blocks too.
    rng = np.random.default_rng(2)
    for length in (101, 53):
      records = [rng.integers(0, 256, length, np.uint8).tobytes()
                 for _ in range(12_000)]
      path, reader = self._file(records)
      shard = riegeli.DirectShard.open(path, reader.num_records())
      self.assertEqual((shard.num_direct, shard.record_bytes),
                       (12_000, length))
      rows = np.concatenate([rng.permutation(12_000)[:3000], [681, 682, 683]])
      ok, values = shard.read(rows)
      self.assertTrue(ok.all())
      want = np.frombuffer(b''.join(reader.read(rows.tolist())),
                           np.uint8).reshape(len(rows), length)
      np.testing.assert_array_equal(values, want)

  def test_a_damaged_chunk_is_left_to_array_record(self):
    records = [bytes([i]) * 30 for i in range(200)]
    path, reader = self._file(records)
    with open(path, 'r+b') as f:  # A byte of record 7's value.
      f.seek(riegeli.BLOCK_HEADER + riegeli.CHUNK_HEADER +
             7 * (riegeli.CHUNK_HEADER + 33) + riegeli.CHUNK_HEADER + 10)
      f.write(b'\xff')
    shard = riegeli.DirectShard.open(path, reader.num_records())
    ok, values = shard.read(np.arange(10))
    np.testing.assert_array_equal(ok, np.arange(10) != 7)
    self.assertEqual(values[:, 0].tolist(), [0, 1, 2, 3, 4, 5, 6, 8, 9])

  def test_other_layouts(self):
    # Compressed: not read directly.
    path, reader = self._file([b'x' * 40] * 10, 'snappy')
    self.assertIsNone(riegeli.DirectShard.open(path, reader.num_records()))
    # Lengths that change: the footer is not where the layout puts it.
    path, reader = self._file([b'a' * 20] * 6 + [b'b' * 21] + [b'c' * 20] * 5)
    self.assertIsNone(riegeli.DirectShard.open(path, reader.num_records()))
    # Lengths that change and change back: read directly up to the first
    # record not where computed, except the one of the other length.
    records = [b'a' * 20] * 6 + [b'b' * 21, b'c' * 19] + [b'd' * 20] * 4
    path, reader = self._file(records)
    shard = riegeli.DirectShard.open(path, reader.num_records())
    self.assertEqual(shard.num_direct, 7)
    ok, values = shard.read(np.arange(7))
    np.testing.assert_array_equal(ok, np.arange(7) < 6)
    self.assertEqual(values.tobytes(), b'a' * 120)

if __name__ == '__main__':
  absltest.main()
