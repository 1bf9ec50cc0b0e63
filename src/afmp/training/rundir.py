"""A run directory as a unit: one writer at a time, and checkpoints committed whole.

- ``RunLock(out)``: the writer holds an OS lock (``flock``) on ``out/.lock``, a file
  that names its pid and host. A second writer is refused with a message naming the
  holder; a lock whose process is gone (the kernel released it) is reclaimed, and the
  user is told.
- ``commit_checkpoint(out, epoch, fill)``: every file of an epoch's checkpoint is
  written into a hidden folder, fsynced, listed with its SHA-256 in ``manifest.json``
  (written last), and the folder is renamed to ``out/checkpoints/epoch-NNNN`` in one
  step. A crash leaves either the previous epoch's folder or the new one, never a mix.
- ``latest_checkpoint(out)``: the newest folder whose manifest verifies.
- ``clean_temporaries(out)``: what a killed write left (``.NAME.tmpPID`` files and
  folders), removed once the lock is held.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from afmp.utils.errors import UsageError
from afmp.utils.files import fsync_path, sha256_file

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


def clean_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the ``.NAME.tmpPID`` files and folders a killed write left in ``directory``
    (and in its checkpoints folder). Call it only while holding the directory's lock."""
    removed = []
    directory = Path(directory)
    for folder in (directory, directory / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


# -- one writer -----------------------------------------------------------------------------
class RunLock:
    """``with RunLock(out):`` while writing ``out``; see the module's docstring.

    The lock is ``flock`` on ``out/.lock``: the kernel gives it to one process at a time and
    takes it back when that process dies, so a stale lock needs no test of whether its pid
    is alive, and two writers that both find one cannot both take it. The file's JSON (pid,
    host) is what the refusal message says, and keeps a lock left from another host.
    """

    def __init__(self, directory: str | os.PathLike, notify: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.path = self.directory / ".lock"
        self.notify = notify
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = self._lock_the_file()
        left = self._holder()
        if left is not None and left.get("host") != self.me["host"]:
            # flock may not reach across hosts (some network file systems keep it local),
            # so a lock left from another host is that host's to release, as before.
            os.close(fd)
            raise self._refusal(left)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.me).encode(), 0)
        if left is not None:
            self.notify(f"reclaimed {self.path}: its process (pid {left.get('pid')}) is gone")
        self.fd = fd
        return self

    def _lock_the_file(self) -> int:
        """A descriptor of ``.lock`` that holds its flock, or the UsageError naming the holder."""
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refusal(self._holder()) from None
            # The writer before us removes the file as it leaves: if that happened between
            # our open and our flock, we hold a file no one else will open. Open it again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _refusal(self, holder: dict | None) -> UsageError:
        who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
        return UsageError(
            f"{self.directory} is being written by {who} (lock file {self.path}); "
            "wait for it to finish, use another --out, or delete the lock file if that "
            "process is gone"
        )

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def __exit__(self, *exc) -> None:
        # Removed while still held, so a writer waiting on this file sees it gone (above).
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


# -- checkpoints ----------------------------------------------------------------------------
def commit_checkpoint(directory: str | os.PathLike, epoch: int, fill: Callable[[Path], None]) -> Path:
    """Epoch ``epoch``'s checkpoint: ``fill(folder)`` writes its files into a hidden folder,
    which is then committed whole (see the module's docstring). Returns the committed folder."""
    root = Path(directory) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:04d}"
    tmp = root / f".epoch-{epoch:04d}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    fill(tmp)
    files = {}
    for path in sorted(tmp.iterdir()):
        fsync_path(path)
        files[path.name] = sha256_file(path)
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"epoch": epoch, "files": files}, indent=2) + "\n")
    fsync_path(manifest)
    fsync_path(tmp)
    if final.exists():  # the same epoch again (a resumed run redoing it): the new one wins
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    for older in root.glob("epoch-*"):
        if older != final:
            shutil.rmtree(older)
    return final


def verify_checkpoint(folder: Path) -> dict:
    """The manifest of a committed checkpoint folder, once every file matches its checksum."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        epoch = manifest["epoch"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{folder / MANIFEST} is missing or malformed ({err})") from err
    if not isinstance(files, dict) or not isinstance(epoch, int):
        raise UsageError(f"{folder / MANIFEST} is malformed: expected an epoch and a file list")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise UsageError(f"{path} is missing (listed in {folder / MANIFEST})")
        if sha256_file(path) != digest:
            raise UsageError(
                f"{path} does not match its checksum in {folder / MANIFEST}: the file is corrupted"
            )
    return manifest


def latest_checkpoint(directory: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """(newest checkpoint folder that verifies or None, why each newer one was skipped)."""
    skipped = []
    for folder in sorted((Path(directory) / CHECKPOINTS).glob("epoch-*"), reverse=True):
        try:
            verify_checkpoint(folder)
        except UsageError as err:
            skipped.append(str(err))
            continue
        return folder, skipped
    return None, skipped


def run_labels(runs) -> list[str]:
    """A label per training run directory that tells them apart in a table: model, data set
    and seed from its results.json (``afmp_tiny-digits-seed0``); the directory is added
    where two runs would still read the same."""
    labels = []
    for run in map(Path, runs):
        try:
            results = json.loads((run / "results.json").read_text())
            cfg = results.get("config", {})
            labels.append(f"{results['model']}-{results['dataset']}-seed{cfg['seed']}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            labels.append(run.name)
    repeated = {label for label in labels if labels.count(label) > 1}
    return [f"{label} ({run})" if label in repeated else label for label, run in zip(labels, runs)]
