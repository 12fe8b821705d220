"""Atomic folder writes: what a write killed midway leaves is recovered or cleared, never mistaken."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuneforge.fsio import atomic_dir, atomic_file, temporary_siblings, writing


def test_a_folder_swapped_out_by_a_killed_replace_is_put_back(tmp_path):
    # Killed between its two renames: the earlier step-4 is swapped out, the new one not yet in place.
    swapped = tmp_path / ".old-step-4-12345"
    swapped.mkdir()
    (swapped / "weights").write_text("earlier")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "step-4", replace=True) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed again")
    assert (tmp_path / "step-4" / "weights").read_text() == "earlier"
    assert sorted(os.listdir(tmp_path)) == ["step-4"]


# A replace killed midway through deleting the earlier folder it swapped out: one of its files is gone, one left.
_KILLED_DELETER = """
import os, shutil, signal, sys
from pathlib import Path
from tuneforge.fsio import atomic_dir
final = Path(sys.argv[1]) / "step-4"
with atomic_dir(final) as tmp:
    (tmp / "config.json").write_text("earlier")
    (tmp / "model.safetensors").write_text("earlier")
def killed_midway(path, *args, **kwargs):
    if (Path(path) / "model.safetensors").exists():
        os.unlink(Path(path) / "model.safetensors")
        os.kill(os.getpid(), signal.SIGKILL)
shutil.rmtree = killed_midway
with atomic_dir(final, replace=True) as tmp:
    (tmp / "config.json").write_text("new")
