"""State dict files: reading them safely, writing `.npz` and `.pt` files.

Torch files are read with `torch.load(weights_only=True)`, allowing
besides only the numpy scalar types a --save-model file holds. A
facebookresearch `.pt` export is the dict --load-model reads
(`facebook_checkpoint`); `.npz` files and TorchRec `.pt` files hold the bare
state dict.

`check_input` and `check_output` refuse, in one line, a file the command
cannot read or write.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

EXTENSIONS = ('.npz', '.pt', '.pth')
_EXT_WORDS = '.npz, .pt or .pth'
# dlrm_s_pytorch.py's default --learning-rate (the lr of the SGD state an
# exported facebookresearch .pt carries).
FACEBOOK_DEFAULT_LR = 0.01
_TORCH_HINT = ("pip install 'dlrm_jax[torch]'; or save the state dict as"
               ' .npz: np.savez(path, **{k: v.numpy() for k, v in'
               ' sd.items()})')


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch


def _numpy_scalar_globals() -> list[Any]:
  """What unpickling a numpy scalar (a --save-model file's test_acc,
  train_loss) needs besides torch's defaults: `scalar` (under numpy 2's and
  numpy 1's module names), `dtype`, and the types of numeric dtypes (their
  state is set with BUILD). Nothing else of numpy (no arrays)."""
  scalar = np._core.multiarray.scalar  # pylint: disable=protected-access
  codes = np.typecodes['AllInteger'] + np.typecodes['AllFloat'] + '?'
  dtypes = sorted({type(np.dtype(c)) for c in codes}, key=str)
  return [scalar, (scalar, 'numpy.core.multiarray.scalar'), np.dtype,
          *dtypes]


_SAFE_LOAD = ('convert reads torch files with weights_only=True (tensors,'
              ' numbers, strings, containers and numpy scalars; it never'
              ' unpickles arbitrary objects); save the state dict alone:'
              ' torch.save(model.state_dict(), path).')


def _torch_detail(e: BaseException) -> str:
  """The line of a torch.load error that says what it met."""
  skip = ('Weights only load failed', 'Please file an issue', 'Check the'
          ' documentation', '(1)', '(2)', 'WeightsUnpickler error')
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  keep = [l for l in lines if not l.startswith(skip)] or lines or [repr(e)]
  return ' '.join(keep[0].split())[:300]


def _load_torch(path: str):
  """`torch.load(weights_only=True)` with the numpy scalar types allowed."""
  torch = _torch()
  if torch is None:
    raise ValueError(
        f'{path}: reading torch files needs torch ({_TORCH_HINT}).')
  allowed = _numpy_scalar_globals()
  try:
    with torch.serialization.safe_globals(allowed):
      return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    try:
      names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # pylint: disable=broad-except
      names = []
    ok = {f'{g.__module__}.{g.__qualname__}' for g in allowed
          if not isinstance(g, tuple)} | {
              g[1] for g in allowed if isinstance(g, tuple)}
    names = [n for n in names if n not in ok]
    if names:
      raise ValueError(
          f'{path} holds {", ".join(names)}: {_SAFE_LOAD}') from e
    raise ValueError(f'{path}: torch.load refused it ({_torch_detail(e)});'
                     f' {_SAFE_LOAD}') from e
  except (RuntimeError, EOFError, OSError) as e:
    raise ValueError(f'{path}: not a readable torch file'
                     f' ({_torch_detail(e)}).') from e


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict from `.npz` (keys as saved) or a torch `.pt`/`.pth`.

  Args:
    path: the file. A `.pt` holding a dict with a 'state_dict' entry
      (facebookresearch's `dlrm_s_pytorch.py --save-model`) or a
      'model_state_dict' entry reads that; numpy scalars beside it are
      allowed, other objects refused (`weights_only=True`).

  Returns:
    {key: array}, floating tensors as float32, in the file's order.
  """
  if path.endswith('.npz'):
    try:
      with np.load(path) as z:  # allow_pickle off: arrays only
        return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      raise ValueError(f'{path}: not a readable .npz file'
                       f' ({" ".join(str(e).split())[:200]}).') from e
  obj = _load_torch(path)
  for key in ('state_dict', 'model_state_dict'):
    if isinstance(obj, dict) and key in obj:
      obj = obj[key]
      break
  torch = _torch()
  bad = ([type(obj).__name__] if not isinstance(obj, dict) else
         [k for k, v in obj.items() if not isinstance(v, torch.Tensor)])
  if bad:
    raise ValueError(
        f'{path} holds no state dict of tensors (found {bad[:4]}); save'
        ' model.state_dict(), or the dict --save-model writes.')
  return {k: v.detach().float().numpy() if v.is_floating_point() else
          v.numpy() for k, v in obj.items()}


