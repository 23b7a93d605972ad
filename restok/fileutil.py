"""Atomic file and folder writes (no torch): write under a temporary name, swap in when complete.

A folder output (an export, a checkpoint, a run's images) is built in a hidden staging folder next to it
(``.NAME.partial-PID-XXXX``) and swapped in with one atomic ``renameat2(RENAME_EXCHANGE)``: after a crash
at any instant the path holds either the old folder or the new one. Whatever the old folder held that
restok did not write (engines built later, Polygraphy files, a user's notes) is carried into the new one;
staging folders left by a killed process (its PID is gone) are cleaned on the next write to that path.

An output path that is a symbolic link means its target: files and folders are written into what the link
names and the link stays as it was. Cleaning up never follows a link.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

PARTIAL_MARK = ".restok-partial"  # inside a staging folder until it is swapped in


class Discard(Exception):
    """Raised inside ``staged``: drop the staging folder and leave ``final`` as it was (no error)."""

__all__ = ["Discard", "atomic_path", "atomic_write_bytes", "check_writable", "locked", "real_target", "staged"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed. A
    ``path`` that is a link is written where the link points (the link stays)."""
    path = real_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def real_target(path: str | os.PathLike) -> Path:
    """Where a write to ``path`` lands: every symbolic link in it resolved (a link to a folder means the folder;
    a link that points nowhere yet means the path it names)."""
    return Path(os.path.realpath(os.fspath(path)))


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder``'s parent if needed and check that files can be created there, before any work."""
    folder = Path(folder)
    if str(folder) in ("", "."):
        raise ValueError("the output path is empty; give a folder name")
    parent = folder.parent if not folder.is_dir() else folder
    parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(prefix=".restok-write-test-", dir=parent)
    except OSError as e:  # name the folder, not the probe
        raise OSError(e.errno, f"cannot create files there ({(e.strerror or '').lower()}); choose a writable folder", str(parent)) from None
    os.close(fd)
    os.unlink(probe)
    return folder


def cache_root() -> Path:
    """The user's restok cache: $RESTOK_CACHE, else ~/.cache/restok (exports of the model options, verified
    file hashes, --backend auto's measurements, locks)."""
    return Path(os.environ.get("RESTOK_CACHE") or Path.home() / ".cache" / "restok")


def _lock_file(path: Path) -> Path:
    """The lock of ``path``: a file in the user's restok cache named after the path's hash, so no lock file
    litters the user's folders (and none is ever deleted: unlinking a lock file races with its waiters)."""
    import hashlib

    root = cache_root() / "locks"
    root.mkdir(parents=True, exist_ok=True)
    return root / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".lock")


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (other restok processes wait), held in the user's cache. Not
    reentrant: a process that holds it and asks again waits forever."""
    path = Path(path)
    with open(_lock_file(path), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ folder swaps


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _carry_over(old: Path, new: Path, owned: set[str], link: bool = False) -> None:
    """Give ``new`` every file of ``old`` that restok did not write (not in ``owned``), at the same place:
    hard links (a copy where the filesystem has none) when ``link``, else moved. A name the new folder
    already uses keeps the user's file beside it as NAME.kept; a file already there (same inode) is left."""
    for rel in _files(old):
        if rel in owned or rel == PARTIAL_MARK:
            continue
        src, dst = old / rel, new / rel
        if dst.exists() and os.path.samefile(src, dst):
            continue
        if dst.exists() or dst.is_symlink():
            dst = dst.with_name(dst.name + ".kept")
            print(f"restok: kept your {rel} as {dst} (the new output writes that name)", file=sys.stderr)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not link:
            os.replace(src, dst)
        elif src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def _clean_stale(final: Path, owned: Callable[[Path], Iterable[str]]) -> None:
    """Staging folders of dead processes: unfinished ones are deleted; an old folder that a crash left at
    a staging name after the swap gives its user files to ``final`` first; with the two-rename fallback, a
    crash between the renames left the old folder as .NAME.old-PID: it is put back."""
    parent = final.parent
    if not parent.is_dir():
        return
    for p in parent.glob(f".{final.name}.partial-*"):
        try:
            pid = int(p.name.rsplit(".partial-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if _pid_alive(pid) and pid != os.getpid():
            continue
        if p.is_symlink():  # never ours to follow: remove the link itself, never what it points to
            p.unlink()
            continue
        if p.is_dir() and not (p / PARTIAL_MARK).exists() and final.is_dir():
            _carry_over(p, final, set(owned(p)))
        shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".{final.name}.old-*"):
        try:
            pid = int(p.name.rsplit(".old-", 1)[1])
        except ValueError:
            continue
        if _pid_alive(pid) and pid != os.getpid() or p.is_symlink():
            continue
        if not final.exists():
            os.replace(p, final)


def _no_files(_: Path) -> list[str]:
    return []


@contextlib.contextmanager
def staged(final: str | os.PathLike, owned: Callable[[Path], Iterable[str]] = _no_files) -> Iterator[Path]:
    """Build a folder in a staging folder, then swap it in for ``final`` atomically.

    ``owned(folder)`` lists the files (relative paths) that restok wrote in an existing output folder;
    everything else in the old ``final`` is carried into the new one. On an exception nothing changes at
    ``final`` and the staging folder is removed. A ``final`` that is a link is built where the link points."""
    final = real_target(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a folder; choose another output path")
    with locked(final):
        _clean_stale(final, owned)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    os.chmod(stage, 0o777 & ~_umask())
    (stage / PARTIAL_MARK).touch()
    try:
        try:
            yield stage
        except Discard:
            return
        with locked(final):
            _swap_in(stage, final, owned)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _swap_in(stage: Path, final: Path, owned: Callable[[Path], Iterable[str]]) -> None:
    """The user's files of the old folder are linked into the new one first, so that whatever instant a
    crash hits, the folder at ``final`` (old or new) has them."""
    if not final.exists():
        (stage / PARTIAL_MARK).unlink()
        os.rename(stage, final)
        return
    _carry_over(final, stage, set(owned(final)), link=True)
    if _exchange(stage, final):
        old = stage  # the old folder now lives at the staging name
    else:  # two renames; a crash between them is repaired by _clean_stale
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(stage, final)
    (final / PARTIAL_MARK).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)
