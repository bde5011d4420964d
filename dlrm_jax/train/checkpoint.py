"""Checkpoints: an orbax CheckpointManager holding the train state and metadata.

Each checkpoint step holds two items:
  state: the TrainState pytree (dense parameters and optimizer state, embedding
         stacks and their optimizer state, step, RNG), every process writing
         its own shards;
  meta:  JSON: the model signature (what fixes the state's shapes), the
         embedding sharding plan, the config;
  data:  the training data iterator's state, one file per process: a grain
         iterator's (random-access sources) or a text stream's
         (`pipeline.TextBatchIterator`, its position in the batch schedule);
  remappers: the managed-collision remappers' arrays, when there are any.

Saves are atomic (orbax writes to a temporary directory and renames it), so a
run killed mid-save leaves the previous checkpoints intact.

Checkpoints prove themselves. orbax verifies no array data (its zarr3 layout
has a crc32c on the shard index only, not on the values), so every save puts
in `meta` a fingerprint of each array of the state (two position-weighted
sums of its bits modulo 2^32, computed on the devices whatever the sharding,
so a single changed word is always caught) and a crc32 of each remapper
array; a restore recomputes and compares them. `restore_newest_good` tries
the checkpoints newest first: a damaged one (unreadable, wrong structure,
values that differ from their fingerprint) is named by step and path, moved
to `<workdir>/checkpoints_damaged/` (never deleted) and the previous one is
used. A save that fails raises CheckpointSaveError, in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from typing import Any, Callable

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class IncompatibleCheckpointError(ValueError):
  """The checkpoint was written by a config with different shapes."""


class DamagedCheckpointError(RuntimeError):
  """A checkpoint that cannot be read back as it was written."""


class CheckpointSaveError(RuntimeError):
  """A save failed, for example on a full disk or a missing permission."""


def _one_line(e: BaseException, limit: int = 300) -> str:
  """An exception in one line; a long one keeps its start and its end (where
  'No space left on device' usually is)."""
  text = ' '.join(f'{type(e).__name__}: {e}'.split())
  if len(text) <= limit:
    return text
  return text[:limit // 2] + ' ... ' + text[-(limit // 2):]


def _bits(x):
  """An array's bits as uint32 `[n]` (narrower types widened)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize
  if width == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if width in (1, 2):
    return jax.lax.bitcast_convert_type(
        x, jnp.uint8 if width == 1 else jnp.uint16).astype(jnp.uint32)
  if width == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
  raise ValueError(f'no fingerprint for dtype {x.dtype}')


