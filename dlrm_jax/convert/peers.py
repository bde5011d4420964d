"""The peers' layouts: key names, shapes, table features, column orders.

`read_peer` reads a state dict into a `PeerDLRM` and refuses, in one line,
what dlrm_jax cannot represent. `state_dict_of` writes one back. The column
functions say how the first over-arch layer's inputs and the cross net's are
ordered by each side. Numpy only: no JAX arrays or calls.

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
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Mapping, Sequence

import numpy as np

from dlrm_jax import cli
from dlrm_jax.models import interaction

PEERS = ('facebook', 'torchrec')
PEER_NAMES = {'facebook': 'facebookresearch', 'torchrec': 'TorchRec'}
_TR_EMB = 'sparse_arch.embedding_bag_collection.embedding_bags.'
_TR_CROSS = 'inter_arch.crossnet.'
# Criteo's columns: dlrm_jax reads int_0..int_12 and cat_0..cat_25.
MAX_DENSE, MAX_SPARSE = 13, 26


# ----------------------------------------------------------------------------
# The peers' models, read from and written to their state dicts.


@dataclasses.dataclass(frozen=True)
class PeerTable:
  """One embedding table of a peer.

  Attributes:
    name: its name. facebookresearch names it `emb_l.{k}`. TorchRec uses the
      EBC's table name.
    weight: the rows, `[rows, D]`.
    features: the names of the features it serves, in pooling order.
  """

  name: str
  weight: np.ndarray
  features: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PeerDLRM:
  """A peer's DLRM as its state dict holds it, in the peer's shapes.

  Attributes:
    peer: 'facebook' or 'torchrec'.
    tables: the tables in the peer's order, the order of its pooled features.
    bottom: per layer of the dense arch, the weight `[out, in]` and the bias
      `[out]`.
    top: the same for the over arch. The last layer has one output.
    crossnet: per cross layer of a TorchRec DLRM_DCN, W `[I, r]`, V `[r, I]`
      and b `[I]`. None for the dot interaction.
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
    """The embedding dim D."""
    return int(self.tables[0].weight.shape[1])

  @property
  def num_dense(self) -> int:
    """The number of dense inputs."""
    return int(self.bottom[0][0].shape[1])

  @property
  def num_features(self) -> int:
    """The number of pooled features, over all tables."""
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
        f'the state dict has no {marker!r} keys: it is not a {PEER_NAMES[peer]}'
        f' DLRM (keys: {sorted(sd)[:6]}...).')
  prefix = keys[0][:keys[0].index(marker)]
  outside = [k for k in sd if not k.startswith(prefix)]
  if outside:
    raise ValueError(
        f'the {PEER_NAMES[peer]} state dict has keys outside its {prefix!r}'
        f' prefix ({outside[:4]}); convert would drop them.')
  return {k[len(prefix):]: np.asarray(v) for k, v in sd.items()}


class _Keys:
  """The state dict's entries, those read, and the gaps in numbered ones.

  Gaps are refused after the keys it has no place for, which say more.
  """

  def __init__(self, sd):
    self.sd, self.used, self.gaps = sd, set(), []

  def get(self, key):
    """Returns an entry and marks it read.

    Args:
      key: the key.

    Returns:
      The array.
    """
    self.used.add(key)
    return self.sd[key]

  def indexed(self, fmt: str, suffix: str, step: int = 1, start: int = 0
              ) -> list[int]:
    """Finds the numbered keys `fmt.format(i) + suffix`, with i digits only.

    A gap in the numbers is recorded in `gaps`.

    Args:
      fmt: the key before the suffix, with `{}` for the number.
      suffix: what follows the number.
      step: the step between numbers of a whole model.
      start: the first number of a whole model.

    Returns:
      The numbers found, sorted. A whole model has start, start + step, and so
      on, with none missing.
    """
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
    """Reads consecutive layers named by `fmt` and marks them read.

    Args:
      fmt: the layer's key prefix, with `{}` for the number.
      step: the step between layer numbers.
      start: the first layer number.

    Returns:
      Per layer, the weight `[out, in]` and the bias `[out]`.

    Raises:
      ValueError: a layer has no bias.
    """
    out = []
    for i in self.indexed(fmt, '.weight', step, start):
      name = fmt.format(i)
      if name + '.bias' not in self.sd:
        raise ValueError(f'{name} has no bias; DLRM layers have one.')
      out.append((self.get(name + '.weight'), self.get(name + '.bias')))
    return out

  def unused(self) -> list[str]:
    """The keys not read yet, in the state dict's order."""
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
  """The feature count F of a TorchRec DLRM's over-arch input width.

  That width is `dim + F + F (F - 1) / 2`. Returns None when no F gives it.
  """
  pairs = width - dim  # F (F + 1) / 2
  f = (math.isqrt(8 * pairs + 1) - 1) // 2 if pairs > 0 else 0
  return f if f > 0 and f * (f + 1) // 2 == pairs else None


