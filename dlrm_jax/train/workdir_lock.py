"""One writer per workdir: `<workdir>/.lock`, held while a run trains.

The lock is an exclusive `fcntl.flock` on the file, which the kernel drops
when its process ends however it ends (SIGKILL included), so a killed run
never leaves a lock that blocks the next one; the file also names its owner
(host, pid, start time, command line), for the error the second writer gets.
A lock file naming a process that is gone (same host, pid not alive) is
recognized as stale and taken over, with a log line. A clean release
removes the file, so a finished or failed run leaves no `.lock` behind.
Where the file system offers no flock (some network file systems), the file
alone is the lock: created exclusively, removed on release, and taken over
when stale.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

from absl import logging

LOCK_NAME = '.lock'


class WorkdirLockedError(RuntimeError):
  """Another process is writing to the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Alive, another user's.
  return True


def _describe(owner: dict[str, Any]) -> str:
  return (f"pid {owner.get('pid')} on host {owner.get('host')!r} (since"
          f" {owner.get('started')}: {owner.get('command')})")


def is_stale(owner: dict[str, Any]) -> bool:
  """Says whether a lock file's owner is a process gone from this host.

  A lock of another host cannot be judged, so it is not stale.

  Args:
    owner: the owner the lock file names: host, pid, started, command.

  Returns:
    True when the owner is on this host and its pid is not alive.
  """
  return (owner.get('host') == socket.gethostname() and
          isinstance(owner.get('pid'), int) and
          not _pid_alive(owner['pid']))


class WorkdirLock:
  """Holds `<workdir>/.lock` as a context manager.

  Entering acquires the lock, leaving releases it.

  Attributes:
    path: the lock file.
    stale_owner: the owner of a stale lock this one took over, or None.
  """

  def __init__(self, workdir: str):
    """Makes the lock. Nothing is taken before `acquire`.

    Args:
      workdir: the run directory.
    """
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: int | None = None
    self._flock = True
    self.stale_owner: dict[str, Any] | None = None

  def _read_owner(self) -> dict[str, Any]:
    try:
      with open(self.path) as f:
        return json.loads(f.read() or '{}')
    except (OSError, ValueError):
      return {}

  def _refuse(self, owner: dict[str, Any]) -> WorkdirLockedError:
    return WorkdirLockedError(
        f'{os.path.dirname(self.path) or "."} is in use by another run: '
        f'{_describe(owner)}; its lock is {self.path}. Wait for it to end,'
        ' or use another --workdir.')

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock and writes this process as its owner.

    A stale lock is taken over, with a log line. Where the file system has no
    flock, the file alone is the lock.

    Returns:
      The lock itself.

    Raises:
      WorkdirLockedError: another live process holds the lock.
    """
    os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        owner = self._read_owner()
        if not owner:  # Locked a moment ago, its owner not yet written.
          time.sleep(0.5)
          owner = self._read_owner()
        raise self._refuse(owner) from None
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
        raise
      return self._acquire_without_flock()
    if not self._is_the_file(fd):
      # A releasing owner removed the file between our open and our flock:
      # the lock is on a file nobody else will see. Take the path anew.
      os.close(fd)
      return self.acquire()
    self._fd = fd
    owner = self._read_owner()
    if owner and owner.get('pid') != os.getpid():
      # Unlocked but not empty: its owner ended without releasing (killed).
      self.stale_owner = owner
      logging.warning('took over the stale lock %s of %s, which is no longer'
                      ' running.', self.path, _describe(owner))
    self._write_owner(fd)
    return self

  def _is_the_file(self, fd: int) -> bool:
    """Whether `fd` is still the file at `self.path`."""
    try:
      return os.path.samestat(os.fstat(fd), os.stat(self.path))
    except FileNotFoundError:
      return False

  def _acquire_without_flock(self) -> 'WorkdirLock':
    self._flock = False
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        owner = self._read_owner()
        if not is_stale(owner):
          raise self._refuse(owner) from None
        self.stale_owner = owner
        logging.warning('removing the stale lock %s of %s, which is no'
                        ' longer running.', self.path, _describe(owner))
        os.remove(self.path)
        continue
      self._fd = fd
      self._write_owner(fd)
      return self
    raise self._refuse(self._read_owner())

  def _write_owner(self, fd: int) -> None:
    owner = {'host': socket.gethostname(), 'pid': os.getpid(),
             'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
             'command': ' '.join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    os.fsync(fd)

  def release(self) -> None:
    """Releases the lock and removes its file. A lock not held does nothing."""
    if self._fd is None:
      return
    try:
      # Released cleanly: the file goes (removed while still locked, so a
      # process that opened it meanwhile sees it is gone, `_is_the_file`).
      os.ftruncate(self._fd, 0)
      os.remove(self.path)
    except OSError:
      pass
    finally:
      os.close(self._fd)  # Drops the flock.
      self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