@jax.jit
def _fingerprint_leaves(leaves):
  out = []
  for x in leaves:
    b = _bits(x)
    i = jax.lax.iota(jnp.uint32, b.shape[0])
    # Odd weights: any change of one word changes each sum.
    w1 = (i * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(0x9E3779B1)
    w2 = (i * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(0x85EBCA77)
    out.append(jnp.stack([jnp.sum(b * w1, dtype=jnp.uint32),
                          jnp.sum((b ^ (b >> jnp.uint32(15))) * w2,
                                  dtype=jnp.uint32)]))
  return out


def fingerprints(tree: Any) -> dict[str, str]:
  """Fingerprints every array of a tree.

  A jax array is fingerprinted on its devices. A numpy array gets a crc32.

  Args:
    tree: a pytree of jax or numpy arrays.

  Returns:
    {array path: fingerprint}.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  device = [(jax.tree_util.keystr(p), x) for p, x in flat
            if isinstance(x, jax.Array)]
  if device:
    sums = jax.device_get(_fingerprint_leaves([x for _, x in device]))
    out.update({k: f'{int(s[0]):08x}{int(s[1]):08x}'
                for (k, _), s in zip(device, sums)})
  for p, x in flat:
    if not isinstance(x, jax.Array):
      a = np.ascontiguousarray(np.asarray(x))
      out[jax.tree_util.keystr(p)] = (
          f'crc32:{zlib.crc32(a.tobytes()):08x}:{a.dtype.str}:{list(a.shape)}')
  return out


def _check_fingerprints(saved: dict[str, str] | None, tree: Any,
                        where: str) -> None:
  if saved is None:
    raise DamagedCheckpointError(
        f'{where} holds no fingerprints of its arrays in its meta.')
  got = fingerprints(tree)
  bad = sorted(k for k in set(saved) | set(got) if saved.get(k) != got.get(k))
  if bad:
    raise DamagedCheckpointError(
        f'{len(bad)} array(s) of {where} differ from the fingerprints saved'
        f' with them: {", ".join(bad[:5])}{", ..." if len(bad) > 5 else ""}')


def signature_diff(saved: dict[str, Any], current: dict[str, Any],
                   prefix: str = '') -> list[str]:
  """Lists the differences between two nested signature dicts.

  Args:
    saved: the signature a checkpoint holds.
    current: the current model's signature.
    prefix: the path of these dicts inside the outer ones.

  Returns:
    One readable line per field that differs.
  """
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k, '<absent>'), current.get(k, '<absent>')
    key = f'{prefix}{k}'
    if isinstance(a, dict) and isinstance(b, dict):
      out += signature_diff(a, b, key + '.')
    elif a != b:
      out.append(f'{key}: checkpoint has {a!r}, config has {b!r}')
  return out


def _item_handlers() -> dict[str, Any]:
  """The handler of each item a checkpoint may hold. Registered up front, so
  that a restore of some items knows the others (orbax warns of every item it
  finds without a handler)."""
  return {'state': ocp.StandardCheckpointHandler(),
          'meta': ocp.JsonCheckpointHandler(),
          'data': grain.checkpoint.CheckpointHandler(),
          'remappers': ocp.StandardCheckpointHandler()}


class Checkpointer:
  """Saves and restores train states under `<workdir>/checkpoints`.

  Attributes:
    directory: the folder that holds the steps.
    manager: the orbax CheckpointManager.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3,
               async_save: bool = True, subdir: str = 'checkpoints',
               create: bool = True, **options: Any):
    """Opens `<workdir>/<subdir>`. With `create`, it makes the folder.

    Args:
      workdir: the run's directory. It may be absolute or relative to the
        current directory. `~` is expanded.
      max_to_keep: how many checkpoints are kept.
      async_save: whether saves are written in the background.
      subdir: the folder of `workdir` that holds the steps.
      create: whether a missing folder is created. The modes that only read
        pass False: eval, predict and export must find it.
      **options: further `ocp.CheckpointManagerOptions` fields.

    Raises:
      ValueError: `create` is False and the folder does not exist.
    """
    # orbax takes absolute paths only.
    self.directory = epath.Path(
        os.path.abspath(os.path.expanduser(os.fspath(workdir)))) / subdir
    if not create and not self.directory.is_dir():
      raise ValueError(
          f'{self.directory.parent} holds no checkpoints (no folder'
          f' {self.directory}); train first, or pass the --workdir of a run.')
    self._pending: int | None = None  # The step being written, if any.
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, **options),
        item_handlers=_item_handlers(),
    )

  def latest_step(self) -> int | None:
    """The newest step saved, or None."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """All steps saved, oldest first."""
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any],
           data_iter: Any = None, remappers: Any = None,
           metrics: dict[str, float] | None = None) -> None:
    """Saves a step. The arrays' fingerprints go into the meta.

    Args:
      step: the step.
      state: the train state.
      meta: the JSON metadata: signature, plan, config.
      data_iter: the training data iterator, whose position is saved. It is
        grain's or a `pipeline.TextBatchIterator`.
      remappers: the numpy arrays of the managed-collision remappers.
      metrics: the eval metrics a `BestCheckpointer` ranks by.

    Raises:
      CheckpointSaveError: this save failed, or an earlier asynchronous one.
    """
    self.wait()  # An earlier asynchronous save that failed is named as such.
    meta = dict(meta, fingerprints={
        'state': fingerprints(state),
        'remappers': None if remappers is None else fingerprints(remappers)})
    items = dict(state=ocp.args.StandardSave(state),
                 meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    if remappers is not None:
      items['remappers'] = ocp.args.StandardSave(remappers)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True,
                        metrics=metrics)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._pending = step  # Written in the background (async saves).

  def _save_error(self, step: int | None, e: BaseException
                  ) -> CheckpointSaveError:
    try:
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    try:
      self.manager.reload()
      good = [s for s in self.all_steps() if s != step]
    except Exception:  # pylint: disable=broad-except
      good = []
    which = f'checkpoint {step}' if step is not None else 'a checkpoint'
    return CheckpointSaveError(
        f'saving {which} to {self.directory} failed ({_one_line(e)}); the run'
        ' stops here'
        + (f'; the earlier checkpoints ({", ".join(map(str, good))}) are'
           ' intact' if good else '') + '.')

  def check_for_errors(self) -> None:
    """Raises if an asynchronous save has failed.

    It is cheap: it waits for nothing still being written.

    Raises:
      CheckpointSaveError: an asynchronous save failed.
    """
    try:
      self.manager.check_for_errors()
      if (self._pending is not None and
          not self.manager.is_saving_in_progress()):
        self.manager.wait_until_finished()  # Raises a failure of its thread.
        self._pending = None
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._pending, e) from e

  def damaged_directory(self) -> epath.Path:
    """Where damaged checkpoints go: `<workdir>/checkpoints_damaged`."""
    return self.directory.parent / 'checkpoints_damaged'

  def move_aside(self, step: int) -> str | None:
    """Moves a step's folder to `checkpoints_damaged/`.

    Only the primary process moves it.

    Args:
      step: the step.

    Returns:
      Where it went, or None when there was nothing to move.
    """
    src = self.directory / str(step)
    if not src.exists() or jax.process_index() != 0:
      return None
    dst_dir = self.damaged_directory()
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / f'{step}-{time.strftime("%Y%m%dT%H%M%S")}'
    n = 0
    while dst.exists():
      n += 1
      dst = dst_dir / f'{step}-{time.strftime("%Y%m%dT%H%M%S")}-{n}'
    shutil.move(os.fspath(src), os.fspath(dst))
    self.manager.reload()
    return os.fspath(dst)

  def restore_newest_good(self, restore_fn: Callable[[int], Any], *,
                          move_aside: bool = True,
                          log: Callable[[str], None] = logging.warning
                          ) -> tuple[int | None, Any]:
    """Calls `restore_fn(step)` on the newest checkpoint that restores.

    A checkpoint whose restore fails is damaged. It is named by step and path
    in one line, moved aside, and the previous one is tried.
    IncompatibleCheckpointError is a config mistake, not damage, so it is
    raised at once.

    Args:
      restore_fn: restores one step.
      move_aside: whether a damaged checkpoint is moved aside. Eval and predict
        pass False and only skip it.
      log: where the line about a damaged checkpoint goes.

    Returns:
      The step and what restore_fn returned. (None, None) without checkpoints.

    Raises:
      DamagedCheckpointError: there are checkpoints and none restores. Nothing
        is started afresh over them.
      IncompatibleCheckpointError: from restore_fn.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return step, restore_fn(step)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        where = self.directory / str(step)
        moved = self.move_aside(step) if move_aside else None
        damaged.append(f'{step} ({_one_line(e, 160)})')
        log(f'checkpoint {step} at {where} is damaged: {_one_line(e)}'
            + (f'; moved to {moved}' if moved else '')
            + '; trying the previous one.')
    if damaged:
      raise DamagedCheckpointError(
          f'every checkpoint in {self.directory} is damaged: '
          + '; '.join(damaged)
          + (f'. They were moved to {self.damaged_directory()}' if move_aside
             else '') + '. Nothing was restored or overwritten.')
    return None, None

  def restore_remappers(self, step: int) -> Any:
    """Restores the managed-collision remappers' arrays saved at `step`.

    Args:
      step: the checkpoint step.

    Returns:
      The arrays, checked against their fingerprints.

    Raises:
      IncompatibleCheckpointError: the checkpoint holds no remappers.
      DamagedCheckpointError: the arrays differ from their fingerprints.
    """
    if 'remappers' not in self.manager.item_metadata(step):
      raise IncompatibleCheckpointError(
          f'the checkpoint at {self.directory / str(step)} holds no'
          ' managed-collision state; it was written without'
          ' managed_collision features.')
    remappers = self.manager.restore(step, args=ocp.args.Composite(
        remappers=ocp.args.StandardRestore())).remappers
    saved = (self.read_meta(step).get('fingerprints') or {}).get('remappers')
    _check_fingerprints(saved, remappers,
                        f'checkpoint {step} at {self.directory / str(step)}')
    return remappers

  def restore_data_iterator(self, step: int, data_iter: Any) -> None:
    """Sets a data iterator to where it was when `step` was saved.

    Args:
      step: the checkpoint step.
      data_iter: a grain `DatasetIterator`, or one whose `get_state` and
        `set_state` use JSON bytes, as `pipeline.TextBatchIterator` does.

    Raises:
      IncompatibleCheckpointError: the checkpoint holds no data state, or the
        state of another kind of source.
    """
    where = self.directory / str(step)
    if 'data' not in self.manager.item_metadata(step):
      raise IncompatibleCheckpointError(
          f'the checkpoint at {where} holds no input pipeline state; it was'
          ' written with another config.data.source.')
    self.manager.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(_KindChecked(data_iter,
                                                             where))))

  def restore_host_state(self, step: int, host: Any) -> None:
    """Loads a run's host-side id state saved with `step`.

    The state is `embedding.ids.host_state`'s. An empty `host` loads nothing.

    Args:
      step: the checkpoint step.
      host: the HostState to load into.

    Raises:
      IncompatibleCheckpointError: the saved state is of another config.
      DamagedCheckpointError: its arrays differ from their fingerprints.
    """
    if not host:
      return
    try:
      host.load_state_dict(self.restore_remappers(step))
    except IncompatibleCheckpointError:
      raise
    except ValueError as e:
      raise IncompatibleCheckpointError(
          f'the checkpoint at {self.directory / str(step)}: {e}') from e

  def read_meta(self, step: int) -> dict[str, Any]:
    """Reads the meta item of a step.

    Args:
      step: the checkpoint step.

    Returns:
      The JSON metadata.
    """
    restored = self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored.meta

  def check_signature(self, step: int, meta: dict[str, Any],
                      signature: dict[str, Any]) -> None:
    """Checks that the model signature saved in `meta` is `signature`.

    Args:
      step: the checkpoint step, for the message.
      meta: its meta item, from `read_meta`.
      signature: the current model's signature, from `Trainer.signature`.

    Raises:
      IncompatibleCheckpointError: the signatures differ. It names every field
        that differs.
    """
    diff = signature_diff(meta.get('signature', {}), signature)
    if diff:
      config_json = self.directory.parent / 'config.json'
      raise IncompatibleCheckpointError(
          f'the checkpoint at {self.directory / str(step)} does not fit the'
          ' config (a mismatch, not damage): ' + '; '.join(diff) +
          '. Use a new --workdir, or run with the config the checkpoint was'
          f' written with: --config={config_json}.')

  def restore(self, step: int, abstract_state: Any,
              signature: dict[str, Any] | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores a step onto the shardings of `abstract_state`.

    Args:
      step: the checkpoint step.
      abstract_state: ShapeDtypeStructs of the state, with shardings.
      signature: the current model signature. When given, it must equal the
        saved one.

    Returns:
      The state and the meta item.

    Raises:
      IncompatibleCheckpointError: the signatures differ.
      DamagedCheckpointError: the arrays differ from their fingerprints.
    """
    meta = self.read_meta(step)
    if signature is not None:
      self.check_signature(step, meta, signature)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    _check_fingerprints((meta.get('fingerprints') or {}).get('state'),
                        restored.state,
                        f'checkpoint {step} at {self.directory / str(step)}')
    return restored.state, meta

  def wait(self) -> None:
    """Waits for the asynchronous save.

    Raises:
      CheckpointSaveError: the save failed.
    """
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._pending, e) from e
    self._pending = None

  def close(self) -> None:
    """Waits for the last save, then closes the manager."""
    try:
      self.wait()
    finally:
      self.manager.close()


class _KindChecked:
  """A data iterator as grain's checkpoint handler restores it.

  The handler sets a state of JSON bytes, then calls `start_prefetch`. A state
  of another kind of iterator is refused before it is set. A text stream's
  state has a 'kind' key, `TextBatchIterator.KIND`. A grain iterator's has
  none.
  """

  _GRAIN = 'grain'

  def __init__(self, data_iter: Any, where: Any):
    self.data_iter = data_iter
    self.where = where

  @classmethod
  def _kind(cls, state: Any) -> str:
    kind = state.get('kind') if isinstance(state, dict) else None
    return kind if isinstance(kind, str) else cls._GRAIN

  def set_state(self, raw: bytes) -> None:
    """Sets the iterator's state, after checking its kind.

    Args:
      raw: the saved state, JSON bytes.

    Raises:
      IncompatibleCheckpointError: the state is of another kind of iterator.
    """
    state = json.loads(raw)
    is_grain = isinstance(self.data_iter, grain.DatasetIterator)
    want = self._GRAIN if is_grain else getattr(self.data_iter, 'KIND', None)
    saved = self._kind(state)
    if saved != want:
      def name(kind):
        """Names a kind of source for the message.

        Args:
          kind: the kind.

        Returns:
          Its name.
        """
        return ('a random-access source (grain)' if kind == self._GRAIN
                else f'a {kind} (streamed text)')
      raise IncompatibleCheckpointError(
          f'the checkpoint at {self.where} holds the input state of'
          f' {name(saved)}, but this run reads {name(want)}; it was written'
          ' with another config.data.source.')
    self.data_iter.set_state(state if is_grain else raw)

  def start_prefetch(self) -> None:
    """Starts the iterator's prefetch."""
    self.data_iter.start_prefetch()


class BestCheckpointer(Checkpointer):
  """Keeps only the best checkpoint by an eval metric.

  It lives under `<workdir>/best_checkpoint`. orbax's `best_fn` and
  `best_mode` rank the checkpoints, max_to_keep is 1, and checkpoints without
  metrics are not kept. So every save needs `metrics`.

  Attributes:
    metric: the eval metric it ranks by.
  """

  def __init__(self, workdir: str, metric: str, mode: str, *,
               async_save: bool = True):
    """Opens `<workdir>/best_checkpoint`.

    Args:
      workdir: the run directory.
      metric: the eval metric to rank by.
      mode: 'max' or 'min'.
      async_save: whether saves are written in the background.
    """
    self.metric = metric
    super().__init__(workdir, max_to_keep=1, async_save=async_save,
                     subdir='best_checkpoint', best_fn=lambda m: m[metric],
                     best_mode=mode, keep_checkpoints_without_metrics=False)

  def best_step(self) -> int | None:
    """The step of the best checkpoint, or None."""
    return self.manager.best_step()


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically, through a temporary file and a rename.

  Args:
    path: the file.
    obj: the value. What JSON cannot hold is written as its str.
  """
  path = os.fspath(path)
  tmp = path + '.tmp'
  try:
    with open(tmp, 'w') as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):  # No half file left (disk full).
      os.remove(tmp)
    raise
