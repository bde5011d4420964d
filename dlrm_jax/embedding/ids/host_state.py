"""A run's host-side id state: managed-collision remappers and admission.

Both map raw ids to table rows on the host, in step order, and change as
training sees ids. Both are saved with every checkpoint, as its 'remappers'
item (`Checkpointer.restore_host_state`), and restored with it. So a resumed
run, an evaluation and an export map ids exactly as training did.
`HostState.of(spec)` builds the empty state of a run. `train` maps a training
batch and learns from it. `eval` maps an eval or serving batch and learns
nothing. `export_id_tables` and `admitted_rows` give what the export needs to
map ids the same way inside its function.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dlrm_jax.embedding.ids import admission as admission_lib
from dlrm_jax.embedding.ids import remapping


class HostState:
  """A run's host-side id state.

  Args:
    remapper: the managed-collision remappers.
    admission: the rare-id admission filter, or None.

  Attributes:
    remapper: the managed-collision remappers. It is empty without such
      features.
    admission: the rare-id admission filter, None without config.admission.
  """

  _ADMISSION_KEY = '_id_admission'

  def __init__(self, remapper: remapping.BatchRemapper,
               admission: admission_lib.IdAdmission | None):
    self.remapper = remapper
    self.admission = admission

  @classmethod
  def of(cls, spec, *, process_index: int = 0,
         process_count: int = 1) -> 'HostState':
    """The empty state of a run.

    Args:
      spec: the run's RunSpec. Its feature transform and `admission` are
        used.
      process_index: this process.
      process_count: the processes of the run. The state sees every
        process's ids.

    Returns:
      Empty remappers and, with rare-id admission, an empty sketch.
    """
    kw = dict(process_index=process_index, process_count=process_count)
    return cls(remapping.BatchRemapper(spec.transform, **kw),
               admission_lib.build(spec.admission, spec.transform, **kw))

  def __bool__(self) -> bool:
    """Whether there is any host-side id state."""
    return bool(self.remapper) or self.admission is not None

  def train(self, host_batch: dict[str, Any], step: int) -> dict[str, Any]:
    """Maps a training batch and updates the state. Call it in step order.

    Args:
      host_batch: a host batch.
      step: the 0-based training step.

    Returns:
      The mapped batch.
    """
    if self.remapper:
      host_batch = self.remapper.train(host_batch, step)
    if self.admission is not None:  # counts ids
      host_batch = self.admission.train(host_batch)
    return host_batch

  def eval(self, host_batch: dict[str, Any]) -> dict[str, Any]:
    """Maps an eval or serving batch without changing the state.

    Args:
      host_batch: a host batch.

    Returns:
      The mapped batch.
    """
    if 'mc_raw' in host_batch:
      host_batch = self.remapper.eval(host_batch)
    if self.admission is not None:
      host_batch = self.admission.eval(host_batch)
    return host_batch

  def state_dict(self) -> dict[str, Any] | None:
    """The arrays to checkpoint, or None when there is no state."""
    out = self.remapper.state_dict() if self.remapper else {}
    if self.admission is not None:
      out[self._ADMISSION_KEY] = self.admission.state_dict()
    return out or None

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Sets the state from `state_dict`'s arrays.

    Args:
      state: the arrays.

    Raises:
      ValueError: if the arrays are of another config. That is a missing
        admission sketch, other remappers or another sketch size.
    """
    if self.remapper:
      self.remapper.load_state_dict(
          {k: v for k, v in state.items() if k != self._ADMISSION_KEY})
    if self.admission is not None:
      if self._ADMISSION_KEY not in state:
        raise ValueError(
            'the checkpoint holds no rare-id admission sketch; it was written'
            ' without config.admission.min_count.')
      self.admission.load_state_dict(state[self._ADMISSION_KEY])

  def export_id_tables(self) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """The managed-collision features' raw id -> row tables, for the export.

    Returns:
      Per feature name, a triple. It holds the sorted raw ids as uint32,
      their rows as int32, and 0, the row of ids not in the table.

    Raises:
      ValueError: if a feature holds raw ids outside 32 bits. The export's
        inputs are uint32.
    """
    tables = {}
    for name, r in self.remapper.remappers.items():
      live = r.live_ids()
      keys = np.array(sorted(live), np.int64)
      if len(keys) and (keys.max() >= 2**32 or keys.min() < 0):
        raise ValueError(
            f'feature {name!r} has raw ids outside 32 bits, which the export'
            ' (uint32 inputs) cannot take.')
      tables[name] = (keys.astype(np.uint32),
                      np.array([live[k] for k in keys], np.int32), 0)
    return tables

  def admitted_rows(self, spec) -> dict[str, tuple[np.ndarray, int]]:
    """The admission filter as the export applies it.

    Args:
      spec: the run's RunSpec.

    Returns:
      Per filtered feature, a pair of the bool `[num_rows]` mask and the
      shared row of the rows not admitted. {} without admission.
    """
    if self.admission is None:
      return {}
    oov = spec.admission.oov_row
    return {name: (mask, oov) for name, mask in
            self.admission.admitted_rows(spec.transform).items()}
