"""Weights in and out: facebookresearch/dlrm and TorchRec DLRM state dicts.

`python -m dlrm_jax.convert` (see `main`) turns a peer's file (`.npz`, or a
torch `.pt`/`.pth` with torch installed) into a dlrm_jax checkpoint with a
matching config, and a checkpoint back into the peer's file. What it cannot
represent it refuses in one line, before writing anything: it never writes a
file that loads into a different model (keys it would drop, widths no DLRM
gives, dcn or shared tables for facebookresearch, ...).

The peers' layouts, as their sources define them:

facebookresearch/dlrm (`dlrm_s_pytorch.py`, `DLRM_Net`):
  emb_l.{k}.weight          [rows_k, D]  `create_emb`: one
                                         nn.EmbeddingBag(mode='sum') a feature
  bot_l.{2i}.weight, .bias  [out, in]    `create_mlp`: Sequential(Linear, ReLU,
  top_l.{2i}.weight, .bias  [out, in]    ...), Sigmoid after the top's last
  `interact_features` (dot): T = [x, ly_0 .. ly_{N-1}] (x the bottom MLP's
  output), Z = T Tᵀ, R = [x, Z[i, j] for i in range(N+1) for j in range(i)]
  (j <= i with --arch-interaction-itself). The state dict does not record
  --arch-interaction-op: it is read as dot, the default; widths no dot
  interaction gives ('cat' among them) are refused.
  Files: --save-model (`run`, `inference`) writes torch.save of {state_dict,
  nepochs, nbatches, nbatches_test, test_acc (a numpy float64), epoch, iter,
  train_loss (a numpy float32), total_loss, opt_state_dict[, test_auc]};
  --load-model reads them all back (test_auc with --mlperf-logging only,
  opt_state_dict unless --inference-only).
TorchRec (`torchrec/models/dlrm.py`, `DLRM`, `DLRM_DCN`):
  sparse_arch.embedding_bag_collection.embedding_bags.{table}.weight [rows, D]
  dense_arch.model._mlp.{i}._linear.weight, .bias   (MLP of Perceptrons)
  over_arch.model.0._mlp.{i}._linear.weight, .bias  (all but the last layer)
  over_arch.model.1.weight, .bias                   (the last nn.Linear)
  Pooled features (`EmbeddingBagCollection.forward`, `SparseArch`): tables
  in config order (the state dict's), each table's feature_names in order.
  DLRM (`InteractionArch`): combined = [dense, sparse_0 ..], pairs from
  `torch.triu_indices(F+1, F+1, offset=1)`, output [dense, pairs]; no
  self-interaction. DLRM_DCN (`InteractionDCNArch`, `modules/crossnet.py`
  `LowRankCrossNet`): x_0 = [dense, sparse_0 ..] flattened, [B, (F+1) D];
  x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l with
  inter_arch.crossnet.W_kernels.{l} [I, r], .V_kernels.{l} [r, I],
  .bias.{l} [I]; the over arch takes x_L alone. Logits out.
dlrm_jax (`models/dlrm.py`, `interaction.py`, `dcn.py`): features
  [dense_out, sparse_0 ..]; dot: pairs i < j (i <= j with interaction_self)
  row by row, over-arch input [pairs, dense_out]; dcn: the same cross net,
  `crossnet.v_{l}.kernel` = V_lᵀ, `u_{l}.kernel` = W_lᵀ, `u_{l}.bias` = b_l;
  MLP layers `dense_{i}` with `[in, out]` kernels; the last one `output`.

The mapping. The k-th pooled feature becomes the id feature cat_k (Criteo
column cat_k); features of one TorchRec table share a dlrm_jax table
(`embedding_name`: its first feature's name). The state dict names tables
only: `--table_features` says which features each serves (default one; a
model whose widths say more features than tables is refused). An export
writes the tables in the order of their first feature in the sparse group,
each with its features in order (`<output stem>.torchrec.json` lists the
EmbeddingBagConfigs). The first over-arch layer's input columns and the
cross net's are permuted to the peer's order, other weights transposed,
tables copied row for row (`dlrm_jax.embedding.table_access`): the model is
numerically the peer's. What rows a raw value maps to and how dense values
are normalized (facebookresearch: log(x+1), as our default config) is the
data pipeline's business.

Files. Torch files are read with `torch.load(weights_only=True)`, allowing
besides only the numpy scalar types a --save-model file holds. A
facebookresearch `.pt` export is the dict --load-model reads
(`facebook_checkpoint`); `.npz` files and TorchRec `.pt` files hold the bare
state dict.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import math
import os
import pickle
import re
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax import cli
from dlrm_jax.train import trainer as trainer_lib
from dlrm_jax.data import inputs
from dlrm_jax.embedding import table_access
from dlrm_jax.models import interaction

PEERS = ('facebook', 'torchrec')
EXTENSIONS = ('.npz', '.pt', '.pth')
_EXT_WORDS = '.npz, .pt or .pth'
_TR_EMB = 'sparse_arch.embedding_bag_collection.embedding_bags.'
_TR_CROSS = 'inter_arch.crossnet.'
_NAME = {'facebook': 'facebookresearch', 'torchrec': 'TorchRec'}
PEER_FILE = 'peer.json'  # in the workdir: the peer's table and feature names
TORCHREC_SIDECAR = '.torchrec.json'  # beside a TorchRec export
# Criteo's columns: dlrm_jax reads int_0..int_12 and cat_0..cat_25.
MAX_DENSE, MAX_SPARSE = 13, 26
# dlrm_s_pytorch.py's default --learning-rate (the lr of the SGD state an
# exported facebookresearch .pt carries).
FACEBOOK_DEFAULT_LR = 0.01
_TORCH_HINT = ("pip install 'dlrm_jax[torch]'; or save the state dict as"
               ' .npz: np.savez(path, **{k: v.numpy() for k, v in'
               ' sd.items()})')


# ----------------------------------------------------------------------------
# State dict files.


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
# The peers' models, read from their state dicts.


@dataclasses.dataclass(frozen=True)
class PeerTable:
  """One embedding table of a peer.

  Attributes:
    name: its name (`emb_l.{k}`, or the TorchRec EBC's table name).
    weight: `[rows, D]`.
    features: the names of the features it serves, in pooling order.
  """

  name: str
  weight: np.ndarray
  features: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PeerDLRM:
  """A peer's DLRM as its state dict holds it (the peer's shapes).

  Attributes:
    peer: 'facebook' or 'torchrec'.
    tables: in the peer's order (the order of its pooled features).
    bottom: (weight `[out, in]`, bias `[out]`) of the dense arch's layers.
    top: the same of the over arch's layers, the last one's out 1.
    crossnet: (W `[I, r]`, V `[r, I]`, b `[I]`) per cross layer (TorchRec
      DLRM_DCN), or None for the dot interaction.
    interaction_self: the dot interaction includes the diagonal.
  """

  peer: str
  tables: tuple[PeerTable, ...]
  bottom: tuple[tuple[np.ndarray, np.ndarray], ...]
  top: tuple[tuple[np.ndarray, np.ndarray], ...]
  crossnet: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...] | None
  interaction_self: bool

  @property
  def dim(self) -> int:
    return int(self.tables[0].weight.shape[1])

  @property
  def num_dense(self) -> int:
    return int(self.bottom[0][0].shape[1])

  @property
  def num_features(self) -> int:
    return sum(len(t.features) for t in self.tables)


# Keys a peer's DLRM variant holds that dlrm_jax has no place for, with what
# they tell.
_UNSUPPORTED = {
    'facebook': (
        (r'^emb_l\.\d+\.weight_[qr]$', 'QR embeddings (--qr-flag)'),
        (r'^emb_l\.\d+\.(embs|projs)\.', 'mixed-dimension embeddings'
         ' (--md-flag)'),
        (r'^v_W_l\.', 'learned weighted pooling (--weighted-pooling)'),
        (r'^(bot_l|top_l)\.module\.', 'MLPs wrapped in DistributedDataParallel'
         ' (a multi-process run holds only its own tables; save from one'
         ' process)'),
    ),
    'torchrec': (
        (r'^inter_arch\.interaction_branch', 'TorchRec DLRM_Projection'
         ' (InteractionProjectionArch)'),
        (r'^inter_arch\.crossnet\.', 'a cross net other than DLRM_DCN\'s'
         ' LowRankCrossNet (W_kernels, V_kernels, bias)'),
    ),
}


def _strip_prefix(sd: Mapping[str, np.ndarray], peer: str
                  ) -> dict[str, np.ndarray]:
  """Drops a wrapper prefix ('module.' of DDP, 'model.' of DLRMTrain)."""
  marker = 'emb_l.' if peer == 'facebook' else 'sparse_arch.'
  keys = [k for k in sd if marker in k]
  if not keys:
    raise ValueError(
        f'the state dict has no {marker!r} keys: it is not a {_NAME[peer]}'
        f' DLRM (keys: {sorted(sd)[:6]}...).')
  prefix = keys[0][:keys[0].index(marker)]
  outside = [k for k in sd if not k.startswith(prefix)]
  if outside:
    raise ValueError(
        f'the {_NAME[peer]} state dict has keys outside its {prefix!r}'
        f' prefix ({outside[:4]}); convert would drop them.')
  return {k[len(prefix):]: np.asarray(v) for k, v in sd.items()}


class _Keys:
  """The state dict's entries, which of them were read, and the gaps in
  numbered ones (refused after the keys it has no place for, which say
  more)."""

  def __init__(self, sd):
    self.sd, self.used, self.gaps = sd, set(), []

  def get(self, key):
    self.used.add(key)
    return self.sd[key]

  def indexed(self, fmt: str, suffix: str, step: int = 1, start: int = 0
              ) -> list[int]:
    """Indices i with `fmt.format(i) + suffix` a key (digits only): start,
    start + step, ..., with none missing."""
    pattern = re.compile('^' + re.escape(fmt).replace(r'\{\}', r'(\d+)') +
                         re.escape(suffix) + '$')
    idx = sorted(int(m.group(1)) for k in self.sd if (m := pattern.match(k)))
    want = list(range(start, start + step * len(idx), step))
    if idx != want:
      self.gaps.append(
          f'{fmt.format("{i}")}{suffix} has indices {idx}; a whole model has'
          f' {want}.')
    return idx

  def layers(self, fmt: str, step: int = 1, start: int = 0):
    """(weight [out, in], bias [out]) of consecutive layers named by `fmt`."""
    out = []
    for i in self.indexed(fmt, '.weight', step, start):
      name = fmt.format(i)
      if name + '.bias' not in self.sd:
        raise ValueError(f'{name} has no bias; DLRM layers have one.')
      out.append((self.get(name + '.weight'), self.get(name + '.bias')))
    return out

  def unused(self) -> list[str]:
    return [k for k in self.sd if k not in self.used]


def _check_chain(layers, what: str):
  """Each layer a Linear taking what the one before gives."""
  for i, (w, b) in enumerate(layers):
    if w.ndim != 2 or b.shape != (w.shape[0],):
      raise ValueError(
          f'{what} layer {i} has weight {list(w.shape)} and bias'
          f' {list(b.shape)}; a Linear has [out, in] and [out].')
    want = int(layers[i - 1][0].shape[0]) if i else None
    if want is not None and int(w.shape[1]) != want:
      raise ValueError(
          f'{what} layer {i} takes {w.shape[1]} inputs; the layer before'
          f' gives {want}.')


def _features_of_width(width: int, dim: int) -> int | None:
  """F with `dim + F + F (F - 1) / 2 == width` (TorchRec DLRM's over arch
  input), or None."""
  pairs = width - dim  # F (F + 1) / 2
  f = (math.isqrt(8 * pairs + 1) - 1) // 2 if pairs > 0 else 0
  return f if f > 0 and f * (f + 1) // 2 == pairs else None


def parse_table_features(value: str | None) -> dict[str, list[str]] | None:
  """The `--table_features` mapping: which features each TorchRec table
  serves.

  Args:
    value: 't_a=f1,f2;t_b=f3' (each table's EmbeddingBagConfig.feature_names,
      in order), or the path of a `.json` file holding that string under
      'table_features' (what an export writes beside its output); None or ''
      for none.

  Returns:
    {table: [features]} in the order given, or None.
  """
  if not value:
    return None
  if value.endswith('.json'):
    path = cli.absolute(value)
    try:
      with open(path) as f:
        value = json.load(f).get('table_features')
    except (OSError, ValueError, AttributeError) as e:
      raise ValueError(f'--table_features ({path}): not a readable JSON'
                       f' object ({e}).') from e
    if not value or not isinstance(value, str):
      raise ValueError(f'--table_features ({path}) has no table_features'
                       " entry ('t_a=f1,f2;t_b=f3').")
  out: dict[str, list[str]] = {}
  seen: set[str] = set()
  for item in filter(None, (i.strip() for i in value.split(';'))):
    table, eq, feats = item.partition('=')
    names = [n.strip() for n in feats.split(',')]
    if not eq or not table.strip() or not all(names):
      raise ValueError(
          f'--table_features ({value!r}): {item!r} is not'
          ' table=feature[,feature...]; write t_a=f1,f2;t_b=f3.')
    table = table.strip()
    if table in out:
      raise ValueError(f'--table_features ({value!r}) names table {table!r}'
                       ' twice.')
    twice = [n for n in names if n in seen or names.count(n) > 1]
    if twice:
      raise ValueError(
          f'--table_features ({value!r}) names feature {twice[0]!r} twice;'
          ' a DLRM feature reads one table.')
    seen.update(names)
    out[table] = names
  return out or None


def read_peer(sd: Mapping[str, np.ndarray], peer: str,
              table_features: Mapping[str, Sequence[str]] | None = None
              ) -> PeerDLRM:
  """Reads a peer's DLRM from its state dict, refusing what dlrm_jax cannot
  represent.

  Args:
    sd: the state dict (numpy), possibly under a 'module.' or 'model.'
      prefix.
    peer: 'facebook' or 'torchrec'.
    table_features: TorchRec only: {table: [features]}, which features each
      table serves (`parse_table_features`); None: one each.

  Returns:
    The model. Raises ValueError, in one line, for keys it would drop,
    shapes that do not chain, widths that fit no DLRM, or more features
    than tables without `table_features`.
  """
  if peer not in PEERS:
    raise ValueError(f'peer ({peer!r}) must be one of {list(PEERS)}.')
  if peer == 'facebook' and table_features:
    raise ValueError(
        '--table_features is for --peer=torchrec: facebookresearch\'s DLRM_Net'
        ' has one table per feature (dlrm_s_pytorch.py create_emb).')
  names, tables, bottom, top, crossnet = _read_keys(sd, peer)
  dim = _check_shapes(peer, names, tables, bottom, top)
  width = int(top[0][0].shape[1])
  self_interaction = False
  who = _NAME[peer]
  if crossnet is not None:
    n_features = _check_crossnet(crossnet, dim, width)
    source = f'the TorchRec cross net ({width} inputs)'
  elif peer == 'facebook':
    n = len(tables) + 1
    options = {dim + interaction.output_dim(n, s): s for s in (False, True)}
    if width not in options:
      raise ValueError(
          f'the {who} top MLP takes {width} inputs; a dot interaction of'
          f' {n} features of dim {dim} gives {sorted(options)}'
          ' (--arch-interaction-op=cat is not supported).')
    self_interaction, n_features = options[width], len(tables)
    source = f'the {who} top MLP ({width} inputs)'
  else:
    n_features = _features_of_width(width, dim)
    if n_features is None:
      raise ValueError(
          f'the {who} over arch takes {width} inputs; DLRM\'s takes D + F +'
          f' F (F - 1) / 2 (D = {dim}), which no feature count F gives.')
    source = f'the {who} over arch ({width} inputs)'
  features = _table_features(peer, names, n_features, table_features, source)
  num_dense = int(bottom[0][0].shape[1])
  if num_dense > MAX_DENSE or n_features > MAX_SPARSE:
    raise ValueError(
        f'the {who} model has {num_dense} dense inputs and {n_features}'
        f' sparse features; dlrm_jax reads Criteo rows (at most {MAX_DENSE}'
        f' and {MAX_SPARSE}).')
  return PeerDLRM(
      peer, tuple(PeerTable(n, t, f) for n, t, f in
                  zip(names, tables, features)),
      tuple(bottom), tuple(top),
      None if crossnet is None else tuple(crossnet), self_interaction)


def _read_keys(sd, peer):
  """(table names, tables, bottom layers, top layers, cross layers or None)
  under the peer's names; refuses keys it has no place for."""
  keys = _Keys(_strip_prefix(sd, peer))
  crossnet = None
  if peer == 'facebook':
    names = [f'emb_l.{i}' for i in keys.indexed('emb_l.{}', '.weight')]
    tables = [keys.get(f'{n}.weight') for n in names]
    bottom = keys.layers('bot_l.{}', step=2)
    top = keys.layers('top_l.{}', step=2)
  else:
    names = [k[len(_TR_EMB):-len('.weight')] for k in keys.sd
             if k.startswith(_TR_EMB) and k.endswith('.weight')]
    tables = [keys.get(f'{_TR_EMB}{n}.weight') for n in names]
    bottom = keys.layers('dense_arch.model._mlp.{}._linear')
    top = keys.layers('over_arch.model.0._mlp.{}._linear')
    if 'over_arch.model.1.weight' in keys.sd:
      top += keys.layers('over_arch.model.{}', start=1)
    layers = keys.indexed(_TR_CROSS + 'W_kernels.{}', '')
    if layers:
      crossnet = []
      for l in layers:
        parts = [_TR_CROSS + f'{p}.{l}' for p in ('W_kernels', 'V_kernels',
                                                   'bias')]
        if not all(p in keys.sd for p in parts):
          raise ValueError(f'the TorchRec cross net lacks {parts[1]} or'
                           f' {parts[2]}; LowRankCrossNet has all three.')
        crossnet.append(tuple(keys.get(p) for p in parts))
  unused = keys.unused()
  if unused:
    why = next((hint for pattern, hint in _UNSUPPORTED[peer]
                if any(re.match(pattern, k) for k in unused)), None)
    raise ValueError(
        f'the {_NAME[peer]} state dict holds {len(unused)} key(s) dlrm_jax'
        f' has no place for ({", ".join(unused[:3])}'
        f'{", ..." if len(unused) > 3 else ""})'
        f'{": " + why + " is not supported" if why else ""}; convert would'
        ' drop them.')
  if keys.gaps:
    raise ValueError(keys.gaps[0])
  return names, tables, bottom, top, crossnet


