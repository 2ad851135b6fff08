"""Recipe validation: errors name the key, its section and the closest valid key, before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import apply_overrides, load_recipe, validate_recipe
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_filled_and_trl_fields_pass_through(tiny_recipe):
    recipe = validate_recipe(tiny_recipe)
    assert recipe.sft["assistant_only_loss"] is True
    assert recipe.sft["max_steps"] == 4
    assert recipe.dpo["beta"] == 0.1 and recipe.dpo["start"] == "merge"
    assert recipe.lora["r"] == 4
    assert recipe.enabled_stages() == ["prepare", "sft", "dpo"]


def test_misspelt_trl_key_names_section_and_closest_field(tiny_recipe):
    tiny_recipe["sft"]["learning_rte"] = 1e-4
    with pytest.raises(PipelineError, match=r"'learning_rte' in recipe section 'sft'.*'learning_rate'"):
        validate_recipe(tiny_recipe)


def test_misspelt_lora_key_suggests_peft_field(tiny_recipe):
    tiny_recipe["lora"]["lora_alfa"] = 8
    with pytest.raises(PipelineError, match=r"'lora_alfa'.*'lora'.*'lora_alpha'"):
        validate_recipe(tiny_recipe)


def test_unknown_model_and_top_level_keys_are_errors(tiny_recipe):
    with pytest.raises(PipelineError, match=r"'chat_templat'.*'model'.*'chat_template'"):
        validate_recipe({**tiny_recipe, "model": {**tiny_recipe["model"], "chat_templat": "chatml"}})
    with pytest.raises(PipelineError, match=r"'lorra'.*Did you mean 'lora'"):
        validate_recipe({**tiny_recipe, "lorra": {}})


def test_wrong_type_is_an_error(tiny_recipe):
    tiny_recipe["sft"]["per_device_train_batch_size"] = "four"
    with pytest.raises(PipelineError, match=r"sft.per_device_train_batch_size must be of type int"):
        validate_recipe(tiny_recipe)


@pytest.mark.parametrize("section", ["sft", "dpo"])
def test_save_steps_off_the_logging_cadence_is_refused_before_anything_loads(tiny_recipe, section):
    # the NaN-loss guard reads the logged loss: a save between two logs could checkpoint broken weights
    with pytest.raises(PipelineError, match=rf"{section}.save_steps \(10\) must be a multiple of "
                                            rf"{section}.logging_steps \(4\)"):
        validate_recipe(apply_overrides(tiny_recipe, [f"{section}.save_steps=10", f"{section}.logging_steps=4"]))
    validate_recipe(apply_overrides(tiny_recipe, [f"{section}.save_steps=10", f"{section}.logging_steps=2"]))


def test_float_written_without_dot_is_accepted(tiny_recipe):
    # YAML 1.1 reads 1e-4 as a string; users write it all the time.
    recipe = validate_recipe(apply_overrides(tiny_recipe, ["sft.learning_rate=1e-4"]))
    assert recipe.sft["learning_rate"] == pytest.approx(1e-4)


def test_set_override_reaches_nested_field(tiny_recipe):
    recipe = validate_recipe(apply_overrides(tiny_recipe, ["dpo.beta=0.3", "data.seed=7"]))
    assert recipe.dpo["beta"] == 0.3 and recipe.data["seed"] == 7


def test_dpo_start_mode_is_checked(tiny_recipe):
    tiny_recipe["dpo"]["start"] = "restart"
    with pytest.raises(PipelineError, match=r"dpo.start must be one of \['merge', 'continue_adapter'\]"):
        validate_recipe(tiny_recipe)


def test_dpo_lora_is_checked_like_the_lora_section_and_laid_over_it(tiny_recipe):
    recipe = validate_recipe(apply_overrides(tiny_recipe, ["dpo.lora.r=8", "dpo.lora.lora_alpha=16"]))
    assert recipe.stage_lora("dpo") == {**recipe.lora, "r": 8, "lora_alpha": 16}
    assert recipe.stage_lora("sft") == recipe.lora and recipe.lora["r"] == 4
    assert validate_recipe(tiny_recipe).stage_lora("dpo") == recipe.lora
    with pytest.raises(PipelineError, match=r"'lora_alfa' in recipe section 'dpo.lora'.*'lora_alpha'"):
        validate_recipe(apply_overrides(tiny_recipe, ["dpo.lora.lora_alfa=16"]))
    with pytest.raises(PipelineError, match=r"dpo.lora.r must be of type int"):
        validate_recipe(apply_overrides(tiny_recipe, ["dpo.lora.r=sixty"]))
    with pytest.raises(PipelineError, match="continue_adapter DPO trains the SFT adapter as it is"):
        validate_recipe(apply_overrides(tiny_recipe, ["dpo.lora.r=8", "dpo.start=continue_adapter"]))
    with pytest.raises(PipelineError, match="never trains the turn-token embeddings"):
        validate_recipe(apply_overrides(tiny_recipe, ["dpo.lora.train_template_tokens=false"]))
    with pytest.raises(PipelineError, match="dpo.lora must be a mapping"):
        validate_recipe(apply_overrides(tiny_recipe, ["dpo.lora=64"]))


def test_adapter_dtype_is_checked(tiny_recipe):
    tiny_recipe["lora"]["adapter_dtype"] = "bf16"
    with pytest.raises(PipelineError, match=r"lora.adapter_dtype must be one of \['float32', 'model'\]"):
        validate_recipe(tiny_recipe)


def test_output_dir_is_reserved_for_the_pipeline(tiny_recipe):
    tiny_recipe["sft"]["output_dir"] = "elsewhere"
    with pytest.raises(PipelineError, match="set by the pipeline"):
        validate_recipe(tiny_recipe)


def test_dpo_without_sft_is_rejected(tiny_recipe):
    del tiny_recipe["sft"]
    with pytest.raises(PipelineError, match="DPO starts from SFT"):
        validate_recipe(tiny_recipe)


def test_unknown_data_source_key(tiny_recipe):
    tiny_recipe["data"]["sft"][0]["fromat"] = "alpaca"
    with pytest.raises(PipelineError, match=r"'fromat'.*'format'"):
        validate_recipe(tiny_recipe)


def test_cli_prints_one_paragraph_without_traceback(tmp_path, tiny_recipe):
    tiny_recipe["sft"]["learning_rte"] = 1e-4
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_recipe.py"), str(recipe)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: Unknown key 'learning_rte'")


def test_shipped_recipes_validate():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        load_recipe(path)
