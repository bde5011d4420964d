"""Weights from facebookresearch/dlrm and TorchRec state dicts, and back.

The state dicts are built with the peers' names and shapes, as their modules
define them (facebookresearch `dlrm_s_pytorch.py` DLRM_Net; TorchRec
`torchrec/models/dlrm.py` DLRM and DLRM_DCN, `modules/crossnet.py`
LowRankCrossNet, `modules/embedding_modules.py` EmbeddingBagCollection); the
reference forward is a NumPy transcription of each peer's forward, in the
peer's own column order. Files are torch `.pt` where torch is installed;
without it the same state dicts go through `.npz`, and the tests of torch's
own layouts (a --save-model file, the --load-model dict, a refused pickle)
are skipped, saying so.
"""

import collections
import json
import os
import re
import subprocess
import sys
import unittest

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax import convert
from dlrm_jax.train import trainer as trainer_lib
from dlrm_jax.models import interaction
from tests import reference

torch = convert._torch()  # pylint: disable=protected-access
NO_TORCH = ('torch is not installed: the torch layouts (.pt) are not tested;'
            ' the .npz tests cover the same state dicts')
EXT = '.pt' if torch is not None else '.npz'  # the peer files of the tests
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DIM, ROWS, BOT, TOP = 4, (11, 7, 5), (13, 8, 4), (6, 3, 1)
EMB = 'sparse_arch.embedding_bag_collection.embedding_bags.'
CROSS = 'inter_arch.crossnet.'
# TorchRec's Criteo DLRM (examples/dlrm): table t_cat_{k} serves cat_{k}.
ONE_EACH = {f't_cat_{k}': (r, (f'cat_{k}',)) for k, r in enumerate(ROWS)}
# A table serving two features: {table: (rows, feature_names)}, EBC order.
SHARED = {'t_a': (11, ('a1', 'a2')), 't_b': (7, ('b1',)),
          't_c': (5, ('c1',))}
SHARED_FLAG = 't_a=a1,a2;t_b=b1;t_c=c1'
DCN = (2, 3)  # cross layers, rank


def peer_state_dict(peer, self_interaction=False, seed=0, tables=None,
                    dcn=None):
  """Random weights under the peer's parameter names ([out, in] weights).

  Args:
    peer: 'facebook' or 'torchrec'.
    self_interaction: facebookresearch's --arch-interaction-itself.
    seed: the weights' seed.
    tables: TorchRec: {table: (rows, feature_names)} (default ONE_EACH).
    dcn: TorchRec DLRM_DCN: (layers, rank) of its LowRankCrossNet.
  """
  rng = np.random.default_rng(seed)
  tables = tables or ONE_EACH
  n = sum(len(f) for _, f in tables.values()) + 1
  if dcn:
    width = n * DIM  # InteractionDCNArch: the cross net's output
  else:
    width = DIM + interaction.output_dim(n, self_interaction)
  bot = list(zip(BOT[1:], BOT[:-1]))
  top = list(zip(TOP, (width,) + TOP[:-1]))
  lin = lambda o, i: ((rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32),
                      (rng.normal(size=(o,)) * 0.1).astype(np.float32))
  sd = {}
  if peer == 'facebook':
    for k, r in enumerate(ROWS):
      sd[f'emb_l.{k}.weight'] = rng.uniform(-1, 1, (r, DIM)).astype(np.float32)
    for prefix, layers in (('bot_l', bot), ('top_l', top)):
      for i, (o, inp) in enumerate(layers):  # Sequential(Linear, ReLU, ...)
        sd[f'{prefix}.{2 * i}.weight'], sd[f'{prefix}.{2 * i}.bias'] = lin(
            o, inp)
    return sd
  for name, (r, _) in tables.items():
    sd[EMB + name + '.weight'] = rng.uniform(-1, 1, (r, DIM)).astype(
        np.float32)
  for i, (o, inp) in enumerate(bot):
    key = f'dense_arch.model._mlp.{i}._linear'
    sd[key + '.weight'], sd[key + '.bias'] = lin(o, inp)
  if dcn:
    layers, rank = dcn
    for l in range(layers):
      sd[f'{CROSS}W_kernels.{l}'] = (
          rng.normal(size=(width, rank)) / np.sqrt(rank)).astype(np.float32)
      sd[f'{CROSS}V_kernels.{l}'] = (
          rng.normal(size=(rank, width)) / np.sqrt(width)).astype(np.float32)
      sd[f'{CROSS}bias.{l}'] = (rng.normal(size=(width,)) * 0.1).astype(
          np.float32)
  for i, (o, inp) in enumerate(top[:-1]):
    key = f'over_arch.model.0._mlp.{i}._linear'
    sd[key + '.weight'], sd[key + '.bias'] = lin(o, inp)
  sd['over_arch.model.1.weight'], sd['over_arch.model.1.bias'] = lin(
      *top[-1])
  return sd


