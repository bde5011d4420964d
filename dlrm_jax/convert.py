"""Weights in and out: facebookresearch/dlrm and TorchRec DLRM state dicts.

`python -m dlrm_jax.convert` (see `main` below) turns a peer's `state_dict`
(saved as `.npz`, or a torch `.pt` when torch is installed) into a dlrm_jax
checkpoint with a matching config, and a dlrm_jax checkpoint back into the
peer's state dict.

The peers' layouts, as their modules define them:

facebookresearch/dlrm (`dlrm_s_pytorch.py`, `DLRM_Net`):
  emb_l.{k}.weight          [rows_k, D]  nn.EmbeddingBag(mode='sum')
  bot_l.{2i}.weight, .bias  [out, in]    nn.Sequential(Linear, ReLU, ...)
  top_l.{2i}.weight, .bias  [out, in]    the same, Sigmoid after the last
  interaction: T = [x, ly_0 .. ly_{N-1}] (x the bottom MLP's output), Z = T Tᵀ,
  R = [x, Z[i, j] for i in range(N+1) for j in range(i)] (pairs i > j, row
  by row; j <= i with arch_interaction_itself).
TorchRec (`torchrec/models/dlrm.py`, `DLRM`):
  sparse_arch.embedding_bag_collection.embedding_bags.{table}.weight [rows, D]
  dense_arch.model._mlp.{i}._linear.weight, .bias   (MLP of Perceptrons)
  over_arch.model.0._mlp.{i}._linear.weight, .bias  (all but the last layer)
  over_arch.model.1.weight, .bias                   (the last nn.Linear)
  interaction: combined = [dense, sparse_0 ..], pairs from
  `torch.triu_indices(F+1, F+1, offset=1)` (i < j row by row), output
  `[dense, pairs]`; logits out (the sigmoid is in the loss).
dlrm_jax (`dlrm_jax/models/dlrm.py`, `interaction.py`):
  features [dense_out, sparse_0 ..], pairs i < j (i <= j with
  interaction_self) row by row, over-arch input `[pairs, dense_out]`
  (arch_with_sparse off); MLP layers `dense_{i}` with kernels `[in, out]`
  (a Linear's weight transposed); the last top layer is `output`.

So the first over-arch layer's input columns are permuted (facebookresearch:
a dense block then the lower triangle; TorchRec: a dense block then the same
upper triangle; ours: the triangle then the dense block), every other weight
is transposed, and the tables are copied row for row with
`dlrm_jax.embedding.table_access.set_table` (each process writing the rows its
devices hold). The model is then numerically the peer's: the same forward
for the same embedding rows and dense inputs. What rows a raw value maps to,
and how dense values are normalized (facebookresearch reads log(x+1), as our
default config), is the data pipeline's business, not the weights'.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from dlrm_jax import checkpoint as ckpt_lib
from dlrm_jax import config_lib
from dlrm_jax import train
from dlrm_jax.data import inputs
from dlrm_jax.embedding import table_access
from dlrm_jax.models import interaction

PEERS = ('facebook', 'torchrec')
_TR_EMB = 'sparse_arch.embedding_bag_collection.embedding_bags.'
PEER_FILE = 'peer.json'  # in the workdir: the peer and its table names


# ----------------------------------------------------------------------------
# State dict files.


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict from `.npz` (keys as saved) or a torch `.pt`/`.pth`.

  A `.pt` holding a dict with a 'state_dict' (facebookresearch's
  `dlrm_s_pytorch.py --save-model`) or 'model_state_dict' entry reads that.
  """
  if path.endswith('.npz'):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
        f'{path}: reading torch files needs torch (pip install'
        " 'dlrm_jax[torch]'); or save the state dict as .npz:"
        ' np.savez(path, **{k: v.numpy() for k, v in sd.items()}).') from e
  obj = torch.load(path, map_location='cpu', weights_only=True)
  for key in ('state_dict', 'model_state_dict'):
    if isinstance(obj, dict) and key in obj:
      obj = obj[key]
  return {k: v.detach().float().numpy() if v.is_floating_point() else
          v.numpy() for k, v in obj.items()}


