"""One compile at a time per ``log_dir``: an exclusive ``flock`` held while a session has its store open."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import weakref
from pathlib import Path
from typing import Any

from dspy_turbogepa.store.errors import RunStoreError

__all__ = ["LOCK_FILENAME", "RunLock"]

logger = logging.getLogger("dspy_turbogepa.store.sqlite_store")


LOCK_FILENAME = "run.lock"


class _HeldRunLocks:
    """The run locks this process holds. A flock lasts until every copy of its descriptor is closed,
    and ``fork()`` copies descriptors: a worker forked during the run (a metric's multiprocessing pool)
    kept the log_dir locked after the compile was killed, and the rerun was refused. A forked child
    now closes its copies."""

    def __init__(self) -> None:
        self._locks: weakref.WeakSet[RunLock] = weakref.WeakSet()
        self._guard = threading.Lock()
        self._hooked = False

    def add(self, lock: RunLock) -> None:
        with self._guard:
            self._locks.add(lock)
            if not self._hooked and hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=self._after_fork_in_child)
                self._hooked = True

    def discard(self, lock: RunLock) -> None:
        with self._guard:
            self._locks.discard(lock)

    def _after_fork_in_child(self) -> None:
        for lock in list(self._locks):
            lock.forget_in_child()
        self._locks = weakref.WeakSet()
        self._guard = threading.Lock()  # a copy of a lock another thread may have held at the fork


#: Process-wide, as the descriptors a fork copies are.
_HELD_RUN_LOCKS = _HeldRunLocks()


class RunLock:
    """An exclusive lock on a log_dir while a session has its store open.

    Two compiles of one run in one log_dir at once (two threads, two processes) would each replay the
    store as it was when they started and pay for the same evaluations twice; the second is refused
    instead. ``flock`` is released by the kernel when the process dies, so a killed run never leaves a
    stale lock behind. Where ``fcntl`` does not exist (Windows) there is no lock.
    """

    def __init__(self, fd: int | None, dir_fd: int | None = None) -> None:
        self._fd = fd
        #: The log_dir itself, locked too: deleting ``run.lock`` by hand (the habit with stale lock
        #: files) while a compile holds it let the next compile lock a new file and open the same store.
        self._dir_fd = dir_fd
        if fd is not None or dir_fd is not None:
            _HELD_RUN_LOCKS.add(self)

    def forget_in_child(self) -> None:
        """In a forked child: close this copy of the descriptors (the parent keeps its lock) and forget
        them, so that a release in the child (a store's finalizer) cannot close a file the child opened
        later under the same number."""
        fds, self._fd, self._dir_fd = (self._fd, self._dir_fd), None, None
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    @staticmethod
    def _in_use(log_dir: Path, holder: str) -> RunStoreError:
        holder = holder or "unknown"
        if holder == str(os.getpid()):
            holder += (", this process: a compile on another thread, or the last compile's run store still "
                       "committing after close() on a slow disk")
        return RunStoreError(
            f"log_dir {log_dir} is in use by another compile that is still running (pid {holder}): two at "
            "once would pay for the same evaluations twice. Wait for it to finish, or use another log_dir.")

    @classmethod
    def _lock_dir(cls, log_dir: Path, fcntl: Any) -> int | None:
        """An exclusive flock on the directory, or None where directories cannot be locked (NFS emulates
        flock with POSIX locks, which need a descriptor open for writing): the lock file still holds."""
        try:
            fd = os.open(log_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as exc:
            logger.debug("Cannot open %s to lock it: %s", log_dir, exc)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = (log_dir / LOCK_FILENAME).read_text(errors="replace").strip()[:64]
            except OSError:  # deleted by hand: the very case this lock is for
                holder = ""
            raise cls._in_use(log_dir, holder) from None
        except OSError as exc:
            os.close(fd)
            logger.debug("Cannot lock the directory %s (%s): the lock file alone guards it", log_dir, exc)
            return None
        return fd

    @classmethod
    def acquire(cls, log_dir: Path) -> RunLock:
        try:
            import fcntl
        except ImportError:
            return cls(None)
        dir_fd = cls._lock_dir(log_dir, fcntl)
        try:
            return cls._lock_file(log_dir, fcntl, dir_fd)
        except BaseException:
            if dir_fd is not None:
                os.close(dir_fd)
            raise

    @classmethod
    def _lock_file(cls, log_dir: Path, fcntl: Any, dir_fd: int | None) -> RunLock:
        path = log_dir / LOCK_FILENAME
        try:
            # never through a symlink, and only a regular file: the pid is written over what it holds (a
            # link planted in a shared log_dir truncated the file it pointed to)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file")
        except OSError as exc:
            # the lock file, not the stored results, is what is wrong (owned by another user, not a file):
            # deleting the database, as START_OVER says for a damaged store, would throw away paid work
            raise RunStoreError(
                f"cannot open the lock file {path}: {exc}. The stored results in {log_dir} are not affected: "
                f"make {path} a file this user can write (or remove it while no compile uses {log_dir}), "
                "then run again with the same log_dir.") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise cls._in_use(log_dir, holder) from None
        except OSError as exc:  # a filesystem without locks (some NFS, FUSE or SMB mounts): run unlocked
            os.close(fd)
            if dir_fd is None:
                logger.warning("Cannot lock %s (%s): two compiles of this run at once will not be refused.", path,
                               exc)
            return cls(None, dir_fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:  # the pid is only for the message: keep the lock without it
            logger.debug("Could not write the pid into %s: %s", path, exc)
        return cls(fd, dir_fd)

    def release(self) -> None:
        fds, self._fd, self._dir_fd = (self._fd, self._dir_fd), None, None
        _HELD_RUN_LOCKS.discard(self)
        for fd in fds:
            if fd is None:
                continue
            try:
                import fcntl

                # released now, whatever copies of the descriptor exist (a child forked outside the fork hook)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError as exc:
                logger.debug("Could not unlock %s: %s", fd, exc)
            os.close(fd)
