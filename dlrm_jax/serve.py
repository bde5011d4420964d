"""`python -m dlrm_jax.serve`: the HTTP scoring server of an export.

The server is `dlrm_jax.serving.server` (its docstring has the endpoints and
flags); this entry point keeps the command short.
"""

import sys

from dlrm_jax.serving import server

if __name__ == '__main__':
  sys.exit(server.main())