def _check_shapes(peer, names, tables, bottom, top) -> int:
  """Checks the tables and MLPs of a DLRM; returns the embedding dim D."""
  who = _NAME[peer]
  if not names:
    raise ValueError(f'the {who} state dict has no embedding tables.')
  if not bottom:
    raise ValueError(f'the {who} state dict has no bottom (dense) MLP.')
  if len(top) < 2:
    raise ValueError(
        f'the {who} top MLP has {len(top)} layer(s); dlrm_jax needs at least'
        ' two (config.model.final plus the output layer).')
  dim = int(tables[0].shape[1]) if tables[0].ndim == 2 else -1
  for name, t in zip(names, tables):
    if t.ndim != 2 or t.shape[1] != dim:
      raise ValueError(
          f'{who} table {name} has shape {list(t.shape)}; every table must'
          f' be [rows, {dim}].')
  _check_chain(bottom, f'the {who} bottom MLP')
  _check_chain(top, f'the {who} top MLP')
  if int(bottom[-1][0].shape[0]) != dim:
    raise ValueError(
        f'the {who} bottom MLP ends at width {bottom[-1][0].shape[0]}, not'
        f' the embedding dim {dim}.')
  if int(top[-1][0].shape[0]) != 1:
    raise ValueError(f'the {who} top MLP must end in one output (logit).')
  return dim


