"""Command line: `python -m dlrm_jax.main --config=configs/criteo.py`.

Flags:
  --config: a config file, optionally with a `:variant` suffix, and
    `--config.<field>=<value>` overrides (ml_collections config_flags).
  --workdir: where checkpoints, metrics.jsonl and config.json go (default: a
    new folder under ./runs/). Running again with the same workdir resumes.
  --coordinator_address, --num_processes, --process_id: multi-process runs
    (else taken from the environment, see dlrm_jax.parallel).
"""

import datetime
import logging as std_logging
import os

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dlrm_jax import parallel
from dlrm_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (with an optional :variant).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Work directory (default: a new folder under ./runs/).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes (multi-process).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process (multi-process).')
_LIBRARY_LOGS = flags.DEFINE_bool(
    'library_logs', False,
    'Also show the INFO logs of libraries (orbax, jax); by default only'
    " dlrm_jax's own INFO lines and everyone's warnings are shown.")


class _OwnInfoOnly(std_logging.Filter):
  """Keeps warnings and errors, and INFO lines from dlrm_jax itself."""

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING
            or f'{os.sep}dlrm_jax{os.sep}' in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  if not _LIBRARY_LOGS.value:
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  if jax.process_index() != 0:  # only process 0 writes logs
    logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value or os.path.join(
      'runs', datetime.datetime.now().strftime('%Y%m%d-%H%M%S'))
  logging.info('workdir: %s', workdir)
  train.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
