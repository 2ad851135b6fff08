"""The base model's evaluation is cached in the user cache and reused only for exactly the same evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from pipeline.config import MODEL_DEFAULTS, validate_recipe
from pipeline.models import load_tokenizer
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
    assert "base: evaluation read from the cache" in capsys.readouterr().out
    assert second == first and first["base"]["heldout_loss"] > 0
    assert (second_dir / "generations_base.jsonl").read_text() == (first_dir / "generations_base.jsonl").read_text()
    assert "| format_compliance |" in (second_dir / "report.md").read_text()


def test_other_generation_settings_are_not_read_from_the_cache(tiny_recipe, tmp_path, user_cache, capsys):
    _run_base_eval(tiny_recipe, tmp_path, "one")
    _run_base_eval(tiny_recipe, tmp_path, "two", max_new_tokens=4)
    assert "read from the cache" not in capsys.readouterr().out
    assert len(list((user_cache / "eval").glob("base-*.json"))) == 2


def test_the_cache_key_follows_model_weights_template_inputs_and_settings(tiny_model_dir, tmp_path, user_cache):
    from conftest import build_tiny_model

    model_cfg = {**MODEL_DEFAULTS, "name_or_path": str(tiny_model_dir), "chat_template": "chatml"}
    tokenizer = load_tokenizer(model_cfg)
    inputs, settings = {"prompts": PROMPTS}, {"max_new_tokens": 5}
    path = eval_cache.cache_path(model_cfg, tokenizer, inputs, settings)
    assert path == eval_cache.cache_path(model_cfg, tokenizer, json.loads(json.dumps(inputs)), dict(settings))
    other_weights = build_tiny_model(tmp_path / "other", seed=1)
    gemma = load_tokenizer({**model_cfg, "chat_template": "gemma"})
    variants = [
        eval_cache.cache_path({**model_cfg, "name_or_path": str(other_weights)}, tokenizer, inputs, settings),
        eval_cache.cache_path(model_cfg, gemma, inputs, settings),
        eval_cache.cache_path(model_cfg, tokenizer, {"prompts": PROMPTS[:1]}, settings),
        eval_cache.cache_path(model_cfg, tokenizer, inputs, {"max_new_tokens": 6}),
        eval_cache.cache_path({**model_cfg, "dtype": "bfloat16"}, tokenizer, inputs, settings),
    ]
    assert len({path, *variants}) == len(variants) + 1
    assert path.parent == user_cache / "eval"


def test_a_model_without_local_files_is_not_cached(tmp_path, user_cache):
    model_cfg = {**MODEL_DEFAULTS, "name_or_path": "some-org/some-model"}
    assert eval_cache.base_model_fingerprint(model_cfg) is None
    assert eval_cache.load(None) is None
    eval_cache.store(None, {"metrics": {}})  # nothing to write, nothing written
    assert not user_cache.exists()