def peer_forward(sd, peer, dense, ids, self_interaction=False, tables=None):
  """The peer's forward in NumPy (float64), its own ordering.

  Args:
    sd: the peer's state dict.
    peer: 'facebook' or 'torchrec'.
    dense: `[B, 13]`.
    ids: `[B, F]`, one id per pooled feature in the peer's order.
    self_interaction: facebookresearch's --arch-interaction-itself.
    tables: TorchRec: {table: (rows, feature_names)} in EBC order.
  """
  relu = lambda v: np.maximum(v, 0.0)
  linears = lambda fmt: [(sd[fmt.format(i) + '.weight'],
                          sd[fmt.format(i) + '.bias'])
                         for i in range(len(TOP) - 1)]
  if peer == 'facebook':
    bot = [(sd[f'bot_l.{2 * i}.weight'], sd[f'bot_l.{2 * i}.bias'])
           for i in range(len(BOT) - 1)]
    top = [(sd[f'top_l.{2 * i}.weight'], sd[f'top_l.{2 * i}.bias'])
           for i in range(len(TOP))]
    # apply_emb: one EmbeddingBag per feature.
    pooled = [sd[f'emb_l.{k}.weight'][ids[:, k]] for k in range(len(ROWS))]
  else:
    bot = [(sd[f'dense_arch.model._mlp.{i}._linear.weight'],
            sd[f'dense_arch.model._mlp.{i}._linear.bias'])
           for i in range(len(BOT) - 1)]
    top = linears('over_arch.model.0._mlp.{}._linear')
    top.append((sd['over_arch.model.1.weight'], sd['over_arch.model.1.bias']))
    # EmbeddingBagCollection.forward: tables in config order, each table's
    # feature_names in order (SparseArch keeps that order).
    pooled, col = [], 0
    for name, (_, feats) in (tables or ONE_EACH).items():
      for _ in feats:
        pooled.append(sd[EMB + name + '.weight'][ids[:, col]])
        col += 1
  x = dense.astype(np.float64)
  for w, b in bot:
    x = relu(x @ w.T + b)
  if CROSS + 'W_kernels.0' in sd:
    # InteractionDCNArch: LowRankCrossNet on [dense, sparse_0, ..] flat.
    x0 = np.concatenate([x] + pooled, axis=1)
    r, l = x0, 0
    while f'{CROSS}W_kernels.{l}' in sd:
      x_v = r @ sd[f'{CROSS}V_kernels.{l}'].T
      x_w = x_v @ sd[f'{CROSS}W_kernels.{l}'].T
      r = x0 * (x_w + sd[f'{CROSS}bias.{l}']) + r
      l += 1
  else:
    feats = np.stack([x] + pooled, 1)
    z = np.einsum('bnd,bmd->bnm', feats, feats)
    n = feats.shape[1]
    if peer == 'facebook':  # li, lj: for i, for j in range(i + offset)
      off = 1 if self_interaction else 0
      flat = [z[:, i, j] for i in range(n) for j in range(i + off)]
    else:  # torch.triu_indices(n, n, offset=1)
      flat = [z[:, i, j] for i in range(n) for j in range(i + 1, n)]
    r = np.concatenate([x, np.stack(flat, 1)], axis=1)
  for w, b in top[:-1]:
    r = relu(r @ w.T + b)
  logit = (r @ top[-1][0].T + top[-1][1])[:, 0]
  return 1 / (1 + np.exp(-logit))


def base_config():
  config = criteo_config.get_config('tiny')
  config.embedding.optimizer.kind = 'adagrad'
  config.batch_size = config.eval_batch_size = 16
  return config


def batch(rows=ROWS, seed=0, b=16):
  """ids `[B, F]` (one per feature, `rows[k]` the k-th one's table rows)."""
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.integers(0, r, b) for r in rows], 1).astype(np.int32)
  ids[:, 0] = np.arange(b) % 4  # rows 4.. of table 0 are never looked up
  return {'ids': ids,
          'dense': rng.uniform(0, 3, (b, 13)).astype(np.float32),
          'label': (rng.random(b) < 0.5).astype(np.float32)}


def feature_rows(tables):
  return [r for r, feats in tables.values() for _ in feats]


def assert_same(test, got, want):
  test.assertEqual(list(got), list(want))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