"""


def test_a_folder_whose_deletion_was_killed_midway_is_never_put_back(tmp_path):
    # Killed while deleting the earlier step-4 it swapped out, then step-4 removed: the half-deleted one is not put
    # back as if whole, and the next write of the name removes it.
    subprocess.run([sys.executable, "-c", _KILLED_DELETER, str(tmp_path)], check=False)
    assert len(os.listdir(tmp_path)) == 2
    shutil.rmtree(tmp_path / "step-4")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "step-4", replace=True):
        raise RuntimeError("stopped")
    assert os.listdir(tmp_path) == []


def test_a_folder_given_as_a_symbolic_link_is_written_where_the_link_points(tmp_path):
    (tmp_path / "disk" / "exports").mkdir(parents=True)
    (tmp_path / "disk" / "exports" / "old.txt").write_text("earlier")
    (tmp_path / "exports").symlink_to(tmp_path / "disk" / "exports")
    with atomic_dir(tmp_path / "exports", replace=True) as tmp:
        (tmp / "new.txt").write_text("written")
    assert (tmp_path / "exports").is_symlink()
    assert [p.name for p in (tmp_path / "disk" / "exports").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "exports"]  # no link left renamed away


def test_a_file_given_as_a_symbolic_link_is_written_where_the_link_points(tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "report.json").write_text("earlier")
    (tmp_path / "report.json").symlink_to(tmp_path / "disk" / "report.json")
    with atomic_file(tmp_path / "report.json") as f:
        f.write("written")
    assert (tmp_path / "report.json").is_symlink()
    assert (tmp_path / "disk" / "report.json").read_text() == "written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "report.json"]


def test_a_folder_given_as_a_symbolic_link_that_loops_is_refused_naming_it(tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(OSError) as refused, atomic_dir(tmp_path / "loop"):
        pass
    assert (refused.value.errno, refused.value.filename) == (errno.ELOOP, str(tmp_path / "loop"))
    assert [p.name for p in tmp_path.iterdir()] == ["loop"]


@pytest.mark.parametrize("write", [atomic_dir, atomic_file])
def test_a_folder_above_that_loops_is_refused_naming_it(tmp_path, write):
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(OSError) as refused, write(tmp_path / "loop" / "out" / "report"):
        pass
    assert (refused.value.errno, refused.value.filename) == (errno.ELOOP, str(tmp_path / "loop"))
    assert [p.name for p in tmp_path.iterdir()] == ["loop"]


def test_a_mount_point_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    # `data prepare --out /out`, a container's volume bound from elsewhere on the same file system.
    import psutil

    volume = tmp_path / "volume"
    volume.mkdir()
    partitions = psutil.disk_partitions(all=True)
    bound = SimpleNamespace(device="/srv/data", mountpoint=str(volume), fstype="none", opts="rw,bind")
    monkeypatch.setattr(psutil, "disk_partitions", lambda all=False: [*partitions, bound])
    with pytest.raises(OSError) as refused, atomic_dir(volume, replace=True) as tmp:
        (tmp / "train.jsonl").write_text("written")
    assert (refused.value.errno, refused.value.filename) == (errno.EBUSY, str(volume))
    assert refused.value.strerror.startswith("a mount point") and "Give a folder inside it" in refused.value.strerror
    assert [p.name for p in tmp_path.iterdir()] == ["volume"] and list(volume.iterdir()) == []


def test_a_swapped_out_leftover_beside_its_folder_is_removed(tmp_path):
    (tmp_path / "step-4").mkdir()
    (tmp_path / ".old-step-4-12345").mkdir()
    (tmp_path / ".old-step-40-12345").mkdir()  # another folder's
    with atomic_dir(tmp_path / "step-4", replace=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (tmp_path / "step-4" / "weights").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == [".old-step-40-12345", "step-4"]


def test_two_writers_replacing_one_folder_at_once_leave_the_last_ones_folder_whole(tmp_path, monkeypatch):
    """Two runs' reports (or data caches) written to one folder at once: another writer puts the earlier folder back
    and its own in while this one is between its two renames. This one still swaps its folder in, whole, and
    leaves nothing beside it."""
    final = tmp_path / "eval"
    with atomic_dir(final) as tmp:
        (tmp / "report.html").write_text("earlier")
    rename = os.replace
    interleaved = []

    def replace(source, target):
        rename(source, target)
        if not interleaved and os.path.basename(target).startswith(".old-"):  # this writer's first rename
            interleaved.append(target)
            with atomic_dir(final, replace=True) as other:
                (other / "report.html").write_text("other")

    monkeypatch.setattr(os, "replace", replace)
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "report.html").write_text("last")
    assert interleaved and (final / "report.html").read_text() == "last"
    assert sorted(os.listdir(tmp_path)) == ["eval"]


def test_two_threads_replacing_one_folder_at_once_each_swap_out_their_own(tmp_path, monkeypatch):
    """Two threads of one process (one pid) write one folder at once: the other thread has swapped its folder in
    and not yet removed the earlier one it swapped out when this one swaps the other's out. Each swaps out into a
    name of its own, so this one's folder goes in, whole, and nothing is left beside it."""
    final = tmp_path / "eval"
    with atomic_dir(final) as tmp:
        (tmp / "report.html").write_text("earlier")
    rename = os.replace
    swapped_in, done = threading.Event(), threading.Event()

    def write_other():
        with atomic_dir(final, replace=True) as other:
            (other / "report.html").write_text("other")

    other = threading.Thread(target=write_other)

    def replace(source, target):
        main = threading.current_thread() is threading.main_thread()
        if main and Path(source) == final and not other.is_alive() and not swapped_in.is_set():
            other.start()
            assert swapped_in.wait(10)
        rename(source, target)
        if not main and Path(target) == final:  # the other's folder is in, the earlier one swapped out beside it
            swapped_in.set()
            done.wait(10)

    monkeypatch.setattr(os, "replace", replace)
    try:
        with atomic_dir(final, replace=True) as tmp:
            (tmp / "report.html").write_text("last")
    finally:
        done.set()
        other.join()
    assert (final / "report.html").read_text() == "last"
    assert sorted(os.listdir(tmp_path)) == ["eval"]


def test_a_swapped_out_folder_whose_place_another_writer_filled_first_is_removed_as_a_leftover(tmp_path, monkeypatch):
    """A killed write's swapped-out folder is being put back just as another writer puts its own folder in: the
    swapped-out one is a leftover beside it, removed, and this write goes on."""
    final, swapped = tmp_path / "eval", tmp_path / ".old-eval-12345"
    swapped.mkdir()
    (swapped / "report.html").write_text("earlier")
    rename = os.replace

    def replace(source, target):
        if source == swapped:  # the other writer's folder goes in first
            final.mkdir()
            (final / "report.html").write_text("other")
        rename(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "report.html").write_text("last")
    assert (final / "report.html").read_text() == "last"
    assert sorted(os.listdir(tmp_path)) == ["eval"]


