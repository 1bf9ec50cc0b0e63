"""Running a study's independent jobs N at a time, each in a process of its own.

``afmp ablate --jobs N``, ``afmp reproduce --jobs N`` and ``afmp tune --jobs N`` share
this: the jobs run in N worker processes, each job with ``threads_per_job(N)`` torch
threads, so that N jobs fill the cores without fighting over them.

Processes, not threads: a training step holds the GIL between its kernels, and one
process's torch thread pool is shared by whatever runs in it. The workers are never forked
from the caller: forking a process whose OpenMP thread pool has run may leave the child
waiting on a lock its parent held, and the caller has usually trained or measured something
before. They come from a fork server (a fresh process that imports the job's module once
and has run nothing, so forking it is safe): importing afmp takes seconds, and N spawned
workers would each pay it. Where there is no fork server (Windows), they are spawned.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any


def add_jobs_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help=f"{what} N at a time, each in its own process with cores / N torch threads (default 1)",
    )


def check_jobs(jobs) -> int:
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
    return jobs


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """torch threads for each of ``jobs`` jobs at once: the cores shared out, at least one."""
    cores = cores if cores is not None else os.cpu_count() or 1
    return max(1, cores // jobs)


def worker_context(module: str):
    """The fork server's context, the server importing ``module`` before its first fork (a
    server already running keeps what it imported: a job's module it lacks is imported
    in each worker); spawning where there is no fork server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([module])
    return context


def run_in_processes(fn: Callable[..., Any], calls: Sequence[tuple], jobs: int) -> list:
    """``[fn(*args) for args in calls]``, at most ``jobs`` at once in spawned worker processes,
    the results in the order of ``calls``. ``fn`` and its arguments must pickle (``fn`` a
    module-level function). The first job to raise stops the others that have not started,
    and its exception is raised here once the running ones have finished."""
    if not calls:
        return []
    context = worker_context(fn.__module__)
    with ProcessPoolExecutor(max_workers=min(jobs, len(calls)), mp_context=context) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            for future in futures:
                future.cancel()
            raise failed.exception()
        return [f.result() for f in futures]