class ConvertTest(parameterized.TestCase):

  @parameterized.parameters(('facebook', False), ('facebook', True),
                            ('torchrec', False))
  def test_forward_train_and_back(self, peer, self_interaction):
    sd = peer_state_dict(peer, self_interaction)
    config = convert.config_from_peer(sd, peer, base_config())
    self.assertEqual(config.model.interaction_self, self_interaction)
    trainer = trainer_lib.Trainer(config, mesh=reference.single_device_mesh())
    state, names = convert.state_from_peer(sd, peer, trainer)
    b = batch()
    got = trainer.predict(state, {k: b[k] for k in ('ids', 'dense')})
    want = peer_forward(sd, peer, b['dense'], b['ids'], self_interaction)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    # Back unchanged before training, bit for bit.
    assert_same(self, convert.peer_from_state(trainer, state, peer, names), sd)
    # One train step: the loss is the peer's log loss; rows not looked up
    # come back unchanged, the looked-up ones and the MLPs moved.
    acc = trainer.zero_metrics()
    state2, acc = trainer.train_step(state, trainer.put_batch(b), acc)
    p = np.clip(want, 1e-7, 1 - 1e-7)
    peer_loss = -np.mean(b['label'] * np.log(p) +
                         (1 - b['label']) * np.log(1 - p))
    self.assertAlmostEqual(float(acc['loss_sum']), peer_loss, places=5)
    back = convert.peer_from_state(trainer, state2, peer, names)
    t0 = next(k for k in sd if k.endswith(('emb_l.0.weight',
                                           't_cat_0.weight')))
    np.testing.assert_array_equal(back[t0][4:], sd[t0][4:])
    self.assertGreater(np.abs(back[t0][:4] - sd[t0][:4]).max(), 0)
    w0 = next(k for k in sd if k.endswith(('top_l.0.weight',
                                           'over_arch.model.0._mlp.0._linear'
                                           '.weight')))
    self.assertGreater(np.abs(back[w0] - sd[w0]).max(), 0)

  @parameterized.named_parameters(('dot', None), ('dcn', DCN))
  def test_torchrec_shared_table_dot_and_dcn(self, dcn):
    """A table serving two features (and TorchRec DLRM_DCN): the forward is
    TorchRec's, the round trip exact."""
    sd = peer_state_dict('torchrec', tables=SHARED, dcn=dcn, seed=1)
    mapping = convert.parse_table_features(SHARED_FLAG)
    config = convert.config_from_peer(sd, 'torchrec', base_config(), mapping)
    self.assertEqual(list(config.model.feature_groups.sparse),
                     ['cat_0', 'cat_1', 'cat_2', 'cat_3'])
    self.assertEqual([config.features[f'cat_{k}'].embedding_name
                      for k in range(4)], ['cat_0', 'cat_0', None, None])
    self.assertFalse(config.model.interaction_self)
    self.assertEqual(config.model.interaction, 'dcn' if dcn else 'dot')
    if dcn:
      self.assertEqual((config.model.dcn.num_layers, config.model.dcn.rank),
                       dcn)
    trainer = trainer_lib.Trainer(config, mesh=reference.single_device_mesh())
    self.assertEqual([t.name for t in trainer.spec.tables],
                     ['cat_0', 'cat_2', 'cat_3'])
    state, names = convert.state_from_peer(sd, 'torchrec', trainer,
                                           table_features=mapping)
    b = batch(feature_rows(SHARED))
    got = trainer.predict(state, {k: b[k] for k in ('ids', 'dense')})
    want = peer_forward(sd, 'torchrec', b['dense'], b['ids'], tables=SHARED)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert_same(self, convert.peer_from_state(trainer, state, 'torchrec',
                                              names), sd)
    tables = convert.peer_tables(trainer.spec, 'torchrec', names)
    args = convert.torchrec_arguments(trainer.spec, tables)
    self.assertEqual(args['table_features'], SHARED_FLAG)
    self.assertEqual(args['model'], 'DLRM_DCN' if dcn else 'DLRM')
    self.assertEqual(
        [(t['name'], t['num_embeddings'], t['feature_names'])
         for t in args['tables']],
        [(n, r, list(f)) for n, (r, f) in SHARED.items()])
    self.assertEqual(args['over_arch_layer_sizes'], list(TOP))

  @parameterized.named_parameters(('dot', None), ('dcn', DCN))
  def test_export_features_out_of_table_order(self, dcn):
    """Our sparse group [a1, b1, a2, c1], a1 and a2 sharing a table: TorchRec
    pools [a1, a2, b1, c1]; the export's forward is ours."""
    sd = peer_state_dict('torchrec', tables=SHARED, dcn=dcn, seed=2)
    config = convert.config_from_peer(
        sd, 'torchrec', base_config(),
        convert.parse_table_features(SHARED_FLAG))
    config.model.feature_groups.sparse = ['cat_0', 'cat_2', 'cat_1', 'cat_3']
    trainer = trainer_lib.Trainer(config, mesh=reference.single_device_mesh())
    state = trainer.init_state(0)
    rng = np.random.default_rng(3)
    params = jax.tree.map(
        lambda x, s: jax.device_put(
            rng.normal(size=x.shape).astype(np.float32) * 0.4, s),
        state.params, trainer.state_shardings().params)
    state = state.replace(params=params)
    back = convert.peer_from_state(trainer, state, 'torchrec')
    tables = convert.peer_tables(trainer.spec, 'torchrec')
    peer_tables = {t['name']: (t['num_embeddings'], t['feature_names'])
                   for t in tables}
    self.assertEqual(peer_tables, {'t_cat_0': (11, ['cat_0', 'cat_1']),
                                   't_cat_2': (7, ['cat_2']),
                                   't_cat_3': (5, ['cat_3'])})
    b = batch([11, 7, 11, 5])
    got = trainer.predict(state, {k: b[k] for k in ('ids', 'dense')})
    ours = ['cat_0', 'cat_2', 'cat_1', 'cat_3']
    theirs = [f for t in tables for f in t['feature_names']]
    ids = b['ids'][:, [ours.index(f) for f in theirs]]
    want = peer_forward(back, 'torchrec', b['dense'], ids,
                        tables=peer_tables)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    # Read back with its mapping, the export is a whole TorchRec model.
    flag = convert.torchrec_arguments(trainer.spec, tables)['table_features']
    self.assertEqual(flag, 't_cat_0=cat_0,cat_1;t_cat_2=cat_2;t_cat_3=cat_3')
    pm = convert.read_peer(back, 'torchrec',
                           convert.parse_table_features(flag))
    self.assertEqual(pm.num_features, 4)
    self.assertEqual(pm.crossnet is not None, dcn is not None)

  def test_checkpoint_round_trip_on_8_devices_from_relative_paths(self):
    """A DLRM_DCN with a shared table, through files and a checkpoint on 8
    devices, with paths relative to the current directory."""
    sd = peer_state_dict('torchrec', tables=SHARED, dcn=DCN, seed=3)
    cwd = os.getcwd()
    os.chdir(self.create_tempdir().full_path)
    self.addCleanup(os.chdir, cwd)
    convert.save_state_dict(sd, 'sd' + EXT)
    config = base_config()
    config.embedding.sharding = 'row_wise'
    config.embedding.replicate_bytes = 0
    mapping = convert.parse_table_features(SHARED_FLAG)
    convert.import_checkpoint(convert.load_state_dict('sd' + EXT),
                              'torchrec', 'runs/imported', config,
                              table_features=mapping)
    self.assertTrue(os.path.exists('runs/imported/config.json'))
    ex = convert.export_checkpoint('runs/imported', 'torchrec')
    self.assertEqual(ex.setup.model.interaction, 'dcn')
    assert_same(self, ex.state_dict, sd)
    self.assertEqual(convert.torchrec_arguments(ex.setup, ex.tables)[
        'table_features'], SHARED_FLAG)  # the names peer.json kept


