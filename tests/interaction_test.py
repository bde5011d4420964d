"""Dot interaction against a plain double loop."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from dlrm_jax.models import interaction


def loop_interaction(x, self_interaction):
  b, n, _ = x.shape
  out = []
  for e in range(b):
    row = []
    for i in range(n):
      for j in range(i if self_interaction else i + 1, n):
        row.append(float(np.dot(x[e, i], x[e, j])))
    out.append(row)
  return np.array(out, np.float32)


class InteractionTest(parameterized.TestCase):

  @parameterized.parameters((2, 3, False), (3, 5, False), (4, 27, False),
                            (2, 4, True), (1, 1, True))
  def test_matches_double_loop(self, n, d, self_interaction):
    x = np.random.default_rng(n * 10 + d).normal(size=(3, n, d)).astype(
        np.float32)
    got = jax.jit(interaction.dot_interaction, static_argnums=1)(
        x, self_interaction)
    want = loop_interaction(x, self_interaction)
    self.assertEqual(got.shape, want.shape)
    self.assertEqual(got.shape[1],
                     interaction.output_dim(n, self_interaction))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

  @parameterized.parameters((4, 3, False), (5, 2, True))
  def test_gradient_matches_double_loop(self, n, d, self_interaction):
    x = np.random.default_rng(n).normal(size=(2, n, d)).astype(np.float32)
    w = np.random.default_rng(7).normal(
        size=(2, interaction.output_dim(n, self_interaction))).astype(
            np.float32)

    def loop_loss(x):
      total = 0.0
      for e in range(x.shape[0]):
        k = 0
        for i in range(n):
          for j in range(i if self_interaction else i + 1, n):
            total += w[e, k] * jax.numpy.dot(x[e, i], x[e, j])
            k += 1
      return total

    def loss(x):
      return jax.numpy.sum(
          w * interaction.dot_interaction(x, self_interaction))

    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss))(x)),
                               np.asarray(jax.grad(loop_loss)(x)), rtol=1e-5,
                               atol=1e-5)

  @parameterized.parameters((1, 3, False), (3, 4, False), (26, 5, False),
                            (1, 2, True), (4, 3, True))
  def test_lead_equals_the_stacked_features(self, n, d, self_interaction):
    # lead=x0 must give the interaction of [x0, x_1..x_N] stacked, values
    # and gradients of both inputs, against the double loop.
    rng = np.random.default_rng(n * 7 + d)
    lead = rng.normal(size=(3, d)).astype(np.float32)
    x = rng.normal(size=(3, n, d)).astype(np.float32)
    stacked = np.concatenate([lead[:, None], x], axis=1)
    got = jax.jit(interaction.dot_interaction, static_argnums=1)(
        x, self_interaction, lead=lead)
    np.testing.assert_allclose(np.asarray(got),
                               loop_interaction(stacked, self_interaction),
                               rtol=1e-5, atol=1e-5)
    w = rng.normal(size=got.shape).astype(np.float32)

    def loss_lead(lead, x):
      return jax.numpy.sum(
          w * interaction.dot_interaction(x, self_interaction, lead=lead))

    def loss_stacked(lead, x):
      return jax.numpy.sum(w * interaction.dot_interaction(
          jax.numpy.concatenate([lead[:, None], x], 1), self_interaction))

    got_g = jax.jit(jax.grad(loss_lead, argnums=(0, 1)))(lead, x)
    want_g = jax.grad(loss_stacked, argnums=(0, 1))(lead, x)
    for g, h in zip(got_g, want_g):
      np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5,
                                 atol=1e-5)

  def test_rejects_a_lead_of_the_wrong_shape(self):
    with self.assertRaisesRegex(ValueError, r'\[B, D\] lead of B=2, D=3'):
      interaction.dot_interaction(np.zeros((2, 4, 3), np.float32),
                                  lead=np.zeros((2, 4), np.float32))

  def test_output_dim(self):
    self.assertEqual(interaction.output_dim(27), 351)
    self.assertEqual(interaction.output_dim(27, True), 378)

  def test_rejects_wrong_rank(self):
    with self.assertRaisesRegex(ValueError, r'\[B, N, D\]'):
      interaction.dot_interaction(np.zeros((2, 3), np.float32))


if __name__ == '__main__':
  absltest.main()
