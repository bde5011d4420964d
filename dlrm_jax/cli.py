"""What the command lines of dlrm_jax share: paths and one-line errors.

Paths. Every path a user gives (a flag, or a config field that names files or
directories) is relative to the current directory and may start with `~`.
The entry points resolve them once, where the command line is read, so that
nothing downstream depends on the directory it runs in (orbax, for one,
takes absolute paths only):

  absolute(path)              one path
  absolute_spec(spec)         a file spec: a path, a glob, a comma-separated
                              string or a list of those, item by item
  absolute_config_paths(cfg)  a config's path fields (`CONFIG_PATH_FIELDS`)

Errors. A mistake of the user (a bad flag or config value, a missing file, an
unwritable directory) ends the command with one line, `error: <what>`, on
stderr and exit status 1; the Python traceback is shown too with
`--verbosity=1` (or `-v=1`) or the environment variable DLRM_JAX_TRACEBACK=1.
`run` wraps a command's main function so; `UserError` is the error a command
raises for a mistake that is neither a ValueError nor an OSError.

Flags. `parse_flags` is absl's flag parsing with every mistake in the flags
(a type, an unknown flag or config field, a config variant that does not
exist) as one line (`flag_error`); `config_argv` lets `--config` name a run's
saved `config.json` (`dlrm_jax.config.saved`); `run_app` is `absl.app.run`
with `--help` ending in status 0.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Sequence

# Config fields that name files or directories (dotted paths of the config).
CONFIG_PATH_FIELDS = ('data.train_path', 'data.eval_path', 'data.binary_dir',
                      'data.tfds_data_dir')


class UserError(Exception):
  """A mistake of the user that is reported in one line."""


def absolute(path: str | os.PathLike | None) -> str | None:
  """Expands `~` in a path and makes it absolute against the current directory.

  Args:
    path: a path. None or '' mean not given and come back as they are.

  Returns:
    The absolute path, normalized. None or '' unchanged.
  """
  if path is None or path == '':
    return path
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


def absolute_spec(spec: Any) -> Any:
  """Makes every item of a file spec absolute, as `absolute` does.

  Args:
    spec: a path, a glob, a comma-separated string of those, or a list or
      tuple of such strings. '' means not given and comes back as it is.

  Returns:
    The same kind of spec with absolute items. A string stays a
    comma-separated string, a list stays a list. Globs stay globs.
  """
  if isinstance(spec, (str, os.PathLike)):
    parts = [p.strip() for p in os.fspath(spec).split(',')]
    return ','.join(absolute(p) for p in parts if p)
  if isinstance(spec, (list, tuple)):
    return type(spec)(absolute_spec(s) for s in spec)
  return spec


def absolute_config_paths(config) -> None:
  """Makes the config's path fields absolute, in place.

  The fields are `CONFIG_PATH_FIELDS`.

  Args:
    config: an ml_collections ConfigDict, locked or not. Fields it lacks are
      skipped.
  """
  for field in CONFIG_PATH_FIELDS:
    node, *rest = field.split('.')
    parent = config.get(node) if hasattr(config, 'get') else None
    name = rest[-1]
    if parent is None or name not in parent:
      continue
    value = parent[name]
    if value:
      parent[name] = absolute_spec(value)


def show_traceback(argv: Sequence[str] | None = None) -> bool:
  """Says whether user errors are shown with their traceback.

  Args:
    argv: the raw arguments, read before absl parses them. None reads
      absl's parsed `--verbosity`.

  Returns:
    True with DLRM_JAX_TRACEBACK set to anything but '0', or with a verbosity
    of at least 1.
  """
  if os.environ.get('DLRM_JAX_TRACEBACK', '') not in ('', '0'):
    return True
  if argv is None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    return flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1
  for a in argv:
    for name in ('--verbosity=', '-v='):
      if a.startswith(name):
        try:
          return int(a[len(name):]) >= 1
        except ValueError:
          return False
  return False


def fail(message: str) -> None:
  """Prints `error: <message>` in one line on stderr and exits with status 1.

  Args:
    message: what went wrong. Runs of whitespace are folded into single
      spaces.
  """
  sys.stdout.flush()
  sys.stderr.write(f'error: {" ".join(str(message).split())}\n')
  sys.exit(1)


def run(main: Callable[..., Any], *args: Any,
        errors: tuple[type[BaseException], ...] = ()) -> Any:
  """Calls `main(*args)` and prints a user's mistake as one line.

  A ValueError, an OSError, a UserError or one of `errors` ends the command
  through `fail`. With `show_traceback`, it is raised instead.

  Args:
    main: the command's main function.
    *args: its arguments.
    errors: exception types besides ValueError, OSError and UserError that
      are the user's to fix.

  Returns:
    What `main` returns.
  """
  show = show_traceback()
  try:
    return main(*args)
  except (ValueError, OSError, UserError) + tuple(errors) as e:
    if show:
      raise
    fail(str(e) or type(e).__name__)


HELP_FLAGS = ('--help', '-help', '-?', '--helpshort', '-helpshort',
               '--helpfull', '-helpfull')


def run_app(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None,
            **kwargs: Any) -> None:
  """Runs `absl.app.run(main, argv, **kwargs)`, with `--help` exiting 0.

  absl ends `--help`, `--helpshort` and `--helpfull` with status 1. A user who
  asked for help got it, so here they end with 0.

  Args:
    main: the command's main function.
    argv: the arguments. Default: sys.argv.
    **kwargs: further `app.run` arguments, such as `flags_parser`.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    app.run(main, argv, **kwargs)
  except SystemExit as e:
    args = sys.argv if argv is None else argv
    if e.code == 1 and any(a in HELP_FLAGS for a in args[1:]):
      sys.exit(0)
    raise


