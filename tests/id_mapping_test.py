"""One id mapping, four paths: raw values give the same table rows through
the input pipeline, preprocessing (vocabularies), inference's reading of
preprocessed runs, and the exported function; each is checked against a
plain Python mapping written from the formulas (features.py's docstrings)."""

import bisect
import os

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from configs import criteo as criteo_config
from dlrm_jax.config import build as config_lib
from dlrm_jax.data import features
from dlrm_jax.serving import export as serving
from dlrm_jax.data import pipeline
from dlrm_jax.data import preprocess

B = 300
BOUNDARIES = [1.0, 10.0, 100.0]


def _mix32(v):
  """MurmurHash3's 32-bit finalizer, in Python ints."""
  m = 0xFFFFFFFF
  v = ((v ^ (v >> 16)) * 0x85EBCA6B) & m
  v = ((v ^ (v >> 13)) * 0xC2B2AE35) & m
  return v ^ (v >> 16)


def _reference_row(f, value, vocab):
  """The row of one raw value, in plain Python."""
  if isinstance(f, features.RawFeature):  # bucketized; negatives clamp to 0
    return bisect.bisect_right(f.boundaries, max(float(value), 0.0))
  if value < 0:
    return 0  # missing
  if vocab is not None:
    return vocab.get(value, preprocess.OOV_ID)
  if f.hash_bucket_size:
    return 1 + _mix32(value) % (f.hash_bucket_size - 1)
  return 1 + value % (f.num_buckets - 1)


class OneMappingTest(absltest.TestCase):

  def test_four_paths_give_the_same_rows(self):
    config = criteo_config.get_config('tiny')
    dim = config.features.cat_0.embedding_dim
    config.features.int_0.boundaries = BOUNDARIES  # bucketized
    config.features.int_0.embedding_dim = dim
    groups = config.model.feature_groups
    groups.dense = [f'int_{i}' for i in range(1, 13)]
    groups.sparse = ['int_0'] + [f'cat_{i}' for i in range(26)]
    config.features.cat_1.num_buckets = None  # hashed
    config.features.cat_1.hash_bucket_size = 97
    transform = config_lib.build(config).transform
    rng = np.random.default_rng(0)
    ints = rng.integers(-3, 300, (B, 13))
    pool = rng.integers(0, 2**32, 40)  # repeated values, so vocabularies hit
    cat = np.where(rng.random((B, 26)) < 0.1, -1,
                   pool[rng.integers(0, 40, (B, 26))])
    cat[:3] = np.array([2**32 - 1, 0, 2**31])[:, None]  # 32-bit range edges
    # Vocabularies as preprocessing writes them, of half the pool.
    out = self.create_tempdir().full_path
    os.makedirs(os.path.join(out, 'vocab'))
    vocabs = []
    for j in range(26):
      values = rng.permutation(pool[:20]).astype(np.uint32)
      np.savez(os.path.join(out, 'vocab', f'cat_{j}.npz'), values=values)
      vocabs.append({int(v): 2 + k for k, v in enumerate(values)})
    lookups = preprocess.load_vocab_lookups(out)
    raw = {'int': ints, 'cat': cat, 'label': np.zeros(B, np.float32)}
    maker = pipeline.ModelBatchMaker(transform, None)

    # 1. The input pipeline on raw rows (text sources, synthetic data).
    text_ids = maker(raw)['ids']
    # 2. Preprocessing maps the cat columns by the vocabularies; 3. training
    # and inference (`inference.TrainedModel.raw_to_model_rows`) then read
    # those ids through the same transform.
    vocab_ids = maker({'int': ints, 'ids': preprocess.map_vocab(cat, lookups),
                       'label': raw['label']})['ids']
    # 4. The exported function, on jax.numpy, without and with the
    # vocabularies as its id tables (`inference.TrainedModel.id_tables`).
    present = jnp.asarray(cat >= 0)
    cat_u32 = jnp.asarray(np.where(cat < 0, 0, cat).astype(np.uint32))
    tables = preprocess.vocab_id_tables(lookups, transform)
    for offset, f in zip(transform.id_offsets, transform.sparse):
      column = (ints if isinstance(f, features.RawFeature) else cat)[
          :, int(f.input[4:])]
      vocab = (vocabs[int(f.input[4:])]
               if isinstance(f, features.IdFeature) else None)
      want = [_reference_row(f, int(v), None) for v in column]
      want_vocab = [_reference_row(f, int(v), vocab) for v in column]
      export = serving.sparse_ids(f, jnp.asarray(ints), cat_u32, present, {})
      export_vocab = serving.sparse_ids(f, jnp.asarray(ints), cat_u32,
                                        present, tables)
      for name, got, expected in (
          ('pipeline', text_ids[:, offset], want),
          ('export', np.asarray(export), want),
          ('preprocessed', vocab_ids[:, offset], want_vocab),
          ('export with vocabularies', np.asarray(export_vocab),
           want_vocab)):
        np.testing.assert_array_equal(got, expected,
                                      err_msg=f'{name}: {f.name}')


if __name__ == '__main__':
  absltest.main()
