"""A run directory's files, the one way the service writes a file, and the lock on a run directory.

Every file is written whole or not at all (``atomic_write``): a crash or a full disk leaves the old
file. metrics.jsonl is the exception, appended a line at a time; its reader drops a torn last line.
A run directory has one writer at a time: it holds ``LOCK_NAME`` (flock) while it writes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CONFIG_NAME = "config.yaml"
RUN_INFO_NAME = "run.json"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"
PLOT_NAME = "learning_curve.png"
LOCK_NAME = ".lock"


class WriteError(RuntimeError):
    """A file could not be written (the disk is full); the old file, if any, is intact."""


class LockedError(RuntimeError):
    """Another process writes this run directory."""


def disk_full(path: Path, err: BaseException) -> WriteError | None:
    """The clear error for ``err`` if it (or what caused it) is ENOSPC or EDQUOT."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return WriteError(
                f"disk full at {path}: free some space there and try again (a run continues "
                "from its last intact checkpoint with `es-service resume RUN_DIR`)"
            )
        err = err.__cause__ or err.__context__
    return None


class _Writer:
    """A binary file object whose writes are plain os.write calls, so a full disk surfaces as the
    OSError it is (torch.save, for one, replaces its writer's exceptions with its own)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as err:
            self.error = err
            raise
        return len(data)

    def flush(self) -> None:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, content: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``content`` (bytes, or a function that writes to a binary file) to ``path``: readers see
    the old file or the new one, never part of one, also after a power cut (file and directory fsynced)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    writer = _Writer(fd)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the group
            if callable(content):
                content(writer)
            else:
                writer.write(content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = disk_full(path, writer.error or err)
        if full is not None:
            raise full from None
        raise
    return path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_run_info(run_dir: Path) -> dict | None:
    """run.json's fields, or None when it is missing or damaged."""
    try:
        info = json.loads((Path(run_dir) / RUN_INFO_NAME).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def write_run_info(run_dir: Path, **fields) -> None:
    """Update run.json; a field given as None is removed (a resumed run drops its old error). A damaged
    run.json is rewritten from these fields: the checkpoint, not run.json, holds a run's state."""
    info = read_run_info(run_dir) or {}
    info.update(fields)
    info = {key: value for key, value in info.items() if value is not None}
    atomic_write(Path(run_dir) / RUN_INFO_NAME, (json.dumps(info, indent=2) + "\n").encode())


class Lock:
    """An exclusive, non-blocking flock on ``folder``/LOCK_NAME, holding the owner's pid while held.

    flock belongs to the open file, not the path: the lock follows its directory through a rename, so
    a run directory can be locked while it is still being built under a temporary name."""

    def __init__(self, folder: Path, shown_as: Path | None = None):
        path = Path(folder) / LOCK_NAME
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise LockedError(
                f"cannot open the lock file {str(path)!r} ({err.strerror}); make "
                f"{str(shown_as or folder)!r} writable by this user"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise LockedError(
                f"run directory {str(shown_as or folder)!r} is in use by process {holder}; wait "
                "for it to finish (or stop it), then try again"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # at rest the file is empty: a finished run's bytes do not name a pid
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


def create(run_dir: Path, fill: Callable[[Path], None], replace: bool) -> Lock:
    """Build a run directory in a temporary sibling (``fill`` writes its files), then move it into
    place, replacing an old run only when ``replace`` and only now, when nothing is left to fail before
    it. Returns the new directory's lock, held: no other process can start writing it meanwhile."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.creating-", dir=run_dir.parent))
    lock = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the run from the group
        lock = Lock(tmp, shown_as=run_dir)
        fill(tmp)
        if replace and run_dir.exists():
            _swap(tmp, run_dir)
        else:
            os.rename(tmp, run_dir)
        _fsync_dir(run_dir.parent)
        return lock
    except BaseException:
        if lock is not None:
            lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(new: Path, old: Path) -> None:
    """Put ``new`` where ``old`` is; the old run survives any failure before the new one is in place."""
    trash = old.with_name(f".{old.name}.replaced-{os.getpid()}")
    with Lock(old):  # never pull a run from under a process that is writing it
        os.rename(old, trash)
        try:
            os.rename(new, old)
        except BaseException:
            os.rename(trash, old)
            raise
    shutil.rmtree(trash, ignore_errors=True)
