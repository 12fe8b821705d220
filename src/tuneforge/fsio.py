"""Atomic writes: a file or folder either appears complete or not at all.

Everything tuneforge writes that a user would miss if half-written (checkpoints, converted models,
reports, data caches) goes through here: write into a temporary sibling, fsync, then `os.replace`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

TEMPORARY_PREFIX = ".tmp-"
"""What the temporary sibling of `NAME` is called: `.tmp-NAME-<random>`."""
SWAPPED_OUT_PREFIX = ".old-"
"""What an earlier `NAME` is called while `atomic_dir(NAME, replace=True)` swaps the new one in."""
BEING_DELETED_PREFIX = ".del-"
"""What a swapped-out `.old-NAME-...` is renamed to before it is deleted: `.del-NAME-...-<random>`. One that a process
killed while deleting it left, half-deleted, is never put back as `NAME`, only removed."""


def temporary_siblings(final: str | os.PathLike) -> list[Path]:
    """The temporary siblings `atomic_dir` and `atomic_file` make for `final`: those a write killed
    midway leaves behind (not those of another name that starts the same)."""
    final = Path(final)
    pattern = _temporary_name(final)
    return sorted(p for p in final.parent.glob(f"{TEMPORARY_PREFIX}*") if pattern.fullmatch(p.name))


def _held_temporary(make) -> tuple[Path, int]:
    """A temporary sibling made by `make()` and a descriptor of it that holds an exclusive flock on it while
    it is written: the lock tells a live writer's sibling from one a killed writer left (the kernel lets a
    lock go with its process, SIGKILL included). Made again where `_remove_stale_siblings` took it first,
    between its making and its locking. Where the file system takes no such lock (NFS takes one only on a
    descriptor open for writing, and answers ENOLCK without its lock manager) the sibling is written unlocked:
    `_remove_unheld` cannot lock it either, so it is left as a live writer's."""
    while True:
        tmp = Path(make())
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            return tmp, fd
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return tmp, fd
        os.close(fd)


