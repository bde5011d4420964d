"""Command line: `python -m dlrm_jax.main --config=configs/criteo.py`.

Modes (`--mode`):
  train    (default) train and evaluate; resumes from --workdir's checkpoints.
  eval     evaluate a checkpoint of --workdir on the config's eval set or on
           --input files (labeled Criteo text).
  predict  write one click probability per row of --input (labeled or
           unlabeled Criteo text), in input order, to --output.
  export   write the inference function (raw features in, probability out)
           with jax.export to the --output directory.

Flags:
  --config: a config file, optionally with a `:variant` suffix, or the
    `config.json` a run saved in its workdir; `--config.<field>=<value>`
    overrides (ml_collections config_flags). Without --config, a --workdir
    holding a config.json runs with that one.
  --workdir: the run's directory (default for training: a new folder under
    ./runs/). Checkpoints, metrics.jsonl, TensorBoard events, plots.
  --checkpoint: eval/predict/export: `best` (the default where the run keeps
    a best checkpoint, `config.keep_best_metric`), `latest` (the default
    otherwise) or a step.
  --coordinator_address, --num_processes, --process_id: multi-process runs
    (else taken from the environment, see dlrm_jax.parallel).

Paths are relative to the current directory (`~` expanded): the flags and
the config's path fields are made absolute once, here.

A mistake of the user (a bad flag or config value, a missing file, a workdir
in use, a checkpoint of another config, a malformed input line, a failed
save) ends with one line, `error: <what>`, on stderr and exit status 1,
checked before anything is built or written where it can be; the Python
traceback is shown too with `--verbosity=1` or DLRM_JAX_TRACEBACK=1.
Ctrl-C (SIGINT) or SIGTERM during training saves a checkpoint at the current
step and ends with one line (exit status 130 for SIGINT, 0 for SIGTERM);
rerunning the command resumes.
"""

import dataclasses
import datetime
import logging as std_logging
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax import cli
from dlrm_jax.config import checks as config_checks
from dlrm_jax.config import build as config_lib
from dlrm_jax import gpu
from dlrm_jax.serving import offline as inference
from dlrm_jax import parallel
from dlrm_jax.train import loop as train_loop
from dlrm_jax.train import workdir_lock
from dlrm_jax.data import criteo
from dlrm_jax.data import inputs

MODES = ('train', 'eval', 'predict', 'export')

# `--config.<list field>=[32,8]` (or =32,8): config_flags parses no lists.
config_checks.register_list_parser()

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (with an optional :variant), or a run\'s'
    ' config.json.', lock_config=True)
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (train default: a new folder under'
    ' ./runs/; required by the other modes).')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'eval/predict/export: best, latest or a step'
    ' (default: best where the run keeps one, else latest).')
_INPUT = flags.DEFINE_list(
    'input', [], 'eval/predict: Criteo text files, or a tabular config\'s'
    ' files (file, glob or list).')
_OUTPUT = flags.DEFINE_string(
    'output', None, 'predict: the scores file; export: the directory;'
    ' eval with --input: the metrics file.')
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


# The package's own folder. A path test on '/dlrm_jax/' alone would also let
# through every library of a virtual environment made inside a clone named
# dlrm_jax (the README's set-up: `.venv` in the checkout).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _OwnInfoOnly(std_logging.Filter):
  """Keeps warnings and errors, and INFO lines from dlrm_jax itself."""

  def filter(self, record):
    """Says whether a log record is shown.

    A library's traceback is dropped from its record. The line stays, and
    dlrm_jax's own error says what failed and where.

    Args:
      record: the log record.

    Returns:
      True for warnings, errors and dlrm_jax's own lines.
    """
    own = os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)
    if not own and record.exc_info:
      # A library's traceback (orbax logs one per failed save): its line
      # stays; dlrm_jax's own error says what failed and where.
      record.exc_info = record.exc_text = None
    return record.levelno >= std_logging.WARNING or own


# ----------------------------------------------------------------------------
# Flags.


