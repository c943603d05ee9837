"""A lock on a run folder, so two `tunelab train` runs never write into one output_dir at once.

    with RunLock(output_dir):      # raises RunLockedError naming the other run's pid when it is held
        ...train...

The lock is the file `<folder>/.tunelab.lock`, holding the owner's pid and start time (for the message only).
Ownership is an OS lock on that file (fcntl.flock on Linux/macOS, msvcrt.locking on Windows), which the kernel
drops when the process dies: a lock file left behind by a killed run never blocks the next one. Where neither is
available the pid in the file decides (a lock whose pid is not running is taken over).
"""
from __future__ import annotations

import datetime
import os

from tunelab.errors import TunelabError

LOCK_NAME = ".tunelab.lock"

try:  # POSIX
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt  # type: ignore[import-not-found]
except ImportError:
    msvcrt = None  # type: ignore[assignment]


class RunLockedError(TunelabError):
    """Another live process holds the run folder."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or we cannot tell: assume alive)
    return True


class RunLock:
    """Exclusive, non-blocking lock on `folder` for the life of a run (a context manager)."""

    def __init__(self, folder: str, what: str = "output_dir") -> None:
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.what = what
        self.fd: int | None = None
        self.created = False

    def _holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as fh:
                text = fh.read().split()
            return f"pid {text[0]}, started {text[1]}" if len(text) >= 2 else "another process"
        except OSError:
            return "another process"

    def _refuse(self) -> RunLockedError:
        return RunLockedError(
            f"{self.what} '{self.folder}' is in use by another tunelab run ({self._holder()}): two runs in one folder "
            "would mix their checkpoints and logs. Wait for that run to end (or stop it), or choose another output_dir."
        )

    def _os_lock(self, fd: int) -> bool:
        """True when this process now holds the OS lock on fd, False when another process holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                return False
        if msvcrt is not None:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                return False
        # no OS lock: trust the pid in the file
        try:
            pid = int(open(self.path, encoding="utf-8").read().split()[0])
        except (OSError, ValueError, IndexError):
            return True
        return pid == os.getpid() or not _pid_alive(pid)

    def acquire(self) -> "RunLock":
        self.created = not os.path.isdir(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not self._os_lock(fd):
                os.close(fd)
                raise self._refuse()
            # The previous owner may have removed the file between our open and our lock: then we hold a lock on a
            # file nobody else can see, so start again on the file that is there now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if same:
                break
            os.close(fd)
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {stamp}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the lock, so no one locks a file about to vanish
        except OSError:
            pass
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = None
        if self.created:  # a run that failed before writing anything leaves no empty folder behind
            try:
                os.rmdir(self.folder)
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
