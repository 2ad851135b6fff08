"""scripts/benchmark.py's kernels mode (the per-token floor the README's time analysis uses), on the tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _conversations(path: Path, n: int) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Write one line about the sea ({i})."},
                          {"role": "assistant", "content": f"Waves fold in silver light, {i} times."}]}
            for i in range(n)]
    return write_jsonl(path, rows)


def test_kernels_mode_reports_throughput_of_backbone_and_head(tmp_path: Path, tiny_model_dir: Path) -> None:
    data, out = _conversations(tmp_path / "sft.jsonl", 20), tmp_path / "bench.jsonl"
    _benchmark().main(["--model", str(tiny_model_dir), "--what", "kernels", "--batch-size", "2", "--max-length",
                       "32", "--steps", "1", "--dtype", "fp32", "--sft-data", str(data), "--out", str(out)])
    result = json.loads(out.read_text())["result"]
    assert result["tokens"] == 64
    for key in ("backbone_forward_tok_per_s", "backbone_forward_backward_tok_per_s", "lm_head_forward_pos_per_s",
                "lm_head_forward_backward_pos_per_s"):
        assert result[key] > 0, key


def test_kernels_mode_refuses_too_little_text(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = _conversations(tmp_path / "sft.jsonl", 1)
    with pytest.raises(SystemExit, match="needs 4096"):
        _benchmark().main(["--model", str(tiny_model_dir), "--what", "kernels", "--batch-size", "8",
                           "--max-length", "512", "--dtype", "fp32", "--sft-data", str(data)])
