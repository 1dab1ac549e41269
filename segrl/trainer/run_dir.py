"""A run directory: created (or reopened) safely, locked against a second writer.

* :meth:`RunDir.open` refuses a path that cannot be a directory (a file, a read-only or
  missing parent) with one line, creates what is missing and takes an exclusive
  ``fcntl.flock`` on ``RUN/.segrl.lock`` holding the writer's PID: a second ``segrl train``
  on the same directory (or a ``--resume`` of a run still training) is refused at once
  naming that PID. The kernel drops the lock when its process dies, so a killed run's lock
  is simply taken over (and said so).
* :meth:`RunDir.discard` undoes a failed start: the lock is released and the directories
  this start created are removed again (nothing that existed before is touched).
* :func:`disk_full` recognises a write that failed for lack of space and names the device.
* Files are written with the user's umask (:func:`apply_umask`; safetensors creates its
  files mode 0600).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import shutil
import weakref
from pathlib import Path

from .errors import TrainingError

LOCK = ".segrl.lock"
#: files whose presence (non-empty) means a directory already holds a run
RUN_FILES = ("metrics.jsonl", "rollouts.jsonl")


class RunDirError(TrainingError):
    """A run directory that cannot be used (the message says why and what to do)."""


class DiskFullError(RunDirError):
    """A write failed for lack of space; the message names the device and the file."""


# ------------------------------------------------------------------------------ the lock ---

_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``DIR/.segrl.lock``; the file holds the PID."""

    def __init__(self, fd: int, path: Path, previous_pid: int | None):
        self.fd: int | None = fd
        self.path = path
        #: PID written by an earlier holder that is gone (its lock was taken over)
        self.previous_pid = previous_pid
        _HELD.add(self)

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        path = Path(run_dir) / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by exec'd children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"PID {holder}" if holder else "another process"
                raise RunDirError(
                    f"{run_dir} is in use by another segrl process ({who}); wait for it to end or stop it, or use another --log.output_dir"
                ) from None
            raise
        previous = _read_pid(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path, previous if previous and previous != os.getpid() else None)

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __del__(self):
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _close_locks_in_child() -> None:
    """A forked child (a reward worker) must not keep the run locked after the trainer dies:
    close its copies of the lock descriptors (the parent's lock is unaffected)."""
    for lk in list(_HELD):
        if lk.fd is not None:
            try:
                os.close(lk.fd)
            except OSError:
                pass
            lk.fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


# ------------------------------------------------------------------------- the directory ---


class RunDir:
    """The directory of one run (see the module docstring)."""

    def __init__(self, path: Path, created: Path | None, lock: RunLock | None, before: set[str]):
        self.path = path
        self.created = created  # the top-most directory this start created (None: it existed)
        self.lock = lock
        self.before = before  # what was there before this start (a failed start removes only what it added)

    @classmethod
    def open(cls, path: str | Path, lock: bool = True) -> RunDir:
        """Create ``path`` if needed and lock it (``lock=False``: non-main torchrun ranks)."""
        path = Path(path)
        created = _make_dirs(path)
        if not os.access(path, os.W_OK | os.X_OK):
            _remove(created)
            raise RunDirError(f"run directory {path} is not writable; choose another --log.output_dir")
        before = set() if created else {p.name for p in path.iterdir()}
        try:
            held = RunLock.acquire(path) if lock else None
        except RunDirError:  # in use: it is the other writer's now, never remove anything
            raise
        except OSError as e:
            _remove(created)
            full = disk_full(e, path, path / LOCK)
            raise (DiskFullError(full) if full else RunDirError(f"cannot lock run directory {path}: {e.strerror or e}")) from None
        return cls(path, created, held, before)

    def holds_run(self) -> bool:
        """True when a run has already written here (steps logged or checkpoints saved)."""
        return holds_run(self.path)

    def size(self, name: str) -> int:
        p = self.path / name
        return p.stat().st_size if p.exists() else 0

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def lock_again(self) -> None:
        """Take the lock again after :meth:`release` (no-op while it is held)."""
        if self.lock is None or self.lock.fd is None:
            self.lock = RunLock.acquire(self.path)

    def discard(self) -> None:
        """Undo a failed start: release the lock, remove what this start created (the whole
        directory if it made it, else only the entries it added)."""
        self.release()
        if self.created is not None:
            _remove(self.created)
        elif self.path.is_dir():
            for p in self.path.iterdir():
                if p.name in self.before:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        self.created = None


