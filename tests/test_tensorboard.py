"""TensorBoard by default: training stages write event files under ``<stage>/runs/``; the eval report reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import apply_overrides, validate_recipe
from pipeline.evaluation import read_loss_history
from pipeline.runner import run_recipe


def _run_sft(raw: dict, *overrides: str) -> Path:
    raw = {k: v for k, v in raw.items() if k != "dpo"}  # prepare → sft only: all these tests need
    recipe = validate_recipe(apply_overrides(raw, overrides))
    run_recipe(recipe, log=lambda _: None)
    return recipe.stage_dir("sft")


def _scalars(stage_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(stage_dir / "runs"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {e.step: e.value for e in accumulator.Scalars(tag)}


def test_sft_stage_writes_the_training_loss_to_tensorboard_under_its_runs_dir(tiny_recipe):
    stage_dir = _run_sft(tiny_recipe)
    assert list((stage_dir / "runs").glob("events.out.tfevents.*"))
    assert not (stage_dir / "checkpoints").exists()  # the logs do not live with the deleted checkpoints
    logged = {h["step"]: h["loss"] for h in json.loads((stage_dir / "log_history.json").read_text()) if "loss" in h}
    losses = _scalars(stage_dir, "train/loss")
    assert sorted(losses) == sorted(logged) == [1, 2, 3, 4]  # logging_steps 1, max_steps 4
    for step, value in logged.items():
        assert losses[step] == pytest.approx(value, rel=1e-6)
    # the eval report's loss curves read the same event files
    history = read_loss_history(stage_dir)
    assert {h["step"]: h["loss"] for h in history if "loss" in h} == losses
    assert any("eval_loss" in h for h in history)  # held-out loss, logged once at the end


def test_report_to_none_writes_no_event_files_and_the_loss_curves_fall_back_to_log_history(tiny_recipe):
    stage_dir = _run_sft(tiny_recipe, "sft.report_to=none")
    assert not (stage_dir / "runs").exists()
    history = read_loss_history(stage_dir)
    assert history == json.loads((stage_dir / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
