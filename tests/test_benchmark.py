"""scripts/benchmark.py's kernels and quick modes and scripts/bench_eval_generation.py, on the tiny model."""

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


def test_eval_generation_bench_times_each_batch_setting_on_the_same_prompts(tmp_path: Path, sft_stage: Path,
                                                                          capsys) -> None:
    prompts = write_jsonl(tmp_path / "eval.jsonl", [
        {"prompt": f"Name a colour ({i}). Do not use any commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]} for i in range(5)])
    load_script("bench_eval_generation").main([str(sft_stage), "--eval-prompts", str(prompts), "--prompts", "4",
                                               "--max-new-tokens", "6", "--batch-sizes", "4", "2", "p2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["setting"] for line in lines] == ["4", "2", "p2"]
    assert all(line["seconds"] >= 0 and line["tokens_per_s"] > 0 for line in lines)
    assert {line["new_tokens"] for line in lines} == {4 * 6}  # the tiny model never stops within 6 tokens
    assert lines[0]["same_answers_as_first"] is None
    assert [line["same_answers_as_first"] for line in lines[1:]] == [4, 4]  # batching does not change answers


def test_stage_floors_time_the_bare_model_over_every_batch_of_a_runs_stages(tmp_path: Path, tiny_recipe) -> None:
    import yaml

    from pipeline.config import validate_recipe
    from pipeline.runner import run_recipe

    sft = {k: v for k, v in tiny_recipe["sft"].items() if k != "max_steps"}
    raw = {**tiny_recipe, "sft": {**sft, "num_train_epochs": 2},
           "dpo": {**tiny_recipe["dpo"], "max_steps": 3, "gradient_accumulation_steps": 2}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    run_recipe(validate_recipe(raw), stage="prepare", log=lambda _: None)
    out = tmp_path / "floors.json"
    _benchmark().main(["--stage-floors", raw["output_dir"], "--model", raw["model"]["name_or_path"],
                       "--recipe", str(recipe), "--json", str(out)])
    result = json.loads(out.read_text())
    per_epoch = result["sft_micro_batches"]["per_epoch"]
    assert per_epoch > 0 and result["sft_micro_batches"]["trained"] == 2 * per_epoch  # two epochs
    assert result["dpo_micro_batches"]["trained"] == 3 * 2  # max_steps x gradient_accumulation_steps
    for key in ("sft_floor_s", "dpo_floor_s", "dpo_reference_floor_s"):
        assert result[key] > 0, key
    assert "sft_measured_s" not in result  # prepare only: no stage measured to compare with