def discard_run_dir_on_failure(init):
    """Decorates an ``__init__`` that opens ``self.run`` (a :class:`RunDir`): a start that
    fails (bad reward code, too-long prompts, a model error, a full disk) leaves no run
    directory behind; what it created is removed and its lock released."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except BaseException as e:
            run = self.__dict__.get("run")
            if run is not None:
                run.discard()
            if isinstance(e, OSError):
                full = disk_full(e, run.path if run else Path.cwd(), getattr(e, "filename", None) or "the run directory")
                if full:
                    raise DiskFullError(full) from None
            raise

    return wrapper


def holds_run(path: Path) -> bool:
    path = Path(path)
    if any(path.joinpath(n).is_file() and path.joinpath(n).stat().st_size > 0 for n in RUN_FILES):
        return True
    ck = path / "checkpoints"
    return (path / "final_model").is_dir() or (ck.is_dir() and any(p.name.startswith("step-") for p in ck.iterdir()))


def is_run(path: Path) -> bool:
    """Does ``path`` look like a directory that ``segrl train`` wrote (for ``--resume``)?"""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "config.yaml").is_file() and ((path / LOCK).is_file() or holds_run(path)):
        return True
    ck = path / "checkpoints"
    return ck.is_dir() and any(p.name.startswith(("step-", "corrupt-step-")) for p in ck.iterdir())


def _make_dirs(path: Path) -> Path | None:
    """``mkdir -p path``; returns the top-most directory created (None if it existed)."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--log.output_dir {path} is a file, not a directory; choose a directory path")
    if path.is_dir():
        return None
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise RunDirError(f"cannot create run directory {path}: {blocker} is a file, not a directory")
    try:
        path.mkdir(parents=True)
    except FileExistsError:  # created meanwhile by someone else: use it, do not remove it
        return None
    except OSError as e:
        full = disk_full(e, top.parent, path)
        if full:
            raise DiskFullError(full) from None
        raise RunDirError(f"cannot create run directory {path}: {e.strerror or e}; choose another --log.output_dir") from None
    return top


def _remove(top: Path | None) -> None:
    if top is not None:
        shutil.rmtree(top, ignore_errors=True)


# ----------------------------------------------------------------------- disk and modes ---


def device_of(path: Path) -> str:
    """``MOUNTPOINT`` of the file system holding ``path``, with its type when known."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    fstype = ""
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[1] == str(p):
                fstype = parts[2]
    except OSError:
        pass
    return f"{p} ({fstype})" if fstype else str(p)


def free_bytes(path: Path) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


#: a write that failed while less than this was free is taken for a full disk (torch.save and
#: safetensors report a short write as a RuntimeError, not as ENOSPC)
NEARLY_FULL = 1 << 20


def disk_full(exc: BaseException, where: Path, what: Path | str) -> str | None:
    """The one-line message for ``exc`` if it is a write that failed for lack of space."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full and isinstance(exc, (OSError, RuntimeError)):
        free = free_bytes(where)
        full = free is not None and free < NEARLY_FULL
    if not full:
        return None
    return f"no space left on {device_of(where)} while writing {what}"


def umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # (no /proc: read it by setting it, and put it back at once)
    os.umask(old)
    return old


def apply_umask(root: Path) -> None:
    """Give every file under ``root`` the mode a plain ``open()`` would (0666 minus the umask):
    safetensors writes its files mode 0600 whatever the umask."""
    mode = 0o666 & ~umask()
    root = Path(root)
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if p.is_file() and (p.stat().st_mode & 0o777) != mode:
            os.chmod(p, mode)
