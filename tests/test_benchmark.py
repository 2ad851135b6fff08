"""scripts/benchmark.py's kernels mode (the per-token floor the README's time analysis uses), on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script, write_jsonl


def _benchmark():
    return load_script("benchmark")


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


def test_quick_mode_compares_the_pipeline_with_plain_trl_and_the_bare_model(tmp_path: Path, tiny_recipe) -> None:
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe, "model": {**tiny_recipe["model"], "chat_template": "gemma"},
                                      "dpo": {**tiny_recipe["dpo"], "precompute_ref_log_probs": True,
                                              "loss_type": ["sigmoid", "sft"]}}))
    out = tmp_path / "quick.json"
    _benchmark().main(["--quick", "--model", tiny_recipe["model"]["name_or_path"], "--recipe", str(recipe),
                       "--rounds", "1", "--sft-rows", "6", "--dpo-pairs", "4", "--json", str(out)])
    result = json.loads(out.read_text())
    for key in ("sft_speedup", "dpo_speedup", "sft_floor_ratio", "dpo_floor_ratio", "peak_rss_gb"):
        assert result[key] > 0, key
    assert result["machine"]["torch_threads"] >= 1 and result["machine"]["cpu"]
    assert result["dpo_loss_path"] == "labelled_positions"  # the pipeline's DPO loop ran its own loss
    assert result["rows"] == {"sft_conversations": 6, "dpo_pairs": 4}
    assert result["dpo_steps"] == {"pipeline": 2, "plain_trl": 1}  # 4 pairs: 2 x (2 pairs), TRL: one batch of 8
    assert result["sft_labelled_positions"] > 0 and result["sft_tokens"] >= result["sft_labelled_positions"]
    for stage in ("sft", "dpo"):  # the floor ratio's numerator: the optimizer steps, inside train()
        seconds = result["seconds"]
        assert 0 < seconds[f"{stage}_pipeline_steps_s"][0] <= seconds[f"{stage}_pipeline_train_s"][0], stage
