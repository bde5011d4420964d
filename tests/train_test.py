"""The training loop on the tiny config: learning, resuming, failures."""

import json
import os
import signal
import subprocess
import sys
import time

from absl.testing import absltest
import jax
import numpy as np

from configs import criteo as criteo_config
from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax.config import build as config_lib
from dlrm_jax.train import loop as train_loop
from dlrm_jax.train import trainer as trainer_lib
from tests import reference

_TRAINER = None


def tiny_config(**overrides):
  config = criteo_config.get_config('tiny')
  for k, v in overrides.items():
    target = config
    *path, last = k.split('.')
    for p in path:
      target = target[p]
    target[last] = v
  return config


def shared_trainer():
  """One Trainer (and its compiled steps) for every run of the tiny model."""
  global _TRAINER
  if _TRAINER is None:
    _TRAINER = trainer_lib.Trainer(tiny_config(),
                                   mesh=reference.single_device_mesh())
  return _TRAINER


def restore_final_state(workdir, trainer):
  ckpt = ckpt_lib.Checkpointer(workdir)
  state, meta = ckpt.restore(ckpt.latest_step(), trainer.abstract_state())
  ckpt.close()
  return state, meta


def saved_data_state(workdir):
  """The data iterator's state in the latest checkpoint (grain's handler
  writes it as one JSON file per process)."""
  ckpt = ckpt_lib.Checkpointer(workdir)
  path = ckpt.directory / str(ckpt.latest_step()) / 'data'
  ckpt.close()
  return json.loads((path / 'process_0-of-1.json').read_text())


def assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class TrainLoopTest(absltest.TestCase):

  def test_learns_and_resumes_to_the_same_result(self):
    trainer = shared_trainer()
    straight = self.create_tempdir().full_path
    summary = train_loop.train_and_evaluate(tiny_config(), straight, trainer)
    self.assertEqual(summary['step'], 40)
    # It learns: eval AUC well above chance, and the train loss went down.
    self.assertGreater(summary['eval']['auc'], 0.57)
    rows = [json.loads(l) for l in open(os.path.join(straight,
                                                      'metrics.jsonl'))]
    losses = [r['loss'] for r in rows if r['type'] == 'train']
    self.assertLess(losses[-1], losses[0])
    self.assertTrue(os.path.exists(os.path.join(straight, 'config.json')))

    # Stop after 20 steps, then run the same command again: it resumes.
    resumed = self.create_tempdir().full_path
    first = train_loop.train_and_evaluate(tiny_config(num_train_steps=20), resumed,
                                          trainer)
    self.assertEqual(first['step'], 20)
    second = train_loop.train_and_evaluate(tiny_config(), resumed, trainer)
    self.assertEqual(second['step'], 40)
    self.assertEqual(second['eval'], summary['eval'])
    a, meta_a = restore_final_state(straight, trainer)
    b, meta_b = restore_final_state(resumed, trainer)
    self.assertEqual(saved_data_state(straight), saved_data_state(resumed))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  def test_incompatible_config_is_refused(self):
    trainer = shared_trainer()
    workdir = self.create_tempdir().full_path
    train_loop.train_and_evaluate(tiny_config(num_train_steps=10), workdir,
                                  trainer)
    config = tiny_config()
    config.features.cat_3.num_buckets = 57
    with self.assertRaisesRegex(ckpt_lib.IncompatibleCheckpointError,
                                r"tables\.cat_3\.num_rows: checkpoint has 101,"
                                ' config has 57'):
      train_loop.train_and_evaluate(config, workdir)

  def test_non_finite_loss_stops_before_saving(self):
    config = tiny_config(**{
        'embedding.optimizer.kind': 'sgd',
        'embedding.optimizer.schedule.learning_rate': 1e30,
        'optimizer.kind': 'sgd', 'optimizer.schedule.learning_rate': 1e30,
        'checkpoint_every_steps': 10, 'log_every_steps': 10})
    trainer = trainer_lib.Trainer(config, mesh=reference.single_device_mesh())
    workdir = self.create_tempdir().full_path
    with self.assertRaisesRegex(train_loop.NonFiniteLossError,
                                r'non-finite at step \d+ \(checked over steps'
                                r' 1\.\.10\)'):
      train_loop.train_and_evaluate(config, workdir, trainer)
    self.assertEqual(ckpt_lib.Checkpointer(workdir).all_steps(), [])


