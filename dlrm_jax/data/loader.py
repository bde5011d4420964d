"""grain input pipeline over random-access sources: binary, TFDS, synthetic.

The grain dataset's elements are whole training batches. Element k is global
batch k, of epoch `k // batches_per_epoch`. Its rows are positions
`[j*B, (j+1)*B)` of the epoch's order. That order is a seeded pseudo-random
permutation of all rows: a global shuffle that stores nothing, by a Feistel
network over the row numbers, re-keyed every epoch. Each process reads only
its own slice of each batch, as `ShardByJaxProcess` does. Over an epoch the
processes cover every row exactly once. Each batch takes one vectorized read,
not one per record. grain prefetches batches in background threads. Its
iterator state, the next batch index, goes into the orbax checkpoint. So a
resumed run sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Protocol

import grain
import numpy as np

from dlrm_jax import hashing
from dlrm_jax.data import multi_hot as multi_hot_lib


class RowSource(Protocol):
  """Random access to the rows of a data set.

  Attributes:
    num_rows: the rows of the data set.
    description: a line naming the source, for logs and errors.
  """

  num_rows: int
  description: str

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Reads rows by index.

    Args:
      indices: the row indices.

    Returns:
      A raw batch of those rows, in that order. See `dlrm_jax.data.features`.
    """


class FeistelPermutation:
  """A seeded bijection of `[0, n)`, evaluated on arrays of positions.

  A 4-round balanced Feistel network on the smallest even number of bits
  covering n, with cycle walking to stay below n. Nothing of size n is stored.

  Call it on an array of positions to get their images.

  Args:
    n: the size of the domain.
    seed: the seed of the round keys.
    rounds: the Feistel rounds.

  Attributes:
    n: the size of the domain.
    half: the bits of each half.
    mask: the mask of one half.
    keys: the round keys.

  Raises:
    ValueError: if n <= 0.
  """

  def __init__(self, n: int, seed: int, rounds: int = 4):
    if n <= 0:
      raise ValueError(f'cannot permute {n} rows.')
    self.n = n
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    self.half = np.uint64(half)
    self.mask = np.uint64((1 << half) - 1)
    rng = np.random.default_rng([seed, n, 0x5EED])
    self.keys = [np.uint64(k) for k in rng.integers(0, 2**63, rounds)]

  def _once(self, x: np.ndarray) -> np.ndarray:
    left, right = x >> self.half, x & self.mask
    for k in self.keys:
      left, right = right, left ^ hashing.splitmix64(right, k, self.mask)
    return (left << self.half) | right

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    x = self._once(np.asarray(positions, np.uint64))
    bad = x >= self.n
    while bad.any():  # cycle walking: expected < 4 rounds
      x[bad] = self._once(x[bad])
      bad = x >= self.n
    return x.astype(np.int64)


class _Batches:
  """grain random-access source of this process's slices of the batches.

  Element k is this process's slice of global batch k.
  """

  def __init__(self, source: RowSource, make_batch, batch_size: int,
               num_batches: int, seed: int, shuffle: bool, process_index: int,
               process_count: int):
    self.source = source
    self.make_batch = make_batch
    self.batch_size = batch_size
    self.batches_per_epoch = source.num_rows // batch_size
    self.num_batches = num_batches
    self.seed = seed
    self.shuffle = shuffle
    per = batch_size // process_count
    self.lo, self.hi = process_index * per, (process_index + 1) * per
    self._perms: dict[int, FeistelPermutation] = {}

  def __len__(self) -> int:
    return self.num_batches

  def rows_of(self, k: int) -> np.ndarray:
    """Row numbers this process reads for global batch k."""
    epoch, j = divmod(int(k), self.batches_per_epoch)
    positions = np.arange(j * self.batch_size + self.lo,
                          j * self.batch_size + self.hi, dtype=np.int64)
    if not self.shuffle:
      return positions
    perm = self._perms.get(epoch)
    if perm is None:
      perm = FeistelPermutation(self.source.num_rows, self.seed * 1_000_003
                                + epoch)
      self._perms = {epoch: perm}
    return perm(positions)

  def __getitem__(self, k: int) -> dict[str, np.ndarray]:
    return self.make_batch(self.source.read(self.rows_of(k)))