# ----------------------------------------------------------------------------
# Flags.


def flag_value(argv, name: str) -> tuple[int, str] | None:
  """Finds `--name=value` or `--name value` in argv.

  Args:
    argv: the arguments.
    name: the flag's name, without dashes.

  Returns:
    The index and the value, or None.
  """
  for i, a in enumerate(argv):
    for prefix in (f'--{name}=', f'-{name}='):
      if a.startswith(prefix):
        return i, a[len(prefix):]
    if a in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      return i, argv[i + 1]
  return None


def config_argv(argv: Sequence[str]) -> list[str]:
  """Rewrites argv's `--config` as ml_collections' config_flags takes it.

  A run's `config.json` is handed to `saved_config`, which explains it. A
  Python config file is passed on as it is. Without --config, argv is
  unchanged.

  Args:
    argv: the arguments.

  Returns:
    The new arguments.

  Raises:
    UserError: the config file does not exist.
  """
  from dlrm_jax.config import saved as saved_config  # pylint: disable=g-import-not-at-top
  argv = list(argv)
  found = flag_value(argv, 'config')
  if found is None:
    return argv
  i, value = found
  path = value.split(':', 1)[0]
  if not os.path.isfile(absolute(path)):
    raise UserError(f'--config: the file {path} does not exist.')
  value = saved_config.config_flag_value(value)
  if '=' in argv[i]:
    argv[i] = f'--config={value}'
  else:
    argv[i + 1] = value
  return argv


_REASONS = (  # Python's parse errors -> what the flag takes.
    (r"invalid literal for int\(\) with base 10", 'an integer'),
    (r'could not convert string to float', 'a number'),
    (r'(?i)boolean|bool', 'true or false'),
)


def flag_error(e: Exception, argv) -> str:
  """Words a mistake absl or config_flags found in the flags as one line.

  Args:
    e: the error absl or config_flags raised.
    argv: the arguments, to name the flag.

  Returns:
    The line, without `error: `.
  """
  text = str(e)
  if 'Error whilst parsing config file' in text:  # get_config raised
    last = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-1]
    last = re.sub(r'^[A-Za-z_.]*Error: ', '', last)
    found = flag_value(argv, 'config')
    return f'--config={found[1] if found else ""}: {last}'
  if isinstance(e, (AttributeError, KeyError)):
    msg = text.replace("\\'", "'").replace('\\n', ' ')
    msg = msg[1:-1] if msg[:1] in '"\'' and msg[-1:] == msg[:1] else msg
    msg = ' '.join(msg.split())
    m = re.match(r"^'([^']+)'\s*(.*)$", msg)
    if m:
      name, rest = m.groups()
      arg = next((a for a in argv if a.startswith('--config.') and
                  re.search(rf'[.]{re.escape(name)}(=|[.]|$)', a)), None)
      rest = f'; {rest[0].lower()}{rest[1:]}' if rest else ''
      return (f'{arg + ": " if arg else ""}no such config field'
              f' {name!r}{rest}')
    return f'no such config field: {msg}'
  m = re.match(r'^flag (--?[^=\s]+)=(.*?): (.*)$', text, re.S)
  if m:
    name, value, reason = m.groups()
    for pattern, wants in _REASONS:
      if re.search(pattern, reason):
        return f'{name}={value}: {name.lstrip("-")} takes {wants}, not' \
               f' {value!r}.'
    return f'{name}={value}: {" ".join(reason.split())}'
  return ' '.join(text.split())


def parse_flags(argv: Sequence[str],
                prepare: Callable[[list[str]], list[str]] | None = None
                ) -> list[str]:
  """Parses absl's flags, with every mistake in the flags shown as one line.

  It serves as an `app.run` flags_parser. `flag_error` words the line.

  Args:
    argv: the command line.
    prepare: rewrites argv before parsing, as `config_argv` does. Its
      UserError is shown as it is.

  Returns:
    The arguments that are not flags.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  original = list(argv)
  try:
    return flags.FLAGS(prepare(list(argv)) if prepare else list(argv))
  except Exception as e:  # pylint: disable=broad-except
    if show_traceback(original):
      raise
    fail(str(e) if isinstance(e, UserError) else flag_error(e, original))