class PermutationTest(absltest.TestCase):

  def test_columns_are_a_permutation(self):
    for peer in convert.PEERS:
      perm = convert.over_arch_permutation(peer, 5, 3, False)
      self.assertEqual(sorted(perm), list(range(3 + 10)))
    # facebookresearch: [dense, (1,0), (2,0), (2,1), ...]; ours [(0,1), (0,2),
    # ..., (1,2), ..., dense].
    perm = convert.over_arch_permutation('facebook', 3, 2, False)
    np.testing.assert_array_equal(perm, [2, 3, 4, 0, 1])
    perm = convert.over_arch_permutation('torchrec', 3, 2, False)
    np.testing.assert_array_equal(perm, [2, 3, 4, 0, 1])
    perm = convert.over_arch_permutation('facebook', 4, 1, False)
    # ours (0,1),(0,2),(0,3),(1,2),(1,3),(2,3); theirs after dense:
    # (1,0)=1,(2,0)=2,(2,1)=3,(3,0)=4,(3,1)=5,(3,2)=6
    np.testing.assert_array_equal(perm, [1, 2, 4, 3, 5, 6, 0])

  def test_reordered_features(self):
    """With the peer's features in another order, the columns still match:
    checked on the interaction outputs of a double loop."""
    rng = np.random.default_rng(0)
    n, d, order = 5, 3, [0, 1, 3, 2, 4]  # the peer's j-th is our order[j]
    x = rng.normal(size=(2, n, d))
    pairs = lambda f: np.stack([np.sum(f[:, i] * f[:, j], -1)
                                for i in range(n) for j in range(i + 1, n)], 1)
    ours = np.concatenate([pairs(x), x[:, 0]], 1)  # [pairs, dense]
    p = x[:, order]
    theirs = np.concatenate([p[:, 0], pairs(p)], 1)  # [dense, pairs]
    perm = convert.over_arch_permutation('torchrec', n, d, False, order)
    np.testing.assert_allclose(ours, theirs[:, perm])
    # The cross net's input: [dense, sparse ..] blocks of d.
    idx = convert.crossnet_columns(d, order)
    np.testing.assert_array_equal(p.reshape(2, -1), x.reshape(2, -1)[:, idx])


