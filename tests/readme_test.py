"""The README's config table covers every field of configs/criteo.py, and
its set-up commands are the ones .ci/run runs."""

import os
import re

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


if __name__ == '__main__':
  absltest.main()
