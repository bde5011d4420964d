"""Damaged checkpoints are named, moved aside and passed over; failed saves
stop the run in one line."""

import errno
import glob
import os
import shutil
import subprocess
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from dlrm_jax.train import checkpoint as ckpt_lib
from dlrm_jax.serving import offline as inference
from dlrm_jax.train import loop as train_loop
from tests import train_test

_BASE = None


def _config(steps=20):
  return train_test.tiny_config(num_train_steps=steps,
                                checkpoint_every_steps=10,
                                eval_every_steps=1000)


def base_workdir():
  """A run of 20 steps with checkpoints 10 and 20 (made once)."""
  global _BASE
  if _BASE is None:
    # One per test process: pytest-xdist workers share the default tmpdir.
    _BASE = tempfile.mkdtemp(prefix='damage_base_',
                             dir=absltest.get_default_test_tmpdir())
    train_loop.train_and_evaluate(_config(), _BASE, train_test.shared_trainer())
  return _BASE


def _garbage_over_biggest_array_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd',
                                             '*'), recursive=True)]
  biggest = max(files, key=os.path.getsize)
  size = os.path.getsize(biggest)
  with open(biggest, 'wb') as f:
    f.write(np.random.default_rng(0).bytes(size))


def _truncate_all(step_dir):
  for f in glob.glob(os.path.join(step_dir, '**'), recursive=True):
    if os.path.isfile(f):
      open(f, 'wb').close()


def _empty_folder(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


def _garble_meta(step_dir):
  with open(os.path.join(step_dir, 'meta', 'metadata'), 'r+b') as f:
    f.seek(100)
    f.write(b'}{ not json')


def _values_changed_files_readable(step_dir):
  """Checkpoint 20's state replaced by a well-formed one with other values
  (bit rot orbax cannot see); its meta, with the fingerprints, kept."""
  workdir = os.path.dirname(os.path.dirname(step_dir))
  trainer = train_test.shared_trainer()
  ckpt = ckpt_lib.Checkpointer(workdir)
  state, _ = ckpt.restore(20, trainer.abstract_state())
  ckpt.close()
  leaves, tree = jax.tree.flatten(state.params)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].add(1.0)
  tampered = state.replace(params=jax.tree.unflatten(tree, leaves))
  other_dir = os.path.join(workdir, 'other')
  other = ckpt_lib.Checkpointer(other_dir, async_save=False)
  other.save(20, tampered, {})
  other.close()
  shutil.rmtree(os.path.join(step_dir, 'state'))
  shutil.copytree(os.path.join(other_dir, 'checkpoints', '20', 'state'),
                  os.path.join(step_dir, 'state'))
  shutil.rmtree(other_dir)


DAMAGES = {
    'values changed, files readable': _values_changed_files_readable,
    'garbage over the biggest array file': _garbage_over_biggest_array_file,
    'state metadata deleted': lambda d: os.remove(
        os.path.join(d, 'state', '_METADATA')),
    'meta JSON garbled': _garble_meta,
    'files truncated to 0': _truncate_all,
    'empty step folder': _empty_folder,
    'state folder deleted': lambda d: shutil.rmtree(os.path.join(d, 'state')),
}


def _params(workdir, step):
  trainer = train_test.shared_trainer()
  ckpt = ckpt_lib.Checkpointer(workdir)
  try:
    state, _ = ckpt.restore(step, trainer.abstract_state())
  finally:
    ckpt.close()
  return jax.tree.leaves(state)