def _check_crossnet(crossnet, dim: int, width: int) -> int:
  """The feature count F of a LowRankCrossNet on [B, (F + 1) D] (checked)."""
  w0 = crossnet[0][0]
  if w0.ndim != 2:
    raise ValueError(f'TorchRec W_kernels.0 has shape {list(w0.shape)};'
                     ' LowRankCrossNet\'s are [I, r].')
  size, rank = (int(s) for s in w0.shape)
  for l, (w, v, b) in enumerate(crossnet):
    if w.shape != (size, rank) or v.shape != (rank, size) or b.shape != (
        size,):
      raise ValueError(
          f'TorchRec cross layer {l} has W {list(w.shape)}, V'
          f' {list(v.shape)}, bias {list(b.shape)}; LowRankCrossNet\'s are'
          f' [{size}, {rank}], [{rank}, {size}], [{size}].')
  if size % dim or size // dim < 2:
    raise ValueError(
        f'the TorchRec cross net takes {size} inputs, not (F + 1) x {dim}'
        ' (the dense arch output and F pooled features).')
  if width != size:
    raise ValueError(
        f'the TorchRec over arch takes {width} inputs; DLRM_DCN\'s takes the'
        f' cross net\'s {size}.')
  return size // dim - 1


def _table_features(peer, names, n_features, given, source
                    ) -> list[tuple[str, ...]]:
  """Per table, the features it serves (see `read_peer`)."""
  if given:  # read in the state dict's (the EBC's) table order
    if sorted(given) != sorted(names):
      raise ValueError(
          f'--table_features names tables {sorted(given)}; the state dict'
          f' has {sorted(names)}.')
    count = sum(len(v) for v in given.values())
    if count != n_features:
      raise ValueError(
          f'--table_features names {count} features; {source} says'
          f' {n_features}.')
    return [tuple(given[n]) for n in names]
  if n_features > len(names):
    raise ValueError(
        f'{source} says {n_features} features, the state dict has'
        f' {len(names)} tables: a table serves several features'
        ' (EmbeddingBagConfig.feature_names); say which with'
        " --table_features='t_a=f1,f2;t_b=f3'.")
  if n_features < len(names):
    raise ValueError(
        f'{source} says {n_features} features, the state dict has'
        f' {len(names)} tables: some table would serve none.')
  # One feature each, named as TorchRec's Criteo DLRM names its tables
  # (`t_{feature}`), or as the table (the EBC's default feature name).
  return [(n[2:] if peer == 'torchrec' and n.startswith('t_') and n[2:]
           else n,) for n in names]


