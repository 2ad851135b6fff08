"""The stage directory contract: manifests, fingerprints, atomic writes and the run lock.

A stage directory ``<output_dir>/<stage>/`` is complete when, and only when, its ``manifest.json`` exists.
The manifest is written last, atomically (temp file + rename), so a killed process never leaves a
half-written stage that looks finished. It records every output file of the stage (size and sha256), so a
finished stage that later changed on disk is caught (:func:`verify_stage`) instead of silently re-used; and
a write that fails for lack of room (a full disk, a quota, ``ulimit -f``) is explained (:func:`write_failure`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import resource
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

MANIFEST = "manifest.json"
IN_PROGRESS = "in_progress.json"
STALE_MANIFEST = "manifest.stale.json"
CHECKPOINTS = "checkpoints"  # Trainer checkpoints of a running stage, deleted once it completes
LOCK = ".lock"
FILES = "files"  # manifest key: {relative path: {"size": bytes, "sha256": hex}} of the stage's outputs
# Not outputs: the stage's own bookkeeping, and what exists only while it runs. Names starting with "." are
# temporary files of atomic writes (see atomic_write_text, atomic_directory).
_NOT_OUTPUTS = {MANIFEST, IN_PROGRESS, STALE_MANIFEST, CHECKPOINTS}
# What a stage kind must hold, checked for manifests written before file lists were recorded.
_EXPECTED = {
    "prepare": ("report.json",),
    "sft": ("adapter_config.json", "adapter_model.safetensors"),
    "dpo": ("adapter_config.json", "adapter_model.safetensors"),
    "eval": ("metrics.json", "report.md"),
}


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


def output_files(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """Every output file under ``stage_dir`` (relative path → size and sha256), bookkeeping excluded."""
    files = {}
    for path in sorted(stage_dir.rglob("*")):
        rel = path.relative_to(stage_dir)
        if rel.parts[0] in _NOT_OUTPUTS or any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        files[rel.as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def _safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file is shorter or longer than its own header says (a truncated copy)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return f"{path.name} is not a readable safetensors file"
    expected, actual = 8 + length + end, path.stat().st_size
    return None if actual == expected else f"{path.name} is {actual} bytes, its header describes {expected}"


def _legacy_problems(stage_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """For a manifest without a file list: the stage kind's main files exist, its safetensors are whole."""
    expected = list(_EXPECTED.get(manifest.get("stage", ""), ()))
    if manifest.get("start") == "merge":
        expected.append("sft_merged/config.json")
    problems = [f"{name} is missing" for name in expected if not (stage_dir / name).is_file()]
    for path in sorted(stage_dir.rglob("*.safetensors")):
        if CHECKPOINTS not in path.relative_to(stage_dir).parts and (problem := _safetensors_problem(path)):
            problems.append(problem.replace(path.name, path.relative_to(stage_dir).as_posix(), 1))
    return problems


def rerun_command(stage: str, recipe: str | Path | None) -> str:
    """The command that rebuilds ``stage`` (and what was built from it)."""
    return f"python scripts/run_recipe.py {recipe or '<your recipe>'} --from {stage}"


def verify_stage(stage_dir: Path, manifest: dict[str, Any], *, hashed: Collection[str] | bool = False,
                 recipe: str | Path | None = None) -> None:
    """Raise a :class:`PipelineError` when a completed stage's files are not what its manifest recorded.

    Sizes are always compared (one ``stat`` per file); ``hashed`` names the files whose sha256 is compared
    too (``True``: all of them). A manifest written before file lists were recorded gets the checks that need
    none: the stage kind's main files exist and every safetensors file is as long as its header says.
    Nothing is deleted: the message names the files and the command that rebuilds the stage.
    """
    stage = manifest.get("stage", stage_dir.name)
    files = manifest.get(FILES)
    if files is None:
        problems = _legacy_problems(stage_dir, manifest)
    else:
        problems = []
        for rel, want in files.items():
            path = stage_dir / rel
            if not path.is_file():
                problems.append(f"{rel} is missing")
            elif (size := path.stat().st_size) != want["size"]:
                problems.append(f"{rel} is {size} bytes, the manifest recorded {want['size']}")
            elif (hashed is True or rel in (hashed or ())) and (digest := file_sha256(path)) != want["sha256"]:
                problems.append(f"{rel} has other contents (sha256 {digest[:12]}…, recorded {want['sha256'][:12]}…)")
    if not problems:
        return
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    legacy = (" (its manifest predates recorded file sizes and hashes, so only the presence of its main files "
              "and the length of its safetensors files could be checked)") if files is None else ""
    raise PipelineError(
        f"Stage '{stage}' in {stage_dir} changed on disk after it completed{legacy}: {shown}. Its outputs are not "
        f"used and nothing was deleted. Rebuild it and the stages after it: {rerun_command(stage, recipe)}"
    )


