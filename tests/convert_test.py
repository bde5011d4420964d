"""Weights from facebookresearch/dlrm and TorchRec state dicts, and back.

The state dicts are built with the peers' names and shapes (as their modules
define them); the reference forward is a NumPy transcription of each peer's
forward, in the peer's own column order.
"""

import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax import convert
from dlrm_jax import train
from tests import reference

DIM, ROWS, BOT, TOP = 4, (11, 7, 5), (13, 8, 4), (6, 3, 1)


def peer_state_dict(peer, self_interaction=False, seed=0):
  """Random weights under the peer's parameter names ([out, in] weights)."""
  rng = np.random.default_rng(seed)
  n = len(ROWS) + 1
  pairs = n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2
  bot = list(zip(BOT[1:], BOT[:-1]))
  top = list(zip(TOP, (DIM + pairs,) + TOP[:-1]))
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
  else:
    for k, r in enumerate(ROWS):
      sd[f'sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{k}'
         '.weight'] = rng.uniform(-1, 1, (r, DIM)).astype(np.float32)
    for i, (o, inp) in enumerate(bot):
      key = f'dense_arch.model._mlp.{i}._linear'
      sd[key + '.weight'], sd[key + '.bias'] = lin(o, inp)
    for i, (o, inp) in enumerate(top[:-1]):
      key = f'over_arch.model.0._mlp.{i}._linear'
      sd[key + '.weight'], sd[key + '.bias'] = lin(o, inp)
    sd['over_arch.model.1.weight'], sd['over_arch.model.1.bias'] = lin(
        *top[-1])
  return sd


def peer_forward(sd, peer, dense, ids, self_interaction=False):
  """The peer's forward in NumPy (float64), its own ordering."""
  relu = lambda v: np.maximum(v, 0.0)
  if peer == 'facebook':
    bot = [(sd[f'bot_l.{2 * i}.weight'], sd[f'bot_l.{2 * i}.bias'])
           for i in range(len(BOT) - 1)]
    top = [(sd[f'top_l.{2 * i}.weight'], sd[f'top_l.{2 * i}.bias'])
           for i in range(len(TOP))]
    tables = [sd[f'emb_l.{k}.weight'] for k in range(len(ROWS))]
  else:
    bot = [(sd[f'dense_arch.model._mlp.{i}._linear.weight'],
            sd[f'dense_arch.model._mlp.{i}._linear.bias'])
           for i in range(len(BOT) - 1)]
    top = [(sd[f'over_arch.model.0._mlp.{i}._linear.weight'],
            sd[f'over_arch.model.0._mlp.{i}._linear.bias'])
           for i in range(len(TOP) - 1)]
    top.append((sd['over_arch.model.1.weight'], sd['over_arch.model.1.bias']))
    tables = [sd['sparse_arch.embedding_bag_collection.embedding_bags.'
                 f't_cat_{k}.weight'] for k in range(len(ROWS))]
  x = dense.astype(np.float64)
  for w, b in bot:
    x = relu(x @ w.T + b)
  feats = np.stack([x] + [t[ids[:, k]] for k, t in enumerate(tables)], 1)
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
  return config


def batch(seed=0, b=16):
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.integers(0, r, b) for r in ROWS], 1).astype(np.int32)
  ids[:, 0] = np.arange(b) % 4  # rows 4.. of table 0 are never looked up
  return {'ids': ids,
          'dense': rng.uniform(0, 3, (b, 13)).astype(np.float32),
          'label': (rng.random(b) < 0.5).astype(np.float32)}


class ConvertTest(parameterized.TestCase):

  @parameterized.parameters(('facebook', False), ('facebook', True),
                            ('torchrec', False))
  def test_forward_train_and_back(self, peer, self_interaction):
    sd = peer_state_dict(peer, self_interaction)
    config = convert.config_from_peer(sd, peer, base_config())
    config.batch_size = config.eval_batch_size = 16
    self.assertEqual(config.model.interaction_self, self_interaction)
    trainer = train.Trainer(config, mesh=reference.single_device_mesh())
    state, names = convert.state_from_peer(sd, peer, trainer)
    b = batch()
    got = trainer.predict(state, {k: b[k] for k in ('ids', 'dense')})
    want = peer_forward(sd, peer, b['dense'], b['ids'], self_interaction)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    # Back unchanged before training, bit for bit.
    back = convert.peer_from_state(trainer, state, peer, names)
    self.assertEqual(sorted(back), sorted(sd))
    for k in sd:
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
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

  def test_checkpoint_round_trip_on_8_devices(self):
    sd = peer_state_dict('torchrec', seed=3)
    workdir = self.create_tempdir().full_path
    path = os.path.join(self.create_tempdir().full_path, 'sd.npz')
    convert.save_state_dict(sd, path)
    config = base_config()
    config.embedding.sharding = 'row_wise'
    config.embedding.replicate_bytes = 0
    convert.import_checkpoint(convert.load_state_dict(path), 'torchrec',
                              workdir, config)
    self.assertTrue(os.path.exists(os.path.join(workdir, 'config.json')))
    back = convert.export_checkpoint(workdir, 'torchrec')
    self.assertEqual(sorted(back), sorted(sd))
    for k in sd:
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)

  def test_bad_state_dicts(self):
    sd = peer_state_dict('facebook')
    with self.assertRaisesRegex(ValueError, "no 'sparse_arch.' keys"):
      convert.config_from_peer(sd, 'torchrec', base_config())
    bad = dict(sd)
    bad['top_l.0.weight'] = bad['top_l.0.weight'][:, :-1]
    with self.assertRaisesRegex(ValueError, 'top MLP takes 9 inputs'):
      convert.config_from_peer(bad, 'facebook', base_config())
    # A 'module.' prefix (DistributedDataParallel) is accepted.
    wrapped = {'module.' + k: v for k, v in sd.items()}
    c = convert.config_from_peer(wrapped, 'facebook', base_config())
    self.assertEqual(list(c.model.dense_mlp.hidden_units), [8, 4])


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


if __name__ == '__main__':
  absltest.main()