class DamagedCheckpointTest(absltest.TestCase):

  def test_each_damage_resumes_from_the_previous_checkpoint(self):
    base = base_workdir()
    want = _params(base, 20)
    for name, damage in DAMAGES.items():
      with self.subTest(name):
        workdir = self.create_tempdir().full_path
        shutil.copytree(base, workdir, dirs_exist_ok=True)
        damage(os.path.join(workdir, 'checkpoints', '20'))
        with self.assertLogs('absl', level='WARNING') as logs:
          summary = train_loop.train_and_evaluate(_config(), workdir,
                                                  train_test.shared_trainer())
        self.assertEqual(summary['step'], 20)
        line = [l for l in logs.output if 'is damaged' in l]
        self.assertLen(line, 1, logs.output)
        if name == 'values changed, files readable':
          self.assertIn("differ from the fingerprints saved with them:"
                        " .params['", line[0])
        self.assertRegex(
            line[0], r'checkpoint 20 at .*checkpoints/20 is damaged: .*; moved'
            r' to .*checkpoints_damaged/20-\d+T\d+; trying the previous one')
        self.assertLen(glob.glob(os.path.join(workdir, 'checkpoints_damaged',
                                              '20-*')), 1)
        # Trained again from 10: the same weights as the undamaged run.
        for x, y in zip(_params(workdir, 20), want):
          np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  def test_eval_and_predict_skip_a_damaged_newest_without_moving_it(self):
    workdir = self.create_tempdir().full_path
    shutil.copytree(base_workdir(), workdir, dirs_exist_ok=True)
    _garble_meta(os.path.join(workdir, 'checkpoints', '20'))
    with self.assertLogs('absl', level='WARNING') as logs:
      model = inference.load(_config(), workdir)
    self.assertEqual(model.step, 10)
    self.assertTrue(any('checkpoint 20 at' in l and 'is damaged' in l
                        for l in logs.output), logs.output)
    self.assertTrue(os.path.isdir(os.path.join(workdir, 'checkpoints', '20')))
    # A step asked for by number is not replaced by another.
    with self.assertRaisesRegex(ckpt_lib.DamagedCheckpointError,
                                r'checkpoint 20 at .*checkpoints/20 is'
                                ' damaged'):
      inference.load(_config(), workdir, step=20)

  def test_all_damaged_is_an_error_not_a_fresh_start(self):
    workdir = self.create_tempdir().full_path
    shutil.copytree(base_workdir(), workdir, dirs_exist_ok=True)
    for step in (10, 20):
      _garble_meta(os.path.join(workdir, 'checkpoints', str(step)))
    with self.assertRaisesRegex(ckpt_lib.DamagedCheckpointError,
                                'every checkpoint in .* is damaged: 20 .*; 10'):
      train_loop.train_and_evaluate(_config(), workdir,
                                    train_test.shared_trainer())
    self.assertLen(os.listdir(os.path.join(workdir, 'checkpoints_damaged')),
                   2)


class FingerprintTest(absltest.TestCase):

  def test_one_changed_word_is_caught(self):
    tree = {'a': jnp.arange(1000, dtype=jnp.float32),
            'b': jnp.ones((7, 3), jnp.bfloat16), 'c': jnp.zeros(5, bool),
            'r': np.arange(10)}
    fp = ckpt_lib.fingerprints(tree)
    self.assertEqual(fp, ckpt_lib.fingerprints(jax.tree.map(lambda x: x,
                                                            tree)))
    rng = np.random.default_rng(0)
    for key in ('a', 'b', 'c', 'r'):
      for _ in range(5):
        x = np.array(tree[key])
        flat = x.reshape(-1)
        i = int(rng.integers(flat.size))
        if x.dtype == bool:
          flat[i] = ~flat[i]
        else:
          words = flat.view(f'u{x.dtype.itemsize}')
          words[i] ^= 1 << int(rng.integers(8 * x.dtype.itemsize))
        changed = dict(tree, **{key: x if key == 'r' else jnp.asarray(x)})
        got = ckpt_lib.fingerprints(changed)
        self.assertNotEqual(got[f"['{key}']"], fp[f"['{key}']"])
    # Two swapped values are caught too (position-weighted).
    a = np.arange(1000, dtype=np.float32)
    a[[3, 4]] = a[[4, 3]]
    self.assertNotEqual(
        ckpt_lib.fingerprints({'a': jnp.asarray(a)})["['a']"], fp["['a']"])


def _du(path):
  return sum(os.path.getsize(os.path.join(r, f))
             for r, _, files in os.walk(path) for f in files)