def test_temporary_siblings_are_those_of_the_name_alone(tmp_path):
    for name in (".tmp-out-abcd_123", ".tmp-out-v2-abcd_123", ".tmp-output-abcd_123", ".tmp-out-abc"):
        (tmp_path / name).mkdir()
    assert temporary_siblings(tmp_path / "out") == [tmp_path / ".tmp-out-abcd_123"]


def test_files_written_owner_only_end_with_the_umasks_mode(tmp_path):
    """safetensors writes 0600; a finished folder's files have the mode any new file gets, exec bits kept."""
    import safetensors.torch
    import torch

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            safetensors.torch.save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o700)
    finally:
        os.umask(mask)
    assert oct((tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "model" / "run.sh").stat().st_mode & 0o777) == oct(0o755)


def test_every_file_is_on_disk_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    # A power loss cannot be simulated: what is checked is that each file was fsynced while it was still
    # in the temporary folder, and the folder that holds the renamed entry after the rename.
    synced = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with atomic_dir(tmp_path / "final") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"\0" * 1024)
        (tmp / "config.json").write_text("{}")
    for name in ("sub/weights.bin", "config.json", "sub"):
        assert str(tmp / name) in synced, name
    assert synced[-1] == str(tmp_path)
    synced.clear()
    with atomic_file(tmp_path / "report.json") as f:
        f.write("{}")
    assert synced[-1] == str(tmp_path) and len(synced) == 2


_KILLED_WRITER = """
import os, sys, time
from pathlib import Path
from tuneforge.fsio import atomic_dir, atomic_file
out = Path(sys.argv[1])
with atomic_dir(out / "prepared") as tmp, atomic_file(out / "summary.json") as f:
    (tmp / "train.jsonl").write_text("half")
    f.write("{")
    (out / "writing").touch()
    time.sleep(600)
"""


def test_what_a_killed_writer_left_is_removed_by_the_next_write_of_the_same_name(tmp_path):
    # `data prepare --out`, `distill init`, a report: a process killed mid-write leaves its temporary sibling,
    # out of sight; the next write of that name removes it, and never a live writer's.
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)])
    try:
        while not (tmp_path / "writing").exists():
            assert writer.poll() is None, "the writer stopped before it wrote"
            os.sched_yield()
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait()
    assert len(temporary_siblings(tmp_path / "prepared")) == len(temporary_siblings(tmp_path / "summary.json")) == 1
    with atomic_dir(tmp_path / "prepared") as first:
        with pytest.raises(RuntimeError), atomic_dir(tmp_path / "prepared") as second:
            assert temporary_siblings(tmp_path / "prepared") == sorted([first, second])  # both live
            raise RuntimeError
        (first / "train.jsonl").write_text("whole")
    with atomic_file(tmp_path / "summary.json") as f:
        f.write("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "summary.json", "writing"]
    assert (tmp_path / "prepared" / "train.jsonl").read_text() == "whole"


# A pull's scratch folder as `models.convert._scratch_dir` makes it (without importing the models stage).
_KILLED_DOWNLOAD = """
import sys, time
from tuneforge.fsio import scratch_dir
with scratch_dir(sys.argv[1], ".download-") as scratch:
    (scratch / "model.gguf").write_text("part")
    time.sleep(600)
"""


def test_a_scratch_folder_a_killed_pull_left_is_removed_by_the_next(tmp_path, monkeypatch):
    # `models pull` killed midway: its partial download goes with the next pull, never a live one's.
    from tuneforge.models.convert import _scratch_dir

    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path))
    cache = tmp_path / "models"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_DOWNLOAD, str(cache)])
    try:
        while not list(cache.glob(".download-*/model.gguf")):
            assert writer.poll() is None, "the pull stopped before it wrote"
            os.sched_yield()
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait()
    [left] = cache.glob(".download-*")
    with _scratch_dir() as first, _scratch_dir() as second:
        assert not left.exists() and sorted(cache.iterdir()) == sorted([first, second])
    assert list(cache.iterdir()) == []


