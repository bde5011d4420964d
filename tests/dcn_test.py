"""DCNv2 cross network and DLRM-DCN against plain NumPy, and their configs."""

from absl.testing import absltest
import flax
import jax
import jax.numpy as jnp
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.config import build as config_lib
from dlrm_jax.models import DCNSpec, DLRM, DLRMSpec, LowRankCrossNet, MLPSpec


def numpy_cross(x0, layers):
  """`x_{l+1} = x_0 * (U_l (V_l x_l) + b_l) + x_l`, row by row, from the
  formula; `layers` holds (V [r, I], U [I, r], b [I]) per layer."""
  out = np.empty_like(x0)
  for e in range(x0.shape[0]):
    x = x0[e]
    for v, u, b in layers:
      x = x0[e] * (u @ (v @ x) + b) + x
    out[e] = x
  return out


def numpy_layers(params, num_layers):
  """Flax kernels are [in, out]: V = v_l.kernelᵀ, U = u_l.kernelᵀ."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  return [(p[f'v_{l}']['kernel'].T, p[f'u_{l}']['kernel'].T,
           p[f'u_{l}']['bias']) for l in range(num_layers)]


def numpy_mlp(x, params, n, relu_last=True):
  for i in range(n):
    x = x @ params[f'dense_{i}']['kernel'] + params[f'dense_{i}']['bias']
    if relu_last or i < n - 1:
      x = np.maximum(x, 0.0)
  return x


class CrossNetTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.spec = DCNSpec.create(num_layers=3, rank=2)
    self.net = LowRankCrossNet(self.spec)
    rng = np.random.default_rng(0)
    self.x = rng.normal(size=(4, 6)).astype(np.float32)
    params = self.net.init(jax.random.key(1), self.x)['params']
    # Non-zero biases, so their placement inside the product is tested.
    self.params = jax.tree.map(
        lambda a: a + 0.3 * rng.normal(size=a.shape).astype(np.float32),
        params)

  def test_forward_matches_numpy(self):
    got = self.net.apply({'params': self.params}, self.x)
    want = numpy_cross(self.x.astype(np.float64),
                       numpy_layers(self.params, 3))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    self.assertEqual(
        sum(a.size for a in jax.tree.leaves(self.params)),
        self.spec.num_params(6))

  def test_gradient_matches_finite_differences(self):
    w = np.random.default_rng(2).normal(size=self.x.shape)

    def jax_loss(params, x):
      return jnp.sum(self.net.apply({'params': params}, x) * w)

    g_params, g_x = jax.grad(jax_loss, argnums=(0, 1))(self.params, self.x)
    # Flattened in float64 NumPy (jax's ravel_pytree would cast to float32).
    leaves, treedef = jax.tree.flatten(self.params)
    sizes = [l.size for l in leaves]
    flat = np.concatenate([np.asarray(l, np.float64).ravel() for l in leaves])

    def unravel(theta):
      parts = np.split(theta, np.cumsum(sizes)[:-1])
      return jax.tree.unflatten(treedef, [
          p.reshape(l.shape) for p, l in zip(parts, leaves)])

    x64 = self.x.astype(np.float64)

    def np_loss(theta, x):
      return float(np.sum(numpy_cross(x, numpy_layers(unravel(theta), 3))
                          * w))

    eps = 1e-6
    fd_params = np.array([
        (np_loss(flat + eps * e, x64) - np_loss(flat - eps * e, x64))
        / (2 * eps) for e in np.eye(flat.size)])
    fd_x = np.array([
        (np_loss(flat, x64 + eps * e.reshape(x64.shape))
         - np_loss(flat, x64 - eps * e.reshape(x64.shape))) / (2 * eps)
        for e in np.eye(x64.size)]).reshape(x64.shape)
    got_params = np.concatenate(
        [np.asarray(l).ravel() for l in jax.tree.leaves(g_params)])
    np.testing.assert_allclose(np.asarray(got_params), fd_params, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_x), fd_x, rtol=1e-4, atol=1e-4)

  def test_init_is_torchrec_xavier_normal_and_zero_bias(self):
    """U, V ~ N(0, 2 / (I + r)), untruncated; b = 0 (TorchRec)."""
    i, r = 1024, 256
    params = LowRankCrossNet(DCNSpec(1, r)).init(
        jax.random.key(0), jnp.zeros((1, i)))['params']
    std = np.sqrt(2.0 / (i + r))
    for name in ('u_0', 'v_0'):
      k = np.asarray(params[name]['kernel'])
      self.assertAlmostEqual(k.std() / std, 1.0, delta=0.01)
      # A truncated normal (flax's glorot_normal) has no values past 2 std.
      self.assertGreater(np.abs(k).max() / std, 4.0)
    np.testing.assert_array_equal(np.asarray(params['u_0']['bias']), 0.0)


class DLRMDCNTest(absltest.TestCase):

  def spec(self):
    return DLRMSpec(
        num_dense=3, num_sparse=4, embedding_dim=5,
        dense_mlp=MLPSpec.create([7, 5]), final=MLPSpec.create([6]),
        arch_with_sparse=False, interaction='dcn', dcn=DCNSpec(2, 3))

  def test_matches_numpy_dense_cross_over_arch(self):
    spec = self.spec()
    self.assertEqual(spec.final_input_dim, 5 * 5)  # (N + 1) * D
    rng = np.random.default_rng(3)
    dense = rng.normal(size=(2, 3)).astype(np.float32)
    sparse = rng.normal(size=(2, 4, 5)).astype(np.float32)
    model = DLRM(spec)
    params = model.init(jax.random.key(0), dense, sparse,
                        train=False)['params']
    params = jax.tree.map(
        lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32),
        params)
    got = model.apply({'params': params}, dense, sparse, train=False)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    d = numpy_mlp(dense.astype(np.float64), p['dense_mlp'], 2)
    x0 = np.concatenate([d[:, None, :], sparse], axis=1).reshape(2, -1)
    x = numpy_cross(x0, numpy_layers(p['crossnet'], 2))
    x = numpy_mlp(x, p['final'], 1)
    logits = (x @ p['output']['kernel'] + p['output']['bias'])[:, 0]
    np.testing.assert_allclose(np.asarray(got['logits']), logits, rtol=1e-5,
                               atol=1e-5)

  def test_bfloat16_compute_float32_weights_and_logits(self):
    spec = self.spec()
    rng = np.random.default_rng(4)
    dense = rng.normal(size=(8, 3)).astype(np.float32)
    sparse = rng.normal(size=(8, 4, 5)).astype(np.float32)
    f32, bf16 = DLRM(spec), DLRM(spec, dtype=jnp.bfloat16)
    params = f32.init(jax.random.key(0), dense, sparse, train=False)['params']
    self.assertEqual(
        jax.tree.structure(params),
        jax.tree.structure(bf16.init(jax.random.key(0), dense, sparse,
                                     train=False)['params']))
    out, state = bf16.apply({'params': params}, dense, sparse, train=False,
                            capture_intermediates=True)
    inter = flax.traverse_util.flatten_dict(state['intermediates'])
    self.assertEqual(inter[('crossnet', '__call__')][0].dtype, jnp.bfloat16)
    self.assertEqual(inter[('dense_mlp', '__call__')][0].dtype, jnp.bfloat16)
    self.assertEqual(out['logits'].dtype, jnp.float32)
    want = f32.apply({'params': params}, dense, sparse, train=False)
    np.testing.assert_allclose(np.asarray(out['logits']),
                               np.asarray(want['logits']), rtol=0.05,
                               atol=0.05)

    def loss(params):
      return jnp.mean(bf16.apply({'params': params}, dense, sparse,
                                 train=False)['logits'])

    for g in jax.tree.leaves(jax.grad(loss)(params)):
      self.assertEqual(g.dtype, jnp.float32)  # float32 master weights


class ConfigTest(absltest.TestCase):

  def config(self, **model):
    config = criteo_config.get_config('mlperf_dcnv2_tiny')
    for k, v in model.items():
      target = config.model
      *path, last = k.split('.')
      for p in path:
        target = target[p]
      target[last] = v
    return config

  def test_builds_dcn_spec(self):
    setup = config_lib.build(self.config())
    self.assertEqual(setup.model.interaction, 'dcn')
    self.assertEqual(setup.model.dcn, DCNSpec(num_layers=2, rank=4))
    default = config_lib.build(criteo_config.get_config('tiny'))
    self.assertEqual(default.model.interaction, 'dot')
    self.assertIsNone(default.model.dcn)

  def test_bad_values_name_the_field(self):
    cases = [
        ({'interaction': 'cross'}, r"config\.model\.interaction \('cross'\)"),
        ({'dcn.rank': 0}, r'config\.model\.dcn\.rank \(0\) must be a'
                          r' positive integer'),
        ({'dcn.num_layers': -1}, r'config\.model\.dcn\.num_layers \(-1\)'),
        ({'arch_with_sparse': True}, r'config\.model\.arch_with_sparse'
                                     r" \(True\) must be False with"),
    ]
    for overrides, message in cases:
      with self.subTest(overrides=overrides):
        with self.assertRaisesRegex(ValueError, message):
          config_lib.build(self.config(**overrides))


if __name__ == '__main__':
  absltest.main()
