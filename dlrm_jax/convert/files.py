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
  """What unpickling a numpy scalar needs besides torch's defaults.

  A --save-model file holds numpy scalars: test_acc and train_loss. They need
  `scalar`, under numpy 2's and numpy 1's module names, `dtype`, and the types
  of the numeric dtypes, whose state is set with BUILD. Nothing else of numpy
  is allowed, so no arrays.
  """
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
  """`torch.load` with weights_only=True and the numpy scalar types allowed."""
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
  """Reads a state dict from `.npz` or from a torch `.pt`/`.pth` file.

  A `.pt` file may hold a dict with a 'state_dict' entry, as
  facebookresearch's `dlrm_s_pytorch.py --save-model` writes. It may instead
  hold a 'model_state_dict' entry. Either entry is read. Numpy scalars beside
  it are allowed. Other objects are refused: the file is read with
  weights_only=True.

  Args:
    path: the file.

  Returns:
    {key: array} in the file's order. Floating tensors come back as float32.
    `.npz` keys are kept as saved.

  Raises:
    ValueError: the file is not readable, holds objects other than tensors
      and numpy scalars, or holds no state dict. A torch file without torch
      installed is refused too.
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
  """Writes the bare state dict as `.npz`, or as `.pt`/`.pth` torch tensors.

  Args:
    sd: {key: array}.
    path: the file. Its extension picks the format.

  Raises:
    ValueError: a torch file without torch installed.
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
  """Builds the dict `dlrm_s_pytorch.py --load-model` reads, holding `sd`.

  The reference reads it in `run`. iter and epoch are 0, so training from the
  file starts at the first batch. The reference skips `iter` batches of every
  epoch. At `epoch` > 0 its epoch loop never ends, because
  `if k < skip_upto_epoch: continue` comes before `k += 1`.

  nepochs, nbatches and nbatches_test are 0. The reference only prints them.
  train_loss, total_loss, test_acc and test_auc are 0, as a fresh run's
  best_acc_test is.

  opt_state_dict is the state of a fresh `torch.optim.SGD` at lr 0.01. That is
  the reference's default --optimizer and --learning-rate. SGD without
  momentum keeps no state, so the state is exact. The saved lr serves the
  first step. LRPolicyScheduler sets it from the second step on.

  With --optimizer=adagrad or rwsadagrad, the reference's first step fails on
  this state: torch's Adagrad finds no lr_decay and no state. Run such a model
  with --inference-only, or load `state_dict` alone.

  The dict holds Python numbers only. So the reference's own `torch.load`
  reads the file with weights_only, the default since torch 2.6.

  Args:
    sd: a facebookresearch state dict of numpy arrays.

  Returns:
    A dict with state_dict as torch tensors, iter, epoch, nepochs, nbatches,
    nbatches_test, train_loss, total_loss, test_acc, test_auc and
    opt_state_dict.

  Raises:
    ValueError: torch is not installed.
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
  """Writes a peer's file.

  A `.npz` file holds the bare state dict. A facebookresearch `.pt`/`.pth`
  file holds the dict --load-model reads, from `facebook_checkpoint`. A
  TorchRec `.pt`/`.pth` file holds the bare state dict, for
  `model.load_state_dict(torch.load(path))`. A torch file needs torch:
  `check_output` refuses one without it.

  Args:
    sd: the peer's state dict of numpy arrays.
    path: the file.
    peer: 'facebook' or 'torchrec'.

  Raises:
    ValueError: a facebookresearch torch file is asked for without torch.
  """
  if path.endswith('.npz') or peer != 'facebook':
    save_state_dict(sd, path)
    return
  torch = _torch()
  if torch is None:
    raise ValueError(
        f'{path}: writing torch files needs torch ({_TORCH_HINT}).')
  torch.save(facebook_checkpoint(sd), path)


# ----------------------------------------------------------------------------
# The command's files.


def check_input(path: str) -> None:
  """Refuses, in one line, an --input the import cannot read.

  Args:
    path: the file.

  Raises:
    ValueError: a wrong extension, a missing or unreadable file, or a torch
      file without torch installed.
  """
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
  """Refuses, in one line, an --output the export cannot write.

  Args:
    path: the file.

  Raises:
    ValueError: a wrong extension, a directory, a missing or read-only
      parent directory, or a torch file without torch installed.
  """
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
