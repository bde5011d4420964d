"""Managed-collision remapping of model batches, in step order.

A feature with `managed_collision` set reaches the trainer with raw values
(`batch['mc_raw'][name]`, `[B, 1]` int64, -1 missing) and placeholder ids.
`BatchRemapper.train` maps them with one `ManagedCollisionRemapper` per
feature. It writes the rows into `batch['ids']`, and the rows given to new
values into `batch['reset']` (`[B, T]`, laid out like the ids, -1 elsewhere).
The train step resets those rows before the lookup: embedding zeroed,
optimizer state back to its start. Remapping runs in the training loop, batch
after batch, because the remappers keep state. That state goes into the
checkpoint, so a resumed run maps ids exactly as an uninterrupted one.

With several processes every process sees only its rows of a batch. The raw
values of the whole batch are gathered first, so that every process runs the
same remapping and keeps its own rows.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dlrm_jax.data import features as features_lib
from dlrm_jax.embedding.ids.managed_collision import ManagedCollisionRemapper


class BatchRemapper:
  """The remappers of a model's managed-collision features.

  Args:
    transform: the feature transform of the batches.
    process_index: this process.
    process_count: the processes of the run.

  Attributes:
    transform: the feature transform.
    process_index: this process.
    process_count: the processes of the run.
    remappers: the `ManagedCollisionRemapper` of each managed-collision
      feature, by name.
  """

  def __init__(self, transform: features_lib.FeatureTransform, *,
               process_index: int = 0, process_count: int = 1):
    self.transform = transform
    self.process_index = process_index
    self.process_count = process_count
    self.remappers: dict[str, ManagedCollisionRemapper] = {}
    self._columns: dict[str, int] = {}
    for f, off in zip(transform.sparse, transform.id_offsets):
      if isinstance(f, features_lib.IdFeature) and f.managed_collision:
        self.remappers[f.name] = ManagedCollisionRemapper(
            f.num_rows, f.managed_collision, name=f.name)
        self._columns[f.name] = off

  def __bool__(self) -> bool:
    """Whether there is any managed-collision feature."""
    return bool(self.remappers)

  def _global(self, raw: np.ndarray) -> np.ndarray:
    if self.process_count == 1:
      return raw
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(raw, tiled=True))

  def _local(self, rows: np.ndarray) -> np.ndarray:
    if self.process_count == 1:
      return rows
    per = rows.shape[0] // self.process_count
    return rows[self.process_index * per:(self.process_index + 1) * per]

  def train(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
    """Maps a training batch's raw values and updates the remappers.

    Args:
      batch: a host batch with 'ids' and 'mc_raw'.
      step: the 0-based training step.

    Returns:
      A new batch without 'mc_raw'. Its 'ids' hold the mapped rows. Its
      `[B, T]` int32 'reset' holds the rows given to new values, -1
      elsewhere. Without remappers, `batch` itself.
    """
    if not self.remappers:
      return batch
    batch = dict(batch)
    raw_all = batch.pop('mc_raw')
    ids = batch['ids'].copy()
    reset = np.full(ids.shape, -1, np.int32)
    for name, remapper in self.remappers.items():
      col = self._columns[name]
      raw = self._global(raw_all[name])
      rows, fresh = remapper.remap(raw, step)
      ids[:, col] = self._local(rows)[:, 0]
      # The rows to reset, once each over the whole batch. There are at most
      # as many as new values, so at most one per example. Each process
      # takes its share of them.
      column = np.full(raw.shape[0], -1, np.int32)
      column[:len(fresh)] = fresh
      reset[:, col] = self._local(column)
    batch['ids'] = ids
    batch['reset'] = reset
    return batch

  def eval(self, batch: dict[str, Any]) -> dict[str, Any]:
    """Maps an eval or serving batch without changing any state.

    Unknown values read the missing row.

    Args:
      batch: a host batch with 'ids' and 'mc_raw'.

    Returns:
      A new batch without 'mc_raw', its 'ids' holding the mapped rows.
      Without remappers, `batch` itself.
    """
    if not self.remappers:
      return batch
    batch = dict(batch)
    raw_all = batch.pop('mc_raw')
    ids = batch['ids'].copy()
    for name, remapper in self.remappers.items():
      ids[:, self._columns[name]] = remapper.lookup(raw_all[name])[:, 0]
    batch['ids'] = ids
    return batch

  def state_dict(self) -> dict[str, dict[str, np.ndarray]]:
    """The arrays to checkpoint: each remapper's state, by feature name."""
    return {name: r.state_dict() for name, r in self.remappers.items()}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Sets every remapper from `state_dict`'s arrays.

    Args:
      state: each remapper's arrays, by feature name.

    Raises:
      ValueError: if `state` lacks a remapper of this model, or if a
        remapper rejects its arrays.
    """
    missing = set(self.remappers) - set(state)
    if missing:
      raise ValueError(
          f'the checkpoint has no managed-collision state for {sorted(missing)}.')
    for name, r in self.remappers.items():
      r.load_state_dict({k: np.asarray(v) for k, v in state[name].items()})

  @property
  def feature_names(self) -> Sequence[str]:
    """The names of the managed-collision features."""
    return tuple(self.remappers)
