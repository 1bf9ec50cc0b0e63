"""Test set-up shared by every test file.

Triton kernels are checked on the CPU through Triton's interpreter, which must be
switched on before any kernel is defined, so before afmp is imported. On a machine
with a GPU the kernels compile for real instead.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a shared CPU, OpenMP's spinning threads make
    small steps 10x slower (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fast_calibration(tmp_path, monkeypatch):
    """A private roofline cache and a calibration that takes milliseconds (the bench tests')."""
    from afmp.measure import roofline

    monkeypatch.setenv("AFMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(roofline, "MATMUL_SIZES", {"cpu": (64,), "cuda": (256,)})
    monkeypatch.setattr(roofline, "COPY_BYTES", {"cpu": 2**16, "cuda": 2**20})
    monkeypatch.setattr(roofline, "REPEATS", 2)


def _hold_run_lock(out, ready) -> None:
    import time

    from afmp.training.rundir import RunLock

    with RunLock(out, notify=lambda message: None):
        ready.set()
        time.sleep(300)  # until the test kills it


@pytest.fixture
def lock_holder():
    """``hold(out)`` starts a process that takes ``out``'s run-directory lock and keeps it
    until killed (or the test ends); returns the process once it holds the lock."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    started = []

    def hold(out):
        ready = fork.Event()
        process = fork.Process(target=_hold_run_lock, args=(out, ready), daemon=True)
        process.start()
        started.append(process)
        assert ready.wait(60), "the holder never took the lock"
        return process

    yield hold
    for process in started:
        process.kill()
        process.join()
