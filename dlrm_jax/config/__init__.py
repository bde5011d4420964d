"""The config, read once: an ml_collections ConfigDict in, a typed RunSpec out.

Everything downstream of the config takes the RunSpec, never the ConfigDict.

  build    `run_spec(config)`: the RunSpec of a config (`resolve_data`, which
           completes it from the data, then `build`); `load_config(
           'path.py[:variant]')` for notebooks; one `build_*` per group
           (`build_model`, `build_tables`, `build_loop`, ...).
  spec     `RunSpec` and its parts: `ModelSetup`, `ShardingRequest`,
           `MeshSpec`, `DenseOptimizerSpec`, `DataSpec`, `LoopSpec`.
  checks   the rules of a config, in one place (`validate_numbers`, one
           `check_*` per group, `check_batch_sizes` for the Trainer), and the
           list-flag parser of the command line.
  saved    a run's saved `config.json` as a `--config`.

Call sites import the modules (`from dlrm_jax.config import build as
config_lib`, `... import spec as spec_lib`, `... import checks as
config_checks`); this file imports none of them, so that `config.saved`
costs only ml_collections.
"""
