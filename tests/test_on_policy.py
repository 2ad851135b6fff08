"""DPO's on-policy rejections: the SFT model's own failing answer replaces a constrained pair's rejected one."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset
from test_pipeline import _manifest, _run

from pipeline.stages.dpo import with_on_policy_rejected

NO_COMMA = json.dumps({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
ENDS = json.dumps({"instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Bye."}]})
NONE = json.dumps({"instruction_id_list": [], "kwargs": []})


def _pair(prompt: str, constraints: str | None) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": "ok"}],
            "rejected": [{"role": "assistant", "content": "synthetic"}], "constraints": constraints}


def test_only_stopped_failing_answers_replace_the_rejected_one(tmp_path):
    rows = Dataset.from_list([
        _pair("List two fruits without commas.", NO_COMMA),   # answer fails, stopped → replaced
        _pair("Say bye. End with Bye.", ENDS),                 # answer passes → kept
        _pair("Name a colour without commas.", NO_COMMA),      # answer fails but was cut off → kept
        _pair("Tell me a joke.", NONE),                        # nothing to check → not generated for
        _pair("Count to three.", None),
    ])
    cache = tmp_path / "answers.jsonl"  # what the SFT model answered (a resumed stage reads it back)
    cache.write_text("".join(json.dumps(a) + "\n" for a in [
        {"text": "Apples, pears.", "stopped": True, "new_tokens": 4},
        {"text": "See you. Bye.", "stopped": True, "new_tokens": 4},
        {"text": "Red, blue, green, red, blue", "stopped": False, "new_tokens": 200},
    ]))
    out, stats = with_on_policy_rejected(rows, None, None, cache)  # cached: no model needed
    assert [r[0]["content"] for r in out["rejected"]] == ["Apples, pears.", "synthetic", "synthetic", "synthetic",
                                                          "synthetic"]
    assert out["chosen"] == rows["chosen"] and out["prompt"] == rows["prompt"]
    assert stats == {"on_policy_prompts": 3, "on_policy_passed": 1, "on_policy_rejected": 1}


def test_dpo_stage_generates_with_the_sft_model_before_training(tiny_recipe, tmp_path):
    prefs = tmp_path / "data" / "constrained.jsonl"
    prefs.write_text("".join(json.dumps({
        "prompt": f"Say hello number {i}. End your answer with the exact phrase Bye now.",
        "chosen": f"hello {i}. Bye now.", "rejected": f"hello {i}.",
        "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Bye now."}],
    }) + "\n" for i in range(12)))
    tiny_recipe["data"]["dpo"] = [{"path": str(prefs)}]
    assert _run(tiny_recipe, "dpo.on_policy_rejected=true") == {"prepare": "ran", "sft": "ran", "dpo": "ran"}
    metrics = _manifest(tiny_recipe, "dpo")["metrics"]
    train_rows = _manifest(tiny_recipe, "prepare")["metrics"]["dpo_train_rows"]
    assert metrics["on_policy_prompts"] == train_rows > 0
    assert 0 <= metrics["on_policy_rejected"] <= train_rows - metrics["on_policy_passed"]
    assert not (Path(tiny_recipe["output_dir"]) / "dpo" / "checkpoints").exists()  # the answer cache went too