class EarlyStoppingTest(absltest.TestCase):

  def test_stops_keeps_the_best_and_stays_stopped(self):
    trainer = shared_trainer()
    workdir = self.create_tempdir().full_path
    # min_delta 1.0: no later evaluation can improve on the first AUC, so
    # with patience 2 the run stops at the third evaluation (step 15).
    config = tiny_config(**{
        'eval_every_steps': 5, 'log_every_steps': 5,
        'early_stopping.patience': 2, 'early_stopping.min_delta': 1.0,
        'keep_best_metric': 'log_loss'})
    summary = train_loop.train_and_evaluate(config, workdir, trainer)
    self.assertEqual(summary['step'], 15)
    self.assertTrue(summary['stopped_early'])
    evals = [json.loads(l) for l in open(os.path.join(workdir,
                                                      'metrics.jsonl'))]
    evals = [r for r in evals if r['type'] == 'eval']
    self.assertEqual([r['step'] for r in evals], [5, 10, 15])
    self.assertEqual(summary['best_eval']['step'], 5)
    best = min(evals, key=lambda r: r['log_loss'])
    kept = ckpt_lib.BestCheckpointer(workdir, 'log_loss', 'min')
    self.assertEqual(kept.all_steps(), [best['step']])
    state, meta = kept.restore(best['step'], trainer.abstract_state())
    kept.close()
    self.assertEqual(meta['step'], best['step'])
    self.assertEqual(int(state.step), best['step'])
    # Run again on the same workdir: it resumes at 15 and stays stopped.
    again = train_loop.train_and_evaluate(config, workdir, trainer)
    self.assertEqual(again['step'], 15)

  def test_min_train_steps_trains_whole_epochs(self):
    from dlrm_jax.data import inputs  # pylint: disable=g-import-not-at-top
    config = config_lib.resolve_data(tiny_config(num_train_steps=-1,
                                               num_epochs=1))
    data = inputs.make_data(config)
    per_epoch = data.train.batches_per_epoch
    steps = lambda: train_loop.num_train_steps(config_lib.build_loop(config), data)
    self.assertEqual(steps(), per_epoch)
    config.min_train_steps = per_epoch + 1
    self.assertEqual(steps(), 2 * per_epoch)
    config.min_train_steps = -1
    with self.assertRaisesRegex(ValueError, r'config.min_train_steps \(-1\)'):
      steps()

  def test_bad_early_stopping_config_names_the_field(self):
    with self.assertRaisesRegex(ValueError,
                                r"config.early_stopping.metric \('auroc'\)"):
      train_loop.train_and_evaluate(
          tiny_config(**{'early_stopping.metric': 'auroc'}),
          self.create_tempdir().full_path, shared_trainer())


class TextResumeTest(absltest.TestCase):
  """criteo_tsv: the text stream's position is the checkpoint's 'data' item,
  as a grain iterator's is."""

  def test_resumes_to_the_same_state(self):
    from tests import shared_data  # pylint: disable=g-import-not-at-top
    path = shared_data.criteo_file(self, 'kaggle_train_head_4000.tsv')
    text = lambda steps: tiny_config(**{
        'data.train_path': path, 'data.shuffle_buffer': 512,
        'num_train_steps': steps})  # 28 steps an epoch: 40 cross into a 2nd
    trainer = shared_trainer()
    straight = self.create_tempdir().full_path
    summary = train_loop.train_and_evaluate(text(40), straight, trainer)
    self.assertEqual(saved_data_state(straight),
                     {'kind': 'text_stream', 'position': 40})

    resumed = self.create_tempdir().full_path
    train_loop.train_and_evaluate(text(20), resumed, trainer)
    self.assertEqual(saved_data_state(resumed),
                     {'kind': 'text_stream', 'position': 20})
    want, _ = restore_final_state(straight, trainer)
    second = train_loop.train_and_evaluate(text(40), resumed, trainer)
    self.assertEqual(second['eval'], summary['eval'])
    got, _ = restore_final_state(resumed, trainer)
    assert_same_state(got, want)
    self.assertEqual(saved_data_state(resumed),
                     {'kind': 'text_stream', 'position': 40})

    # A text stream's state does not go into a grain iterator, nor the
    # reverse; nothing is moved aside as damaged.
    with self.assertRaisesRegex(ckpt_lib.IncompatibleCheckpointError,
                                r'text_stream \(streamed text\), but this'
                                r' run reads a random-access source'):
      train_loop.train_and_evaluate(tiny_config(num_train_steps=60), resumed,
                                    trainer)
    grain_run = self.create_tempdir().full_path
    train_loop.train_and_evaluate(tiny_config(num_train_steps=20), grain_run,
                                  trainer)
    with self.assertRaisesRegex(ckpt_lib.IncompatibleCheckpointError,
                                r'a random-access source \(grain\), but this'
                                r' run reads a text_stream'):
      train_loop.train_and_evaluate(text(40), grain_run, trainer)
    for workdir in (resumed, grain_run):
      self.assertFalse(os.path.exists(os.path.join(
          workdir, 'checkpoints_damaged')), workdir)


class MultiHotTrainingTest(absltest.TestCase):

  def test_trains_on_mlperf_bags(self):
    from dlrm_jax.data import inputs  # pylint: disable=g-import-not-at-top
    config = tiny_config(**{'data.multi_hot.enabled': True,
                            'num_train_steps': 20})
    prepared = config_lib.resolve_data(config)
    self.assertEqual(prepared.features.cat_20.max_ids, 100)
    trainer = trainer_lib.Trainer(prepared, mesh=reference.single_device_mesh())
    data = inputs.make_data(prepared)
    batch = next(data.train.iterator())
    self.assertEqual(batch['ids'].shape, (128, sum(
        criteo_config.MLPERF_HOTNESS)))
    self.assertGreater((batch['ids'] >= 0).mean(), 0.9)
    summary = train_loop.train_and_evaluate(config, self.create_tempdir().full_path,
                                            trainer)
    self.assertEqual(summary['step'], 20)
    self.assertTrue(np.isfinite(summary['eval']['log_loss']))


