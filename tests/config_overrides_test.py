"""Every documented `--config.<field>=<value>` works; numbers are checked;
user mistakes end in one line."""

import os
import subprocess
import sys

from absl import flags
from absl.testing import absltest
from ml_collections import config_flags

from configs import criteo as criteo_config
from dlrm_jax.config import checks as config_checks
from dlrm_jax.config import build as config_lib
from dlrm_jax.train import trainer as trainer_lib
from tests import readme_test

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*overrides, variant='tiny'):
  """The config as `main.py` parses `--config=configs/criteo.py:<variant>
  <overrides>`."""
  config_checks.register_list_parser()
  fv = flags.FlagValues()
  argv = ['prog', f'--config={_ROOT}/configs/criteo.py:{variant}',
          *overrides]
  config_flags.DEFINE_config_file('config', None, flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


class OverrideTest(absltest.TestCase):

  def test_table_overrides_from_the_command_line(self):
    config = parse('--config.embedding.sharding_overrides.cat_3=row_wise',
                   '--config.embedding.tables.cat_3.dtype=bfloat16',
                   '--config.embedding.tables.cat_5.init_scale=0.5')
    setup = config_lib.build(config)
    dtypes = {t.name: t.dtype for t in setup.tables}
    self.assertEqual(dtypes['cat_3'], 'bfloat16')
    self.assertEqual({d for n, d in dtypes.items() if n != 'cat_3'},
                     {'float32'})
    self.assertEqual({t.name: t.init_scale for t in setup.tables}['cat_5'],
                     0.5)
    plan = trainer_lib.make_plan(config, setup.tables, 8)
    strategies = {p.table: p.strategy for p in plan.placements}
    self.assertEqual(strategies['cat_3'], 'row_wise')
    # Unset, the placeholders change nothing.
    default = parse()
    self.assertEqual(trainer_lib.make_plan(default, config_lib.build(default).tables,
                                           8),
                     trainer_lib.make_plan(criteo_config.get_config('tiny'),
                                           setup.tables, 8))
    self.assertEqual(config_lib.build(default).tables,
                     config_lib.build(criteo_config.get_config('tiny')).tables)

  def test_a_misspelt_table_is_still_refused(self):
    with self.assertRaises(Exception):
      parse('--config.embedding.sharding_overrides.cat_99=row_wise')
    with self.assertRaises(Exception):
      parse('--config.embedding.tables.cat_3.dtyp=bfloat16')

  def test_list_fields(self):
    for arg in ('[32,8]', '32,8', '(32, 8)'):
      config = parse(f'--config.model.dense_mlp.hidden_units={arg}')
      self.assertEqual(list(config.model.dense_mlp.hidden_units), [32, 8])
    config = parse('--config.model.feature_groups.dense=int_0,int_1')
    self.assertEqual(list(config.model.feature_groups.dense),
                     ['int_0', 'int_1'])
    config = parse('--config.model.final.hidden_units=[]')
    self.assertEqual(list(config.model.final.hidden_units), [])


  def test_every_field_can_be_set_from_the_command_line(self):
    samples = {list: '[1,2]', int: '3', float: '0.5', str: 'x'}
    config = criteo_config.get_config()
    fields = list(readme_test.flat_fields(config))
    self.assertGreater(len(fields), 500)
    args = []
    for field in fields:
      node = config
      for part in field.split('.'):
        parent, node = node, node[part]
      if node is None:  # A typed placeholder: a value of its type.
        ref = parent.get_ref(part)
        arg = samples[ref.get_type()]
      elif isinstance(node, list):
        arg = '[' + ','.join(map(str, node)) + ']'
      else:
        arg = str(node)
      args.append(f'--config.{field}={arg}')
    try:
      got = parse(*args, variant='')  # All at once (one file load).
    except Exception:  # pylint: disable=broad-except
      failed = []  # Which ones?
      for arg in args:
        try:
          parse(arg, variant='')
        except Exception as e:  # pylint: disable=broad-except
          failed.append(f'{arg}: {type(e).__name__}: {e}'[:200])
      self.fail(failed)
    self.assertEqual(got.features.int_3.boundaries, [1, 2])
    self.assertEqual(got.embedding.tables.cat_9.dtype, 'x')


class NumberRulesTest(absltest.TestCase):

  def test_each_bad_number_is_named(self):
    cases = {
        'num_train_steps': (-5, r'-1 \(num_epochs over the train rows\) or'
                                ' at least 1'),
        'eval_every_steps': (-1, 'at least 1'),
        'log_every_steps': (0, 'at least 1'),
        'checkpoint_every_steps': (0, 'at least 1'),
        'max_to_keep': (0, r'at least 1 \(the checkpoint to resume from\)'),
        'batch_size': (0, 'at least 1'),
        'data.shuffle_buffer': (-10, r'at least 0 \(0: no shuffle window\)'),
        'data.eval_fraction': (1.5, r'in \[0, 1\)'),
        'mesh.model': (0, r'-1 \(the rest\) or at least 1'),
        'embedding.device_memory_gb': (-2.0, 'more than 0'),
    }
    config_checks.validate_numbers(criteo_config.get_config('tiny'))
    for path, (value, rule) in cases.items():
      with self.subTest(path):
        config = parse(f'--config.{path}={value}')
        with self.assertRaisesRegex(
            ValueError, rf'^config\.{path} \({value}\) must be {rule}\.$'):
          config_checks.validate_numbers(config)
    config = criteo_config.get_config('tiny')
    config.num_epochs = True
    with self.assertRaisesRegex(ValueError, r'config\.num_epochs \(True\)'
                                ' must be a number'):
      config_checks.validate_numbers(config)

  def test_main_prints_one_line(self):
    workdir = self.create_tempdir().full_path
    cmd = [sys.executable, '-m', 'dlrm_jax.main',
           '--config=configs/criteo.py:tiny', f'--workdir={workdir}',
           '--config.num_train_steps=-5']
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('DLRM_JAX_TRACEBACK', None)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT,
                         env=env, timeout=300)
    self.assertEqual(out.returncode, 1)
    self.assertEqual(out.stderr.strip().splitlines()[-1],
                     'error: config.num_train_steps (-5) must be -1'
                     ' (num_epochs over the train rows) or at least 1.')
    self.assertNotIn('Traceback', out.stderr)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT,
                         env=dict(env, DLRM_JAX_TRACEBACK='1'), timeout=300)
    self.assertIn('Traceback', out.stderr)
    # A misspelt field, found while the flags are parsed.
    out = subprocess.run(cmd[:-1] + ['--config.num_train_step=5'],
                         capture_output=True, text=True, cwd=_ROOT, env=env,
                         timeout=300)
    self.assertEqual(out.returncode, 1)
    self.assertEqual(out.stderr.strip().splitlines()[-1],
                     "error: --config.num_train_step=5: no such config"
                     " field 'num_train_step'; did you mean"
                     ' "num_train_steps" instead of "num_train_step"?')
    self.assertNotIn('Traceback', out.stderr)


if __name__ == '__main__':
  absltest.main()