# ------------------------------------------------------------------------------------------ failed writes
_NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "a file would exceed the file-size limit"}
# Libraries that write from native code report the errno only in their message (safetensors: "File too large
# (os error 27)"), or not at all (torch.save: "unexpected pos …" / "file write failed").
_NO_ROOM_TEXT = {f"(os error {code})": code for code in _NO_ROOM}
_NATIVE_WRITE_FAILED = ("PytorchStreamWriter failed writing", "unexpected pos")


def file_size_limit() -> int | None:
    """The process's file-size limit (``ulimit -f``) in bytes, or None when there is none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def write_failure(exc: BaseException | None) -> int | None:
    """The errno (ENOSPC, EDQUOT, EFBIG) if ``exc`` is a write that failed for lack of room, else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
            return exc.errno
        text = str(exc)
        for marker, code in _NO_ROOM_TEXT.items():
            if marker in text:
                return code
        if any(marker in text for marker in _NATIVE_WRITE_FAILED):  # no errno given: say which limit applies
            return errno.EFBIG if file_size_limit() is not None else errno.ENOSPC
        exc = exc.__cause__ or exc.__context__
    return None


def human_size(n: float) -> str:
    """``n`` bytes for people: 512 bytes, 48.8 KiB, 1.2 GiB."""
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    return f"{human_size(shutil.disk_usage(path).free)} free on the file system of {path}"


@contextlib.contextmanager
def explain_write_failures(stage: str, target: Path, *, what: str, needed: str = "",
                           kept: str = "") -> Iterator[None]:
    """Turn a write that fails for lack of room inside the block into a :class:`PipelineError` that says so.

    ``what`` names what was being written, ``needed`` says how big it is (and how that was estimated),
    ``kept`` what survives for the re-run (default: the finished stages, which the re-run skips).
    """
    try:
        yield
    except PipelineError:
        raise
    except Exception as exc:
        code = write_failure(exc)
        if code is None:
            raise
        if code == errno.EFBIG and (limit := file_size_limit()) is not None:
            where, fix = f"ulimit -f is {human_size(limit)}", "Raise the limit (ulimit -f unlimited)"
        elif code == errno.EFBIG:  # no ulimit: the file system's own maximum file size (FAT32: 4 GiB)
            where, fix = "the file system's largest file size", "Use another file system for output_dir"
        else:
            where, fix = _free_space(target), "Free space there"
        need = f" It needs {needed}." if needed else ""
        kept = kept or "Finished stages are kept; the re-run skips them."
        raise PipelineError(
            f"Stage '{stage}' could not write {what} to {target}: {_NO_ROOM[code]} ({where}).{need} {kept} "
            f"{fix}, then re-run the same command."
        ) from exc


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
    """Write the manifest last: from now on the stage counts as complete.

    It records every file the stage wrote (:func:`output_files`), hashed now, after the stage has finished.
    """
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
        FILES: output_files(stage_dir),
    }
    atomic_write_json(stage_dir / MANIFEST, manifest)
    with contextlib.suppress(FileNotFoundError):
        (stage_dir / IN_PROGRESS).unlink()
    return manifest


def invalidate(stage_dir: Path) -> bool:
    """Mark a complete stage stale (its manifest moves aside); returns whether there was one."""
    path = stage_dir / MANIFEST
    if path.is_file():
        os.replace(path, stage_dir / STALE_MANIFEST)
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