# ----------------------------------------------------------------------------
# Column orders.


def _pairs(n: int, self_interaction: bool, lower: bool) -> list[tuple]:
  """Pair columns of an n-feature interaction, as (i, j) in the peer's
  order of the product (i > j for facebookresearch's lower triangle)."""
  if lower:  # facebookresearch: for i, for j < i (j <= i)
    return [(i, j) for i in range(n)
            for j in range(i + (1 if self_interaction else 0))]
  rows, cols = np.triu_indices(n, k=0 if self_interaction else 1)
  return list(zip(rows.tolist(), cols.tolist()))


def over_arch_columns(peer: str | None, n: int, dim: int,
                      self_interaction: bool,
                      order: Sequence[int] | None = None) -> list[tuple]:
  """What each input column of the first over-arch layer holds (dot).

  Args:
    peer: the peer's order; None: dlrm_jax's own (checked against
      `interaction.triangle_indices`).
    n: interaction features (the dense arch's output and the sparse ones).
    dim: D, the dense arch's output width.
    self_interaction: pairs include the diagonal.
    order: for a peer, `order[j]` is dlrm_jax's index of the peer's j-th
      interaction feature (default: the same order).

  Returns:
    Per column, ('d', k): the k-th output of the dense arch, or ('p', a, b):
    the dot product of dlrm_jax's interaction features a <= b (0 is the
    dense arch's output).
  """
  dense = [('d', k) for k in range(dim)]
  if peer is None:
    idx = interaction.triangle_indices(n, self_interaction)
    return [('p', int(i) // n, int(i) % n) for i in idx] + dense
  order = list(range(n)) if order is None else list(order)
  pairs = _pairs(n, self_interaction, lower=(peer == 'facebook'))
  return dense + [('p',) + tuple(sorted((order[i], order[j])))
                  for i, j in pairs]


def over_arch_permutation(peer: str, n: int, dim: int,
                          self_interaction: bool,
                          order: Sequence[int] | None = None) -> np.ndarray:
  """`perm` with ours[:, r] = peer[:, perm[r]] for the first over-arch
  layer's input columns (dot; arguments as `over_arch_columns`)."""
  theirs = {c: i for i, c in enumerate(
      over_arch_columns(peer, n, dim, self_interaction, order))}
  return np.array([theirs[c] for c in
                   over_arch_columns(None, n, dim, self_interaction)])


def crossnet_columns(dim: int, order: Sequence[int]) -> np.ndarray:
  """`idx` with peer column c of the cross net's input (and output) holding
  dlrm_jax's column idx[c]: blocks of D, the peer's j-th our order[j]."""
  order = np.asarray(order)
  c = np.arange(len(order) * dim)
  return order[c // dim] * dim + c % dim


def peer_layout(setup) -> list[tuple[str, list[int]]]:
  """The peer's order of a dlrm_jax model's tables and features.

  Args:
    setup: the model setup (`trainer.spec`).

  Returns:
    [(our table name, [indices in the sparse group of the features it
    serves])], the tables in the order of their first feature, each one's
    features in order: the pooling order of a TorchRec EBC of these tables.
  """
  groups: dict[str, list[int]] = {}
  for k, f in enumerate(setup.feature_specs):
    groups.setdefault(f.table, []).append(k)
  return list(groups.items())


def _order(layout) -> list[int]:
  """order[j]: our interaction index of the peer's j-th (0: dense)."""
  return [0] + [k + 1 for _, ks in layout for k in ks]


# ----------------------------------------------------------------------------
# Configs and parameters.


def config_from_peer(sd: Mapping[str, np.ndarray], peer: str, base_config,
                     table_features=None) -> config_dict.ConfigDict:
  """The config of the peer's model.

  Args:
    sd: the peer's state dict.
    peer: 'facebook' or 'torchrec'.
    base_config: data, optimizers and loop (its model, features and tables
      are replaced).
    table_features: TorchRec: which features each table serves
      (`read_peer`).

  Returns:
    `base_config` with dense features int_0 .. int_{F-1}, id features cat_0
    .. cat_{N-1} in the peer's pooling order (rows and dim from the tables;
    features of one table share it through `embedding_name`), the MLP
    widths, arch_with_sparse off, and the dot interaction (interaction_self
    read from the top MLP's width; never for TorchRec) or the dcn one.
  """
  pm = read_peer(sd, peer, table_features)
  config = config_dict.ConfigDict(base_config.to_dict())
  feats = config_dict.ConfigDict()
  base_feats = base_config.get('features') or {}
  for i in range(pm.num_dense):
    f = (base_feats[f'int_{i}'].to_dict() if f'int_{i}' in base_feats else
         dict(type='raw', input=f'int_{i}', normalizer='log(x+1)'))
    feats[f'int_{i}'] = f
  k = 0
  for t in pm.tables:
    shared = len(t.features) > 1
    for j in range(len(t.features)):
      feats[f'cat_{k + j}'] = dict(
          type='id', input=f'cat_{k + j}', embedding_dim=pm.dim,
          num_buckets=int(t.weight.shape[0]), hash_bucket_size=None,
          embedding_name=f'cat_{k}' if shared else None, max_ids=1,
          combiner='sum', managed_collision=dict(num_rows=None, policy='lru'))
    k += len(t.features)
  config.features = feats
  if 'model' not in config:
    config.model = config_dict.ConfigDict()
  model = config.model
  model.feature_groups = config_dict.ConfigDict(dict(
      dense=[f'int_{i}' for i in range(pm.num_dense)],
      sparse=[f'cat_{k}' for k in range(pm.num_features)]))
  mlp = lambda layers: config_dict.ConfigDict(dict(
      hidden_units=[int(w.shape[0]) for w, _ in layers], activation='relu',
      use_bn=False, use_ln=False, dropout_ratio=0.0, bias=True))
  model.dense_mlp = mlp(pm.bottom)
  model.final = mlp(pm.top[:-1])
  model.arch_with_sparse = False
  model.interaction_self = pm.interaction_self
  model.interaction = 'dot' if pm.crossnet is None else 'dcn'
  if pm.crossnet is not None:
    model.dcn = config_dict.ConfigDict(dict(
        num_layers=len(pm.crossnet), rank=int(pm.crossnet[0][0].shape[1])))
  if 'embedding' not in config:
    config.embedding = config_dict.ConfigDict()
  config.embedding.tables = config_dict.ConfigDict()
  return config


def _dense_layers(ws):
  return {f'dense_{i}': {'kernel': np.asarray(w, np.float32).T.copy(),
                         'bias': np.asarray(b, np.float32)}
          for i, (w, b) in enumerate(ws)}


def _check_fits(pm: PeerDLRM, setup, layout) -> None:
  """The model of `setup` has the peer's tables and features."""
  m = setup.model
  theirs = [(len(t.features), t.weight.shape[0]) for t in pm.tables]
  rows = {t.name: t.num_rows for t in setup.tables}
  ours = [(len(ks), rows[name]) for name, ks in layout]
  if theirs != ours or (pm.crossnet is None) != (m.interaction != 'dcn'):
    raise ValueError(
        f'the model (tables as (features, rows): {ours}, interaction'
        f' {m.interaction!r}) is not the {_NAME[pm.peer]} state dict\'s'
        f' ({theirs}, {"dot" if pm.crossnet is None else "dcn"}); build it'
        ' with config_from_peer.')


def params_from_peer(sd, peer: str, trainer: trainer_lib.Trainer,
                     table_features=None
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                PeerDLRM]:
  """The peer's weights in dlrm_jax's layout.

  Args:
    sd: the peer's state dict.
    peer: 'facebook' or 'torchrec'.
    trainer: a trainer of `config_from_peer`'s config.
    table_features: as `read_peer`.

  Returns:
    (dense params, {our table name: [rows, D]}, the peer's model).
  """
  pm = read_peer(sd, peer, table_features)
  m = trainer.spec.model
  layout = peer_layout(trainer.spec)
  _check_fits(pm, trainer.spec, layout)
  order = _order(layout)
  final = _dense_layers(pm.top[:-1])
  params = {'dense_mlp': _dense_layers(pm.bottom), 'final': final,
            'output': _dense_layers(pm.top[-1:])['dense_0']}
  if pm.crossnet is None:
    perm = over_arch_permutation(peer, m.num_interaction_features,
                                 m.embedding_dim, m.interaction_self, order)
  else:  # peer = ours[idx], so ours = peer[argsort(idx)]
    perm = np.argsort(crossnet_columns(m.embedding_dim, order))
    params['crossnet'] = {}
    for l, (w, v, b) in enumerate(pm.crossnet):
      params['crossnet'][f'v_{l}'] = {
          'kernel': np.asarray(v, np.float32).T[perm].copy()}
      params['crossnet'][f'u_{l}'] = {
          'kernel': np.asarray(w, np.float32)[perm].T.copy(),
          'bias': np.asarray(b, np.float32)[perm]}
  final['dense_0']['kernel'] = final['dense_0']['kernel'][perm]
  tables = {name: t.weight for (name, _), t in zip(layout, pm.tables)}
  return params, tables, pm


def _check_tree(got, want, what):
  gs = jax.tree.map(np.shape, got)
  ws = jax.tree.map(lambda x: tuple(x.shape), want)
  if jax.tree.structure(gs) != jax.tree.structure(ws) or gs != ws:
    raise ValueError(f'{what}: converted parameters {gs} do not fit the'
                     f' model {ws}.')


def state_from_peer(sd, peer: str, trainer: trainer_lib.Trainer, seed: int = 0,
                    table_features=None
                    ) -> tuple[trainer_lib.TrainState, list[dict[str, Any]]]:
  """A fresh train state holding the peer's weights.

  Args:
    sd: the peer's state dict.
    peer: 'facebook' or 'torchrec'.
    trainer: a trainer of `config_from_peer`'s config.
    seed: seeds what the peer does not hold (the optimizer starts fresh).
    table_features: as `read_peer`.

  Returns:
    (the state at step 0, the peer's names: `peer_tables`' entries, which
    `peer_from_state` takes back).
  """
  params, tables, pm = params_from_peer(sd, peer, trainer, table_features)
  state = trainer.init_state(seed)
  _check_tree(params, state.params, peer)
  rep = trainer.state_shardings()
  params = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s),
                        params, rep.params)
  state = state.replace(params=params, opt_state=jax.jit(
      trainer.tx.init, out_shardings=rep.opt_state)(params))
  emb = state.emb
  for name, values in tables.items():
    emb = table_access.set_table(trainer.engine, emb, name, values)
  names = [{'name': t.name, 'table': name, 'feature_names': list(t.features)}
           for (name, _), t in zip(peer_layout(trainer.spec), pm.tables)]
  return state.replace(emb=emb), names


_POOLING = {'sum': 'SUM', 'mean': 'MEAN'}  # torchrec PoolingType


def _combiner(setup, k: int) -> str:
  """The pooling of the k-th sparse feature (a bucketized raw one: sum)."""
  return getattr(setup.transform.sparse[k], 'combiner', 'sum')


def peer_tables(setup, peer: str, saved: Sequence[Mapping] | None = None
                ) -> list[dict[str, Any]]:
  """The peer's tables of a dlrm_jax model, in the peer's order.

  Args:
    setup: the model setup (`trainer.spec`).
    peer: 'facebook' or 'torchrec'.
    saved: TorchRec: the names an import recorded (`state_from_peer`); a
      table's feature names are used while it serves as many features.

  Returns:
    Per table: name (the peer's), table (ours), features (ours),
    feature_names (the peer's), num_embeddings, embedding_dim, pooling.
  """
  by_table = {s.get('table'): s for s in saved or ()}
  rows = {t.name: t.num_rows for t in setup.tables}
  out = []
  for i, (table, ks) in enumerate(peer_layout(setup)):
    feats = [setup.feature_specs[k].name for k in ks]
    if peer == 'facebook':  # DLRM_Net's tables are positional
      name, feature_names = f'emb_l.{i}', [f'emb_l.{i}']
    else:  # TorchRec's Criteo DLRM: t_cat_{i} serves cat_{i}
      s = by_table.get(table) or {}
      name = s.get('name') or f't_{table}'
      feature_names = list(s.get('feature_names') or ())
      if len(feature_names) != len(ks):
        feature_names = feats
    combiner = _combiner(setup, ks[0])
    out.append({'name': name, 'table': table, 'features': feats,
                'feature_names': feature_names,
                'num_embeddings': int(rows[table]),
                'embedding_dim': int(setup.model.embedding_dim),
                'pooling': _POOLING.get(combiner, combiner)})
  return out


def _check_exportable(setup, peer: str) -> None:
  """Refuses, in one line, a model the peer cannot express."""
  m = setup.model
  who = 'facebookresearch DLRM_Net' if peer == 'facebook' else (
      'TorchRec DLRM_DCN' if m.interaction == 'dcn' else 'TorchRec DLRM')
  if m.dense_mlp is None:
    raise ValueError(
        f'a {who} has a dense arch; this model has no dense features'
        ' (config.model.feature_groups.dense is empty).')
  for path, spec in (('dense_mlp', m.dense_mlp), ('final', m.final)):
    if spec.use_bn or spec.use_ln or not spec.bias or spec.activation != (
        'relu'):
      raise ValueError(
          f'config.model.{path} must be a relu MLP with biases and no'
          f' normalization for a {who}.')
  if m.arch_with_sparse:
    raise ValueError(
        f'config.model.arch_with_sparse must be False for a {who}.')
  if peer == 'facebook' and m.interaction == 'dcn':
    raise ValueError(
        'facebookresearch DLRM_Net has no DCN interaction'
        ' (dlrm_s_pytorch.py --arch-interaction-op is dot or cat); export'
        ' config.model.interaction=dcn with --peer=torchrec (DLRM_DCN).')
  if peer == 'torchrec' and m.interaction_self:
    raise ValueError('TorchRec DLRM has no self-interaction'
                     ' (config.model.interaction_self must be False).')
  for name, ks in peer_layout(setup):
    if peer == 'facebook' and len(ks) > 1:
      feats = [setup.feature_specs[k].name for k in ks]
      raise ValueError(
          f'facebookresearch DLRM_Net has one table per feature; features'
          f' {", ".join(feats)} share table {name!r} (embedding_name).')
    combiner = _combiner(setup, ks[0])
    if combiner != 'sum' and (peer == 'facebook' or combiner not in _POOLING):
      pools = ('by sum: nn.EmbeddingBag(mode=sum)' if peer == 'facebook'
               else 'SUM or MEAN')
      raise ValueError(
          f'config.features.{setup.feature_specs[ks[0]].name}.combiner'
          f' ({combiner!r}) has no {who} counterpart (it pools {pools}).')


def peer_from_state(trainer: trainer_lib.Trainer, state: trainer_lib.TrainState,
                    peer: str, names: Sequence[Mapping] | None = None
                    ) -> dict[str, np.ndarray]:
  """The peer's state dict (numpy) of a dlrm_jax model.

  Args:
    trainer: the model's trainer.
    state: its state.
    peer: 'facebook' or 'torchrec'.
    names: the peer's names an import recorded (`state_from_peer`).

  Returns:
    The state dict. Raises ValueError, in one line, for a model the peer
    cannot express: no dense arch, MLPs other than relu with biases,
    arch_with_sparse, self-interaction for TorchRec, dcn or shared tables
    for facebookresearch, combiners the peer lacks.
  """
  setup = trainer.spec
  _check_exportable(setup, peer)
  m = setup.model
  tables = peer_tables(setup, peer, names)
  order = _order(peer_layout(setup))
  params = jax.device_get(state.params)
  if m.interaction == 'dcn':
    idx = crossnet_columns(m.embedding_dim, order)  # peer = ours[idx]
  else:
    idx = np.argsort(over_arch_permutation(
        peer, m.num_interaction_features, m.embedding_dim,
        m.interaction_self, order))

  def linear(p, first=False):
    w = np.asarray(p['kernel'])
    return (w[idx] if first else w).T.copy(), np.asarray(p['bias'])

  bot = [linear(params['dense_mlp'][f'dense_{i}'])
         for i in range(len(m.dense_mlp.hidden_units))]
  top = [linear(params['final'][f'dense_{i}'], first=(i == 0))
         for i in range(len(m.final.hidden_units))]
  top.append(linear(params['output']))
  weights = [table_access.get_table(trainer.engine, state.emb,
                                    t['table']).astype(np.float32)
             for t in tables]
  sd = {}
  if peer == 'facebook':
    for k, w in enumerate(weights):
      sd[f'emb_l.{k}.weight'] = w
    for prefix, layers in (('bot_l', bot), ('top_l', top)):
      for i, (w, b) in enumerate(layers):
        sd[f'{prefix}.{2 * i}.weight'], sd[f'{prefix}.{2 * i}.bias'] = w, b
    return sd
  for t, w in zip(tables, weights):
    sd[_TR_EMB + t['name'] + '.weight'] = w
  for i, (w, b) in enumerate(bot):
    key = f'dense_arch.model._mlp.{i}._linear'
    sd[key + '.weight'], sd[key + '.bias'] = w, b
  if m.interaction == 'dcn':
    for l in range(m.dcn.num_layers):
      v = np.asarray(params['crossnet'][f'v_{l}']['kernel'])
      u = params['crossnet'][f'u_{l}']
      sd[f'{_TR_CROSS}W_kernels.{l}'] = np.asarray(u['kernel']).T[idx].copy()
      sd[f'{_TR_CROSS}V_kernels.{l}'] = v[idx].T.copy()
      sd[f'{_TR_CROSS}bias.{l}'] = np.asarray(u['bias'])[idx]
  for i, (w, b) in enumerate(top[:-1]):
    key = f'over_arch.model.0._mlp.{i}._linear'
    sd[key + '.weight'], sd[key + '.bias'] = w, b
  sd['over_arch.model.1.weight'], sd['over_arch.model.1.bias'] = top[-1]
  return sd


def torchrec_arguments(setup, tables: Sequence[Mapping]) -> dict[str, Any]:
  """What builds the TorchRec model of an export (`torchrec/models/dlrm.py`).

  Args:
    setup: the model setup.
    tables: `peer_tables(setup, 'torchrec')`.

  Returns:
    model ('DLRM' or 'DLRM_DCN'), tables (EmbeddingBagConfig fields: name,
    embedding_dim, num_embeddings, feature_names, pooling), the model's
    constructor arguments, and table_features (the --table_features value
    that imports the export back).
  """
  m = setup.model
  args = {
      'model': 'DLRM_DCN' if m.interaction == 'dcn' else 'DLRM',
      'tables': [{k: t[k] for k in ('name', 'embedding_dim', 'num_embeddings',
                                    'feature_names', 'pooling')}
                 for t in tables],
      'dense_in_features': m.num_dense,
      'dense_arch_layer_sizes': list(m.dense_mlp.hidden_units),
      'over_arch_layer_sizes': list(m.final.hidden_units) + [1],
  }
  if m.interaction == 'dcn':
    args.update(dcn_num_layers=m.dcn.num_layers, dcn_low_rank_dim=m.dcn.rank)
  args['table_features'] = ';'.join(
      f'{t["name"]}={",".join(t["feature_names"])}' for t in tables)
  return args


def facebook_flags(setup) -> str:
  """The `dlrm_s_pytorch.py` flags that build an export's DLRM_Net (`run`:
  --arch-mlp-bot with the dense input count, --arch-mlp-top without the
  interaction width, --arch-embedding-size for random data)."""
  m = setup.model
  flags = [f'--arch-sparse-feature-size={m.embedding_dim}',
           '--arch-mlp-bot=' + '-'.join(
               map(str, [m.num_dense, *m.dense_mlp.hidden_units])),
           '--arch-mlp-top=' + '-'.join(
               map(str, [*m.final.hidden_units, 1])),
           '--arch-embedding-size=' + '-'.join(
               str(r) for r in setup.table_rows)]
  if m.interaction_self:
    flags.append('--arch-interaction-itself')
  return ' '.join(flags)


# ----------------------------------------------------------------------------
# Checkpoints.


def import_checkpoint(sd, peer: str, workdir: str, base_config,
                      trainer: trainer_lib.Trainer | None = None,
                      table_features=None) -> config_dict.ConfigDict:
  """Writes a step-0 checkpoint of the peer's weights.

  Args:
    sd: the peer's state dict.
    peer: 'facebook' or 'torchrec'.
    workdir: the new run directory (made absolute here).
    base_config: as `config_from_peer`.
    trainer: a trainer of the resulting config (default: built here).
    table_features: as `read_peer`.

  Returns:
    The config, also written as `<workdir>/config.json`, beside the
    checkpoint and `peer.json` (the peer's table and feature names).
  """
  workdir = cli.absolute(workdir)
  config = config_from_peer(sd, peer, base_config, table_features)
  trainer = trainer or trainer_lib.Trainer(config)
  state, names = state_from_peer(sd, peer, trainer,
                                 seed=trainer.spec.loop.seed,
                                 table_features=table_features)
  save_initial_checkpoint(trainer, state, workdir)
  if jax.process_index() == 0:
    ckpt_lib.write_json(os.path.join(workdir, PEER_FILE),
                        {'peer': peer, 'tables': names})
  return config


def save_initial_checkpoint(trainer: trainer_lib.Trainer, state: trainer_lib.TrainState,
                            workdir: str) -> None:
  """Writes `state` as the step-0 checkpoint of a run of the trainer's spec.

  Args:
    trainer: the run's trainer.
    state: the state to save.
    workdir: the run directory (with `config.json` written too); training
      in it starts from this checkpoint as from a fresh initialization.
  """
  workdir = cli.absolute(workdir)
  os.makedirs(workdir, exist_ok=True)
  spec = trainer.spec
  # The input pipeline's start position, so that training resumes from this
  # checkpoint as a fresh run of the config would start.
  data = inputs.make_data(spec, process_index=jax.process_index(),
                          process_count=jax.process_count())
  data_iter = data.train.iterator()
  ckpt = ckpt_lib.Checkpointer(workdir)
  try:
    ckpt.save(0, state, {'signature': trainer.signature(),
                         'plan': trainer.plan.to_json(),
                         'step': 0, 'config': spec.config_json},
              data_iter=data_iter)
  finally:
    ckpt.close()
    data_iter.close()
  if jax.process_index() == 0:
    ckpt_lib.write_json(os.path.join(workdir, 'config.json'),
                        json.loads(spec.config_json))


def config_of_workdir(workdir: str) -> config_dict.ConfigDict:
  """The config a run (or an import) wrote as `config.json`."""
  with open(os.path.join(workdir, 'config.json')) as f:
    return config_dict.ConfigDict(json.load(f))


@dataclasses.dataclass(frozen=True)
class Export:
  """A dlrm_jax checkpoint in a peer's layout.

  Attributes:
    state_dict: the peer's state dict (numpy).
    tables: `peer_tables` (the peer's names, rows, pooling).
    setup: the model setup it came from.
  """

  state_dict: dict[str, np.ndarray]
  tables: list[dict[str, Any]]
  setup: Any


def export_checkpoint(workdir: str, peer: str, config=None,
                      step: int | None = None) -> Export:
  """The peer's state dict of a run's latest (or given) checkpoint.

  Args:
    workdir: the run directory.
    peer: 'facebook' or 'torchrec'.
    config: the run's config (default: `<workdir>/config.json`).
    step: the checkpoint (default: the newest good one).

  Returns:
    The export; the names an import recorded in `peer.json` are kept.
  """
  from dlrm_jax.config import build as config_lib  # pylint: disable=g-import-not-at-top
  from dlrm_jax.serving import offline as inference  # pylint: disable=g-import-not-at-top
  workdir = cli.absolute(workdir)
  config = config if config is not None else config_of_workdir(workdir)
  # Refused before anything is restored.
  setup = config_lib.run_spec(config)
  _check_exportable(setup, peer)
  names = None
  peer_file = os.path.join(workdir, PEER_FILE)
  if os.path.exists(peer_file):
    with open(peer_file) as f:
      saved = json.load(f)
    if saved.get('peer') == peer:
      names = saved.get('tables')
      if names is None and saved.get('table_names'):  # before shared tables
        names = [{'name': n, 'table': t} for n, (t, _)
                 in zip(saved['table_names'], peer_layout(setup))]
  model = inference.load(setup, workdir, step)
  sd = peer_from_state(model.trainer, model.state, peer, names)
  return Export(sd, peer_tables(model.trainer.spec, peer, names),
                model.trainer.spec)


# ----------------------------------------------------------------------------
# Command line.


def default_base_config() -> config_dict.ConfigDict:
  """configs/criteo.py's default config (beside the dlrm_jax package)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), 'configs', 'criteo.py')
  if not os.path.exists(path):
    raise ValueError(
        f'no --config given, and the default base config {path} is not there'
        ' (dlrm_jax installed without its configs/); pass --config.')
  spec = importlib.util.spec_from_file_location('_dlrm_jax_criteo_config',
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _check_input(path: str) -> None:
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


def _nearest_existing(path: str) -> str:
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_new_workdir(path: str) -> None:
  """Refuses, in one line, a --workdir an import cannot write.

  Args:
    path: the absolute directory: new, or holding no run (no checkpoints/ or
      config.json); its nearest existing parent must be a writable
      directory.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'--workdir ({path}) is a file, not a directory.')
  held = [n for n in ('checkpoints', 'config.json')
          if os.path.exists(os.path.join(path, n))]
  if held:
    raise ValueError(
        f'--workdir ({path}) already holds a run ({", ".join(held)}); import'
        ' into a new directory.')
  parent = _nearest_existing(path)
  if not os.path.isdir(parent):
    raise ValueError(f'--workdir ({path}): cannot create it, {parent} is a'
                     ' file.')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir ({path}): cannot create it, {parent} is not'
                     ' writable (permission denied).')


