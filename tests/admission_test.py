"""Rare-id admission: against exact counting, and across a resume."""

import collections
import os

from absl.testing import absltest
import jax
import numpy as np

from dlrm_jax.config import build as config_lib
from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax.data import features as features_lib
from dlrm_jax.train import loop as train_loop
from dlrm_jax.embedding.ids import admission
from tests import train_test


def transform():
  return features_lib.FeatureTransform(dense=(), sparse=(
      features_lib.IdFeature('a', 'cat_0', 4, num_buckets=50),
      features_lib.IdFeature('b', 'cat_1', 4, num_buckets=50, max_ids=2)))


class AdmissionTest(absltest.TestCase):

  def test_matches_exact_counts(self):
    spec = admission.AdmissionSpec(min_count=3, oov_row=0, width=1 << 16)
    adm = admission.IdAdmission(spec, transform())
    counts = collections.Counter()
    rng = np.random.default_rng(0)
    for _ in range(6):
      ids = rng.integers(1, 30, (16, 3)).astype(np.int32)
      ids[:, 2] = np.where(rng.random(16) < 0.3, -1, ids[:, 2])
      got = adm.train({'ids': ids, 'label': np.zeros(16)})['ids']
      want = ids.copy()
      for j, feat in ((0, 'a'), (1, 'b'), (2, 'b')):  # count the batch first
        for i in ids[:, j]:
          if i >= 0:
            counts[feat, int(i)] += 1
      for b in range(16):
        for j, feat in ((0, 'a'), (1, 'b'), (2, 'b')):
          i = int(ids[b, j])
          if i >= 0 and counts[feat, i] < 3:
            want[b, j] = 0  # the shared row
      np.testing.assert_array_equal(got, want)
    # Eval maps with the counts so far and counts nothing.
    before = adm.sketch.counts.copy()
    ev = adm.eval({'ids': ids})['ids']
    np.testing.assert_array_equal(ev, got)
    np.testing.assert_array_equal(adm.sketch.counts, before)
    self.assertTrue(np.any(got == 0) and np.any(got > 0))

  def test_sketch_only_over_counts(self):
    sketch = admission.CountMinSketch(depth=3, width=64)
    keys = np.random.default_rng(1).integers(0, 1000, 5000)
    sketch.add(keys, salt=7)
    true = collections.Counter(keys.tolist())
    uniq = np.array(sorted(true))
    est = sketch.estimate(uniq, salt=7)
    self.assertTrue(np.all(est >= [true[k] for k in uniq]))
    self.assertEqual(sketch.counts.nbytes, 3 * 64 * 4)  # bounded

  def test_bad_config_names_the_field(self):
    with self.assertRaisesRegex(ValueError, r'config.admission.width \(0\)'):
      config_lib.build_admission({'min_count': 2, 'width': 0}, transform())
    with self.assertRaisesRegex(ValueError, r"names \['c'\]"):
      admission.IdAdmission(admission.AdmissionSpec(2, features=('c',)),
                            transform())


class AdmissionResumeTest(absltest.TestCase):

  def test_sketch_survives_a_resume(self):
    trainer = train_test.shared_trainer()
    over = {'admission.min_count': 3, 'admission.width': 4096,
            'eval_every_steps': 10, 'checkpoint_every_steps': 10}
    straight = self.create_tempdir().full_path
    a = train_loop.train_and_evaluate(
        train_test.tiny_config(num_train_steps=20, **over), straight, trainer)
    resumed = self.create_tempdir().full_path
    train_loop.train_and_evaluate(
        train_test.tiny_config(num_train_steps=10, **over), resumed, trainer)
    b = train_loop.train_and_evaluate(
        train_test.tiny_config(num_train_steps=20, **over), resumed, trainer)
    self.assertEqual(a['eval'], b['eval'])
    sketches = []
    for workdir in (straight, resumed):
      ckpt = ckpt_lib.Checkpointer(workdir)
      sketches.append(np.asarray(
          ckpt.restore_remappers(20)['_id_admission']['counts']))
      ckpt.close()
    np.testing.assert_array_equal(sketches[0], sketches[1])
    # 20 steps x 128 examples x 26 single-hot features, 4 sketch rows.
    self.assertEqual(int(sketches[0].sum()), 20 * 128 * 26 * 4)
    x, _ = train_test.restore_final_state(straight, trainer)
    y, _ = train_test.restore_final_state(resumed, trainer)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    self.assertTrue(os.path.isdir(os.path.join(straight, 'checkpoints')))


if __name__ == '__main__':
  absltest.main()