def _config_argv(argv: list[str]) -> list[str]:
  """argv with `--config` as config_flags takes it (`cli.config_argv`);
  without --config, the config.json of the --workdir, if it has one.

  Raises:
    cli.UserError: if there is no config to use.
  """
  if cli.flag_value(argv, 'config') is None:
    workdir = cli.flag_value(argv, 'workdir')
    saved = workdir and os.path.join(cli.absolute(workdir[1]), 'config.json')
    if saved and os.path.isfile(saved):
      argv = [argv[0], f'--config={saved}', *argv[1:]]
    elif not any(a in cli.HELP_FLAGS for a in argv[1:]):
      raise cli.UserError(
          '--config is required: a config file such as'
          ' configs/criteo.py[:variant], or a run\'s config.json (without'
          ' --config, a --workdir holding a config.json runs with it).')
  return cli.config_argv(argv)


def parse_flags(argv):
  """Parses absl's flags, with every mistake in the flags shown as one line.

  Args:
    argv: the command line.

  Returns:
    The arguments that are not flags.
  """
  return cli.parse_flags(argv, prepare=_config_argv)


# ----------------------------------------------------------------------------
# The command, checked.


@dataclasses.dataclass(frozen=True)
class Command:
  """What the command line asks for, checked, with absolute paths.

  Attributes:
    mode: one of MODES.
    spec: the run spec of the config.
    workdir: the run's directory.
    checkpoint: for eval, predict and export: 'best', 'latest', a step, or
      None. None takes best where the run keeps one.
    inputs: for eval and predict: the --input files.
    output: for predict, export and eval: where to write.
  """

  mode: str
  spec: object
  workdir: str
  checkpoint: str | int | None
  inputs: tuple[str, ...]
  output: str | None


def _check_writable(path: str, flag: str, *, directory: bool) -> None:
  """Raises cli.UserError if `path` (a directory, or a file) cannot be
  written, without creating anything."""
  if os.path.exists(path):
    if directory and not os.path.isdir(path):
      raise cli.UserError(f'{flag} {path}: exists and is not a directory.')
    if not directory and os.path.isdir(path):
      raise cli.UserError(f'{flag} {path}: is a directory, not a file.')
    target = path if directory else os.path.dirname(path)
  elif not directory and not os.path.isdir(os.path.dirname(path)):
    raise cli.UserError(f'{flag} {path}: the directory'
                        f' {os.path.dirname(path)} does not exist.')
  else:
    target = os.path.dirname(path)
    while target and not os.path.exists(target):
      target = os.path.dirname(target)
    if target and not os.path.isdir(target):
      raise cli.UserError(f'{flag} {path}: {target} is not a directory.')
  if not os.access(target or '.', os.W_OK | os.X_OK):
    raise cli.UserError(
        f'{flag} {path}: cannot write there ({target} is not writable).')


def _checkpoint_choice(value: str | None) -> str | int | None:
  if value in (None, ''):
    return None
  if value in ('best', 'latest'):
    return value
  if value.isdigit():
    return int(value)
  raise cli.UserError(
      f'--checkpoint={value}: takes best, latest or a step number.')


def check_command() -> Command:
  """Checks the command line's flags and config before anything is built.

  Returns:
    The command.

  Raises:
    cli.UserError: a flag is missing, wrong or meant for another mode. It
      names the flag.
    ValueError: the config breaks a rule. It names the config field.
  """
  mode = _MODE.value
  config = _CONFIG.value
  cli.absolute_config_paths(config)
  workdir = cli.absolute(_WORKDIR.value)
  if mode == 'train':
    if not workdir:
      workdir = os.path.abspath(os.path.join(
          'runs', datetime.datetime.now().strftime('%Y%m%d-%H%M%S')))
    _check_writable(workdir, '--workdir', directory=True)
  elif not workdir:
    raise cli.UserError(f'--mode={mode} needs the --workdir of a run.')
  else:
    _check_run_dir(workdir)
  spec = config_lib.run_spec(config)
  if mode == 'train' or (mode == 'eval' and not _INPUT.value):
    inputs.check_sources(spec)
  checkpoint = None
  if mode != 'train':
    checkpoint = _checkpoint_choice(_CHECKPOINT.value)
  elif _CHECKPOINT.value:
    raise cli.UserError('--checkpoint is for eval, predict and export.')
  output = cli.absolute(_OUTPUT.value)
  if mode in ('predict', 'export') and not output:
    raise cli.UserError(f'--mode={mode} needs --output.')
  if mode == 'predict' and not _INPUT.value:
    raise cli.UserError('--mode=predict needs --input files.')
  paths = ()
  if _INPUT.value:
    if mode not in ('eval', 'predict'):
      raise cli.UserError('--input is for eval and predict.')
    paths = tuple(criteo.expand_paths(cli.absolute_spec(list(_INPUT.value)),
                                      field='--input'))
  if output:
    _check_writable(output, '--output', directory=(mode == 'export'))
  return Command(mode, spec, workdir, checkpoint, paths, output)


