"""Checkpoints: an orbax CheckpointManager holding the train state and metadata.

Each checkpoint step holds two items:
  state: the TrainState pytree (dense parameters and optimizer state, embedding
         stacks and their optimizer state, step, RNG), every process writing
         its own shards;
  meta:  JSON: the model signature (what fixes the state's shapes), the
         embedding sharding plan, the input pipeline position, the config;
  data:  the grain iterator's state (random-access sources), one file per
         process;
  remappers: the managed-collision remappers' arrays, when there are any.

Saves are atomic (orbax writes to a temporary directory and renames it), so a
run killed mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath


class IncompatibleCheckpointError(ValueError):
  """The checkpoint was written by a config with different shapes."""


def signature_diff(saved: dict[str, Any], current: dict[str, Any],
                   prefix: str = '') -> list[str]:
  """Human-readable differences between two nested signature dicts."""
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k, '<absent>'), current.get(k, '<absent>')
    key = f'{prefix}{k}'
    if isinstance(a, dict) and isinstance(b, dict):
      out += signature_diff(a, b, key + '.')
    elif a != b:
      out.append(f'{key}: checkpoint has {a!r}, config has {b!r}')
  return out


class Checkpointer:
  """Saves and restores train states under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = epath.Path(workdir) / 'checkpoints'
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any],
           data_iter: Any = None, remappers: Any = None,
           metrics: dict[str, float] | None = None) -> None:
    """Saves a step; `data_iter`, a grain iterator, saves its position;
    `remappers`, numpy arrays of managed-collision remappers; `metrics`, the
    eval metrics a `BestCheckpointer` ranks by."""
    items = dict(state=ocp.args.StandardSave(state),
                 meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    if remappers is not None:
      items['remappers'] = ocp.args.StandardSave(remappers)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True,
                      metrics=metrics)

  def restore_remappers(self, step: int) -> Any:
    """The managed-collision remappers' arrays saved at `step`."""
    if 'remappers' not in self.manager.item_metadata(step):
      raise IncompatibleCheckpointError(
          f'the checkpoint at {self.directory / str(step)} holds no'
          ' managed-collision state; it was written without'
          ' managed_collision features.')
    return self.manager.restore(step, args=ocp.args.Composite(
        remappers=ocp.args.StandardRestore())).remappers

  def restore_data_iterator(self, step: int, data_iter: Any) -> None:
    """Sets a grain iterator to where it was when `step` was saved."""
    if 'data' not in self.manager.item_metadata(step):
      raise IncompatibleCheckpointError(
          f'the checkpoint at {self.directory / str(step)} holds no input'
          ' pipeline state; it was written with another config.data.source.')
    self.manager.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(data_iter)))

  def read_meta(self, step: int) -> dict[str, Any]:
    restored = self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored.meta

  def restore(self, step: int, abstract_state: Any,
              signature: dict[str, Any] | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores a step onto the shardings of `abstract_state`.

    Args:
      step: the checkpoint step.
      abstract_state: ShapeDtypeStructs (with shardings) of the state.
      signature: the current model signature; when given it must equal the
        saved one.

    Raises:
      IncompatibleCheckpointError: if the signatures differ.
    """
    meta = self.read_meta(step)
    if signature is not None:
      diff = signature_diff(meta.get('signature', {}), signature)
      if diff:
        raise IncompatibleCheckpointError(
            f'the checkpoint at {self.directory / str(step)} does not fit the'
            ' current config:\n  ' + '\n  '.join(diff) +
            '\nUse a new --workdir, or run with the config the checkpoint was'
            ' written with (saved in the workdir as config.json).')
    restored = self.manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    return restored.state, meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class BestCheckpointer(Checkpointer):
  """Keeps only the best checkpoint by an eval metric, under
  `<workdir>/best_checkpoint` (orbax's `best_fn`/`best_mode`, max_to_keep 1,
  checkpoints without metrics not kept). Saves need `metrics`."""

  def __init__(self, workdir: str, metric: str, mode: str, *,
               async_save: bool = True):  # pylint: disable=super-init-not-called
    self.metric = metric
    self.directory = epath.Path(workdir) / 'best_checkpoint'
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m[metric],
            best_mode=mode, keep_checkpoints_without_metrics=False,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
    )

  def best_step(self) -> int | None:
    return self.manager.best_step()


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename)."""
  path = os.fspath(path)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
