"""The checkpoint directory: how a checkpoint becomes complete, is found, verified and pruned.

Filesystem only (no ``torch.distributed``): the job's rank 0 calls these; what goes inside a
checkpoint is ``dist_cautious.train.resume``'s business. Layout under the ``--checkpoint-dir``::

    step-00000004/           a complete checkpoint of the state after step 4
        COMPLETE.json        the marker, written last: every file's size and sha256
        ...                  the backend's files (DCP shards, DeepSpeed's files, job.json, rng/)
    .tmp-step-00000006/      a checkpoint being written (or left by a crash: never loaded)

A checkpoint is written under the ``.tmp-`` name, its files hashed into a manifest, the folder
renamed to its final name, and the marker written last (through a rename of its own, with
fsyncs between): a crash at any point leaves either a ``.tmp-`` folder or a final name without
a marker, and neither counts as complete. A complete checkpoint is loaded only after every file
in its manifest has its recorded size and hash, so a truncated or corrupted file is found and
named before anything is read from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

MARKER = "COMPLETE.json"
_STEP_NAME = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"
_REJECTED_PREFIX = ".rejected-"


class CheckpointError(ValueError):
    """No checkpoint in the directory can be loaded, although some look complete."""


def step_name(step: int) -> str:
    """``step-<step as 8 digits>``: sorts by name as by step."""
    if not isinstance(step, int) or not 0 <= step < 10**8:
        raise ValueError(f"checkpoint step must be an integer in [0, 1e8), got {step!r}")
    return f"step-{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def complete(root: Path) -> list[Checkpoint]:
    """The checkpoints under ``root`` that have their final name and their marker, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_NAME.match(entry.name)
        if match and (entry / MARKER).is_file():
            found.append(Checkpoint(int(match.group(1)), entry))
    return sorted(found, key=lambda c: c.step)


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def begin(root: Path, step: int) -> Path:
    """A fresh, empty ``.tmp-step-XXXXXXXX`` folder to write the checkpoint of ``step`` into
    (one a crash left behind is removed first)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}{step_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int, on_renamed: Optional[Callable[[], None]] = None) -> Checkpoint:
    """Make the written folder ``tmp`` the complete checkpoint of ``step``: hash and fsync its
    files, rename it to ``step-XXXXXXXX`` (an older folder of that name is moved aside first and
    deleted after), then write the marker. ``on_renamed`` runs between the rename and the marker
    (a fault-injection point)."""
    root = tmp.parent
    manifest = {"step": step, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": {}}
    for path in _files(tmp):
        manifest["files"][path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path, fsync=True)}
    final = root / step_name(step)
    old = None
    if final.exists():  # e.g. a checkpoint that failed verification, now written again
        old = root / f"{_REJECTED_PREFIX}{final.name}-replaced-{time.time_ns()}"
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(root)
    if on_renamed is not None:
        on_renamed()
    marker_tmp = final / f"{MARKER}.tmp"
    with open(marker_tmp, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    marker_tmp.rename(final / MARKER)
    _fsync_dir(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return Checkpoint(step, final)


def problem(checkpoint: Checkpoint) -> Optional[str]:
    """Why ``checkpoint`` must not be loaded (a file missing, truncated, changed, or an
    unreadable marker), naming the file; ``None`` when every file matches its manifest."""
    marker = checkpoint.path / MARKER
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{marker}: unreadable completion marker ({error})"
    if not files:
        return f"{marker}: the manifest lists no files"
    for name, expected in files.items():
        path = checkpoint.path / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path}: {size} bytes, the manifest says {expected['bytes']} ({'truncated' if size < expected['bytes'] else 'grown'})"
        if _sha256(path) != expected["sha256"]:
            return f"{path}: contents differ from the manifest (sha256 mismatch)"
    return None


def newest_loadable(root: Path, warn: Callable[[str], None]) -> Optional[Checkpoint]:
    """The newest complete checkpoint whose files all verify. A newer one that fails is
    reported through ``warn`` (naming the file) and skipped; ``CheckpointError`` when complete
    checkpoints exist but none verifies (never a silent start from scratch)."""
    candidates = complete(root)
    problems = []
    for checkpoint in reversed(candidates):
        trouble = problem(checkpoint)
        if trouble is None:
            return checkpoint
        problems.append(trouble)
        warn(f"dist_cautious: checkpoint {checkpoint.path.name} cannot be loaded: {trouble}; falling back to an older one")
    if problems:
        raise CheckpointError(f"no loadable checkpoint in {root}: " + "; ".join(problems))
    return None


def set_aside_newer(root: Path, step: int) -> list[Path]:
    """Rename complete checkpoints newer than ``step`` (ones that failed verification) to
    ``.rejected-step-XXXXXXXX-<ns>``: kept for inspection, never loaded, never pruned into the
    kept set. Returns the new paths."""
    moved = []
    for checkpoint in complete(root):
        if checkpoint.step > step:
            target = root / f"{_REJECTED_PREFIX}{checkpoint.path.name}-{time.time_ns()}"
            checkpoint.path.rename(target)
            moved.append(target)
    return moved


def remove_incomplete(root: Path) -> list[Path]:
    """Delete what crashed saves left: ``.tmp-`` folders and final names without a marker."""
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        stale = entry.name.startswith(_TMP_PREFIX) or (_STEP_NAME.match(entry.name) and not (entry / MARKER).is_file())
        if stale and entry.is_dir():
            shutil.rmtree(entry)
            removed.append(entry)
    return removed


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (called after a new one is
    complete, so the newest is never at risk)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    doomed = complete(root)[:-keep]
    for checkpoint in doomed:
        (checkpoint.path / MARKER).unlink()  # first: a deletion cut short leaves no complete-looking folder
        shutil.rmtree(checkpoint.path)
    return [c.path for c in doomed]
