"""To and from a dlrm_jax model: its config, its parameters and state.

`config_from_peer` builds the config of a peer's model, `state_from_peer`
a step-0 train state holding its weights. `peer_from_state` goes back, after
`check_exportable` has refused what the peer cannot express. `peer_tables`,
`torchrec_arguments` and `facebook_flags` describe an export's tables and
the peer's model.

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
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from dlrm_jax.convert import peers
from dlrm_jax.embedding import table_access
from dlrm_jax.train import trainer as trainer_lib


# ----------------------------------------------------------------------------
# From the peer: its config, parameters and state.


def _order(layout) -> list[int]:
  """order[j] is our interaction index of the peer's j-th feature. 0 is dense.
  """
  return [0] + [k + 1 for _, ks in layout for k in ks]


def config_from_peer(sd: Mapping[str, np.ndarray], peer: str, base_config,
                     table_features=None) -> config_dict.ConfigDict:
  """Builds the config of the peer's model.

  The dense features are int_0 .. int_{F-1}. The id features are cat_0 ..
  cat_{N-1}, in the peer's pooling order. Their rows and dim come from the
  tables. Features of one table share it through `embedding_name`. The MLP
  widths are the peer's, and arch_with_sparse is off. The interaction is dot
  or dcn. For dot, interaction_self is read from the top MLP's width. A
  TorchRec model never has it.

  Args:
    sd: the peer's state dict.
    peer: 'facebook' or 'torchrec'.
    base_config: gives the data, the optimizers and the loop. Its model,
      features and tables are replaced.
    table_features: TorchRec only. Which features each table serves, as
      `peers.read_peer` takes it.

  Returns:
    A copy of `base_config` with the peer's model, features and tables.

  Raises:
    ValueError: `peers.read_peer` refuses the state dict.
  """
  pm = peers.read_peer(sd, peer, table_features)
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


def _check_fits(pm: peers.PeerDLRM, setup, layout) -> None:
  """The model of `setup` has the peer's tables and features."""
  m = setup.model
  theirs = [(len(t.features), t.weight.shape[0]) for t in pm.tables]
  rows = {t.name: t.num_rows for t in setup.tables}
  ours = [(len(ks), rows[name]) for name, ks in layout]
  if theirs != ours or (pm.crossnet is None) != (m.interaction != 'dcn'):
    raise ValueError(
        f'the model (tables as (features, rows): {ours}, interaction'
        f' {m.interaction!r}) is not the {peers.PEER_NAMES[pm.peer]} state'
        f' dict\'s ({theirs}, {"dot" if pm.crossnet is None else "dcn"});'
        ' build it with config_from_peer.')


