"""Each model's evaluation is cached in the user cache and reused only for exactly the same model and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from pipeline.config import MODEL_DEFAULTS, apply_overrides, validate_recipe
from pipeline.models import load_tokenizer
from pipeline.runner import run_recipe
from pipeline.stages import eval_cache, evaluate
from pipeline.stages.context import StageContext

PROMPTS = [
    {"key": 1, "prompt": "Describe the sea. Answer in all lowercase letters.", "reference": "waves fold.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 2, "prompt": "Name a fruit. Do not use any commas.", "reference": "A pear.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
]


@pytest.fixture
def user_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache"


def _run_base_eval(tiny_recipe: dict, tmp_path: Path, run: str, **eval_cfg) -> tuple[dict, Path]:
    prompts = write_jsonl(tmp_path / "eval_prompts.jsonl", PROMPTS)
    raw = {**tiny_recipe, "output_dir": str(tmp_path / run),
           "eval": {"prompts": str(prompts), "models": ["base"], "max_new_tokens": 5, "batch_size": 2, **eval_cfg}}
    recipe = validate_recipe(raw)
    stage_dir = recipe.stage_dir("eval")
    stage_dir.mkdir(parents=True)
    return evaluate.run(StageContext(recipe=recipe, stage="eval", stage_dir=stage_dir, upstream={})), stage_dir


def test_a_second_evaluation_of_the_same_base_reads_its_results_from_the_user_cache(
        tiny_recipe, tmp_path, user_cache, capsys, monkeypatch):
    first, first_dir = _run_base_eval(tiny_recipe, tmp_path, "one")
    assert "read from the cache" not in capsys.readouterr().out
    assert len(list((user_cache / "eval").glob("base-*.json"))) == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("the base model generated although its results are cached")

    monkeypatch.setattr(evaluate, "generate_for_prompts", no_generation)
    second, second_dir = _run_base_eval(tiny_recipe, tmp_path, "two")
    assert "base: answers and log-probs read from the cache" in capsys.readouterr().out
    assert second == first and first["base"]["heldout_loss"] > 0
    assert (second_dir / "generations_base.jsonl").read_text() == (first_dir / "generations_base.jsonl").read_text()
    assert "| format_compliance |" in (second_dir / "report.md").read_text()


def test_cached_answers_are_scored_again(tiny_recipe, tmp_path, user_cache, monkeypatch):
    """The cache holds what the model produced; a changed checker re-scores it (here: one every answer passes)."""
    first, _ = _run_base_eval(tiny_recipe, tmp_path, "one")
    assert first["base"]["instruction_level_loose"] == 0.0  # the tiny model's random text passes no check
    real = evaluate.score_generations

    def lenient_checker(prompts, outputs):
        for out in outputs:
            out["text"] = "waves fold."  # lowercase, no comma: passes both checks
        return real(prompts, outputs)

    monkeypatch.setattr(evaluate, "score_generations", lenient_checker)
    monkeypatch.setattr(evaluate, "generate_for_prompts", lambda *a, **k: pytest.fail("generated again"))
    second, _ = _run_base_eval(tiny_recipe, tmp_path, "two")
    assert second["base"]["heldout_loss"] == first["base"]["heldout_loss"]  # the model's log-probs: from the cache
    assert second["base"]["instruction_level_loose"] == 1.0


def test_other_generation_settings_are_not_read_from_the_cache(tiny_recipe, tmp_path, user_cache, capsys):
    _run_base_eval(tiny_recipe, tmp_path, "one")
    _run_base_eval(tiny_recipe, tmp_path, "two", max_new_tokens=4)
    assert "read from the cache" not in capsys.readouterr().out
    assert len(list((user_cache / "eval").glob("base-*.json"))) == 2


def _path(model_cfg: dict, tokenizer, inputs: dict, settings: dict) -> Path | None:
    return eval_cache.cache_path("base", eval_cache.base_model_fingerprint(model_cfg), model_cfg, tokenizer, inputs,
                                 settings)


def test_the_cache_key_follows_model_weights_template_inputs_and_settings(tiny_model_dir, tmp_path, user_cache):
    from conftest import build_tiny_model

    # float32 spelt out: `auto` is bf16 on an AVX512-BF16 / AMX CPU, and the variant below must differ from it
    model_cfg = {**MODEL_DEFAULTS, "name_or_path": str(tiny_model_dir), "chat_template": "chatml", "dtype": "float32"}
    tokenizer = load_tokenizer(model_cfg)
    inputs, settings = {"prompts": PROMPTS}, {"max_new_tokens": 5}
    path = _path(model_cfg, tokenizer, inputs, settings)
    assert path == _path(model_cfg, tokenizer, json.loads(json.dumps(inputs)), dict(settings))
    other_weights = build_tiny_model(tmp_path / "other", seed=1)
    gemma = load_tokenizer({**model_cfg, "chat_template": "gemma"})
    variants = [
        _path({**model_cfg, "name_or_path": str(other_weights)}, tokenizer, inputs, settings),
        _path(model_cfg, gemma, inputs, settings),
        _path(model_cfg, tokenizer, {"prompts": PROMPTS[:1]}, settings),
        _path(model_cfg, tokenizer, inputs, {"max_new_tokens": 6}),
        _path({**model_cfg, "dtype": "bfloat16"}, tokenizer, inputs, settings),
    ]
    assert len({path, *variants}) == len(variants) + 1
    assert path.parent == user_cache / "eval"


def _full_recipe(tiny_recipe: dict, tmp_path: Path, *overrides: str) -> object:
    prompts = write_jsonl(tmp_path / "eval_prompts.jsonl", PROMPTS)
    raw = {**tiny_recipe, "eval": {"prompts": str(prompts), "models": ["base", "sft", "dpo"], "max_new_tokens": 5,
                                   "batch_size": 2}}
    return validate_recipe(apply_overrides(raw, overrides))


def _generated(monkeypatch) -> list[str]:
    """The names of the models the eval stage generates with, from now on."""
    names: list[str] = []
    real = evaluate.generate_for_prompts

    def recording(*args, desc: str, **kwargs):
        names.append(desc.split()[0])
        return real(*args, desc=desc, **kwargs)

    monkeypatch.setattr(evaluate, "generate_for_prompts", recording)
    return names


def test_a_dpo_only_re_run_reads_the_unchanged_sft_model_from_the_cache(tiny_recipe, tmp_path, user_cache,
                                                                         monkeypatch):
    recipe = _full_recipe(tiny_recipe, tmp_path)
    generated = _generated(monkeypatch)
    run_recipe(recipe)
    assert generated == ["base", "sft", "dpo"]
    eval_dir = recipe.stage_dir("eval")
    first = json.loads((eval_dir / "metrics.json").read_text())
    first_sft = (eval_dir / "generations_sft.jsonl").read_text()
    assert "implicit_reward_acc" in first["sft"]["ci95"] and "implicit_reward_acc" in first["dpo"]["ci95"]

    generated.clear()
    outcomes = {o.stage: o.action for o in run_recipe(_full_recipe(tiny_recipe, tmp_path, "dpo.learning_rate=5e-3"))}
    assert outcomes == {"prepare": "skipped", "sft": "skipped", "dpo": "ran", "eval": "ran"}
    assert generated == ["dpo"]  # base and SFT unchanged: read back
    second = json.loads((eval_dir / "metrics.json").read_text())
    assert second["sft"] == first["sft"] and (eval_dir / "generations_sft.jsonl").read_text() == first_sft
    assert second["dpo"]["ci95"]["implicit_reward_acc"]  # the DPO model's reference log-probs came from the cache

    generated.clear()  # new SFT weights: that model and the DPO model on top of it are evaluated again
    run_recipe(_full_recipe(tiny_recipe, tmp_path, "sft.learning_rate=5e-3"))
    assert generated == ["sft", "dpo"]


def test_a_cached_model_whose_reference_is_not_evaluated_keeps_its_preference_intervals(tiny_recipe, tmp_path,
                                                                                         user_cache, monkeypatch):
    recipe = _full_recipe(tiny_recipe, tmp_path, "eval.models=[dpo]")
    run_recipe(recipe)
    first = json.loads((recipe.stage_dir("eval") / "metrics.json").read_text())
    generated = _generated(monkeypatch)
    # another report (more samples in it): the eval stage runs again, the DPO model is not
    outcomes = {o.stage: o.action for o in run_recipe(_full_recipe(tiny_recipe, tmp_path, "eval.models=[dpo]",
                                                                   "eval.num_samples=1"))}
    assert outcomes["eval"] == "ran" and outcomes["dpo"] == "skipped" and generated == []
    assert json.loads((recipe.stage_dir("eval") / "metrics.json").read_text()) == first
    assert first["dpo"]["ci95"]["implicit_reward_acc"]


def test_a_model_without_local_files_is_not_cached(tmp_path, user_cache):
    model_cfg = {**MODEL_DEFAULTS, "name_or_path": "some-org/some-model"}
    assert eval_cache.base_model_fingerprint(model_cfg) is None
    assert eval_cache.load(None) is None
    eval_cache.store(None, {"metrics": {}})  # nothing to write, nothing written
    assert not user_cache.exists()