class KilledRunTest(absltest.TestCase):

  def test_killed_run_resumes_with_the_same_batches(self):
    """A run killed mid-way and started again consumes, step for step, the
    same batches as an uninterrupted run (preprocessed data, shuffled
    globally by the grain pipeline, 13 epochs)."""
    from tests import shared_data  # pylint: disable=g-import-not-at-top
    from dlrm_jax.data import preprocess  # pylint: disable=g-import-not-at-top
    data_dir = self.create_tempdir().full_path
    preprocess.run([shared_data.criteo_file(
        self, 'kaggle_train_head_4000.tsv')], data_dir, id_scheme='vocab',
                   vocab_threshold=2, workers=1, progress=False)
    overrides = {'data.source': 'binary', 'data.binary_dir': data_dir,
                 'data.record_batches': True, 'num_train_steps': 400,
                 'checkpoint_every_steps': 50, 'eval_every_steps': 1000}
    workdir = self.create_tempdir().full_path
    cmd = [sys.executable, '-m', 'dlrm_jax.main',
           '--config=configs/criteo.py:tiny', f'--workdir={workdir}'] + [
               f'--config.{k}={v}' for k, v in overrides.items()]
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpt_dir = os.path.join(workdir, 'checkpoints')
    deadline = time.time() + 120
    while time.time() < deadline:
      steps = [d for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir)
                           else []) if d.isdigit()]
      if steps:
        break
      time.sleep(0.05)
    self.assertIsNone(proc.poll(), 'the run ended before it could be killed')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    self.assertLess(killed_at, 400)
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True,
                         text=True, check=True)
    self.assertIn(f'resumed from the checkpoint at step {killed_at}',
                  out.stderr)
    summary = json.load(open(os.path.join(workdir, 'summary.json')))
    self.assertEqual(summary['step'], 400)

    straight = self.create_tempdir().full_path
    config = tiny_config(**overrides)
    train_loop.train_and_evaluate(config, straight)

    def digests(d):  # step -> digest; a replayed step's last record wins
      rows = [json.loads(l) for l in open(os.path.join(d, 'batches.jsonl'))]
      return {r['step']: r['ids_crc32'] for r in rows}, len(rows)

    want, n_straight = digests(straight)
    got, n_resumed = digests(workdir)
    self.assertEqual(n_straight, 400)
    self.assertGreaterEqual(n_resumed, 400)  # steps after the checkpoint redone
    self.assertEqual(got, want)
    self.assertLen(set(want.values()), 400)  # 13 epochs, each reshuffled


class RealCriteoTest(absltest.TestCase):

  def test_trains_on_real_rows_with_a_held_out_split(self):
    from tests import shared_data  # pylint: disable=g-import-not-at-top
    path = shared_data.criteo_file(self, 'kaggle_train_head_4000.tsv')
    config = tiny_config(**{'data.train_path': path, 'num_train_steps': -1,
                            'num_epochs': 2, 'data.eval_fraction': 0.1})
    workdir = self.create_tempdir().full_path
    summary = train_loop.train_and_evaluate(config, workdir, shared_trainer())
    self.assertEqual(summary['step'], 2 * (3600 // 128))
    ev = summary['eval']
    self.assertEqual(ev['num_examples'], 400)
    self.assertGreater(ev['auc'], 0.55)
    for k in ('log_loss', 'accuracy', 'calibration'):
      self.assertTrue(np.isfinite(ev[k]), k)
    self.assertIsNone(summary['teacher_auc'])

  def test_malformed_lines_under_both_policies(self):
    from tests import shared_data  # pylint: disable=g-import-not-at-top
    from dlrm_jax.data import criteo  # pylint: disable=g-import-not-at-top
    lines = open(shared_data.criteo_file(
        self, 'kaggle_train_random_1000.tsv')).read().splitlines()
    for at in (10, 200, 500, 700, 950):  # 3 in the training part, 2 in eval
      lines.insert(at, '1\t2\t3')
    path = os.path.join(self.create_tempdir().full_path, 'train.txt')
    with open(path, 'w') as f:
      f.write('\n'.join(lines) + '\n')
    config = tiny_config(**{'data.train_path': path, 'num_train_steps': -1,
                            'num_epochs': 3, 'data.eval_fraction': 0.2,
                            'eval_every_steps': 5})
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                r'train\.txt:11: expected 40 fields, got 3'):
      train_loop.train_and_evaluate(config, self.create_tempdir().full_path,
                                    shared_trainer())
    config.data.bad_lines = 'skip'
    summary = train_loop.train_and_evaluate(
        config, self.create_tempdir().full_path, shared_trainer())
    # Each line counted once, over three epochs and several evaluations.
    self.assertEqual(summary['malformed_lines_skipped'], 5)


if __name__ == '__main__':
  absltest.main()