def save_state_dict(sd: Mapping[str, np.ndarray], path: str) -> None:
  """Writes the bare state dict: `.npz`, or `.pt`/`.pth` (torch tensors).

  Args:
    sd: {key: array}.
    path: the file; its extension picks the format.
  """
  if path.endswith('.npz'):
    np.savez(path, **sd)
    return
  torch = _torch()
  if torch is None:
    raise ValueError(
        f'{path}: writing torch files needs torch ({_TORCH_HINT}).')
  torch.save(_tensors(torch, sd), path)


def _tensors(torch, sd):
  return collections.OrderedDict(
      (k, torch.from_numpy(np.array(v, order='C'))) for k, v in sd.items())


def facebook_checkpoint(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The dict `dlrm_s_pytorch.py --load-model` reads (`run`), holding `sd`.

  iter and epoch are 0, so that training from the file starts at the first
  batch: the reference skips `iter` batches of every epoch, and at
  `epoch` > 0 its epoch loop never ends (`if k < skip_upto_epoch:
  continue` comes before `k += 1`). nepochs, nbatches and nbatches_test
  (printed only) and train_loss, total_loss, test_acc, test_auc are 0 (a
  fresh run's best_acc_test). opt_state_dict is the state of a fresh
  `torch.optim.SGD` at lr 0.01, the reference's default --optimizer and
  --learning-rate: SGD without momentum keeps no state, so it is exact; the
  saved lr serves the first step, LRPolicyScheduler sets it from the
  second. With --optimizer=adagrad (or rwsadagrad) the reference's first
  step fails on it (torch's Adagrad finds no lr_decay nor state): run it
  with --inference-only, or load `state_dict` alone. Python numbers only,
  so the reference's own `torch.load` (weights_only by default since torch
  2.6) reads the file.

  Args:
    sd: a facebookresearch state dict (numpy).

  Returns:
    {state_dict (torch tensors), iter, epoch, nepochs, nbatches,
    nbatches_test, train_loss, total_loss, test_acc, test_auc,
    opt_state_dict}.
  """
  torch = _torch()
  if torch is None:
    raise ValueError(f'writing torch files needs torch ({_TORCH_HINT}).')
  # DLRM_Net's parameters are exactly its state dict's entries (it has no
  # buffers); the optimizer state names them by position.
  params = [torch.nn.Parameter(torch.empty(0)) for _ in sd]
  opt = torch.optim.SGD(params, lr=FACEBOOK_DEFAULT_LR)
  return {'state_dict': _tensors(torch, sd), 'iter': 0, 'epoch': 0,
          'nepochs': 0, 'nbatches': 0, 'nbatches_test': 0,
          'train_loss': 0.0, 'total_loss': 0.0, 'test_acc': 0.0,
          'test_auc': 0.0, 'opt_state_dict': opt.state_dict()}


def save_peer_file(sd: Mapping[str, np.ndarray], path: str, peer: str
                   ) -> None:
  """Writes a peer's file: `.npz` the bare state dict; `.pt`/`.pth` the dict
  --load-model reads for facebook (`facebook_checkpoint`), the bare state
  dict for TorchRec (`model.load_state_dict(torch.load(path))`).

  Args:
    sd: the peer's state dict (numpy).
    path: the file.
    peer: 'facebook' or 'torchrec'.
  """
  if path.endswith('.npz') or peer != 'facebook':
    save_state_dict(sd, path)
  else:
    _torch().save(facebook_checkpoint(sd), path)


# ----------------------------------------------------------------------------
# The command's files.


def check_input(path: str) -> None:
  """Refuses, in one line, an --input the import cannot read."""
  if not path.endswith(EXTENSIONS):
    raise ValueError(f'--input ({path}) must end in {_EXT_WORDS}.')
  if not os.path.exists(path):
    raise ValueError(f'--input ({path}): no such file.')
  if not os.path.isfile(path):
    raise ValueError(f'--input ({path}) is not a file.')
  if not os.access(path, os.R_OK):
    raise ValueError(f'--input ({path}) is not readable (permission denied).')
  if not path.endswith('.npz') and _torch() is None:
    raise ValueError(f'--input ({path}): reading torch files needs torch'
                     f' ({_TORCH_HINT}).')


def check_output(path: str) -> None:
  """Refuses, in one line, an --output the export cannot write."""
  if not path.endswith(EXTENSIONS):
    raise ValueError(f'--output ({path}) must end in {_EXT_WORDS}.')
  if os.path.isdir(path):
    raise ValueError(f'--output ({path}) is a directory; name a file.')
  parent = os.path.dirname(path)
  if not os.path.isdir(parent):
    raise ValueError(f'--output ({path}): the directory {parent} does not'
                     ' exist.')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f'--output ({path}): the directory {parent} is not'
                     ' writable (permission denied).')
  if not path.endswith('.npz') and _torch() is None:
    raise ValueError(f'--output ({path}): writing torch files needs torch'
                     f' ({_TORCH_HINT}).')
