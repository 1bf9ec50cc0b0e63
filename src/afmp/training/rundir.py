"""A run directory as a unit: one writer at a time, and checkpoints committed whole.

- ``RunLock(out)``: ``out/.lock`` holds the writer's pid and host. A second writer is
  refused with a message naming the holder; a lock whose process is gone (same host) is
  reclaimed, and the user is told.
- ``commit_checkpoint(out, epoch, fill)``: every file of an epoch's checkpoint is
  written into a hidden folder, fsynced, listed with its SHA-256 in ``manifest.json``
  (written last), and the folder is renamed to ``out/checkpoints/epoch-NNNN`` in one
  step. A crash leaves either the previous epoch's folder or the new one, never a mix.
- ``latest_checkpoint(out)``: the newest folder whose manifest verifies.
- ``clean_temporaries(out)``: what a killed write left (``.NAME.tmpPID`` files and
  folders), removed once the lock is held.
"""

from __future__ import annotations

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
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """``with RunLock(out):`` while writing ``out``; see the module's docstring."""

    def __init__(self, directory: str | os.PathLike, notify: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.path = self.directory / ".lock"
        self.notify = notify
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after reclaiming a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                stale = (
                    holder is not None
                    and holder.get("host") == self.me["host"]
                    and isinstance(holder.get("pid"), int)
                    and holder["pid"] != self.me["pid"]
                    and not _process_alive(holder["pid"])
                )
                if not stale:
                    who = (
                        f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "an unreadable lock"
                    )
                    raise UsageError(
                        f"{self.directory} is being written by {who} (lock file {self.path}); "
                        "wait for it to finish, use another --out, or delete the lock file if that "
                        "process is gone"
                    ) from None
                self.path.unlink(missing_ok=True)
                self.notify(f"reclaimed {self.path}: its process (pid {holder['pid']}) is gone")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return self
        raise UsageError(f"could not take the lock {self.path}: another writer took it first")

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def __exit__(self, *exc) -> None:
        if self._holder() == self.me:
            self.path.unlink(missing_ok=True)


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
