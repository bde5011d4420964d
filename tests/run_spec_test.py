"""The RunSpec: the config read once, into one frozen, typed spec; training,
evaluation and prediction run from the spec alone, reading no ConfigDict."""

import contextlib
import dataclasses
from unittest import mock

from absl.testing import absltest
from ml_collections import config_dict

from dlrm_jax.config import build as config_lib
from dlrm_jax.serving import offline as inference
from dlrm_jax.train import loop as train_loop
from tests import train_test


def _values(x):
  """`x` and everything inside it (dataclass fields, mappings, sequences)."""
  yield x
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    for f in dataclasses.fields(x):
      yield from _values(getattr(x, f.name))
  elif isinstance(x, dict):
    for k, v in x.items():
      yield from _values(k)
      yield from _values(v)
  elif isinstance(x, (list, tuple)):
    for v in x:
      yield from _values(v)


class ConfigReadError(AssertionError):
  pass


@contextlib.contextmanager
def no_config_reads():
  """Every field read of a ConfigDict (attribute, item, get) raises."""

  def refuse(self, *args, **kwargs):
    del self, kwargs
    raise ConfigReadError(f'a ConfigDict was read: {args}')

  with mock.patch.object(config_dict.ConfigDict, '__getattr__', refuse), \
      mock.patch.object(config_dict.ConfigDict, '__getitem__', refuse), \
      mock.patch.object(config_dict.ConfigDict, 'get', refuse):
    yield


class RunSpecTest(absltest.TestCase):

  def test_typed_frozen_and_built_once(self):
    config = train_test.tiny_config(**{'data.prefetch': 3})
    spec = config_lib.run_spec(config)
    self.assertIs(config_lib.run_spec(spec), spec)
    self.assertEqual(spec, config_lib.run_spec(train_test.tiny_config(
        **{'data.prefetch': 3})))
    self.assertFalse([v for v in _values(spec)
                      if isinstance(v, config_dict.ConfigDict)])
    with self.assertRaises(dataclasses.FrozenInstanceError):
      spec.loop = None  # pytype: disable=not-writable
    # The config's values, resolved: 'auto' is the source it stands for.
    self.assertEqual(spec.data.source, 'synthetic')
    self.assertEqual(spec.data.prefetch, 3)
    self.assertEqual(spec.loop.batch_size, config.batch_size)
    self.assertEqual(spec.dense_optimizer.kind, config.optimizer.kind)

  def test_a_bad_number_is_named_by_the_builder(self):
    with self.assertRaisesRegex(ValueError, r'config\.data\.prefetch \(-1\)'):
      config_lib.run_spec(train_test.tiny_config(**{'data.prefetch': -1}))
    with self.assertRaisesRegex(ValueError,
                                r'config\.embedding\.row_group_size \(-2\)'):
      config_lib.run_spec(train_test.tiny_config(
          **{'embedding.row_group_size': -2}))

  def test_train_eval_predict_read_no_config(self):
    trainer = train_test.shared_trainer()
    config = train_test.tiny_config(num_train_steps=10, eval_every_steps=10,
                                    checkpoint_every_steps=10)
    spec = config_lib.run_spec(config)
    from_config = train_loop.train_and_evaluate(
        config, self.create_tempdir().full_path, trainer)
    workdir = self.create_tempdir().full_path
    with no_config_reads():
      with self.assertRaises(ConfigReadError):  # the guard works
        _ = config.batch_size
      summary = train_loop.train_and_evaluate(spec, workdir, trainer)
      model = inference.load(spec, workdir)
      metrics = inference.evaluate(model)
    self.assertEqual(summary['step'], 10)
    self.assertEqual(summary['eval'], from_config['eval'])
    self.assertAlmostEqual(metrics['auc'], summary['eval']['auc'], places=6)
    self.assertAlmostEqual(metrics['log_loss'], summary['eval']['log_loss'],
                           places=6)


if __name__ == '__main__':
  absltest.main()