_NO_FLOCK = (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
"""What a file system that takes no flock on a temporary sibling answers (NFS on a read-only descriptor, NFS
without its lock manager, one without locks)."""


def _remove_stale_siblings(final: Path) -> None:
    """Remove the temporary siblings of `final` that writers killed midway left (a model's or a data set's
    size each, out of sight), leaving those a live writer holds."""
    _remove_unheld(temporary_siblings(final))


def _remove_unheld(paths: list[Path]) -> None:
    for stale in paths:
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live writer's
        try:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
        finally:
            os.close(fd)


def _temporary_name(final: Path) -> re.Pattern:
    # tempfile's random part: eight of a-z, 0-9 and "_".
    return re.compile(re.escape(f"{TEMPORARY_PREFIX}{final.name}-") + r"[a-z0-9_]{8}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Some file systems refuse fsync on a folder; what matters most, the files' data, is synced on its own.
    with contextlib.suppress(OSError):
        _fsync(path)


def _finish_tree(folder: Path) -> None:
    """Before `folder` is published by a rename, give its files the mode the umask gives any new file (or
    program), and put them and its folders on disk. safetensors writes its files owner-only (0600): without
    the mode, a model saved by one account could not be served by another. Without the sync, a power loss
    after the rename could leave a complete-looking folder of empty or truncated files."""
    mask = _umask()
    for path in sorted(folder.rglob("*"), reverse=True):  # a folder's entries before the folder
        if path.is_symlink():
            continue
        if path.is_dir():
            _fsync_dir(path)
        elif path.is_file():
            executable = path.stat().st_mode & 0o100
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)
            _fsync(path)
    _fsync_dir(folder)


REFUSED_WRITE_ADVICE = {
    errno.ENOSPC: "The disk is full: free some space, or write somewhere else.",
    errno.EDQUOT: "The disk quota is used up: free some space, or write somewhere else.",
    errno.EFBIG: "A file grew past the size this process may write (ulimit -f) or the file system allows.",
}
"""What the machine answers a write it has no room for (a full disk, a used-up quota, a file size limit), and
what the user does about it."""
_REFUSED_WRITES = tuple(REFUSED_WRITE_ADVICE)


def refused_write(err: BaseException) -> bool:
    """Whether `err` is a write the machine refused (`REFUSED_WRITE_ADVICE`) naming its file: the server's state,
    told as such, not a defect."""
    return isinstance(err, OSError) and err.errno in REFUSED_WRITE_ADVICE and err.filename is not None


def refused_write_line(err: OSError) -> str:
    """A `refused_write` as one line for an operator's log: the path, what the machine said, and what to do."""
    return f"{os.fsdecode(err.filename)}: {err.strerror}. {REFUSED_WRITE_ADVICE[err.errno]}"


def _naming(error: BaseException, final: Path) -> OSError | None:
    """A write into `final`'s temporary sibling that the machine refused, as an OSError naming `final`: a
    file object's write reports a full disk without the file's name, and safetensors as a SafetensorError
    ending in the OS's `(os error N)`. Named, it is told as a path the user can look at, not as a traceback.
    One that names the temporary sibling (or a file in it) names `final` (or that file in it) instead: the
    sibling is gone when the error is told. None for any other error."""
    from safetensors import SafetensorError

    if isinstance(error, OSError) and error.filename2 is None:
        if error.filename is None:
            if error.errno in _REFUSED_WRITES:
                return OSError(error.errno, error.strerror, str(final))
            return None
        parts = Path(os.fsdecode(error.filename)).parts
        temporary = _temporary_name(final)
        for at, part in enumerate(parts):
            if temporary.fullmatch(part):
                return OSError(error.errno, error.strerror, str(final.joinpath(*parts[at + 1 :])))
    if isinstance(error, SafetensorError) and str(error).startswith("Error while serializing"):
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code:
            return OSError(int(code[1]), os.strerror(int(code[1])), str(final))
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Writes to `path` in place (an appended log, a lock): one the machine refuses (a full disk, a file size
    limit) is raised as an OSError naming `path`, as `atomic_dir` and `atomic_file` raise theirs."""
    try:
        yield
    except Exception as error:
        named = _naming(error, Path(path))
        if named is None:
            raise
        raise named from error


def _recover_swapped_out(final: Path) -> None:
    """A write killed between its two renames left the earlier `final` swapped out and none in its
    place: that folder is put back (a checkpoint would otherwise drop out of sight); beside a
    `final` that exists, it is a leftover, removed. What a deletion killed midway left is removed."""
    # `_swap_in` names it by its writer's process and thread, `PID.TID` (a lone PID: as earlier releases named it); a
    # hyphen would make another folder's (`NAME-1`, swapped out by PID) look like this one's.
    writer = re.escape(f"{final.name}-") + r"\d+(\.\d+)?"
    being_deleted = re.compile(re.escape(BEING_DELETED_PREFIX) + writer + r"-[0-9a-f]{8}")
    for left in final.parent.glob(f"{BEING_DELETED_PREFIX}*"):
        if being_deleted.fullmatch(left.name):
            shutil.rmtree(left, ignore_errors=True)
    pattern = re.compile(re.escape(SWAPPED_OUT_PREFIX) + writer)
    for old in final.parent.glob(f"{SWAPPED_OUT_PREFIX}*"):
        if not pattern.fullmatch(old.name):
            continue
        if final.exists():
            _delete_swapped_out(old)
            continue
        try:
            os.replace(old, final)
        except FileNotFoundError:  # another writer put it back, or removed it, first
            pass
        except OSError as error:  # another writer's folder went into `final` first: this one is a leftover
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            _delete_swapped_out(old)


def _delete_swapped_out(old: Path) -> None:
    """Delete the swapped-out folder `old`, renamed out of `_recover_swapped_out`'s sight first: a deletion killed
    midway leaves a `BEING_DELETED_PREFIX` folder, which the next write of the name removes, never a swapped-out one
    that would be put back as if whole."""
    doomed = old.with_name(f"{BEING_DELETED_PREFIX}{old.name.removeprefix(SWAPPED_OUT_PREFIX)}-{secrets.token_hex(4)}")
    try:
        os.rename(old, doomed)
    except FileNotFoundError:  # none swapped out, or another writer put it back or deletes it
        return
    shutil.rmtree(doomed, ignore_errors=True)


_SWAP_TRIES = 8


def _swap_in(tmp: Path, final: Path) -> None:
    """`tmp` renamed to `final`, the folder there swapped out first and then removed. Another writer of `final`
    at the same time may swap that folder out itself, or put it back (`_recover_swapped_out`) or its own in,
    between the two renames: the folder found in `final` then is swapped out too, so the last writer's is left,
    whole, and no swapped-out one beside it."""
    # Named by process and thread: two threads of one process writing `final` at once each swap out their own.
    old = final.with_name(f"{SWAPPED_OUT_PREFIX}{final.name}-{os.getpid()}.{threading.get_native_id()}")
    for tries_left in range(_SWAP_TRIES - 1, -1, -1):
        _delete_swapped_out(old)  # what a try before this one swapped out
        with contextlib.suppress(FileNotFoundError):  # another writer swapped it out first
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not tries_left:
                raise
            continue  # another writer's folder went in between the renames
        _delete_swapped_out(old)
        return


MOUNT_POINT_REFUSED = (
    "a mount point: a folder is written beside it and renamed to it whole, and a mounted folder cannot be renamed. "
    "Give a folder inside it"
)
"""Why `atomic_dir` refuses a mount point, and what to do; the commands that refuse one up front say it too."""


def is_mount_point(path: str | os.PathLike) -> bool:
    """Whether the folder `path` is a mount point (a container's volume), which `atomic_dir` cannot rename away: a
    bind mount of a folder on the file system it sits on too, which `os.path.ismount` (comparing devices) misses."""
    import psutil

    path = Path(path)
    if not path.is_dir():
        return False
    mounted = {part.mountpoint for part in psutil.disk_partitions(all=True)}
    return os.path.ismount(path) or str(path.resolve()) in mounted


def resolved(path: Path) -> Path:
    """`path` with its symbolic links followed (`Path.resolve`); where it, or a folder above it, is a link that leads
    back to itself, directly or through other links, the OSError ELOOP naming that link, where `Path.resolve` raises
    a bare RuntimeError (Python 3.11 and 3.12) or returns the link itself (3.13 on)."""
    if _loops(path):
        looping = next(part for part in (*reversed(path.parents), path) if _loops(part))
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(looping))
    return path.resolve()


def _loops(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def _followed(final: str | os.PathLike) -> Path:
    """Where a write of `final` goes: `final`, or where it points where it is a symbolic link (a rename over the
    link would replace it rather than write where it points). A link that loops, `final` or a folder above it, is
    refused naming it."""
    final = Path(final)
    target = resolved(final)
    return target if final.is_symlink() else final


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it is renamed to `final`.

    On any exception the temporary folder is removed, so an interrupted write never leaves a
    folder that looks complete. With `replace`, an existing `final` is swapped out. A `final` that is a
    symbolic link is written where it points (a folder on another disk), the link left as it is. A `final` that
    is a mount point, which no rename can replace, is refused before anything is written.
    """
    final = _followed(final)
    if is_mount_point(final):
        raise OSError(errno.EBUSY, MOUNT_POINT_REFUSED, str(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    _recover_swapped_out(final)
    _remove_stale_siblings(final)
    with writing(final):
        tmp, lock = _held_temporary(
            lambda: tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{final.name}-", dir=final.parent)
        )
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any folder
    try:
        yield tmp
        _finish_tree(tmp)
        if replace:
            _swap_in(tmp, final)
        elif final.exists():
            raise FileExistsError(errno.EEXIST, "created while this folder was being written", str(final))
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        named = _naming(error, final)
        if named is not None:
            raise named from error
        raise
    finally:
        os.close(lock)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w", *, durable: bool = True) -> Iterator:
    """Open a temporary file beside `final` for writing; rename it over `final` on success. `durable`: synced to
    disk before and after the rename, so it survives the machine's crash too; without, a killed process still
    leaves the old file or the new one whole (what a file rewritten every training step needs). A `final` that is a
    symbolic link is written where it points, the link left as it is."""
    final = _followed(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(final)

    def make() -> str:
        made, path = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{final.name}-", dir=final.parent)
        os.close(made)
        return path

    with writing(final):
        tmp, fd = _held_temporary(make)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(
            os.open(tmp, os.O_WRONLY | os.O_TRUNC), mode, **({} if "b" in mode else {"encoding": "utf-8"})
        ) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if durable:
            _fsync_dir(final.parent)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        named = _naming(error, final)
        if named is not None:
            raise named from error
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A temporary folder `prefix`-something in `parent`, removed at the end. Those a killed process left
    there (a download's size) are removed first; a live one, which holds a flock on its own, is left."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}")
    _remove_unheld(sorted(p for p in parent.glob(f"{prefix}*") if pattern.fullmatch(p.name)))
    folder, lock = _held_temporary(lambda: tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)


def write_json(path: str | os.PathLike, obj, *, indent: int = 2, durable: bool = True) -> None:
    with atomic_file(path, durable=durable) as f:
        json.dump(obj, f, indent=indent, default=str)
        f.write("\n")


def complete_lines(path: str | os.PathLike) -> list[bytes]:
    """The lines of a file that a run appends to, each without its newline; a last line still being written (no
    newline yet) is left out, and a file that cannot be read has none."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    return data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]


def tuneforge_home() -> Path:
    """Cache root: `$TUNEFORGE_HOME`, default `~/.cache/tuneforge`."""
    return Path(os.environ.get("TUNEFORGE_HOME") or Path.home() / ".cache" / "tuneforge")
