"""Finished work is never lost: summaries of finished runs, metrics after a
resume, predict's output on failure, eval results on a read-only workdir."""

import json
import os
import shutil

from absl.testing import absltest

from dlrm_jax.serving import offline as inference
from dlrm_jax.train import loop as train_loop
from dlrm_jax.data import criteo
from tests import checkpoint_damage_test
from tests import shared_data
from tests import train_test


def _copy_of_base(test):
  workdir = test.create_tempdir().full_path
  shutil.copytree(checkpoint_damage_test.base_workdir(), workdir,
                  dirs_exist_ok=True)
  return workdir


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


class FinishedRunTest(absltest.TestCase):

  def test_rerunning_a_finished_run_keeps_its_summary(self):
    workdir = _copy_of_base(self)
    path = os.path.join(workdir, 'summary.json')
    before = open(path).read()
    self.assertIsNotNone(json.loads(before)['eval'])
    summary = train_loop.train_and_evaluate(checkpoint_damage_test._config(),
                                            workdir, train_test.shared_trainer())
    self.assertEqual(open(path).read(), before)
    self.assertEqual(summary, json.loads(before))
    self.assertEqual(_rows(workdir), _rows(checkpoint_damage_test
                                           .base_workdir()))

  def test_a_finished_run_without_summary_gets_its_results_again(self):
    workdir = _copy_of_base(self)
    want = json.load(open(os.path.join(workdir, 'summary.json')))
    os.remove(os.path.join(workdir, 'summary.json'))
    summary = train_loop.train_and_evaluate(checkpoint_damage_test._config(),
                                            workdir, train_test.shared_trainer())
    self.assertEqual(summary['eval'], want['eval'])
    self.assertEqual(summary['train_loss'], want['train_loss'])

  def test_after_a_resume_each_step_is_logged_once(self):
    workdir = self.create_tempdir().full_path
    config = train_test.tiny_config(num_train_steps=20, log_every_steps=5,
                                    checkpoint_every_steps=10,
                                    eval_every_steps=10)
    train_loop.train_and_evaluate(config, workdir, train_test.shared_trainer())
    # The run "died" after logging steps 15 and 20 but before saving 20.
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '20'))
    os.remove(os.path.join(workdir, 'summary.json'))
    train_loop.train_and_evaluate(config, workdir, train_test.shared_trainer())
    rows = _rows(workdir)
    self.assertEqual([r['step'] for r in rows if r['type'] == 'train'],
                     [5, 10, 15, 20])
    self.assertEqual([r['step'] for r in rows if r['type'] == 'eval'],
                     [10, 20])


class InferenceArtifactsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = inference.load(checkpoint_damage_test._config(),
                               checkpoint_damage_test.base_workdir())

  def test_failed_predict_leaves_no_file(self):
    src = shared_data.criteo_file(self, 'terabyte_day0_head_200.tsv')
    lines = [l.split('\t', 1)[1] for l in open(src).read().splitlines()[:50]]
    lines.insert(40, lines[0].replace('\t', '\t+', 1))
    d = self.create_tempdir().full_path
    path = os.path.join(d, 'in.tsv')
    with open(path, 'w') as f:
      f.write('\n'.join(lines) + '\n')
    out = os.path.join(d, 'scores.txt')
    with self.assertRaisesRegex(criteo.MalformedLineError, r'in\.tsv:41: I2'):
      inference.predict(self.model, path, out)
    self.assertEqual(sorted(os.listdir(d)), ['in.tsv'])

  def test_eval_on_an_unwritable_workdir_still_prints_the_metrics(self):
    workdir = self.create_tempdir().full_path
    os.mkdir(os.path.join(workdir, 'eval_step20.json'))  # Cannot be written.
    printed = []
    with self.assertLogs('absl', level='WARNING') as logs:
      result = inference.evaluate_and_report(self.model, workdir,
                                             print_fn=printed.append)
    self.assertEqual(json.loads(printed[0]), result)
    self.assertIn('auc', result)
    self.assertIn('could not write', logs.output[0])


if __name__ == '__main__':
  absltest.main()
