"""Command line: `python -m dlrm_jax.main --config=configs/criteo.py`.

Modes (`--mode`):
  train    (default) train and evaluate; resumes from --workdir's checkpoints.
  eval     evaluate the latest checkpoint of --workdir on the config's eval set
           or on --input files (labeled Criteo text).
  predict  write one click probability per row of --input (labeled or
           unlabeled Criteo text), in input order, to --output.
  export   write the inference function (raw features in, probability out)
           with jax.export to the --output directory.

Flags:
  --config: a config file, optionally with a `:variant` suffix, and
    `--config.<field>=<value>` overrides (ml_collections config_flags).
  --workdir: the run's directory (default for training: a new folder under
    ./runs/). Checkpoints, metrics.jsonl, TensorBoard events, plots.
  --coordinator_address, --num_processes, --process_id: multi-process runs
    (else taken from the environment, see dlrm_jax.parallel).

A mistake of the user (a bad config value, a malformed input line, a workdir
in use, a damaged checkpoint, a failed save) ends with one line, `error:
<what>`, on stderr and exit status 1; the Python traceback is shown too with
`--verbosity=1` or the environment variable DLRM_JAX_TRACEBACK=1.
"""

import datetime
import logging as std_logging
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dlrm_jax import gpu
from dlrm_jax import checkpoint as ckpt_lib
from dlrm_jax import config_checks
from dlrm_jax import parallel
from dlrm_jax import train
from dlrm_jax import workdir_lock

MODES = ('train', 'eval', 'predict', 'export')

# `--config.<list field>=[32,8]` (or =32,8): config_flags parses no lists.
config_checks.register_list_parser()

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (with an optional :variant).',
    lock_config=True)
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (train default: a new folder under'
    ' ./runs/; required by the other modes).')
_INPUT = flags.DEFINE_list(
    'input', [], 'eval/predict: Criteo text files (file, glob or list).')
_OUTPUT = flags.DEFINE_string(
    'output', None, 'predict: the scores file; export: the directory.')
_EXPORT_BATCH = flags.DEFINE_integer(
    'export_batch_size', 0, 'export: a fixed batch size (0: symbolic, any).')
_REQUEST_COLUMNS = flags.DEFINE_list(
    'request_columns', [],
    'export: input columns (int_<i>, cat_<j>) that are the same for every'
    ' candidate of a request; adds a tiled function.')
_QUANTIZE = flags.DEFINE_enum(
    'quantize', 'none', ['none', 'fp16', 'int8'],
    'export: table storage (int8: FBGEMM row-wise scale and bias).')
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
    own = f'{os.sep}dlrm_jax{os.sep}' in record.pathname
    if not own and record.exc_info:
      # A library's traceback (orbax logs one per failed save): its line
      # stays; dlrm_jax's own error says what failed and where.
      record.exc_info = record.exc_text = None
    return record.levelno >= std_logging.WARNING or own


# Errors that are the user's to fix: shown as one line, without a traceback.
USER_ERRORS = (ValueError, OSError, ckpt_lib.DamagedCheckpointError,
               ckpt_lib.CheckpointSaveError, workdir_lock.WorkdirLockedError,
               train.NonFiniteLossError, train.InvalidIdError)


def _show_traceback(argv=None) -> bool:
  if os.environ.get('DLRM_JAX_TRACEBACK', '') not in ('', '0'):
    return True
  if argv is not None:  # Before the flags are parsed.
    for a in argv:
      for name in ('--verbosity=', '-v='):
        if a.startswith(name):
          try:
            return int(a[len(name):]) >= 1
          except ValueError:
            return False
    return False
  return flags.FLAGS.verbosity >= 1


def parse_flags(argv):
  """absl's flag parsing, with a config override that names no field (or
  another mistake inside config_flags) shown as one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except Exception as e:  # pylint: disable=broad-except
    if _show_traceback(argv):
      raise
    msg = str(e).replace("\\'", "'").replace('\\n', ' ')
    msg = ' '.join(msg.split())[1:-1] if msg[:1] == "'" else msg
    if isinstance(e, (AttributeError, KeyError)):
      msg = f'no such config field: {msg}'
    sys.stderr.write(f'error: in the flags: {" ".join(msg.split())}\n')
    sys.exit(1)


def run_main(argv):
  """`main`, with user errors printed as one line (see the module doc)."""
  show = _show_traceback()
  try:
    main(argv)
  except USER_ERRORS as e:
    if show:
      raise
    sys.stdout.flush()
    sys.stderr.write(f'error: {e}\n')
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(max(logging.INFO, flags.FLAGS.verbosity))
  if not _LIBRARY_LOGS.value:
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
  gpu.apply_scatter_workaround()  # before JAX starts: it sets XLA_FLAGS
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  if jax.process_index() != 0:  # only process 0 writes logs
    logging.set_verbosity(logging.WARNING)
  mode = _MODE.value
  if mode == 'train':
    workdir = _WORKDIR.value or os.path.join(
        'runs', datetime.datetime.now().strftime('%Y%m%d-%H%M%S'))
    logging.info('workdir: %s', workdir)
    train.train_and_evaluate(_CONFIG.value, workdir)
    return
  from dlrm_jax import inference  # pylint: disable=g-import-not-at-top
  if not _WORKDIR.value:
    raise app.UsageError(f'--mode={mode} needs the --workdir of a run.')
  if mode in ('predict', 'export') and not _OUTPUT.value:
    raise app.UsageError(f'--mode={mode} needs --output.')
  if mode == 'predict' and not _INPUT.value:
    raise app.UsageError('--mode=predict needs --input files.')
  model = inference.load(_CONFIG.value, _WORKDIR.value)
  logging.info('restored step %d of %s', model.step, _WORKDIR.value)
  if mode == 'eval':
    inference.evaluate_and_report(model, _WORKDIR.value, _INPUT.value or None)
  elif mode == 'predict':
    n = inference.predict(model, _INPUT.value, _OUTPUT.value)
    print(f'{n} scores written to {_OUTPUT.value}')
  else:
    out = inference.export(
        model, _OUTPUT.value, batch_size=_EXPORT_BATCH.value or None,
        request_columns=_REQUEST_COLUMNS.value,
        quantize=None if _QUANTIZE.value == 'none' else _QUANTIZE.value)
    print(f'exported to {out}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(run_main, flags_parser=parse_flags)
