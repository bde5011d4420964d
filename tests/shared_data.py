"""Finds the shared Criteo samples (never copied into the repository)."""

import os

from absl.testing import absltest

_HERE = os.path.dirname(os.path.abspath(__file__))


def shared_dir() -> str | None:
  """`$DLRM_SHARED_DIR`, else `<repo>/../shared`, if it exists."""
  for d in (os.environ.get('DLRM_SHARED_DIR'),
            os.path.join(_HERE, '..', '..', 'shared')):
    if d and os.path.isdir(os.path.join(d, 'data', 'criteo')):
      return os.path.abspath(d)
  return None


def criteo_file(test: absltest.TestCase, name: str) -> str:
  """Path of a Criteo sample, or skips the test saying where it looked."""
  d = shared_dir()
  if d is None:
    test.skipTest(
        'the Criteo samples are not available: set DLRM_SHARED_DIR to the'
        " 'shared' folder, or put it beside the checkout (../shared).")
  return os.path.join(d, 'data', 'criteo', name)


def movielens_dir(test: absltest.TestCase) -> str:
  """The shared MovieLens 100K folder, or skips the test saying where it
  looked."""
  d = shared_dir()
  path = d and os.path.join(d, 'data', 'movielens', 'ml-100k')
  if not path or not os.path.isdir(path):
    test.skipTest(
        'the MovieLens sample is not available: set DLRM_SHARED_DIR to the'
        " 'shared' folder (with data/movielens/ml-100k), or put it beside"
        ' the checkout (../shared).')
  return path


def avazu_file(test: absltest.TestCase) -> str:
  """The shared Avazu sample, or skips the test saying where it looked."""
  d = shared_dir()
  path = d and os.path.join(d, 'data', 'avazu', 'avazu_train_head_9999.csv')
  if not path or not os.path.isfile(path):
    test.skipTest(
        'the Avazu sample is not available: set DLRM_SHARED_DIR to the'
        " 'shared' folder (with data/avazu), or put it beside the checkout"
        ' (../shared).')
  return path


def avazu_sample() -> str | None:
  """The shared Avazu sample (9,999 rows with a header), or None."""
  d = shared_dir()
  path = d and os.path.join(d, 'data', 'avazu', 'avazu_train_head_9999.csv')
  return path if path and os.path.isfile(path) else None


def movielens_sample() -> str | None:
  """The shared MovieLens 100K folder, or None (`movielens_dir` skips)."""
  d = shared_dir()
  path = d and os.path.join(d, 'data', 'movielens', 'ml-100k')
  return path if path and os.path.isdir(path) else None
