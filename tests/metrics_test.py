"""Metrics against brute-force definitions."""

from absl.testing import absltest
import numpy as np

from dlrm_jax.train import metrics


def brute_force_auc(scores, labels):
  pos = [s for s, y in zip(scores, labels) if y == 1]
  neg = [s for s, y in zip(scores, labels) if y == 0]
  wins = 0.0
  for p in pos:
    for n in neg:
      wins += 1.0 if p > n else 0.5 if p == n else 0.0
  return wins / (len(pos) * len(neg))


class MetricsTest(absltest.TestCase):

  def test_auc_matches_pairwise_count(self):
    rng = np.random.default_rng(0)
    for trial in range(20):
      n = int(rng.integers(2, 60))
      # Few distinct values: many ties.
      scores = rng.integers(0, 1 + trial % 5 + 1, n).astype(np.float32) / 7
      labels = rng.integers(0, 2, n)
      labels[0], labels[1] = 0, 1
      self.assertAlmostEqual(metrics.roc_auc(scores, labels),
                             brute_force_auc(scores, labels), places=12)

  def test_auc_edge_cases(self):
    self.assertEqual(metrics.roc_auc([0.1, 0.9], [0, 1]), 1.0)
    self.assertEqual(metrics.roc_auc([0.9, 0.1], [0, 1]), 0.0)
    self.assertEqual(metrics.roc_auc([0.5, 0.5], [0, 1]), 0.5)
    self.assertTrue(np.isnan(metrics.roc_auc([0.5, 0.7], [1, 1])))

  def test_log_loss_accuracy_calibration(self):
    p = np.array([0.9, 0.2, 0.6, 0.4])
    y = np.array([1, 0, 0, 1])
    want = -np.mean([np.log(0.9), np.log(0.8), np.log(0.4), np.log(0.4)])
    self.assertAlmostEqual(metrics.log_loss(p, y), want, places=12)
    self.assertEqual(metrics.accuracy(p, y), 0.5)
    self.assertAlmostEqual(metrics.calibration(p, y), 0.525 / 0.5)

  def test_roc_curve_area_equals_auc(self):
    rng = np.random.default_rng(1)
    s = rng.random(500)
    y = (rng.random(500) < s).astype(int)
    fpr, tpr = metrics.roc_curve(s, y, max_points=10_000)
    self.assertAlmostEqual(np.trapezoid(tpr, fpr), metrics.roc_auc(s, y),
                           places=10)


if __name__ == '__main__':
  absltest.main()
