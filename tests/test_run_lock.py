"""One writer per run directory (afmp.training.rundir.RunLock), between real processes.

The lock is the kernel's (flock): it is held by one process, and released when that
process dies, whatever the file says. The file names the holder for the refusal message.
"""

import json
import multiprocessing
import os
import pathlib
import socket
import time

import pytest

from afmp.training.rundir import RunLock
from afmp.utils.errors import UsageError

FORK = multiprocessing.get_context("fork")
HOST = socket.gethostname()
READ_TEXT = pathlib.Path.read_text


def _dead_pid() -> int:
    process = FORK.Process(target=int)
    process.start()
    process.join()
    return process.pid


def _try_to_take(out, index, barrier, release, outcomes) -> None:
    # What a file holds reaches each process a little later than the last, as on a busy
    # machine: between finding a stale lock and acting on it, another writer can act.
    def slow_read_text(path, *args, **kwargs):
        text = READ_TEXT(path, *args, **kwargs)
        time.sleep(0.02 * index)
        return text

    pathlib.Path.read_text = slow_read_text  # in this child process only
    barrier.wait()  # every process starts to take the lock at the same moment
    try:
        with RunLock(out, notify=lambda message: None):
            outcomes.put(("took", os.getpid()))
            release.wait(60)  # held until every other process has tried
    except UsageError as err:
        outcomes.put(("refused", str(err)))


def test_many_writers_started_at_once_on_a_stale_lock_exactly_one_proceeds(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": HOST}))
    n = 12
    barrier, release, outcomes = FORK.Barrier(n), FORK.Event(), FORK.Queue()
    processes = [
        FORK.Process(target=_try_to_take, args=(out, i, barrier, release, outcomes)) for i in range(n)
    ]
    for process in processes:
        process.start()
    try:
        results = [outcomes.get(timeout=60) for _ in range(n)]
    finally:
        release.set()
        for process in processes:
            process.join(60)
    took = [pid for kind, pid in results if kind == "took"]
    assert len(took) == 1, results
    assert all("is being written by" in message for kind, message in results if kind == "refused")
    assert all(process.exitcode == 0 for process in processes)
    assert not (out / ".lock").exists()  # the one writer removed it as it left


def test_a_live_writer_is_named_and_a_killed_ones_lock_is_reclaimed(tmp_path, lock_holder):
    out = tmp_path / "run"
    holder = lock_holder(out)
    assert json.loads((out / ".lock").read_text()) == {"pid": holder.pid, "host": HOST}
    with pytest.raises(UsageError, match=f"is being written by pid {holder.pid} on {HOST} "):
        with RunLock(out):
            pass
    holder.kill()  # no chance to clean up: the file stays, the kernel releases the lock
    holder.join()
    assert (out / ".lock").exists()
    notes = []
    with RunLock(out, notify=notes.append):
        assert json.loads((out / ".lock").read_text()) == {"pid": os.getpid(), "host": HOST}
    assert notes == [f"reclaimed {out / '.lock'}: its process (pid {holder.pid}) is gone"]
    assert not (out / ".lock").exists()


def test_a_lock_file_whose_pid_was_reused_is_no_obstacle(tmp_path):
    """The pid a dead writer left may belong to another live process by now: the file alone
    does not hold the lock."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": HOST}))  # alive, holds nothing
    with RunLock(out, notify=lambda message: None):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()


def test_a_lock_left_from_another_host_is_refused_and_kept(tmp_path):
    """flock may not reach across hosts on a network file system: that host's lock stays."""
    out = tmp_path / "run"
    out.mkdir()
    text = json.dumps({"pid": 4242, "host": "another-host"})
    (out / ".lock").write_text(text)
    with pytest.raises(UsageError, match="is being written by pid 4242 on another-host"):
        with RunLock(out):
            pass
    assert (out / ".lock").read_text() == text


def test_the_same_process_cannot_take_a_directory_twice(tmp_path):
    with RunLock(tmp_path, notify=lambda message: None):
        with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
            with RunLock(tmp_path):
                pass