def params_from_peer(sd, peer: str, trainer: trainer_lib.Trainer,
                     table_features=None
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                peers.PeerDLRM]:
  """Puts the peer's weights in dlrm_jax's layout.

  Args:
    sd: the peer's state dict.
    peer: 'facebook' or 'torchrec'.
    trainer: a trainer of `config_from_peer`'s config.
    table_features: as `peers.read_peer` takes it.

  Returns:
    A tuple of the dense params, {our table name: `[rows, D]`} and the peer's
    model.

  Raises:
    ValueError: the state dict is refused, or the trainer's model does not
      have its tables and features.
  """
  pm = peers.read_peer(sd, peer, table_features)
  m = trainer.spec.model
  layout = peers.peer_layout(trainer.spec)
  _check_fits(pm, trainer.spec, layout)
  order = _order(layout)
  final = _dense_layers(pm.top[:-1])
  params = {'dense_mlp': _dense_layers(pm.bottom), 'final': final,
            'output': _dense_layers(pm.top[-1:])['dense_0']}
  if pm.crossnet is None:
    perm = peers.over_arch_permutation(peer, m.num_interaction_features,
                                       m.embedding_dim, m.interaction_self,
                                       order)
  else:  # peer = ours[idx], so ours = peer[argsort(idx)]
    perm = np.argsort(peers.crossnet_columns(m.embedding_dim, order))
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
  """Builds a fresh train state holding the peer's weights.

  The optimizer state starts fresh.

  Args:
    sd: the peer's state dict.
    peer: 'facebook' or 'torchrec'.
    trainer: a trainer of `config_from_peer`'s config.
    seed: seeds what the peer does not hold.
    table_features: as `peers.read_peer` takes it.

  Returns:
    A tuple of the state at step 0 and the peer's names. The names are
    `peer_tables`' entries, which `peer_from_state` takes back.

  Raises:
    ValueError: the state dict is refused, or its weights do not fit the
      trainer's model.
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
  layout = peers.peer_layout(trainer.spec)
  names = [{'name': t.name, 'table': name, 'feature_names': list(t.features)}
           for (name, _), t in zip(layout, pm.tables)]
  return state.replace(emb=emb), names


# ----------------------------------------------------------------------------
# To the peer: its tables, state dict and model arguments.


_POOLING = {'sum': 'SUM', 'mean': 'MEAN'}  # torchrec PoolingType


def _combiner(setup, k: int) -> str:
  """The pooling of the k-th sparse feature. A bucketized raw one sums."""
  return getattr(setup.transform.sparse[k], 'combiner', 'sum')


def peer_tables(setup, peer: str, saved: Sequence[Mapping] | None = None
                ) -> list[dict[str, Any]]:
  """Lists the peer's tables of a dlrm_jax model, in the peer's order.

  Args:
    setup: the model setup, `trainer.spec`.
    peer: 'facebook' or 'torchrec'.
    saved: TorchRec only. The names an import recorded, from
      `state_from_peer`. A table keeps its saved feature names while it serves
      as many features.

  Returns:
    Per table, a dict. name and feature_names are the peer's. table and
    features are ours. num_embeddings, embedding_dim and pooling follow.
  """
  by_table = {s.get('table'): s for s in saved or ()}
  rows = {t.name: t.num_rows for t in setup.tables}
  out = []
  for i, (table, ks) in enumerate(peers.peer_layout(setup)):
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


def check_exportable(setup, peer: str) -> None:
  """Refuses, in one line, a model the peer cannot express.

  Args:
    setup: the model setup, `trainer.spec`.
    peer: 'facebook' or 'torchrec'.

  Raises:
    ValueError: no dense arch, MLPs other than relu with biases, or
      arch_with_sparse. Self-interaction for TorchRec. A dcn interaction or
      shared tables for facebookresearch. A combiner the peer lacks.
  """
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
  for name, ks in peers.peer_layout(setup):
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
  """Writes a dlrm_jax model as the peer's state dict of numpy arrays.

  Args:
    trainer: the model's trainer.
    state: its state.
    peer: 'facebook' or 'torchrec'.
    names: the peer's names an import recorded, from `state_from_peer`.

  Returns:
    The state dict.

  Raises:
    ValueError: the peer cannot express the model, as `check_exportable`
      says.
  """
  setup = trainer.spec
  check_exportable(setup, peer)
  m = setup.model
  tables = peer_tables(setup, peer, names)
  order = _order(peers.peer_layout(setup))
  params = jax.device_get(state.params)
  if m.interaction == 'dcn':
    idx = peers.crossnet_columns(m.embedding_dim, order)  # peer = ours[idx]
  else:
    idx = np.argsort(peers.over_arch_permutation(
        peer, m.num_interaction_features, m.embedding_dim,
        m.interaction_self, order))

  def linear(p, first=False):
    """The weight `[out, in]` and bias of a dense layer.

    Args:
      p: the layer's params.
      first: the first over-arch layer, whose input columns are permuted.

    Returns:
      The weight and the bias.
    """
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
  crossnet = None
  if m.interaction == 'dcn':
    crossnet = []
    for l in range(m.dcn.num_layers):
      v = np.asarray(params['crossnet'][f'v_{l}']['kernel'])
      u = params['crossnet'][f'u_{l}']
      crossnet.append((np.asarray(u['kernel']).T[idx].copy(),
                       v[idx].T.copy(), np.asarray(u['bias'])[idx]))
  return peers.state_dict_of(peers.PeerDLRM(
      peer, tuple(peers.PeerTable(t['name'], w, tuple(t['feature_names']))
                  for t, w in zip(tables, weights)),
      tuple(bot), tuple(top), None if crossnet is None else tuple(crossnet),
      bool(m.interaction_self)))


def torchrec_arguments(setup, tables: Sequence[Mapping]) -> dict[str, Any]:
  """Says what builds the TorchRec model of an export.

  The model is `torchrec/models/dlrm.py`'s DLRM or DLRM_DCN.

  Args:
    setup: the model setup.
    tables: `peer_tables(setup, 'torchrec')`.

  Returns:
    A dict. model is 'DLRM' or 'DLRM_DCN'. tables holds the
    EmbeddingBagConfig fields: name, embedding_dim, num_embeddings,
    feature_names and pooling. The model's constructor arguments follow.
    table_features is the --table_features value that imports the export
    back.
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
  """Gives the `dlrm_s_pytorch.py` flags that build an export's DLRM_Net.

  The reference builds it in `run`. --arch-mlp-bot starts with the dense
  input count. --arch-mlp-top leaves out the interaction width.
  --arch-embedding-size serves random data.

  Args:
    setup: the model setup.

  Returns:
    The flags, one string.
  """
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