def _check_output(path: str) -> None:
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


def _check_run_workdir(path: str, has_config: bool) -> None:
  if not os.path.isdir(path):
    raise ValueError(f'--workdir ({path}): no such directory.')
  if not has_config and not os.path.exists(os.path.join(path, 'config.json')):
    raise ValueError(
        f'--workdir ({path}) holds no config.json: not a dlrm_jax run (or'
        ' pass its --config).')


def sidecar_path(output: str) -> str:
  """Where a TorchRec export's tables and model arguments go."""
  return os.path.splitext(output)[0] + TORCHREC_SIDECAR


def run_import(input_path: str, peer: str, workdir: str, base_config=None,
               table_features: str | None = None) -> str:
  """`--direction=import`: checks, converts, writes; returns the summary.

  Args:
    input_path: the peer's file (absolute).
    peer: 'facebook' or 'torchrec'.
    workdir: the new run directory (absolute).
    base_config: the base config (default: `default_base_config`).
    table_features: the --table_features value.

  Returns:
    The line to print.
  """
  _check_input(input_path)
  check_new_workdir(workdir)
  mapping = parse_table_features(table_features)
  sd = load_state_dict(input_path)
  base = base_config if base_config is not None else default_base_config()
  cli.absolute_config_paths(base)
  # Refusals come before anything is written (config_from_peer, then the
  # trainer and state_from_peer).
  config = import_checkpoint(sd, peer, workdir, base, table_features=mapping)
  m = config.model
  shared = [f'{t}={",".join(f)}' for t, f in (mapping or {}).items()
            if len(f) > 1]
  return (f'wrote a step-0 checkpoint to {workdir} (config:'
          f' {os.path.join(workdir, "config.json")}); model: {m.interaction}'
          f' interaction, dense_mlp {list(m.dense_mlp.hidden_units)}, final'
          f' {list(m.final.hidden_units)},'
          f' {len(m.feature_groups.sparse)} sparse features'
          + (f'; shared tables: {"; ".join(shared)}' if shared else ''))


