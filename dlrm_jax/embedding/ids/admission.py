"""Rare-id admission for streaming sources: a count-min sketch per model.

An id of a feature is admitted once it has been seen at least `min_count`
times in training (this batch included); until then it reads and trains a
shared out-of-vocabulary row (`oov_row`, row 0 by default: the row a
`num_buckets` feature keeps for missing values). Rare ids then share one
well-trained row instead of each memorizing a few examples in a row of its
own, which is what overfits on small data; the idea is TorchRec's
`ZeroCollisionHash` / feature admission and TF's `min_frequency` filters.

Counts live in a count-min sketch (Cormode & Muthukrishnan 2005): `depth`
rows of `width` uint32 counters, each (feature, id) incrementing one counter
per row picked by a hash, its estimate the minimum of them. Its size is fixed
(`depth * width * 4` bytes) whatever the vocabulary, so it works on data too
big to count exactly; it only over-counts (an id may be admitted a little
early, never late), by at most 2n/width with probability 1 - 2^-depth after
n ids. The sketch goes into each checkpoint, so a resumed run admits exactly
as an uninterrupted one.

Runs on the host, in step order, on batches after managed-collision
remapping; with several processes every process counts the ids of the whole
batch (all-gathered), so their sketches stay identical. Features with a
managed-collision remapper are left alone (the remapper admits and evicts).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dlrm_jax import hashing
from dlrm_jax.data import features as features_lib


@dataclasses.dataclass(frozen=True)
class AdmissionSpec:
  """The rare-id filter, from `config.admission`.

  Attributes:
    min_count: ids seen fewer times than this read the shared row. 0 or 1
      turns the filter off.
    oov_row: the shared row of every filtered feature's table.
    depth: the count-min sketch rows, one hash function each.
    width: the counters per sketch row.
    features: the names of the features to filter. Empty means every id
      feature without managed collisions.
  """

  min_count: int = 0
  oov_row: int = 0
  depth: int = 4
  width: int = 1 << 18
  features: tuple[str, ...] = ()


class CountMinSketch:
  """A count-min sketch of uint32 keys, with a seed per row.

  Args:
    depth: the rows, one hash function each.
    width: the counters per row.

  Attributes:
    counts: the `[depth, width]` uint32 counters.
  """

  def __init__(self, depth: int, width: int):
    self.counts = np.zeros((depth, width), np.uint32)

  def _cells(self, keys: np.ndarray, salt: int) -> np.ndarray:
    depth, width = self.counts.shape
    keys = keys.astype(np.uint32)
    rows = np.arange(depth, dtype=np.uint32)[:, None]
    seed = hashing.mix32(rows * np.uint32(0x9E3779B1) +
                         np.uint32(salt & 0xFFFFFFFF))
    h = hashing.mix32(hashing.mix32(keys[None, :] ^ seed) +
                      np.uint32(0x7F4A7C15))
    return (h % np.uint32(width)).astype(np.int64)

  def add(self, keys: np.ndarray, salt: int) -> None:
    """Counts keys, one increment per key and row.

    Args:
      keys: the keys. Repeats count once each.
      salt: a salt of the hashes, such as the feature index.
    """
    cells = self._cells(keys, salt)
    for d in range(self.counts.shape[0]):
      np.add.at(self.counts[d], cells[d], np.uint32(1))

  def estimate(self, keys: np.ndarray, salt: int) -> np.ndarray:
    """Estimates the counts of keys.

    Args:
      keys: the keys.
      salt: the salt that `add` used.

    Returns:
      The uint32 estimates, one per key. They never under-count.
    """
    cells = self._cells(keys, salt)
    rows = np.arange(self.counts.shape[0])[:, None]
    return self.counts[rows, cells].min(axis=0)


class IdAdmission:
  """Maps ids seen fewer than `spec.min_count` times to `spec.oov_row`.

  Args:
    spec: the filter.
    transform: the feature transform of the batches.
    process_index: this process.
    process_count: the processes of the run. Each counts every process's ids.

  Attributes:
    spec: the filter.
    process_index: this process.
    process_count: the processes of the run.
    sketch: the `CountMinSketch` of the counts.
    columns: `(feature index, first id column, columns)` of each filtered
      feature.

  Raises:
    ValueError: if `spec.features` names an unknown feature, or if
      `spec.oov_row` is outside a filtered feature's rows.
  """

  def __init__(self, spec: AdmissionSpec,
               transform: features_lib.FeatureTransform, *,
               process_index: int = 0, process_count: int = 1):
    self.spec = spec
    self.process_index, self.process_count = process_index, process_count
    self.sketch = CountMinSketch(spec.depth, spec.width)
    names = [f.name for f in transform.sparse]
    unknown = sorted(set(spec.features) - set(names))
    if unknown:
      raise ValueError(
          f'AdmissionSpec.features names {unknown}, which are not sparse'
          f' features (features: {names}).')
    # (feature index, first id column, columns) of each filtered feature.
    self.columns: list[tuple[int, int, int]] = []
    for k, (f, off, width) in enumerate(zip(
        transform.sparse, transform.id_offsets, transform.id_widths)):
      if spec.features and f.name not in spec.features:
        continue
      if getattr(f, 'managed_collision', None):
        continue
      if spec.oov_row >= f.num_rows:
        raise ValueError(
            f'AdmissionSpec.oov_row ({spec.oov_row}) is outside the'
            f' {f.num_rows} rows of feature {f.name!r}.')
      self.columns.append((k, off, width))

  def _global(self, x: np.ndarray) -> np.ndarray:
    if self.process_count == 1:
      return x
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def _map(self, batch: dict[str, Any], count: bool) -> dict[str, Any]:
    ids = np.array(batch['ids'], copy=True)
    for k, off, width in self.columns:
      cols = ids[:, off:off + width]
      if count:
        seen = self._global(cols).reshape(-1)
        self.sketch.add(seen[seen >= 0], k)
      valid = cols >= 0
      est = self.sketch.estimate(cols.reshape(-1), k).reshape(cols.shape)
      rare = valid & (est < self.spec.min_count)
      ids[:, off:off + width] = np.where(rare, self.spec.oov_row, cols)
    return dict(batch, ids=ids)

  def train(self, batch: dict[str, Any]) -> dict[str, Any]:
    """Counts a training batch's ids, then maps the rare ones.

    Args:
      batch: a host batch with `[B, T]` 'ids'.

    Returns:
      A copy of the batch with the rare ids set to `oov_row`.
    """
    return self._map(batch, count=True)

  def eval(self, batch: dict[str, Any]) -> dict[str, Any]:
    """Maps an eval or serving batch's rare ids without counting them.

    Args:
      batch: a host batch with `[B, T]` 'ids'.

    Returns:
      A copy of the batch with the rare ids set to `oov_row`.
    """
    return self._map(batch, count=False)

  def admitted_rows(self, transform: features_lib.FeatureTransform,
                    chunk: int = 1 << 20) -> dict[str, np.ndarray]:
    """Which rows of each filtered feature's table are admitted.

    An id is admitted by its count alone. So for serving the filter is a
    fixed mask over the table's rows. The export applies it as `row if
    mask[row] else oov_row`, and scores exactly as `eval` maps.

    Args:
      transform: the feature transform the filter was built with.
      chunk: the rows estimated at a time. It bounds the memory of big
        tables.

    Returns:
      Feature name -> bool `[num_rows]`.
    """
    out = {}
    for k, _, _ in self.columns:
      f = transform.sparse[k]
      mask = np.zeros(f.num_rows, bool)
      for lo in range(0, f.num_rows, chunk):
        rows = np.arange(lo, min(lo + chunk, f.num_rows), dtype=np.int64)
        mask[lo:lo + len(rows)] = self.sketch.estimate(
            rows, k) >= self.spec.min_count
      out[f.name] = mask
    return out

  def state_dict(self) -> dict[str, np.ndarray]:
    """The arrays to checkpoint: {'counts': the sketch's counters}."""
    return {'counts': self.sketch.counts}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Sets the sketch from `state_dict`'s arrays.

    Args:
      state: the arrays, with 'counts'.

    Raises:
      ValueError: if the sketch in `state` has another size.
    """
    counts = np.asarray(state['counts'])
    if counts.shape != self.sketch.counts.shape:
      raise ValueError(
          f'the checkpoint\'s admission sketch is {counts.shape[0]} x'
          f' {counts.shape[1]}, config.admission asks for'
          f' {self.spec.depth} x {self.spec.width}.')
    self.sketch.counts = counts.astype(np.uint32)


def build(spec: AdmissionSpec, transform: features_lib.FeatureTransform, *,
          process_index: int = 0, process_count: int = 1
          ) -> IdAdmission | None:
  """Builds the admission filter of `config.admission`.

  Args:
    spec: the filter.
    transform: the feature transform of the batches.
    process_index: this process.
    process_count: the processes of the run.

  Returns:
    The `IdAdmission`, or None when `spec.min_count` is at most 1.
  """
  if spec.min_count <= 1:
    return None
  return IdAdmission(spec, transform, process_index=process_index,
                     process_count=process_count)

