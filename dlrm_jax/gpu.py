"""Guard against the float32 scatter-add regression of XLA:GPU.

jaxlib 0.10.2 and 0.11.0 compile a float32 scatter-add on NVIDIA GPUs to a
compare-and-swap loop instead of the native `atom.add.f32`
(openxla/xla#46225, jax-ml/jax#38806; fixed in 0.11.1): an LLVM NVPTX change
keeps the native atomic only for code that flushes denormals. Under repeated
indices (the embedding update of small Criteo tables, where a batch hits a
few rows thousands of times) the loop is hundreds of times slower. Both
sparse update paths scatter-add with repeated indices: SGD adds each id's
gradient into its row (`table.at[ids].add`), and Adagrad/Adam sum each
unique row's gradients with `segment_sum`, a scatter-add too.

`apply_scatter_workaround()` (called by `dlrm_jax.main` before JAX starts a
backend) passes LLVM the option that restores the native atomic,
`XLA_FLAGS=--xla_backend_extra_options=-nvptx-allow-ftz-atomics`, on the
affected versions when a CUDA plugin is installed. The price: a denormal
float (< 1.2e-38) added atomically is flushed to zero. Set
DLRM_JAX_SKIP_SCATTER_WORKAROUND=1 to leave XLA_FLAGS alone.
"""

from __future__ import annotations

import importlib.util
import os

from absl import logging

SKIP_ENV = 'DLRM_JAX_SKIP_SCATTER_WORKAROUND'
FTZ_ATOMICS_OPTION = '-nvptx-allow-ftz-atomics'
# jaxlib versions with the regression: [first affected, first fixed).
AFFECTED = ((0, 10, 2), (0, 11, 1))
_CUDA_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin',
                 'jax_plugins.xla_cuda12', 'jax_plugins.xla_cuda13')


def version_tuple(version: str) -> tuple[int, ...]:
  """Parses the first three parts of a version string.

  Args:
    version: a version such as '0.11.0' or '0.10.2rc1'.

  Returns:
    The numbers, such as (0, 11, 0). A part without digits counts 0.
  """
  parts = []
  for x in version.split('.')[:3]:
    digits = ''.join(c for c in x if c.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts)


def scatter_regression_affected(jaxlib_version: str) -> bool:
  """Says whether a jaxlib has the CAS-loop float32 scatter-add on GPU.

  Args:
    jaxlib_version: the jaxlib version.

  Returns:
    True for the versions in AFFECTED.
  """
  lo, hi = AFFECTED
  return lo <= version_tuple(jaxlib_version) < hi


def cuda_plugin_installed() -> bool:
  """Whether a jax CUDA plugin can be imported."""
  for name in _CUDA_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except (ImportError, ValueError):
      continue
  return False


def with_ftz_atomics(xla_flags: str) -> str:
  """Adds FTZ_ATOMICS_OPTION to the --xla_backend_extra_options of XLA flags.

  Args:
    xla_flags: the XLA_FLAGS value.

  Returns:
    The flags with the option, added once.
  """
  prefix = '--xla_backend_extra_options='
  tokens = xla_flags.split()
  for i, token in enumerate(tokens):
    if token.startswith(prefix):
      options = [o for o in token[len(prefix):].split(',') if o]
      if FTZ_ATOMICS_OPTION not in options:
        options.append(FTZ_ATOMICS_OPTION)
      tokens[i] = prefix + ','.join(options)
      return ' '.join(tokens)
  return ' '.join(tokens + [prefix + FTZ_ATOMICS_OPTION])


def apply_scatter_workaround(jaxlib_version: str | None = None,
                             cuda: bool | None = None) -> bool:
  """Adds the FTZ-atomics option to XLA_FLAGS where the regression is.

  It must run before JAX starts its backends, because XLA reads XLA_FLAGS
  then.

  Args:
    jaxlib_version: the jaxlib version. Default: the installed jaxlib's.
    cuda: whether a CUDA plugin is installed. Default: detected.

  Returns:
    Whether XLA_FLAGS now carries the option because of this call.
  """
  if os.environ.get(SKIP_ENV, '') not in ('', '0'):
    return False
  if jaxlib_version is None:
    import jaxlib  # pylint: disable=g-import-not-at-top
    jaxlib_version = jaxlib.__version__
  if cuda is None:
    cuda = cuda_plugin_installed()
  if not (cuda and scatter_regression_affected(jaxlib_version)):
    return False
  flags = os.environ.get('XLA_FLAGS', '')
  if FTZ_ATOMICS_OPTION in flags:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    logging.warning(
        'jaxlib %s has the GPU float32 scatter-add regression'
        ' (openxla/xla#46225) and JAX has already started, too late to set'
        ' XLA_FLAGS; start with XLA_FLAGS=--xla_backend_extra_options=%s'
        ' for fast sparse updates.', jaxlib_version, FTZ_ATOMICS_OPTION)
    return False
  os.environ['XLA_FLAGS'] = with_ftz_atomics(flags)
  logging.info('jaxlib %s: XLA_FLAGS += %s (GPU scatter-add regression,'
               ' openxla/xla#46225)', jaxlib_version, FTZ_ATOMICS_OPTION)
  return True
