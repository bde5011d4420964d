"""The checkpoints on disk and the command line `python -m dlrm_jax.convert`.

An import (`import_checkpoint`, `run_import`) writes a new run directory: a
step-0 checkpoint, `config.json` and `peer.json`, the peer's table and
feature names. An export (`export_checkpoint`, `run_export`) reads a run's
checkpoint and writes the peer's file. A TorchRec export also writes
`<output stem>.torchrec.json`, the tables and the model's arguments. Every
check runs before anything is written. `main` parses the flags.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from dlrm_jax import cli
from dlrm_jax.convert import files
from dlrm_jax.convert import peers
from dlrm_jax.convert import weights
from dlrm_jax.data import inputs
from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax.train import trainer as trainer_lib

PEER_FILE = 'peer.json'  # in the workdir: the peer's table and feature names
TORCHREC_SIDECAR = '.torchrec.json'  # beside a TorchRec export


# ----------------------------------------------------------------------------
# Checkpoints.


def import_checkpoint(sd, peer: str, workdir: str, base_config,
                      trainer: trainer_lib.Trainer | None = None,
                      table_features=None) -> config_dict.ConfigDict:
  """Writes a step-0 checkpoint of the peer's weights.

  The workdir gets the checkpoint, `config.json` and `peer.json`, which holds
  the peer's table and feature names.

  Args:
    sd: the peer's state dict.
    peer: 'facebook' or 'torchrec'.
    workdir: the new run directory. It is made absolute here.
    base_config: as `weights.config_from_peer` takes it.
    trainer: a trainer of the resulting config. Default: one built here.
    table_features: as `peers.read_peer` takes it.

  Returns:
    The config, as written to `<workdir>/config.json`.

  Raises:
    ValueError: the state dict is refused.
  """
  workdir = cli.absolute(workdir)
  config = weights.config_from_peer(sd, peer, base_config, table_features)
  trainer = trainer or trainer_lib.Trainer(config)
  state, names = weights.state_from_peer(sd, peer, trainer,
                                         seed=trainer.spec.loop.seed,
                                         table_features=table_features)
  save_initial_checkpoint(trainer, state, workdir)
  if jax.process_index() == 0:
    ckpt_lib.write_json(os.path.join(workdir, PEER_FILE),
                        {'peer': peer, 'tables': names})
  return config


def save_initial_checkpoint(trainer: trainer_lib.Trainer, state: trainer_lib.TrainState,
                            workdir: str) -> None:
  """Writes `state` as the step-0 checkpoint of a run of the trainer's spec.

  `config.json` is written too. Training in the workdir starts from this
  checkpoint as from a fresh initialization.

  Args:
    trainer: the run's trainer.
    state: the state to save.
    workdir: the run directory.
  """
  workdir = cli.absolute(workdir)
  os.makedirs(workdir, exist_ok=True)
  spec = trainer.spec
  # The input pipeline's start position, so that training resumes from this
  # checkpoint as a fresh run of the config would start.
  data = inputs.make_data(spec, process_index=jax.process_index(),
                          process_count=jax.process_count())
  data_iter = data.train.iterator()
  ckpt = ckpt_lib.Checkpointer(workdir)
  try:
    ckpt.save(0, state, {'signature': trainer.signature(),
                         'plan': trainer.plan.to_json(),
                         'step': 0, 'config': spec.config_json},
              data_iter=data_iter)
  finally:
    ckpt.close()
    data_iter.close()
  if jax.process_index() == 0:
    ckpt_lib.write_json(os.path.join(workdir, 'config.json'),
                        json.loads(spec.config_json))


def config_of_workdir(workdir: str) -> config_dict.ConfigDict:
  """Reads the config a run or an import wrote as `config.json`.

  Args:
    workdir: the run directory.

  Returns:
    The config.
  """
  with open(os.path.join(workdir, 'config.json')) as f:
    return config_dict.ConfigDict(json.load(f))


@dataclasses.dataclass(frozen=True)
class Export:
  """A dlrm_jax checkpoint in a peer's layout.

  Attributes:
    state_dict: the peer's state dict of numpy arrays.
    tables: `weights.peer_tables` entries: the peer's names, rows, pooling.
    setup: the model setup it came from.
  """

  state_dict: dict[str, np.ndarray]
  tables: list[dict[str, Any]]
  setup: Any


def export_checkpoint(workdir: str, peer: str, config=None,
                      step: int | None = None) -> Export:
  """Reads a run's checkpoint as the peer's state dict.

  The names an import recorded in `peer.json` are kept.

  Args:
    workdir: the run directory.
    peer: 'facebook' or 'torchrec'.
    config: the run's config. Default: `<workdir>/config.json`.
    step: the checkpoint. Default: the newest good one.

  Returns:
    The export.

  Raises:
    ValueError: the peer cannot express the model. This is checked before
      anything is restored.
  """
  from dlrm_jax.config import build as config_lib  # pylint: disable=g-import-not-at-top
  from dlrm_jax.serving import offline as inference  # pylint: disable=g-import-not-at-top
  workdir = cli.absolute(workdir)
  config = config if config is not None else config_of_workdir(workdir)
  # Refused before anything is restored.
  setup = config_lib.run_spec(config)
  weights.check_exportable(setup, peer)
  names = None
  peer_file = os.path.join(workdir, PEER_FILE)
  if os.path.exists(peer_file):
    with open(peer_file) as f:
      saved = json.load(f)
    if saved.get('peer') == peer:
      names = saved.get('tables')
      if names is None and saved.get('table_names'):  # before shared tables
        names = [{'name': n, 'table': t} for n, (t, _)
                 in zip(saved['table_names'], peers.peer_layout(setup))]
  model = inference.load(setup, workdir, step)
  sd = weights.peer_from_state(model.trainer, model.state, peer, names)
  return Export(sd, weights.peer_tables(model.trainer.spec, peer, names),
                model.trainer.spec)


# ----------------------------------------------------------------------------
# Command line.


def default_base_config() -> config_dict.ConfigDict:
  """Loads the default config of configs/criteo.py, beside the dlrm_jax package.

  Raises:
    ValueError: the file is not there, as when dlrm_jax is installed without
      its configs/.
  """
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), 'configs', 'criteo.py')
  if not os.path.exists(path):
    raise ValueError(
        f'no --config given, and the default base config {path} is not there'
        ' (dlrm_jax installed without its configs/); pass --config.')
  spec = importlib.util.spec_from_file_location('_dlrm_jax_criteo_config',
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _nearest_existing(path: str) -> str:
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_new_workdir(path: str) -> None:
  """Refuses, in one line, a --workdir an import cannot write.

  The directory must be new or hold no run: no checkpoints/ and no
  config.json. Its nearest existing parent must be a writable directory.

  Args:
    path: the absolute directory.

  Raises:
    ValueError: the directory breaks one of these rules.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'--workdir ({path}) is a file, not a directory.')
  held = [n for n in ('checkpoints', 'config.json')
          if os.path.exists(os.path.join(path, n))]
  if held:
    raise ValueError(
        f'--workdir ({path}) already holds a run ({", ".join(held)}); import'
        ' into a new directory.')
  parent = _nearest_existing(path)
  if not os.path.isdir(parent):
    raise ValueError(f'--workdir ({path}): cannot create it, {parent} is a'
                     ' file.')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir ({path}): cannot create it, {parent} is not'
                     ' writable (permission denied).')