def save_state_dict(sd: Mapping[str, np.ndarray], path: str) -> None:
  """Writes `.npz`, or `.pt` with torch (tensors)."""
  if path.endswith('.npz'):
    np.savez(path, **sd)
    return
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v))
              for k, v in sd.items()}, path)


def _strip_prefix(sd: Mapping[str, np.ndarray], peer: str
                  ) -> dict[str, np.ndarray]:
  """Drops wrapper prefixes ('module.' of DDP, 'model.' of DLRMTrain)."""
  marker = 'emb_l.' if peer == 'facebook' else 'sparse_arch.'
  keys = [k for k in sd if marker in k]
  if not keys:
    raise ValueError(
        f'the state dict has no {marker!r} keys: it is not a {peer} DLRM'
        f' (keys: {sorted(sd)[:6]}...).')
  prefix = keys[0][:keys[0].index(marker)]
  return {k[len(prefix):]: np.asarray(v) for k, v in sd.items()
          if k.startswith(prefix)}


def _layers(sd, fmt: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """(weight [out, in], bias [out]) of consecutive layers named by `fmt`."""
  out = []
  pattern = re.compile('^' + re.escape(fmt).replace(r'\{\}', r'(\d+)') +
                       r'\.weight$')
  idx = sorted(int(m.group(1)) for k in sd if (m := pattern.match(k)))
  for i in idx:
    w = sd[fmt.format(i) + '.weight']
    b = sd.get(fmt.format(i) + '.bias')
    if b is None:
      raise ValueError(f'{fmt.format(i)} has no bias; DLRM layers have one.')
    out.append((w, b))
  return out


def _peer_parts(sd, peer):
  """(table names, tables, bottom layers, top layers) of a peer state dict."""
  sd = _strip_prefix(sd, peer)
  if peer == 'facebook':
    emb = sorted((int(m.group(1)), k) for k in sd
                 if (m := re.match(r'^emb_l\.(\d+)\.weight$', k)))
    names = [f'emb_l.{i}' for i, _ in emb]
    tables = [sd[k] for _, k in emb]
    bot = _layers(sd, 'bot_l.{}')
    top = _layers(sd, 'top_l.{}')
  elif peer == 'torchrec':
    # The EBC's order (the state dict's) is the order of the pooled features.
    names = [k[len(_TR_EMB):-len('.weight')] for k in sd
             if k.startswith(_TR_EMB) and k.endswith('.weight')]
    tables = [sd[_TR_EMB + n + '.weight'] for n in names]
    bot = _layers(sd, 'dense_arch.model._mlp.{}._linear')
    top = _layers(sd, 'over_arch.model.0._mlp.{}._linear') + [
        (sd['over_arch.model.1.weight'], sd['over_arch.model.1.bias'])]
  else:
    raise ValueError(f'peer ({peer!r}) must be one of {list(PEERS)}.')
  if not bot:
    raise ValueError(f'the {peer} state dict has no bottom (dense) MLP.')
  if len(top) < 2:
    raise ValueError(
        f'the {peer} top MLP has {len(top)} layer(s); dlrm_jax needs at least'
        ' two (config.model.final plus the output layer).')
  return names, tables, bot, top


# ----------------------------------------------------------------------------
# The over arch's input columns.


def _pairs(n: int, self_interaction: bool, lower: bool) -> list[tuple]:
  """Pair columns of an n-feature interaction, as sorted (a, b) tuples."""
  if lower:  # facebookresearch: for i, for j < i (j <= i)
    return [(j, i) for i in range(n)
            for j in range(i + (1 if self_interaction else 0))]
  rows, cols = np.triu_indices(n, k=0 if self_interaction else 1)
  return list(zip(rows.tolist(), cols.tolist()))


def over_arch_columns(peer: str | None, n: int, dim: int,
                      self_interaction: bool) -> list[tuple]:
  """What each input column of the first over-arch layer holds.

  ('d', k): the k-th output of the dense arch; ('p', a, b): the dot product of
  interaction features a <= b (0 is the dense arch's output). `peer` None is
  dlrm_jax's own order (checked against `interaction.triangle_indices`).
  """
  dense = [('d', k) for k in range(dim)]
  if peer is None:
    idx = interaction.triangle_indices(n, self_interaction)
    return [('p', int(i) // n, int(i) % n) for i in idx] + dense
  pairs = _pairs(n, self_interaction, lower=(peer == 'facebook'))
  return dense + [('p',) + p for p in pairs]


def over_arch_permutation(peer: str, n: int, dim: int,
                          self_interaction: bool) -> np.ndarray:
  """`perm` with ours[:, r] = peer[:, perm[r]] for the first over-arch
  layer's input columns (n interaction features, dense dim `dim`)."""
  theirs = {c: i for i, c in enumerate(
      over_arch_columns(peer, n, dim, self_interaction))}
  return np.array([theirs[c] for c in
                   over_arch_columns(None, n, dim, self_interaction)])


# ----------------------------------------------------------------------------
# Configs and parameters.


def config_from_peer(sd: Mapping[str, np.ndarray], peer: str, base_config
                     ) -> config_dict.ConfigDict:
  """`base_config` with the model, features and tables of the peer's state
  dict: dense features int_0 .. int_{F-1}, id features cat_0 .. cat_{N-1}
  with one table each (rows and dim from the state dict),
  arch_with_sparse off, interaction_self read from the top MLP's width."""
  names, tables, bot, top = _peer_parts(sd, peer)
  dim = int(tables[0].shape[1])
  for name, t in zip(names, tables):
    if t.ndim != 2 or t.shape[1] != dim:
      raise ValueError(
          f'{peer} table {name} has shape {list(t.shape)}; every table must'
          f' be [rows, {dim}].')
  num_dense, n_sparse = int(bot[0][0].shape[1]), len(tables)
  if num_dense > 13 or n_sparse > 26:
    raise ValueError(
        f'the {peer} model has {num_dense} dense inputs and {n_sparse} tables;'
        ' dlrm_jax reads Criteo rows (at most 13 and 26).')
  if int(bot[-1][0].shape[0]) != dim:
    raise ValueError(
        f'the {peer} bottom MLP ends at width {bot[-1][0].shape[0]}, not the'
        f' embedding dim {dim}.')
  n = n_sparse + 1
  width = int(top[0][0].shape[1])
  options = {dim + interaction.output_dim(n, s): s for s in (False, True)}
  if width not in options:
    raise ValueError(
        f'the {peer} top MLP takes {width} inputs; a dot interaction of {n}'
        f' features of dim {dim} gives {sorted(options)}.')
  if int(top[-1][0].shape[0]) != 1:
    raise ValueError(f'the {peer} top MLP must end in one output (logit).')
  config = config_dict.ConfigDict(base_config.to_dict())
  template = base_config.features.get('cat_0')
  feats = config_dict.ConfigDict()
  for i in range(num_dense):
    feats[f'int_{i}'] = base_config.features[f'int_{i}'].to_dict()
  for k in range(n_sparse):
    f = template.to_dict()
    f.update(input=f'cat_{k}', embedding_dim=dim,
             num_buckets=int(tables[k].shape[0]), hash_bucket_size=None,
             embedding_name=None, max_ids=1)
    f['managed_collision']['num_rows'] = None
    feats[f'cat_{k}'] = f
  config.features = feats
  config.model.feature_groups.dense = [f'int_{i}' for i in range(num_dense)]
  config.model.feature_groups.sparse = [f'cat_{k}' for k in range(n_sparse)]
  config.model.dense_mlp.hidden_units = [int(w.shape[0]) for w, _ in bot]
  config.model.final.hidden_units = [int(w.shape[0]) for w, _ in top[:-1]]
  for m in (config.model.dense_mlp, config.model.final):
    m.activation, m.use_bn, m.use_ln, m.bias = 'relu', False, False, True
    m.dropout_ratio = 0.0
  config.model.arch_with_sparse = False
  config.model.interaction_self = options[width]
  config.embedding.tables = config_dict.ConfigDict()
  return config


def _dense_layers(ws):
  return {f'dense_{i}': {'kernel': np.asarray(w, np.float32).T.copy(),
                         'bias': np.asarray(b, np.float32)}
          for i, (w, b) in enumerate(ws)}


def params_from_peer(sd, peer: str, trainer: train.Trainer
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                list[str]]:
  """(dense params, {our table name: [rows, D]}, the peer's table names)."""
  names, tables, bot, top = _peer_parts(sd, peer)
  m = trainer.setup.model
  perm = over_arch_permutation(peer, m.num_interaction_features,
                               m.embedding_dim, m.interaction_self)
  final = _dense_layers(top[:-1])
  final['dense_0']['kernel'] = final['dense_0']['kernel'][perm]
  params = {'dense_mlp': _dense_layers(bot), 'final': final,
            'output': _dense_layers(top[-1:])['dense_0']}
  ours = [f.table for f in trainer.setup.feature_specs]
  return params, dict(zip(ours, tables)), names


def _check_tree(got, want, what):
  gs = jax.tree.map(np.shape, got)
  ws = jax.tree.map(lambda x: tuple(x.shape), want)
  if jax.tree.structure(gs) != jax.tree.structure(ws) or gs != ws:
    raise ValueError(f'{what}: converted parameters {gs} do not fit the'
                     f' model {ws}.')


def state_from_peer(sd, peer: str, trainer: train.Trainer, seed: int = 0
                    ) -> tuple[train.TrainState, list[str]]:
  """A fresh train state (step 0, new optimizer state) holding the peer's
  weights, and the peer's table names."""
  params, tables, names = params_from_peer(sd, peer, trainer)
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
  return state.replace(emb=emb), names


def peer_from_state(trainer: train.Trainer, state: train.TrainState,
                    peer: str, table_names: list[str] | None = None
                    ) -> dict[str, np.ndarray]:
  """The peer's state dict (numpy) of a dlrm_jax model.

  The model must be one the peer can express: no batch/layer norm, relu,
  biases, arch_with_sparse off, one table per sparse feature.
  """
  m = trainer.setup.model
  for path, spec in (('dense_mlp', m.dense_mlp), ('final', m.final)):
    if spec is None or spec.use_bn or spec.use_ln or not spec.bias or (
        spec.activation != 'relu'):
      raise ValueError(
          f'config.model.{path} must be a relu MLP with biases and no'
          f' normalization for a {peer} DLRM.')
  if m.arch_with_sparse:
    raise ValueError(
        f'config.model.arch_with_sparse must be False for a {peer} DLRM.')
  if peer == 'torchrec' and m.interaction_self:
    raise ValueError('TorchRec DLRM has no self-interaction'
                     ' (config.model.interaction_self must be False).')
  params = jax.device_get(state.params)
  perm = over_arch_permutation(peer, m.num_interaction_features,
                               m.embedding_dim, m.interaction_self)
  inv = np.argsort(perm)

  def linear(p, first=False):
    w = np.asarray(p['kernel'])
    return (w[inv] if first else w).T.copy(), np.asarray(p['bias'])

  bot = [linear(params['dense_mlp'][f'dense_{i}'])
         for i in range(len(m.dense_mlp.hidden_units))]
  top = [linear(params['final'][f'dense_{i}'], first=(i == 0))
         for i in range(len(m.final.hidden_units))]
  top.append(linear(params['output']))
  tables = [f.table for f in trainer.setup.feature_specs]
  if len(set(tables)) != len(tables):
    raise ValueError(f'a {peer} DLRM has one table per sparse feature;'
                     ' this model shares tables between features.')
  if table_names is None:
    table_names = ([f'emb_l.{k}' for k in range(len(tables))]
                   if peer == 'facebook' else [f't_{t}' for t in tables])
  sd = {}
  if peer == 'facebook':
    for k, t in enumerate(tables):
      sd[f'emb_l.{k}.weight'] = table_access.get_table(
          trainer.engine, state.emb, t).astype(np.float32)
    for prefix, layers in (('bot_l', bot), ('top_l', top)):
      for i, (w, b) in enumerate(layers):
        sd[f'{prefix}.{2 * i}.weight'], sd[f'{prefix}.{2 * i}.bias'] = w, b
  else:
    for name, t in zip(table_names, tables):
      sd[_TR_EMB + name + '.weight'] = table_access.get_table(
          trainer.engine, state.emb, t).astype(np.float32)
    for i, (w, b) in enumerate(bot):
      key = f'dense_arch.model._mlp.{i}._linear'
      sd[key + '.weight'], sd[key + '.bias'] = w, b
    for i, (w, b) in enumerate(top[:-1]):
      key = f'over_arch.model.0._mlp.{i}._linear'
      sd[key + '.weight'], sd[key + '.bias'] = w, b
    sd['over_arch.model.1.weight'], sd['over_arch.model.1.bias'] = top[-1]
  return sd


# ----------------------------------------------------------------------------
# Checkpoints.


def import_checkpoint(sd, peer: str, workdir: str, base_config,
                      trainer: train.Trainer | None = None
                      ) -> config_dict.ConfigDict:
  """Writes a step-0 checkpoint of the peer's weights under `workdir`, with
  `config.json` (the matching config) and `peer.json`; returns the config."""
  config = config_from_peer(sd, peer, base_config)
  trainer = trainer or train.Trainer(config)
  state, names = state_from_peer(sd, peer, trainer,
                                 seed=trainer.spec.loop.seed)
  save_initial_checkpoint(trainer, state, workdir)
  if jax.process_index() == 0:
    ckpt_lib.write_json(os.path.join(workdir, PEER_FILE),
                        {'peer': peer, 'table_names': names})
  return config


def save_initial_checkpoint(trainer: train.Trainer, state: train.TrainState,
                            workdir: str) -> None:
  """Writes `state` as the step-0 checkpoint of a run of the trainer's
  spec in `workdir` (with `config.json`), from which training starts as
  from a fresh initialization."""
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


def export_checkpoint(workdir: str, peer: str, config=None,
                      step: int | None = None) -> dict[str, np.ndarray]:
  """The peer's state dict of a run's latest (or given) checkpoint."""
  from dlrm_jax import inference  # pylint: disable=g-import-not-at-top
  config = config if config is not None else config_of_workdir(workdir)
  model = inference.load(config, workdir, step)
  names = None
  peer_file = os.path.join(workdir, PEER_FILE)
  if os.path.exists(peer_file):
    with open(peer_file) as f:
      saved = json.load(f)
    if saved['peer'] == peer:
      names = saved['table_names']
  return peer_from_state(model.trainer, model.state, peer, names)


# ----------------------------------------------------------------------------
# Command line.


def main(argv=None):
  """`python -m dlrm_jax.convert --peer=facebook|torchrec --direction=...`"""
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'Base config (data, optimizers); the model, features'
      ' and tables come from the state dict. Export: defaults to'
      ' <workdir>/config.json.', lock_config=False)
  peer = flags.DEFINE_enum('peer', None, PEERS, 'The peer layout.')
  direction = flags.DEFINE_enum(
      'direction', 'import', ('import', 'export'),
      'import: state dict -> checkpoint; export: checkpoint -> state dict.')
  input_ = flags.DEFINE_string('input', None, 'import: the state dict file.')
  output = flags.DEFINE_string('output', None, 'export: the state dict file.')
  workdir = flags.DEFINE_string('workdir', None, 'The dlrm_jax run directory.')
  flags.mark_flags_as_required(['peer', 'workdir'])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if direction.value == 'import':
      if not input_.value or config_flag.value is None:
        raise app.UsageError('import needs --input and --config.')
      config = import_checkpoint(load_state_dict(input_.value), peer.value,
                                 workdir.value, config_flag.value)
      model = config_lib.build_model(config).model
      print(f'wrote a step-0 checkpoint to {workdir.value} (config:'
            f' {os.path.join(workdir.value, "config.json")}); model:'
            f' dense_mlp {list(model.dense_mlp.hidden_units)}, final'
            f' {list(model.final.hidden_units)}, {model.num_sparse} tables')
    else:
      if not output.value:
        raise app.UsageError('export needs --output.')
      sd = export_checkpoint(workdir.value, peer.value, config_flag.value)
      save_state_dict(sd, output.value)
      print(f'wrote {len(sd)} arrays to {output.value}')

  app.run(run, argv)


if __name__ == '__main__':
  main()