class FilesTest(absltest.TestCase):
  """The peers' own files: what --save-model writes, what --load-model reads."""

  @unittest.skipIf(torch is None, NO_TORCH)
  def test_reads_a_save_model_file(self):
    sd = peer_state_dict('facebook')
    # dlrm_s_pytorch.py: L = E.detach().cpu().numpy() (a 0-d array),
    # total_loss += L * mbs, train_loss = total_loss / total_samp;
    # test_accu += np.sum((np.round(S) == T).astype(np.uint8)),
    # acc_test = test_accu / test_samp.
    loss = np.array(0.5, np.float32)
    train_loss = (0 + loss * 16) / 32
    acc = (0 + np.sum((np.round([0.2, 0.7]) == [0.0, 1.0]).astype(
        np.uint8))) / 2
    self.assertEqual((type(train_loss), type(acc)), (np.float32, np.float64))
    model = torch.nn.Linear(2, 1)
    saved = {  # inference()'s model_metrics_dict and the loop's additions
        'nepochs': 1, 'nbatches': 32, 'nbatches_test': 4,
        'state_dict': collections.OrderedDict(
            (k, torch.from_numpy(v)) for k, v in sd.items()),
        'test_acc': acc, 'epoch': 0, 'iter': 32, 'train_loss': train_loss,
        'total_loss': 0,
        'opt_state_dict': torch.optim.SGD(model.parameters(),
                                          lr=0.01).state_dict()}
    path = os.path.join(self.create_tempdir().full_path, 'model.pt')
    torch.save(saved, path)
    assert_same(self, convert.load_state_dict(path), sd)

  @unittest.skipIf(torch is None, NO_TORCH)
  def test_refuses_other_objects_without_running_them(self):
    path = os.path.join(self.create_tempdir().full_path, 'model.pt')
    torch.save({'state_dict': {'emb_l.0.weight': torch.zeros(2, 2)},
                'hook': _Hook()}, path)
    with self.assertRaises(ValueError) as e:
      convert.load_state_dict(path)
    self.assertEqual(
        str(e.exception),
        f'{path} holds {__name__}._record_call: convert reads torch files with'
        ' weights_only=True (tensors, numbers, strings, containers and numpy'
        ' scalars; it never unpickles arbitrary objects); save the state dict'
        ' alone: torch.save(model.state_dict(), path).')
    self.assertEqual(_CALLS, [])
    with open(path, 'wb') as f:
      f.write(b'not a torch file')
    with self.assertRaisesRegex(ValueError, '^' + re.escape(
        f'{path}: torch.load refused it (')):
      convert.load_state_dict(path)

  @unittest.skipIf(torch is None, NO_TORCH)
  def test_export_loads_as_load_model_does(self):
    sd = peer_state_dict('facebook', seed=4)
    path = os.path.join(self.create_tempdir().full_path, 'model.pt')
    convert.save_peer_file(sd, path, 'facebook')
    # dlrm_s_pytorch.py --load-model (run): torch.load with its defaults
    # (weights_only since torch 2.6), into a DLRM_Net of the same arch.
    ld_model = torch.load(path, map_location=torch.device('cpu'))
    dlrm = torch.nn.Module()  # create_emb, create_mlp
    dlrm.emb_l = torch.nn.ModuleList(
        [torch.nn.EmbeddingBag(r, DIM, mode='sum', sparse=True)
         for r in ROWS])
    top = (sd['top_l.0.weight'].shape[1],) + TOP
    for name, widths, last in (('bot_l', BOT, torch.nn.ReLU()),
                               ('top_l', top, torch.nn.Sigmoid())):
      layers = []
      for i in range(len(widths) - 1):
        layers += [torch.nn.Linear(widths[i], widths[i + 1]),
                   last if i == len(widths) - 2 else torch.nn.ReLU()]
      setattr(dlrm, name, torch.nn.Sequential(*layers))
    dlrm.load_state_dict(ld_model['state_dict'])  # strict
    for k, v in dlrm.state_dict().items():
      np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)
    # What it prints of them ('Saved at: epoch = {:d}/{:d}, ...').
    counts = [ld_model[k] for k in ('epoch', 'nepochs', 'iter', 'nbatches',
                                    'nbatches_test')]
    self.assertEqual('{:d}/{:d} {:d}/{:d} {:d}'.format(*counts), '0/0 0/0 0')
    self.assertEqual('{:.6f} {:3.3f} {:.3f}'.format(
        ld_model['train_loss'], ld_model['test_acc'] * 100,
        ld_model['test_auc']), '0.000000 0.000 0.000')
    self.assertEqual(ld_model['total_loss'], 0.0)
    optimizer = torch.optim.SGD(dlrm.parameters(), lr=0.01)  # --optimizer=sgd
    optimizer.load_state_dict(ld_model['opt_state_dict'])
    out = dlrm.top_l[0](torch.ones(1, dlrm.top_l[0].in_features)).sum()
    out.backward()
    optimizer.step()
    # And back in, as it came out.
    assert_same(self, convert.load_state_dict(path), sd)
    # TorchRec's .pt is the bare state dict (model.load_state_dict).
    tr = peer_state_dict('torchrec')
    convert.save_peer_file(tr, path, 'torchrec')
    self.assertEqual(list(torch.load(path)), list(tr))

  def test_npz_holds_the_bare_state_dict(self):
    sd = peer_state_dict('facebook')
    path = os.path.join(self.create_tempdir().full_path, 'model.npz')
    convert.save_peer_file(sd, path, 'facebook')
    with np.load(path) as z:
      self.assertEqual(list(z.files), list(sd))
    assert_same(self, convert.load_state_dict(path), sd)


