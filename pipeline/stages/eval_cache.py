"""Each model's evaluation, cached across runs: used by the ``eval`` stage (``stages/evaluate.py``).

The base model never changes, yet every run decoded it again (about 5.5 minutes of the quickstart's eval on
an AVX2 CPU: its answers never stop, so each runs to the token limit); and a run that re-trains only DPO
evaluated the unchanged SFT model again (about 6 minutes more). Each model's results are stored in the user
cache (``$PIPELINE_CACHE`` or ``~/.cache/instruct-pipeline``, under ``eval/``), keyed by everything they depend
on: the model's weights (the base model's location and file hashes; for a trained stage, the sha256 of every
file its manifest records, its adapter and tokenizer included, on top of the base's), the weights of the model
its preference accuracy is measured against, dtype and attention, the tokenizer's chat template, the eval
prompts, held-out conversations and pairs themselves (so the eval file's content and ``max_prompts`` /
``max_pairs``), the generation settings and the torch / transformers versions. A second quickstart, a run that
re-trains only DPO, or any recipe on the same models and eval set reads them back. Models given by hub id (no
local files to hash) are not cached, nor are the stages trained on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.artifacts import FILES, atomic_write_json, fingerprint, library_versions, read_manifest
from pipeline.gguf import default_cache_dir, file_sha256
from pipeline.models import resolve_dtype, resolve_model_path

CACHE_VERSION = 2  # bump when what a cached entry holds or means changes
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def base_model_fingerprint(model_cfg: dict[str, Any]) -> str | None:
    """Hash of the base model's local files (weights and config), or None when it is not a local model."""
    path = Path(resolve_model_path(model_cfg["name_or_path"]))
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"))
    # gguf.file_sha256 remembers each hash by (path, size, mtime): a half-gigabyte checkpoint is read once. The
    # path is part of the key too, so models built afresh in temporary directories (tests) never share entries.
    return fingerprint(str(path.resolve()), {p.name: file_sha256(p) for p in files}) if files else None


def stage_fingerprint(stage_dir: Path, base: str | None) -> str | None:
    """Identity of a trained stage's model: the hashes its manifest records for its files (adapter, tokenizer,
    a dpo stage's merged SFT weights) on top of the base model's ``base``; None if either is unknown."""
    manifest = read_manifest(stage_dir)
    files = (manifest or {}).get(FILES)
    if base is None or not files:
        return None
    return fingerprint(base, {rel: entry["sha256"] for rel, entry in sorted(files.items())})


def cache_path(name: str, model: str | None, model_cfg: dict[str, Any], tokenizer: Any, inputs: dict[str, Any],
               settings: dict[str, Any]) -> Path | None:
    """Where model ``name``'s results for these eval inputs and settings live, or None if not cacheable.

    ``model`` is its identity (:func:`base_model_fingerprint`, :func:`stage_fingerprint`); ``settings`` holds
    whatever else its results depend on (generation settings, the identity of its reference model).
    """
    if model is None:
        return None
    versions = {k: v for k, v in library_versions().items() if k in ("torch", "transformers")}
    key = fingerprint(CACHE_VERSION, model, str(resolve_dtype(model_cfg)), model_cfg.get("attn_implementation"),
                      tokenizer.chat_template, inputs, settings, versions)
    return default_cache_dir() / "eval" / f"{name}-{key}.json"


def load(path: Path | None) -> dict[str, Any] | None:
    """The cached entry at ``path``, or None when there is none (or it does not parse)."""
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def store(path: Path | None, entry: dict[str, Any]) -> None:
    """Write ``entry`` atomically (a concurrent reader sees the old file or the new one, never half of one)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, entry)