def run_export(workdir: str, peer: str, output: str, config=None) -> str:
  """`--direction=export`: checks, converts, writes; returns the summary.

  Args:
    workdir: the run directory (absolute).
    peer: 'facebook' or 'torchrec'.
    output: the peer's file (absolute); for TorchRec also
      `sidecar_path(output)`.
    config: the run's config (default: its config.json).

  Returns:
    The line to print.
  """
  _check_run_workdir(workdir, config is not None)
  _check_output(output)
  if config is not None:
    cli.absolute_config_paths(config)
  ex = export_checkpoint(workdir, peer, config)
  save_peer_file(ex.state_dict, output, peer)
  line = f'wrote {len(ex.state_dict)} arrays to {output}'
  if peer == 'facebook':
    layout = ('the dict --load-model reads' if not output.endswith('.npz')
              else 'the bare state dict')
    return f'{line} ({layout}); dlrm_s_pytorch.py {facebook_flags(ex.setup)}'
  args = torchrec_arguments(ex.setup, ex.tables)
  side = sidecar_path(output)
  with open(side, 'w') as f:
    json.dump(args, f, indent=1)
  return (f'{line} (TorchRec {args["model"]}); tables and model arguments:'
          f' {side}; tables: {args["table_features"]}')


def main(argv=None):
  """`python -m dlrm_jax.convert --peer=facebook|torchrec --direction=...`"""
  # pylint: disable=g-import-not-at-top,g-multiple-import
  from absl import flags, logging
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top,g-multiple-import

  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'Base config (data, optimizers); the model, features'
      ' and tables come from the state dict. Import: default'
      ' configs/criteo.py; export: default <workdir>/config.json.',
      lock_config=False)
  peer = flags.DEFINE_string('peer', None, 'The peer layout: facebook or'
                             ' torchrec.')
  direction = flags.DEFINE_string(
      'direction', 'import',
      'import: state dict -> checkpoint; export: checkpoint -> state dict.')
  input_ = flags.DEFINE_string('input', None, 'import: the peer\'s file'
                               ' (.npz, .pt, .pth).')
  output = flags.DEFINE_string('output', None, 'export: the peer\'s file'
                               ' (.npz, .pt, .pth).')
  workdir = flags.DEFINE_string('workdir', None, 'The dlrm_jax run'
                                ' directory (import: a new one).')
  table_features = flags.DEFINE_string(
      'table_features', None, "import, torchrec: the features each table"
      " serves, 't_a=f1,f2;t_b=f3' (EmbeddingBagConfig.feature_names), or"
      ' the .torchrec.json an export wrote. Default: one feature per table.')

  def run(argv):
    if len(argv) > 1:
      raise cli.UserError(f'unexpected arguments: {argv[1:]}')
    if flags.FLAGS.verbosity <= 0:  # orbax's INFO lines only with -v=1
      logging.set_verbosity(logging.WARNING)
    if peer.value not in PEERS:
      raise cli.UserError(f'--peer ({peer.value}) must be facebook or'
                          ' torchrec.')
    if direction.value not in ('import', 'export'):
      raise cli.UserError(f'--direction ({direction.value}) must be import or'
                          ' export.')
    if not workdir.value:
      raise cli.UserError('--workdir is required: the dlrm_jax run'
                          ' directory.')
    imp = direction.value == 'import'
    for name, flag, wanted in (('--input', input_, imp),
                               ('--output', output, not imp),
                               ('--table_features', table_features, imp)):
      if flag.value and not wanted:
        raise cli.UserError(f'{name} is for --direction='
                            f'{"export" if imp else "import"}.')
    if imp:
      if not input_.value:
        raise cli.UserError('import needs --input: the peer\'s file.')
      line = run_import(cli.absolute(input_.value), peer.value,
                        cli.absolute(workdir.value), config_flag.value,
                        table_features.value)
    else:
      if not output.value:
        raise cli.UserError('export needs --output: the peer\'s file.')
      line = run_export(cli.absolute(workdir.value), peer.value,
                        cli.absolute(output.value), config_flag.value)
    print(line)

  cli.run_app(lambda a: cli.run(run, a, errors=(
      ckpt_lib.DamagedCheckpointError, ckpt_lib.CheckpointSaveError)),
              argv, flags_parser=lambda a: cli.parse_flags(
                  a, prepare=cli.config_argv))


if __name__ == '__main__':
  main()
