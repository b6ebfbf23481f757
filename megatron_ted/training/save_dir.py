"""The run's `--save` directory: found writable at start-up, and held by one run at a time.

    check_writable(args.save)                 # every rank, before any heavy work: one line if not
    lock, notes = hold_save_dir(args.save, groups)   # rank 0 holds it for the run; the others trust it

The lock is `<save>/.lock`, holding the holder's "host pid", locked with `fcntl.flock`. flock (not a
pid check alone) decides who holds it: the kernel drops it when the holder dies, even by SIGKILL,
and on a shared filesystem (NFS emulates it with byte-range locks) it holds across hosts, where a
pid cannot be checked. A lock file whose flock is free but that still names a holder was left by a
run that died without releasing it: it is reported in one line and taken over. Release removes the
file while still holding the flock; a run that opened the file just before checks, after locking,
that its file is still the one at the path, so two runs never lock two different files.

Only rank 0 takes the lock (ranks of one run would exclude each other); every rank hears of a
refusal, so the whole job stops with the same one line before building the model.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import os
import socket

from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.checkpoint import _agree, recover_interrupted_saves

LOCK_NAME = ".lock"
# flock is not supported on this filesystem: fall back to the holder's pid (same host only)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def check_writable(path: str) -> None:
    """Create `path` if missing and prove it writable with a probe file; ValueError naming --save if not."""
    probe = os.path.join(path, f".write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--save {path} is not writable ({err.strerror}); pass a directory this user can "
                         f"write") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        return True
    return True


class SaveDirLock:
    """An exclusive hold on one save directory (see the module docstring)."""

    def __init__(self, directory: str):
        self.directory, self.path = directory, os.path.join(directory, LOCK_NAME)
        self.me = f"{socket.gethostname()} {os.getpid()}"
        self.fd: int | None = None

    def _busy(self, holder: str) -> ValueError:
        host, _, pid = holder.partition(" ")
        who = f"pid {pid} on host {host}" if pid else "another process"
        return ValueError(f"--save {self.directory} is in use by another run ({who}, lock file {self.path}); "
                          f"wait for it to finish or pass another --save")

    def acquire(self) -> list[str]:
        """Take the lock (ValueError naming the holder when another run has it); returns a note
        when a stale lock was taken over."""
        for _ in range(100):   # only repeats when a holder releases between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise self._busy(previous) from None
                except OSError as err:
                    if err.errno not in _NO_FLOCK:
                        raise
                    host, _, pid = previous.partition(" ")
                    if previous and previous != self.me and not (host == socket.gethostname()
                                                                 and pid.isdigit() and not _pid_alive(int(pid))):
                        raise self._busy(previous) from None
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:   # released (and removed) by its holder meanwhile: lock the new file
                    os.close(fd)
                    continue
                previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{self.me}\n".encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            atexit.register(self.release)
            if not previous:
                return []
            host, _, pid = previous.partition(" ")
            return [f"WARNING: --save {self.directory}: took over a stale lock of pid {pid} on host {host} "
                    f"(that run ended without releasing it)"]
        raise RuntimeError(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent; also run at exit)."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)   # before unlocking: a run waiting on this file sees it gone and retries
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        atexit.unregister(self.release)


def hold_save_dir(path: str, groups: ParallelGroups) -> tuple[SaveDirLock | None, list[str]]:
    """Rank 0 locks `path` for the run and repairs what a save killed midway left there (collective:
    every rank calls it and raises the same CheckpointError when the directory is held elsewhere).
    Returns (the lock on rank 0, else None; the notes rank 0 should print)."""
    lock, notes, error = None, [], None
    if groups.rank == 0:
        lock = SaveDirLock(path)
        try:
            notes = lock.acquire()
            notes += recover_interrupted_saves(path)
        except Exception as err:  # noqa: BLE001 -- every rank must hear of it, or the others wait forever
            error = str(err) if isinstance(err, ValueError) else f"--save {path}: {type(err).__name__}: {err}"
            lock.release()
    _agree(error, groups)
    return lock, notes