_CALLS = []


def _record_call(what):
  _CALLS.append(what)


class _Hook:
  """Unpickling it would call `_record_call`."""

  def __reduce__(self):
    return (_record_call, ('unpickled',))


def _write_run_config(workdir, config):
  os.makedirs(workdir)
  ckpt_lib.write_json(os.path.join(workdir, 'config.json'),
                      json.loads(config.to_json_best_effort()))


class RefusalTest(parameterized.TestCase):
  """Each refusal is one line that says what and why, and writes nothing."""

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path
    self.workdir = os.path.join(self.dir, 'new')

  def assert_import_refused(self, sd, peer, message, table_features=None,
                            workdir=None):
    path = os.path.join(self.dir, 'in.npz')
    convert.save_state_dict(sd, path)
    workdir = workdir or self.workdir
    before = sorted(os.listdir(self.dir))
    with self.assertRaises(ValueError) as e:
      convert.run_import(path, peer, workdir, base_config(), table_features)
    self.assertEqual(str(e.exception), message)
    self.assertEqual(sorted(os.listdir(self.dir)), before)

  def test_shared_table_without_table_features(self):
    # 4 features on 3 tables: the width a facebookresearch model with
    # self-interaction would have; TorchRec has none.
    self.assert_import_refused(
        peer_state_dict('torchrec', tables=SHARED), 'torchrec',
        'the TorchRec over arch (14 inputs) says 4 features, the state dict'
        ' has 3 tables: a table serves several features'
        ' (EmbeddingBagConfig.feature_names); say which with'
        " --table_features='t_a=f1,f2;t_b=f3'.")
    self.assert_import_refused(
        peer_state_dict('torchrec', tables=SHARED, dcn=DCN), 'torchrec',
        'the TorchRec cross net (20 inputs) says 4 features, the state dict'
        ' has 3 tables: a table serves several features'
        ' (EmbeddingBagConfig.feature_names); say which with'
        " --table_features='t_a=f1,f2;t_b=f3'.")

  def test_table_features_that_do_not_fit(self):
    sd = peer_state_dict('torchrec', tables=SHARED)
    self.assert_import_refused(
        sd, 'torchrec', "--table_features names tables ['t_a', 't_b', 't_x'];"
        " the state dict has ['t_a', 't_b', 't_c'].",
        't_a=a1,a2;t_b=b1;t_x=c1')
    self.assert_import_refused(
        sd, 'torchrec', '--table_features names 3 features; the TorchRec over'
        ' arch (14 inputs) says 4.', 't_a=a1;t_b=b1;t_c=c1')
    self.assert_import_refused(
        sd, 'torchrec', "--table_features ('t_a=a1,a2;t_b'): 't_b' is not"
        ' table=feature[,feature...]; write t_a=f1,f2;t_b=f3.', 't_a=a1,a2;t_b')
    self.assert_import_refused(
        sd, 'torchrec', "--table_features ('t_a=a1,a2;t_b=a1;t_c=c1') names"
        " feature 'a1' twice; a DLRM feature reads one table.",
        't_a=a1,a2;t_b=a1;t_c=c1')
    self.assert_import_refused(
        peer_state_dict('facebook'), 'facebook', '--table_features is for'
        " --peer=torchrec: facebookresearch's DLRM_Net has one table per"
        ' feature (dlrm_s_pytorch.py create_emb).', 'emb_l.0=a')

  def test_keys_it_would_drop(self):
    sd = peer_state_dict('torchrec')
    sd['inter_arch.interaction_branch1._mlp.0._linear.weight'] = np.zeros(
        (2, 2), np.float32)
    self.assert_import_refused(
        sd, 'torchrec', 'the TorchRec state dict holds 1 key(s) dlrm_jax has'
        ' no place for (inter_arch.interaction_branch1._mlp.0._linear.weight):'
        ' TorchRec DLRM_Projection (InteractionProjectionArch) is not'
        ' supported; convert would drop them.')
    sd = peer_state_dict('facebook')
    sd['v_W_l.0'] = np.ones(ROWS[0], np.float32)
    self.assert_import_refused(
        sd, 'facebook', 'the facebookresearch state dict holds 1 key(s)'
        ' dlrm_jax has no place for (v_W_l.0): learned weighted pooling'
        ' (--weighted-pooling) is not supported; convert would drop them.')
    sd = peer_state_dict('facebook')
    sd['top_l.0.weight'] = sd['top_l.0.weight'][:, :-1]
    self.assert_import_refused(
        sd, 'facebook', 'the facebookresearch top MLP takes 9 inputs; a dot'
        ' interaction of 4 features of dim 4 gives [10, 14]'
        ' (--arch-interaction-op=cat is not supported).')
    # A 'module.' prefix (DistributedDataParallel) is accepted.
    wrapped = {'module.' + k: v for k, v in peer_state_dict('facebook').items()}
    c = convert.config_from_peer(wrapped, 'facebook', base_config())
    self.assertEqual(list(c.model.dense_mlp.hidden_units), [8, 4])

  def test_paths(self):
    sd = peer_state_dict('facebook')
    missing = os.path.join(self.dir, 'nope.npz')
    with self.assertRaises(ValueError) as e:
      convert.run_import(missing, 'facebook', self.workdir)
    self.assertEqual(str(e.exception), f'--input ({missing}): no such file.')
    _write_run_config(os.path.join(self.dir, 'run'), base_config())
    self.assert_import_refused(
        sd, 'facebook', f'--workdir ({self.dir}/run) already holds a run'
        ' (config.json); import into a new directory.',
        workdir=os.path.join(self.dir, 'run'))
    open(os.path.join(self.dir, 'file'), 'w').close()
    self.assert_import_refused(
        sd, 'facebook', f'--workdir ({self.dir}/file) is a file, not a'
        ' directory.', workdir=os.path.join(self.dir, 'file'))
    with self.assertRaises(ValueError) as e:
      convert.run_export(os.path.join(self.dir, 'nowhere'), 'facebook',
                         os.path.join(self.dir, 'out.pt'))
    self.assertEqual(str(e.exception),
                     f'--workdir ({self.dir}/nowhere): no such directory.')
    with self.assertRaises(ValueError) as e:
      convert.run_export(self.dir, 'facebook', os.path.join(self.dir, 'o.pt'))
    self.assertEqual(str(e.exception),
                     f'--workdir ({self.dir}) holds no config.json: not a'
                     ' dlrm_jax run (or pass its --config).')
    run = os.path.join(self.dir, 'run')
    for output, why in (
        ('out/sd.npz', f'the directory {self.dir}/out does not exist.'),
        ('sd.bin', None)):
      out = os.path.join(self.dir, output)
      with self.assertRaises(ValueError) as e:
        convert.run_export(run, 'torchrec', out)
      self.assertEqual(str(e.exception),
                       f'--output ({out}): {why}' if why else
                       f'--output ({out}) must end in .npz, .pt or .pth.')

  @parameterized.named_parameters(
      ('dcn_to_facebook', 'facebook', dict(interaction='dcn'),
       'facebookresearch DLRM_Net has no DCN interaction (dlrm_s_pytorch.py'
       ' --arch-interaction-op is dot or cat); export'
       ' config.model.interaction=dcn with --peer=torchrec (DLRM_DCN).'),
      ('shared_to_facebook', 'facebook', dict(shared=True),
       'facebookresearch DLRM_Net has one table per feature; features cat_0,'
       " cat_1 share table 'cat_0' (embedding_name)."),
      ('self_to_torchrec', 'torchrec', dict(interaction_self=True),
       'TorchRec DLRM has no self-interaction'
       ' (config.model.interaction_self must be False).'),
      ('arch_with_sparse', 'torchrec', dict(arch_with_sparse=True),
       'config.model.arch_with_sparse must be False for a TorchRec DLRM.'),
      ('sqrtn', 'torchrec', dict(combiner='sqrtn'),
       "config.features.cat_0.combiner ('sqrtn') has no TorchRec DLRM"
       ' counterpart (it pools SUM or MEAN).'),
      ('mean_to_facebook', 'facebook', dict(combiner='mean'),
       "config.features.cat_0.combiner ('mean') has no facebookresearch"
       ' DLRM_Net counterpart (it pools by sum: nn.EmbeddingBag(mode=sum)).'),
  )
  def test_export(self, peer, change, message):
    config = convert.config_from_peer(peer_state_dict('facebook'), 'facebook',
                                      base_config())
    if change.get('interaction') == 'dcn':
      config.model.interaction = 'dcn'
    if change.get('shared'):
      config.features.cat_1.embedding_name = 'cat_0'
      config.features.cat_1.num_buckets = ROWS[0]
    if 'combiner' in change:
      config.features.cat_0.combiner = change['combiner']
    for field in ('interaction_self', 'arch_with_sparse'):
      if field in change:
        config.model[field] = change[field]
    _write_run_config(self.workdir, config)
    out = os.path.join(self.dir, 'out.npz')
    with self.assertRaises(ValueError) as e:
      convert.run_export(self.workdir, peer, out)
    self.assertEqual(str(e.exception), message)
    self.assertEqual(sorted(os.listdir(self.dir)), ['new'])