def _check_run_dir(workdir: str) -> None:
  """Raises cli.UserError unless `workdir` is a run's directory."""
  if not os.path.isdir(workdir):
    raise cli.UserError(f'--workdir {workdir}: no such directory.')
  name = os.path.basename(workdir)
  if name in ('best_checkpoint', 'checkpoints') and not os.path.isdir(
      os.path.join(workdir, 'checkpoints')):
    parent = os.path.dirname(workdir)
    hint = ' --checkpoint=best' if name == 'best_checkpoint' else ''
    raise cli.UserError(
        f'--workdir {workdir} is the {name} folder of a run; pass the run:'
        f' --workdir={parent}{hint}.')
  if not any(os.path.isdir(os.path.join(workdir, d))
             for d in ('checkpoints', 'best_checkpoint')):
    raise cli.UserError(
        f'--workdir {workdir} holds no checkpoints; train first, or pass the'
        ' --workdir of a run.')


# ----------------------------------------------------------------------------
# Main.


def main(argv):
  """Runs the command the flags ask for: train, eval, predict or export.

  Args:
    argv: the arguments absl left over. Any is an error.

  Raises:
    cli.UserError: unexpected arguments, or a flag `check_command` refuses.
  """
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(max(logging.INFO, flags.FLAGS.verbosity))
  if not _LIBRARY_LOGS.value:
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
  command = check_command()
  gpu.apply_scatter_workaround()  # before JAX starts: it sets XLA_FLAGS
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  if jax.process_index() != 0:  # only process 0 writes logs
    logging.set_verbosity(logging.WARNING)
  if command.mode == 'train':
    _train(command)
    return
  model = inference.load(command.spec, command.workdir,
                         checkpoint=command.checkpoint)
  logging.info('restored %s', model.description)
  if command.mode == 'eval':
    inference.evaluate_and_report(model, command.workdir,
                                  command.inputs or None,
                                  output=command.output)
  elif command.mode == 'predict':
    n = inference.predict(model, command.inputs, command.output)
    print(f'{n} scores written to {command.output}')
  else:
    out = inference.export(
        model, command.output, batch_size=_EXPORT_BATCH.value or None,
        request_columns=_REQUEST_COLUMNS.value,
        quantize=None if _QUANTIZE.value == 'none' else _QUANTIZE.value)
    print(f'exported to {out}')


def _train(command: Command) -> None:
  """Trains in `command.workdir`; a workdir this command made and that a
  failure leaves without any file is removed again."""
  workdir = command.workdir
  made = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise cli.UserError(
        f'--workdir {workdir}: cannot create it ({e.strerror}).') from e
  logging.info('workdir: %s', workdir)
  try:
    train_loop.train_and_evaluate(command.spec, workdir, handle_signals=True)
  except BaseException:
    if made and jax.process_index() == 0:
      _remove_if_empty(workdir)
    raise


def _remove_if_empty(directory: str) -> None:
  """Removes `directory` if it holds no file (empty folders only)."""
  for _, _, files in os.walk(directory):
    if files:
      return
  for root, dirs, _ in os.walk(directory, topdown=False):
    for d in dirs:
      os.rmdir(os.path.join(root, d))
  os.rmdir(directory)


# Errors besides ValueError and OSError that are the user's to fix.
USER_ERRORS = (ckpt_lib.DamagedCheckpointError, ckpt_lib.CheckpointSaveError,
               workdir_lock.WorkdirLockedError, train_loop.NonFiniteLossError,
               train_loop.InvalidIdError)


def run_main(argv):
  """Runs `main`, with user errors printed as one line.

  The module docstring says which errors. A stopped training and Ctrl-C end
  with one line and their own exit status.

  Args:
    argv: the arguments absl left over.
  """
  try:
    cli.run(main, argv, errors=USER_ERRORS)
  except train_loop.TrainingInterrupted as e:  # saved; one line
    sys.stdout.flush()
    sys.stderr.write(f'{e}\n')
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    # Ctrl-C outside training's own handler (start-up, eval, export).
    sys.stdout.flush()
    sys.stderr.write('interrupted.\n')
    sys.exit(130)


if __name__ == '__main__':
  cli.run_app(run_main, flags_parser=parse_flags)
