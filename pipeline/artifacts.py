"""The stage directory contract: manifests, fingerprints, atomic writes and the run lock.

A stage directory ``<output_dir>/<stage>/`` is complete when, and only when, its ``manifest.json`` exists.
The manifest is written last, atomically (temp file + rename), so a killed process never leaves a
half-written stage that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

MANIFEST = "manifest.json"
IN_PROGRESS = "in_progress.json"
LOCK = ".lock"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs should be as readable as any
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-serialisable parts (dict key order does not matter)."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
    }


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The stage's manifest, or None when the stage is not complete."""
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: treat as incomplete, the stage re-runs


def write_manifest(
    stage_dir: Path,
    *,
    stage: str,
    fingerprint_: str,
    inputs: dict[str, str],
    config: dict[str, Any],
    metrics: dict[str, Any],
    wall_time_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the manifest last: from now on the stage counts as complete."""
    manifest = {
        "stage": stage,
        "status": "complete",
        "fingerprint": fingerprint_,
        "inputs": inputs,
        "config": config,
        "metrics": metrics,
        "wall_time_s": round(wall_time_s, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
        **(extra or {}),
    }
    atomic_write_json(stage_dir / MANIFEST, manifest)
    with contextlib.suppress(FileNotFoundError):
        (stage_dir / IN_PROGRESS).unlink()
    return manifest


def invalidate(stage_dir: Path) -> bool:
    """Mark a complete stage stale (its manifest moves aside); returns whether there was one."""
    path = stage_dir / MANIFEST
    if path.is_file():
        os.replace(path, stage_dir / "manifest.stale.json")
        return True
    return False


@contextlib.contextmanager
def run_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on an output directory for the length of a run.

    A second run on the same directory refuses to start. The lock is an ``flock`` on ``<output_dir>/.lock``:
    the kernel releases it when its process dies, so a crashed run never leaves a stale lock behind.
    """
    import fcntl

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, json.JSONDecodeError):
            holder = {}
        os.close(fd)
        raise PipelineError(
            f"{output_dir} is in use by another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"lock {path}). Wait for it to finish, or stop it; a lock held by a dead process frees itself."
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