class CommandLineTest(absltest.TestCase):
  """`python -m dlrm_jax.convert`: one-line errors, exit status 1."""

  def convert(self, *args, cwd):
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               PYTHONPATH=os.pathsep.join(
                   [_ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    env.pop('DLRM_JAX_TRACEBACK', None)
    return subprocess.run([sys.executable, '-m', 'dlrm_jax.convert', *args],
                          capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)

  def test_refusal(self):
    tmp = self.create_tempdir().full_path
    convert.save_state_dict(peer_state_dict('torchrec', tables=SHARED),
                            os.path.join(tmp, 'sd.npz'))
    out = self.convert('--peer=torchrec', '--input=sd.npz',
                       '--workdir=runs/imported', cwd=tmp)
    self.assertEqual(out.returncode, 1)
    self.assertEqual(
        out.stderr,
        'error: the TorchRec over arch (14 inputs) says 4 features, the state'
        ' dict has 3 tables: a table serves several features'
        ' (EmbeddingBagConfig.feature_names); say which with'
        " --table_features='t_a=f1,f2;t_b=f3'.\n")
    self.assertEqual(out.stdout, '')
    self.assertEqual(os.listdir(tmp), ['sd.npz'])

  def test_import_and_export_from_relative_paths(self):
    tmp = self.create_tempdir().full_path
    sd = peer_state_dict('torchrec', tables=SHARED, dcn=DCN, seed=5)
    convert.save_state_dict(sd, os.path.join(tmp, 'sd' + EXT))
    args = ['--peer=torchrec', '--input=sd' + EXT, '--workdir=runs/imported',
            f'--table_features={SHARED_FLAG}']  # no --config: the default's
    out = self.convert(*args, cwd=tmp)
    self.assertEqual((out.returncode, out.stderr), (0, ''))
    workdir = os.path.join(tmp, 'runs', 'imported')
    self.assertEqual(
        out.stdout,
        f'wrote a step-0 checkpoint to {workdir} (config:'
        f' {workdir}/config.json); model: dcn interaction, dense_mlp [8, 4],'
        ' final [6, 3], 4 sparse features; shared tables: t_a=a1,a2\n')
    self.assertEqual(sorted(os.listdir(workdir)),
                     ['checkpoints', 'config.json', 'peer.json'])
    out = self.convert('--peer=torchrec', '--direction=export',
                       '--workdir=runs/imported', '--output=back.npz', cwd=tmp)
    self.assertEqual((out.returncode, out.stderr), (0, ''))
    assert_same(self, convert.load_state_dict(os.path.join(tmp, 'back.npz')),
                sd)
    with open(os.path.join(tmp, 'back.torchrec.json')) as f:
      args = json.load(f)
    self.assertEqual((args['model'], args['table_features']),
                     ('DLRM_DCN', SHARED_FLAG))


if __name__ == '__main__':
  absltest.main()