def _python_write(path):
    with open(path, "w", encoding="utf-8") as f:
        f.write("x" * 65536)


def _safetensors_write(path):
    import safetensors.torch
    import torch

    safetensors.torch.save_file({"w": torch.zeros(16384)}, path)


@pytest.mark.parametrize("write", [_python_write, _safetensors_write])
def test_a_write_the_disk_refuses_names_the_folder_and_keeps_the_earlier_one(tmp_path, write, file_size_limit):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "rows").write_text("earlier")
    with file_size_limit(4096), pytest.raises(OSError) as refused, atomic_dir(tmp_path / "out", replace=True) as tmp:
        write(tmp / "rows")
    assert (refused.value.errno, refused.value.filename) == (errno.EFBIG, str(tmp_path / "out"))
    assert (tmp_path / "out" / "rows").read_text() == "earlier"
    assert os.listdir(tmp_path) == ["out"]


def test_a_file_the_disk_refuses_is_named_and_the_earlier_one_kept(tmp_path, file_size_limit):
    (tmp_path / "report.json").write_text("earlier")
    with file_size_limit(4096), pytest.raises(OSError) as refused, atomic_file(tmp_path / "report.json") as f:
        f.write("x" * 65536)
    assert (refused.value.errno, refused.value.filename) == (errno.EFBIG, str(tmp_path / "report.json"))
    assert (tmp_path / "report.json").read_text() == "earlier"
    assert os.listdir(tmp_path) == ["report.json"]


def test_an_append_the_disk_refuses_names_the_file(tmp_path, file_size_limit):
    log = tmp_path / "metrics.jsonl"
    log.write_text("x" * 4096)
    with file_size_limit(4096), pytest.raises(OSError) as refused, writing(log), log.open("a") as f:
        f.write("more\n")
    assert (refused.value.errno, refused.value.filename) == (errno.EFBIG, str(log))


def test_an_error_in_the_temporary_folder_names_the_path_the_user_gave(tmp_path):
    """The temporary sibling is gone when the error is told: the message names the final path."""
    with pytest.raises(FileNotFoundError) as refused, atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub" / "rows").write_text("x")
    assert refused.value.filename == str(tmp_path / "out" / "sub" / "rows")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_folder_is_named_not_the_temporary_sibling(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    for atomic in (atomic_dir, atomic_file):
        with pytest.raises(PermissionError) as refused, atomic(tmp_path / "ro" / "out"):
            pass
        assert refused.value.filename == str(tmp_path / "ro" / "out")


def test_writes_go_on_where_the_file_system_takes_no_flock(tmp_path, monkeypatch):
    # NFS takes an exclusive flock only on a descriptor open for writing (EBADF on a read-only one or a folder),
    # and one without its lock manager answers ENOLCK: the writes go on, and a sibling that cannot be told
    # from a live writer's is left.
    import fcntl
    import types

    from tuneforge import fsio

    def flock(fd, operation):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(fsio, "fcntl", types.SimpleNamespace(**{**vars(fcntl), "flock": flock}))
    left = tmp_path / f"{fsio.TEMPORARY_PREFIX}summary.json-abcd1234"
    left.write_text("a killed writer's")
    with atomic_file(tmp_path / "summary.json") as f:
        f.write("{}")
    with atomic_dir(tmp_path / "prepared") as folder:
        (folder / "train.jsonl").write_text("whole")
    with fsio.scratch_dir(tmp_path / "cache", ".download-") as scratch:
        assert scratch.is_dir()
    assert (tmp_path / "summary.json").read_text() == "{}" and left.exists()
    assert (tmp_path / "prepared" / "train.jsonl").read_text() == "whole"
    assert list((tmp_path / "cache").iterdir()) == []
