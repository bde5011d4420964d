"""One writer per workdir, with real processes."""

import json
import os
import signal
import socket
import subprocess
import sys

from absl.testing import absltest

from dlrm_jax.train import workdir_lock

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOLD = ('import sys, time\n'
         'from dlrm_jax.train import workdir_lock\n'
         'workdir_lock.WorkdirLock(sys.argv[1]).acquire()\n'
         "print('locked', flush=True)\n"
         'time.sleep(120)\n')


def _holder(workdir):
  p = subprocess.Popen([sys.executable, '-c', _HOLD, workdir],
                       stdout=subprocess.PIPE, text=True, cwd=_ROOT)
  assert p.stdout.readline().strip() == 'locked'
  return p


class WorkdirLockTest(absltest.TestCase):

  def test_second_run_is_refused_and_a_killed_owner_is_stale(self):
    workdir = self.create_tempdir().full_path
    holder = _holder(workdir)
    try:
      # A real training command on the same workdir stops at once, in one
      # line naming the owner.
      out = subprocess.run(
          [sys.executable, '-m', 'dlrm_jax.main',
           '--config=configs/criteo.py:tiny', f'--workdir={workdir}'],
          capture_output=True, text=True, cwd=_ROOT, timeout=300,
          env=dict(os.environ, JAX_PLATFORMS='cpu'))
      self.assertNotEqual(out.returncode, 0)
      self.assertRegex(
          out.stderr, rf'{workdir} is in use by another run: pid'
          rf' {holder.pid} on host {socket.gethostname()!r}')
      self.assertNotIn('Traceback', out.stderr)
      self.assertFalse(os.path.exists(os.path.join(workdir, 'checkpoints')))
      with self.assertRaises(workdir_lock.WorkdirLockedError):
        workdir_lock.WorkdirLock(workdir).acquire()
    finally:
      holder.send_signal(signal.SIGKILL)
      holder.wait()
    # Killed: its lock file still names it, and is taken over.
    with open(os.path.join(workdir, '.lock')) as f:
      self.assertEqual(json.load(f)['pid'], holder.pid)
    with self.assertLogs('absl', level='WARNING') as logs:
      lock = workdir_lock.WorkdirLock(workdir).acquire()
    self.assertEqual(lock.stale_owner['pid'], holder.pid)
    self.assertIn(f'stale lock {workdir}/.lock of pid {holder.pid}',
                  logs.output[0])
    lock.release()
    # Released cleanly: the next one takes it without a word.
    with workdir_lock.WorkdirLock(workdir) as again:
      self.assertIsNone(again.stale_owner)

  def test_two_runs_started_together(self):
    workdir = self.create_tempdir().full_path
    cmd = [sys.executable, '-m', 'dlrm_jax.main',
           '--config=configs/criteo.py:tiny', f'--workdir={workdir}',
           '--config.num_train_steps=20', '--config.log_every_steps=5']
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=_ROOT,
                             env=env) for _ in range(2)]
    outs = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    for p in runs:
      p.stdout.close()
      p.stderr.close()
    codes = sorted(rc for rc, _ in outs)
    if codes == [0, 0]:  # One reached the lock after the other had ended.
      self.assertTrue(any('already trained for 20 steps' in err
                          for _, err in outs), outs)
    else:
      self.assertEqual(codes, [0, 1], outs)
      refused = [err for rc, err in outs if rc == 1][0]
      self.assertRegex(refused.strip().splitlines()[-1],
                       rf'^error: {workdir} is in use by another run: pid'
                       r' \d+')
    rows = [json.loads(l) for l in open(os.path.join(workdir,
                                                     'metrics.jsonl'))]
    self.assertEqual([r['step'] for r in rows if r['type'] == 'train'],
                     [5, 10, 15, 20])

  def test_without_flock_the_file_is_the_lock(self):
    workdir = self.create_tempdir().full_path
    path = os.path.join(workdir, '.lock')
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    alive = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
      for pid, host, taken in ((dead_pid, socket.gethostname(), True),
                               (alive.pid, socket.gethostname(), False),
                               (dead_pid, 'another-host', False)):
        with open(path, 'w') as f:
          json.dump({'host': host, 'pid': pid}, f)
        lock = workdir_lock.WorkdirLock(workdir)
        if taken:
          lock._acquire_without_flock()  # pylint: disable=protected-access
          self.assertEqual(lock.stale_owner['pid'], dead_pid)
          lock.release()
          self.assertFalse(os.path.exists(path))
        else:
          with self.assertRaisesRegex(workdir_lock.WorkdirLockedError,
                                      f'pid {pid} on host {host!r}'):
            lock._acquire_without_flock()  # pylint: disable=protected-access
    finally:
      alive.kill()
      alive.wait()


if __name__ == '__main__':
  absltest.main()
