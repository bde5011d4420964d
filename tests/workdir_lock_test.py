"""One writer per workdir, with real processes."""

import json
import os
import signal
import socket
import subprocess
import sys

from absl.testing import absltest

from dlrm_jax import workdir_lock

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOLD = ('import sys, time\n'
         'from dlrm_jax import workdir_lock\n'
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
