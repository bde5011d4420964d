"""The README's config table covers every field of configs/criteo.py, and
its set-up commands are the ones .ci/run runs."""

import os
import re
import subprocess
import sys

from absl.testing import absltest

from configs import criteo as criteo_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat_fields(config, prefix=''):
  for k, v in config.items():
    key = f'{prefix}{k}'
    if hasattr(v, 'items') and len(v):
      yield from flat_fields(v, key + '.')
    else:
      yield key


class ReadmeTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.readme = open(os.path.join(_ROOT, 'README.md')).read()

  def test_every_config_field_is_documented(self):
    documented = set(re.findall(r'^\| `([^`]+)` \|', self.readme, re.M))
    missing = []
    for field in flat_fields(criteo_config.get_config()):
      field = re.sub(r'^features\.int_\d+\.', 'features.int_<i>.', field)
      field = re.sub(r'^features\.cat_\d+\.', 'features.cat_<j>.', field)
      field = re.sub(r'^embedding\.(tables|sharding_overrides)(\.cat_\d+.*)?$',
                     r'embedding.\1.<table>', field)
      parents = [field.rsplit('.', k)[0] + '.*' for k in (1, 2)]
      if field not in documented and not documented & set(parents):
        missing.append(field)
    self.assertEqual(missing, [])

  def test_ci_runs_the_readme_commands(self):
    ci = open(os.path.join(_ROOT, '.ci', 'run')).read()
    self.assertIn("grep -E '^[^#].*# install$' README.md", ci)
    self.assertIn("grep -E '^[^#].*# test$' README.md", ci)
    for tag in ('install', 'run', 'test'):
      self.assertRegex(self.readme, rf'(?m)^[^#].* # {tag}$')
    self.assertIn('python -m dlrm_jax.main --config=configs/criteo.py',
                  self.readme)


class ReadmeCommandsTest(absltest.TestCase):
  """What the README tells a user to run exists and parses."""

  def setUp(self):
    super().setUp()
    self.readme = open(os.path.join(_ROOT, 'README.md')).read()

  def test_every_module_it_runs_answers_help(self):
    modules = sorted(set(re.findall(r'python3? -m ([\w.]+)', self.readme)))
    self.assertContainsSubset(
        {'dlrm_jax.main', 'dlrm_jax.convert', 'dlrm_jax.serve',
         'dlrm_jax.data.preprocess', 'pytest'}, modules)
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    procs = {m: subprocess.Popen(
        [sys.executable, '-m', m, '--help'], cwd=_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in modules}
    for m, p in procs.items():
      out, err = p.communicate(timeout=300)
      with self.subTest(m):
        self.assertEqual(p.returncode, 0, f'{m} --help: {err[-1500:]}')
        self.assertTrue(out.strip(), f'{m} --help printed nothing')

  def test_every_config_override_it_writes_parses(self):
    text = self.readme.replace('\\\n', ' ')
    overrides = sorted(set(re.findall(r"--config\.([\w.]+)=('[^']*'|[^\s`]+)",
                                      text)))
    self.assertGreater(len(overrides), 10)
    from tests import config_overrides_test  # pylint: disable=g-import-not-at-top
    for field, value in overrides:
      with self.subTest(field):
        config = config_overrides_test.parse(
            f'--config.{field}={value.strip(chr(39))}', variant='')
        node = config
        for part in field.split('.'):
          node = node[part]
        self.assertIsNotNone(node)

  def test_every_dlrm_jax_name_it_mentions_exists(self):
    # `from dlrm_jax.x import y` and `dlrm_jax.x.y` in the README, the
    # notebooks and the examples name modules or attributes that import.
    texts = [self.readme]
    for folder in ('notebooks', 'examples'):
      for name in sorted(os.listdir(os.path.join(_ROOT, folder))):
        if name.endswith(('.py', '.ipynb', '.md')):
          texts.append(open(os.path.join(_ROOT, folder, name)).read())
    names = set()
    for text in texts:
      for mod, attrs in re.findall(
          r'from (dlrm_jax(?:\.\w+)*) import ([\w, ]+)', text):
        names.update(f'{mod}.{a.split()[0]}' for a in attrs.split(',')
                     if a.strip())
      names.update(n for n in re.findall(r'\b(dlrm_jax(?:\.\w+)+)', text)
                   if not n.endswith(('.tar', '.gz')))
    self.assertGreater(len(names), 10)
    code = ('import importlib, sys\n'
            'for name in sys.argv[1:]:\n'
            '  parts = name.split(".")\n'
            '  for i in range(len(parts), 0, -1):\n'
            '    try:\n'
            '      obj = importlib.import_module(".".join(parts[:i]))\n'
            '      break\n'
            '    except ModuleNotFoundError:\n'
            '      continue\n'
            '  try:\n'
            '    for a in parts[i:]:\n'
            '      obj = getattr(obj, a)\n'
            '  except AttributeError:\n'
            '    print(name)\n')
    out = subprocess.run([sys.executable, '-c', code, *sorted(names)],
                         cwd=_ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, JAX_PLATFORMS='cpu'))
    self.assertEqual(out.stdout.split(), [],
                     'names the README or notebooks use that do not exist')


if __name__ == '__main__':
  absltest.main()