def parse_table_features(value: str | None) -> dict[str, list[str]] | None:
  """Parses `--table_features`: which features each TorchRec table serves.

  Args:
    value: 't_a=f1,f2;t_b=f3', each table's EmbeddingBagConfig.feature_names
      in order. Or the path of a `.json` file holding that string under
      'table_features', as an export writes beside its output. None or ''
      for none.

  Returns:
    {table: [features]} in the order given, or None.

  Raises:
    ValueError: an unreadable file, an item not `table=feature,...`, or a
      table or feature named twice.
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
  """Reads a peer's DLRM from its state dict.

  It refuses what dlrm_jax cannot represent, in one line.

  Args:
    sd: the state dict of numpy arrays. Its keys may carry a 'module.' or
      'model.' prefix.
    peer: 'facebook' or 'torchrec'.
    table_features: TorchRec only. {table: [features]} says which features
      each table serves, as `parse_table_features` returns it. None: one
      feature each.

  Returns:
    The model.

  Raises:
    ValueError: keys it would drop, shapes that do not chain, widths that fit
      no DLRM, or more features than tables without `table_features`.
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
  who = PEER_NAMES[peer]
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
  """Reads the table names, tables, bottom layers, top layers and cross layers.

  The cross layers are None for dot. Keys are the peer's names. Keys it has no
  place for are refused.
  """
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
        f'the {PEER_NAMES[peer]} state dict holds {len(unused)} key(s) dlrm_jax'
        f' has no place for ({", ".join(unused[:3])}'
        f'{", ..." if len(unused) > 3 else ""})'
        f'{": " + why + " is not supported" if why else ""}; convert would'
        ' drop them.')
  if keys.gaps:
    raise ValueError(keys.gaps[0])
  return names, tables, bottom, top, crossnet


def _check_shapes(peer, names, tables, bottom, top) -> int:
  """Checks the tables and MLPs of a DLRM. Returns the embedding dim D."""
  who = PEER_NAMES[peer]
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
  """Checks a LowRankCrossNet on `[B, (F + 1) D]`. Returns the feature count F.
  """
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


def state_dict_of(model: PeerDLRM) -> dict[str, np.ndarray]:
  """Writes a model as the peer's state dict, which `read_peer` reads back.

  Args:
    model: the model, in the peer's shapes and order.

  Returns:
    {key: array} under the peer's names, in the order the peer's
    `state_dict()` lists them.

  Raises:
    ValueError: a facebookresearch model with a cross net.
  """
  sd = {}
  if model.peer == 'facebook':
    if model.crossnet is not None:
      raise ValueError('facebookresearch DLRM_Net has no cross net.')
    for k, t in enumerate(model.tables):
      sd[f'emb_l.{k}.weight'] = t.weight
    for prefix, layers in (('bot_l', model.bottom), ('top_l', model.top)):
      for i, (w, b) in enumerate(layers):
        sd[f'{prefix}.{2 * i}.weight'], sd[f'{prefix}.{2 * i}.bias'] = w, b
    return sd
  for t in model.tables:
    sd[_TR_EMB + t.name + '.weight'] = t.weight
  for i, (w, b) in enumerate(model.bottom):
    key = f'dense_arch.model._mlp.{i}._linear'
    sd[key + '.weight'], sd[key + '.bias'] = w, b
  for l, (w, v, b) in enumerate(model.crossnet or ()):
    sd[f'{_TR_CROSS}W_kernels.{l}'] = w
    sd[f'{_TR_CROSS}V_kernels.{l}'] = v
    sd[f'{_TR_CROSS}bias.{l}'] = b
  for i, (w, b) in enumerate(model.top[:-1]):
    key = f'over_arch.model.0._mlp.{i}._linear'
    sd[key + '.weight'], sd[key + '.bias'] = w, b
  sd['over_arch.model.1.weight'], sd['over_arch.model.1.bias'] = model.top[-1]
  return sd