def _check_run_workdir(path: str, has_config: bool) -> None:
  if not os.path.isdir(path):
    raise ValueError(f'--workdir ({path}): no such directory.')
  if not has_config and not os.path.exists(os.path.join(path, 'config.json')):
    raise ValueError(
        f'--workdir ({path}) holds no config.json: not a dlrm_jax run (or'
        ' pass its --config).')


def sidecar_path(output: str) -> str:
  """Gives where a TorchRec export's tables and model arguments go.

  Args:
    output: the export's state dict file.

  Returns:
    `<output stem>.torchrec.json`.
  """
  return os.path.splitext(output)[0] + TORCHREC_SIDECAR


def run_import(input_path: str, peer: str, workdir: str, base_config=None,
               table_features: str | None = None) -> str:
  """Runs `--direction=import`: checks, converts and writes.

  Args:
    input_path: the peer's file, absolute.
    peer: 'facebook' or 'torchrec'.
    workdir: the new run directory, absolute.
    base_config: the base config. Default: `default_base_config`.
    table_features: the --table_features value.

  Returns:
    The summary line to print.

  Raises:
    ValueError: the input, the workdir or the state dict is refused. Nothing
      is written then.
  """
  files.check_input(input_path)
  check_new_workdir(workdir)
  mapping = peers.parse_table_features(table_features)
  sd = files.load_state_dict(input_path)
  base = base_config if base_config is not None else default_base_config()
  cli.absolute_config_paths(base)
  # Refusals come before anything is written (config_from_peer, then the
  # trainer and state_from_peer).
  config = import_checkpoint(sd, peer, workdir, base, table_features=mapping)
  m = config.model
  shared = [f'{t}={",".join(f)}' for t, f in (mapping or {}).items()
            if len(f) > 1]
  return (f'wrote a step-0 checkpoint to {workdir} (config:'
          f' {os.path.join(workdir, "config.json")}); model: {m.interaction}'
          f' interaction, dense_mlp {list(m.dense_mlp.hidden_units)}, final'
          f' {list(m.final.hidden_units)},'
          f' {len(m.feature_groups.sparse)} sparse features'
          + (f'; shared tables: {"; ".join(shared)}' if shared else ''))


