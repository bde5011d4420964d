"""`python -m dlrm_jax.convert`: see `dlrm_jax.convert.peers.main`."""

from dlrm_jax.convert import peers

if __name__ == '__main__':
  peers.main()
