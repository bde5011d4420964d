"""The hash finalizers on numpy and jax.numpy against plain Python integers."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from dlrm_jax import hashing

_M32, _M64 = (1 << 32) - 1, (1 << 64) - 1


def murmur_fmix32(x: int) -> int:
  x &= _M32
  x = ((x ^ (x >> 16)) * 0x85EBCA6B) & _M32
  x = ((x ^ (x >> 13)) * 0xC2B2AE35) & _M32
  return x ^ (x >> 16)


def splitmix64(x: int, key: int, mask: int) -> int:
  z = ((x ^ key) * 0x9E3779B97F4A7C15) & _M64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
  return (z ^ (z >> 31)) & mask


class HashingTest(absltest.TestCase):

  def test_mix32(self):
    x = np.array([0, 1, 2, 12345, 2**31, 2**32 - 1], np.uint32)
    want = [murmur_fmix32(int(v)) for v in x]
    np.testing.assert_array_equal(hashing.mix32(x), want)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda v: hashing.mix32(v, jnp))(x)), want)

  def test_splitmix64(self):
    x = np.array([0, 1, 7, 2**40 + 3, 2**64 - 1], np.uint64)
    key, mask = 0x1234_5678_9ABC_DEF0, 2**53 - 1
    want = np.array([splitmix64(int(v), key, mask) for v in x], np.uint64)
    np.testing.assert_array_equal(
        hashing.splitmix64(x, np.uint64(key), np.uint64(mask)), want)
    with jax.enable_x64(True):
      got = jax.jit(lambda v: hashing.splitmix64(
          v, jnp.uint64(key), jnp.uint64(mask), jnp))(x)
      np.testing.assert_array_equal(np.asarray(got), want)


if __name__ == '__main__':
  absltest.main()