def run_export(workdir: str, peer: str, output: str, config=None) -> str:
  """Runs `--direction=export`: checks, converts and writes.

  Args:
    workdir: the run directory, absolute.
    peer: 'facebook' or 'torchrec'.
    output: the peer's file, absolute. A TorchRec export also writes
      `sidecar_path(output)`.
    config: the run's config. Default: its config.json.

  Returns:
    The summary line to print.

  Raises:
    ValueError: the workdir, the output or the model is refused.
  """
  _check_run_workdir(workdir, config is not None)
  files.check_output(output)
  if config is not None:
    cli.absolute_config_paths(config)
  ex = export_checkpoint(workdir, peer, config)
  files.save_peer_file(ex.state_dict, output, peer)
  line = f'wrote {len(ex.state_dict)} arrays to {output}'
  if peer == 'facebook':
    layout = ('the dict --load-model reads' if not output.endswith('.npz')
              else 'the bare state dict')
    flags = weights.facebook_flags(ex.setup)
    return f'{line} ({layout}); dlrm_s_pytorch.py {flags}'
  args = weights.torchrec_arguments(ex.setup, ex.tables)
  side = sidecar_path(output)
  with open(side, 'w') as f:
    json.dump(args, f, indent=1)
  return (f'{line} (TorchRec {args["model"]}); tables and model arguments:'
          f' {side}; tables: {args["table_features"]}')


def main(argv=None):
  """Runs `python -m dlrm_jax.convert --peer=facebook|torchrec --direction=...`.

  Args:
    argv: the command line. Default: sys.argv.
  """
  # pylint: disable=g-import-not-at-top,g-multiple-import
  from absl import flags, logging
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top,g-multiple-import

  # The flags below are key flags of main's caller, as when this file was
  # the __main__ module: `python -m dlrm_jax.convert --help` lists them.
  flags.disclaim_key_flags()
  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'Base config (data, optimizers); the model, features'
      ' and tables come from the state dict. Import: default'
      ' configs/criteo.py; export: default <workdir>/config.json.',
      lock_config=False)
  peer = flags.DEFINE_string('peer', None, 'The peer layout: facebook or'
                             ' torchrec.')
  direction = flags.DEFINE_string(
      'direction', 'import',
      'import: state dict -> checkpoint; export: checkpoint -> state dict.')
  input_ = flags.DEFINE_string('input', None, 'import: the peer\'s file'
                               ' (.npz, .pt, .pth).')
  output = flags.DEFINE_string('output', None, 'export: the peer\'s file'
                               ' (.npz, .pt, .pth).')
  workdir = flags.DEFINE_string('workdir', None, 'The dlrm_jax run'
                                ' directory (import: a new one).')
  table_features = flags.DEFINE_string(
      'table_features', None, "import, torchrec: the features each table"
      " serves, 't_a=f1,f2;t_b=f3' (EmbeddingBagConfig.feature_names), or"
      ' the .torchrec.json an export wrote. Default: one feature per table.')

  def run(argv):
    """Checks the flags, then imports or exports.

    Args:
      argv: the arguments absl left over.

    Raises:
      cli.UserError: a flag is missing, wrong or meant for the other
        direction.
    """
    if len(argv) > 1:
      raise cli.UserError(f'unexpected arguments: {argv[1:]}')
    if flags.FLAGS.verbosity <= 0:  # orbax's INFO lines only with -v=1
      logging.set_verbosity(logging.WARNING)
    if peer.value not in peers.PEERS:
      raise cli.UserError(f'--peer ({peer.value}) must be facebook or'
                          ' torchrec.')
    if direction.value not in ('import', 'export'):
      raise cli.UserError(f'--direction ({direction.value}) must be import or'
                          ' export.')
    if not workdir.value:
      raise cli.UserError('--workdir is required: the dlrm_jax run'
                          ' directory.')
    imp = direction.value == 'import'
    for name, flag, wanted in (('--input', input_, imp),
                               ('--output', output, not imp),
                               ('--table_features', table_features, imp)):
      if flag.value and not wanted:
        raise cli.UserError(f'{name} is for --direction='
                            f'{"export" if imp else "import"}.')
    if imp:
      if not input_.value:
        raise cli.UserError('import needs --input: the peer\'s file.')
      line = run_import(cli.absolute(input_.value), peer.value,
                        cli.absolute(workdir.value), config_flag.value,
                        table_features.value)
    else:
      if not output.value:
        raise cli.UserError('export needs --output: the peer\'s file.')
      line = run_export(cli.absolute(workdir.value), peer.value,
                        cli.absolute(output.value), config_flag.value)
    print(line)

  cli.run_app(lambda a: cli.run(run, a, errors=(
      ckpt_lib.DamagedCheckpointError, ckpt_lib.CheckpointSaveError)),
              argv, flags_parser=lambda a: cli.parse_flags(
                  a, prepare=cli.config_argv))