# ----------------------------------------------------------------------------
# Column orders.


def _pairs(n: int, self_interaction: bool, lower: bool) -> list[tuple]:
  """The pair columns of an n-feature interaction, in the peer's order.

  Each pair is (i, j) of the product. facebookresearch's lower triangle has
  i > j.
  """
  if lower:  # facebookresearch: for i, for j < i (j <= i)
    return [(i, j) for i in range(n)
            for j in range(i + (1 if self_interaction else 0))]
  rows, cols = np.triu_indices(n, k=0 if self_interaction else 1)
  return list(zip(rows.tolist(), cols.tolist()))


def over_arch_columns(peer: str | None, n: int, dim: int,
                      self_interaction: bool,
                      order: Sequence[int] | None = None) -> list[tuple]:
  """Says what each input column of the first over-arch layer holds, for dot.

  Args:
    peer: whose column order. None: dlrm_jax's own, checked against
      `interaction.triangle_indices`.
    n: the number of interaction features: the dense arch's output and the
      sparse ones.
    dim: D, the dense arch's output width.
    self_interaction: the pairs include the diagonal.
    order: for a peer, `order[j]` is dlrm_jax's index of the peer's j-th
      interaction feature. Default: the same order.

  Returns:
    Per column, ('d', k) for the k-th output of the dense arch. Or ('p', a, b)
    for the dot product of dlrm_jax's interaction features a <= b. Feature 0
    is the dense arch's output.
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
  """Maps the first over-arch layer's input columns from the peer's order.

  This is for the dot interaction.

  Args:
    peer: 'facebook' or 'torchrec'.
    n: the number of interaction features, as `over_arch_columns` takes it.
    dim: D, the dense arch's output width.
    self_interaction: the pairs include the diagonal.
    order: as `over_arch_columns` takes it.

  Returns:
    `perm` with ours[:, r] = peer[:, perm[r]].
  """
  theirs = {c: i for i, c in enumerate(
      over_arch_columns(peer, n, dim, self_interaction, order))}
  return np.array([theirs[c] for c in
                   over_arch_columns(None, n, dim, self_interaction)])


def crossnet_columns(dim: int, order: Sequence[int]) -> np.ndarray:
  """Maps the cross net's input columns from ours to the peer's order.

  The same map holds for its output. Columns come in blocks of D. The peer's
  j-th block is our block order[j].

  Args:
    dim: D, the embedding dim.
    order: `order[j]` is our index of the peer's j-th interaction feature.

  Returns:
    `idx` with peer column c holding dlrm_jax's column idx[c].
  """
  order = np.asarray(order)
  c = np.arange(len(order) * dim)
  return order[c // dim] * dim + c % dim


def peer_layout(setup) -> list[tuple[str, list[int]]]:
  """Gives the peer's order of a dlrm_jax model's tables and features.

  Tables come in the order of their first feature. Each table's features come
  in order. That is the pooling order of a TorchRec EBC of these tables.

  Args:
    setup: the model setup, `trainer.spec`.

  Returns:
    [(our table name, [the indices in the sparse group of its features])].
  """
  groups: dict[str, list[int]] = {}
  for k, f in enumerate(setup.feature_specs):
    groups.setdefault(f.table, []).append(k)
  return list(groups.items())

