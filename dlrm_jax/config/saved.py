"""A run's saved config: `--config=<workdir>/config.json`.

Every run (and every import by `dlrm_jax.convert`) writes the config it ran
with to `<workdir>/config.json`. Passing that file as `--config` runs,
resumes, evaluates, predicts and exports with exactly that config;
`--config.<field>=<value>` overrides apply on top, as with a config file (a
field that changes the model is then named as a mismatch by the checkpoint's
signature check).

ml_collections' `config_flags` loads Python files only, so the command lines
(`dlrm_jax.main`, `dlrm_jax.convert`) hand it this module, which is such a
file, with the JSON path as its argument: `--config=runs/a/config.json`
becomes `--config=<this file>:<absolute path of runs/a/config.json>`
(`config_flag_value`).
"""

from __future__ import annotations

import json
import os

from ml_collections import config_dict


def load(path: str) -> config_dict.ConfigDict:
  """The config saved as JSON at `path`.

  Args:
    path: a `config.json` written by a run.

  Returns:
    The config, as a ConfigDict.

  Raises:
    ValueError: if the file does not exist or does not hold a JSON object.
  """
  try:
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    raise ValueError(f'--config: the file {path} does not exist.') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'--config: {path} is not valid JSON ({e}).') from None
  if not isinstance(saved, dict):
    raise ValueError(f'--config: {path} holds no config object.')
  return config_dict.ConfigDict(saved)


def get_config(path: str) -> config_dict.ConfigDict:
  """`config_flags`' entry point: the config saved at `path`.

  Args:
    path: a `config.json` written by a run.

  Returns:
    The config, as a ConfigDict (see `load`).
  """
  return load(path)


def config_flag_value(value: str) -> str:
  """`--config`'s value as `config_flags` must get it.

  Args:
    value: what the user passed: a Python config file (optionally with
      `:variant`), or a `.json` file a run saved.

  Returns:
    `value` itself for a Python file; for a `.json` file, this module with
    the file's absolute path as its argument.
  """
  if value.endswith('.json'):
    path = os.path.abspath(os.path.expanduser(value))
    return f'{os.path.abspath(__file__)}:{path}'
  return value