@dataclasses.dataclass
class GrainTrainData:
  """Training batches from a random-access source through grain.

  Attributes:
    source: the rows.
    make_batch: maps a raw batch to a model batch.
    batch_size: the global batch size.
    num_batches: the batches of the dataset, over all epochs.
    seed: the seed of the shuffle.
    shuffle: whether to shuffle the rows of each epoch.
    process_index: this process.
    process_count: the processes of the run.
    num_threads: grain's read threads.
    prefetch: grain's prefetch buffer, in batches.
    batches_per_epoch: the full batches in an epoch. The rest is dropped.
    elements: the grain source of this process's batches.

  Raises:
    ValueError: if the batch does not divide over the processes, or if the
      source has fewer rows than one batch.
  """

  source: RowSource
  make_batch: Any
  batch_size: int
  num_batches: int
  seed: int = 0
  shuffle: bool = True
  process_index: int = 0
  process_count: int = 1
  num_threads: int = 2
  prefetch: int = 4

  def __post_init__(self):
    if self.batch_size % self.process_count:
      raise ValueError(
          f'config.batch_size ({self.batch_size}) must divide evenly over'
          f' {self.process_count} processes.')
    self.batches_per_epoch = self.source.num_rows // self.batch_size
    if self.batches_per_epoch == 0:
      raise ValueError(
          f'the training data ({self.source.description}) has fewer rows than'
          f' one batch (config.batch_size={self.batch_size}).')
    self.elements = _Batches(
        self.source, self.make_batch, self.batch_size, self.num_batches,
        self.seed, self.shuffle, self.process_index, self.process_count)

  def iterator(self) -> grain.DatasetIterator:
    """Starts a grain iterator at batch 0. Restore its state to resume.

    Returns:
      The grain iterator.
    """
    ds = grain.MapDataset.source(self.elements)
    read = grain.ReadOptions(num_threads=self.num_threads,
                             prefetch_buffer_size=self.prefetch)
    return iter(ds.to_iter_dataset(read))


# ----------------------------------------------------------------------------
# Multi-hot data (MLPerf DLRM-DCNv2's synthetic multi-hot scheme).

# MLPerf DLRM-DCNv2's bag sizes of the 26 categorical features
# (mlcommons/training recommendation_v2/torchrec_dlrm README, --multi_hot_sizes).
MLPERF_HOTNESS = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12,
                  100, 27, 10, 3, 1, 1)
DISTRIBUTIONS = ('uniform', 'pareto')


@dataclasses.dataclass(frozen=True)
class MultiHot:
  """Turns single-hot ids into bags, deterministically.

  The scheme is MLPerf DLRM-DCNv2's. The formulas are in
  `dlrm_jax.data.multi_hot`.

  Attributes:
    hotness: the bag size of each sparse feature.
    num_rows: the table size of each sparse feature.
    distribution: one of DISTRIBUTIONS.
    seed: the key of the hash.

  Raises:
    ValueError: if hotness and num_rows differ in length, a hotness is below
      1, or the distribution is unknown.
  """

  hotness: tuple[int, ...]
  num_rows: tuple[int, ...]
  distribution: str = 'uniform'
  seed: int = 0

  def __post_init__(self):
    if len(self.hotness) != len(self.num_rows):
      raise ValueError(
          f'config.data.multi_hot.hotness has {len(self.hotness)} values but'
          f' the sparse group has {len(self.num_rows)} features.')
    if min(self.hotness) < 1:
      raise ValueError(
          f'config.data.multi_hot.hotness ({list(self.hotness)}) must be >= 1.')
    if self.distribution not in DISTRIBUTIONS:
      raise ValueError(
          f'config.data.multi_hot.distribution ({self.distribution!r}) must be'
          f' one of {list(DISTRIBUTIONS)}.')

  def expand(self, ids: np.ndarray) -> np.ndarray:
    """Expands single-hot ids into their bags, by `multi_hot.bags`.

    Args:
      ids: `[B, T]` packed ids. Each bag holds one id or -1, then -1 padding.

    Returns:
      `[B, T]` bags, of the dtype of `ids`.
    """
    out = ids.copy()
    start = 0
    for k, h in enumerate(self.hotness):
      if h > 1:
        bags = multi_hot_lib.bags(ids[:, start], self, k, np)
        out[:, start + 1:start + h] = bags[:, 1:]
      start += h
    return out