class FailedSaveTest(absltest.TestCase):

  def test_a_full_disk_stops_the_run_at_that_checkpoint(self):
    """A real full disk: a tmpfs with room for one checkpoint (skipped where
    tmpfs cannot be mounted)."""
    probe = self.create_tempdir().full_path
    train_loop.train_and_evaluate(_config(10), probe, train_test.shared_trainer())
    ckpt_bytes = _du(os.path.join(probe, 'checkpoints', '10'))
    mnt = self.create_tempdir().full_path
    size = _du(probe) + ckpt_bytes // 2 + (64 << 10)
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs',
                       mnt], capture_output=True).returncode:
      self.skipTest('cannot mount a tmpfs here')
    try:
      workdir = os.path.join(mnt, 'run')
      with self.assertRaisesRegex(
          ckpt_lib.CheckpointSaveError,
          r'^saving checkpoint 20 to .*/run/checkpoints failed \(.*No space'
          r' left on device.*\); the run stops here; the earlier checkpoints'
          r' \(10\) are intact\.$'):
        train_loop.train_and_evaluate(
            train_test.tiny_config(num_train_steps=40,
                                   checkpoint_every_steps=10,
                                   log_every_steps=5, eval_every_steps=1000),
            workdir, train_test.shared_trainer())
      rows = open(os.path.join(workdir, 'metrics.jsonl')).read()
      # Stopped when the background write had failed: at a log step after
      # it, or at the next save (30) at the latest.
      self.assertNotIn('"step": 35', rows)
      moved = self.create_tempdir().full_path
      shutil.copytree(workdir, moved, dirs_exist_ok=True)
    finally:
      subprocess.run(['umount', mnt], check=True)
    # Given room, it resumes from 10.
    summary = train_loop.train_and_evaluate(_config(20), moved,
                                            train_test.shared_trainer())
    self.assertEqual(summary['step'], 20)

  def test_a_failed_save_stops_the_run_and_keeps_the_earlier_ones(self):
    workdir = self.create_tempdir().full_path
    real_save = ckpt_lib.ocp.CheckpointManager.save

    def save(manager, step, *args, **kwargs):
      if step == 20:
        raise OSError(errno.ENOSPC, 'No space left on device')
      return real_save(manager, step, *args, **kwargs)

    with mock.patch.object(ckpt_lib.ocp.CheckpointManager, 'save', save):
      with self.assertRaisesRegex(
          ckpt_lib.CheckpointSaveError,
          r'^saving checkpoint 20 to .*checkpoints failed \(OSError: \[Errno'
          r' 28\] No space left on device\); the run stops here; the earlier'
          r' checkpoints \(10\) are intact\.$'):
        train_loop.train_and_evaluate(_config(30), workdir,
                                      train_test.shared_trainer())
    self.assertEqual(ckpt_lib.Checkpointer(workdir).all_steps(), [10])
    summary = train_loop.train_and_evaluate(_config(20), workdir,
                                            train_test.shared_trainer())
    self.assertEqual(summary['step'], 20)

  def test_a_failed_asynchronous_save_is_noticed_at_the_next_log_step(self):
    workdir = self.create_tempdir().full_path
    calls = []

    def check(manager):
      calls.append(1)
      if manager.latest_step() == 10:  # Step 10's background write "failed".
        raise OSError(errno.EACCES, 'Permission denied')

    with mock.patch.object(ckpt_lib.ocp.CheckpointManager,
                           'check_for_errors', check):
      with self.assertRaisesRegex(ckpt_lib.CheckpointSaveError,
                                  'Permission denied.*the run stops here'):
        train_loop.train_and_evaluate(
            train_test.tiny_config(num_train_steps=30,
                                   checkpoint_every_steps=10,
                                   log_every_steps=5,
                                   eval_every_steps=1000),
            workdir, train_test.shared_trainer())
    metrics = open(os.path.join(workdir, 'metrics.jsonl')).read()
    self.assertIn('"step": 10', metrics)
    self.assertNotIn('"step": 15', metrics)  # Stopped at the next log step.


if __name__ == '__main__':
  absltest.main()
