"""The time estimate said before the long work: what it counts, when it is said, and that it never stops a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from datasets import load_from_disk

from pipeline import estimate
from pipeline.config import apply_overrides, validate_recipe
from pipeline.runner import run_recipe


@pytest.fixture
def estimating(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPELINE_ESTIMATE", "1")
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "calibration"


def _run(raw: dict, *overrides: str) -> tuple[dict[str, str], list[str]]:
    lines: list[str] = []
    recipe = validate_recipe(apply_overrides(raw, overrides))
    return {o.stage: o.action for o in run_recipe(recipe, log=lines.append)}, lines


def _with_eval(raw: dict, tmp_path: Path) -> dict:
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"key": i, "prompt": f"Say hello number {i}.",
                                           "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}) + "\n" for i in range(3)))
    return {**raw, "eval": {"prompts": str(prompts), "models": ["base", "sft", "dpo"], "max_new_tokens": 8,
                            "batch_size": 2}}


def test_the_estimate_comes_before_the_first_model_stage_and_names_each_stage_to_run(tiny_recipe, tmp_path,
                                                                                     estimating):
    outcomes, lines = _run(_with_eval(tiny_recipe, tmp_path))
    assert outcomes == {"prepare": "ran", "sft": "ran", "dpo": "ran", "eval": "ran"}
    said = next(i for i, line in enumerate(lines) if line.startswith("Estimated time on this machine"))
    first_model_stage = next(i for i, line in enumerate(lines) if line.startswith("[sft] running"))
    assert lines.index(next(x for x in lines if x.startswith("[prepare]"))) < said < first_model_stage
    text = lines[said]
    for stage in ("sft", "dpo", "eval"):
        assert f"\n  {stage} " in text
    assert "3 prompts x 3 model(s)" in text  # base, sft and dpo are all evaluated
    assert len(list(estimating.glob("*.json"))) == 1  # the calibration is kept for the next run

    # up to date: nothing to estimate; a changed DPO setting: DPO and eval only, the calibration read back
    _, lines = _run(_with_eval(tiny_recipe, tmp_path))
    assert not any(line.startswith("Estimated time") for line in lines)
    _, lines = _run(_with_eval(tiny_recipe, tmp_path), "dpo.learning_rate=5e-3")
    text = next(line for line in lines if line.startswith("Estimated time"))
    assert "\n  dpo " in text and "\n  eval " in text and "\n  sft " not in text
    # the first run cached the evaluations of the base model and of the SFT model this run keeps
    assert "3 prompts x 1 model(s); base, sft read from the cache" in text
    assert len(list(estimating.glob("*.json"))) == 1


def _ran(raw: dict) -> tuple:
    """A finished run of ``raw``: its recipe and prepared data."""
    recipe = validate_recipe(raw)
    _run(raw)
    return recipe, recipe.stage_dir("prepare")


def _speeds(train_token: float = 1.0, score_token: float = 0.0) -> estimate.Speeds:
    return estimate.Speeds(train_token=train_token, train_position=0.0, score_token=score_token, score_position=0.0,
                           decode_step=0.0, load=0.0)


def test_the_work_counted_follows_the_recipe(tiny_recipe, estimating):
    recipe, prepared = _ran(tiny_recipe)
    speeds = _speeds()
    four, = estimate.estimate_with(recipe, ["sft"], prepared, speeds)
    eight, = estimate.estimate_with(validate_recipe(apply_overrides(tiny_recipe, ["sft.max_steps=8"])), ["sft"],
                                    prepared, speeds)
    assert eight.seconds == pytest.approx(2 * four.seconds)  # twice the steps, twice the tokens
    tokens = int(four.detail.split(" of ")[1].split(" tokens")[0].replace(",", ""))
    rows = len(load_from_disk(str(prepared / "sft_train")))
    assert four.seconds == pytest.approx(tokens * 4 / math.ceil(rows / 2))  # 4 steps of 2 rows, one second a token


def test_a_stage_that_ran_scales_the_next_estimate_by_its_measured_ratio(tiny_recipe, estimating):
    outcomes, lines = _run(tiny_recipe)
    assert outcomes == {"prepare": "ran", "sft": "ran", "dpo": "ran"}
    assert "times the last run's measured ratio" not in next(x for x in lines if x.startswith("Estimated time"))
    recipe = validate_recipe(tiny_recipe)
    ratios = estimate.corrections(recipe)
    assert set(ratios) == {"sft", "dpo"} and all(r > 0 for r in ratios.values())
    # the next run of a changed DPO stage is told DPO's measured ratio; its own time then replaces it
    _, lines = _run(tiny_recipe, "dpo.learning_rate=5e-3")
    text = next(x for x in lines if x.startswith("Estimated time"))
    assert f"x{ratios['dpo']:.2f}, as measured in the last run here" in text
    assert "times the last run's measured ratio" in text
    assert estimate.corrections(recipe)["sft"] == ratios["sft"]  # SFT did not run again: its ratio is kept


def test_measured_ratios_scale_only_their_stage_and_a_broken_record_is_ignored(tiny_recipe, estimating):
    recipe, prepared = _ran(tiny_recipe)
    speeds = _speeds(score_token=1.0)
    plain = {e.stage: e for e in estimate.estimate_with(recipe, ["sft", "dpo"], prepared, speeds)}
    scaled = {e.stage: e for e in estimate.estimate_with(recipe, ["sft", "dpo"], prepared, speeds, {"dpo": 1.5})}
    assert scaled["sft"].seconds == plain["sft"].seconds == scaled["sft"].compute_seconds
    assert scaled["dpo"].seconds == pytest.approx(1.5 * plain["dpo"].seconds)
    assert scaled["dpo"].compute_seconds == plain["dpo"].seconds
    before = estimate.corrections(recipe)
    assert set(before) == {"sft", "dpo"}
    estimate.observe(recipe, "sft", 0.0, 5.0)  # no estimate to compare with: nothing recorded
    assert estimate.corrections(recipe) == before
    next(estimating.glob("observed/*.json")).write_text("not json")
    assert estimate.corrections(recipe) == {}


def test_a_failing_estimate_says_why_and_the_run_goes_on(tiny_recipe, estimating, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no calibration here")

    monkeypatch.setattr(estimate, "calibrate", broken)
    outcomes, lines = _run(tiny_recipe)
    assert outcomes == {"prepare": "ran", "sft": "ran", "dpo": "ran"}
    assert "(no time estimate: RuntimeError: no calibration here)" in lines


def test_switched_off_with_the_environment(tiny_recipe, estimating, monkeypatch):
    monkeypatch.setenv("PIPELINE_ESTIMATE", "0")
    _, lines = _run(tiny_recipe)
    assert not any(line.startswith("Estimated time") for line in lines)
    assert not estimating.exists()
