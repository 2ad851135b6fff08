"""End to end on a tiny model: prepare → sft → dpo → load → generate; skip, re-run, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from pipeline.config import apply_overrides, validate_recipe
from pipeline.errors import PipelineError
from pipeline.runner import run_recipe


def _run(raw: dict, *overrides: str, **kwargs) -> dict[str, str]:
    recipe = validate_recipe(apply_overrides(raw, overrides))
    return {o.stage: o.action for o in run_recipe(recipe, log=lambda _: None, **kwargs)}


def _manifest(raw: dict, stage: str) -> dict:
    return json.loads((Path(raw["output_dir"]) / stage / "manifest.json").read_text())


@pytest.fixture
def completed_run(tiny_recipe):
    assert _run(tiny_recipe) == {"prepare": "ran", "sft": "ran", "dpo": "ran"}
    return tiny_recipe


def test_full_run_writes_each_stage_with_manifest(completed_run):
    out = Path(completed_run["output_dir"])
    for stage in ("prepare", "sft", "dpo"):
        manifest = _manifest(completed_run, stage)
        assert manifest["status"] == "complete" and manifest["stage"] == stage
        assert set(manifest["versions"]) >= {"torch", "transformers", "peft", "trl"}
        assert not (out / stage / "checkpoints").exists()
        assert 0 < manifest["peak_rss_gb"] < 24  # this stage's own peak, not the machine's
        assert 0 < manifest["start_rss_gb"] <= manifest["peak_rss_gb"]
    assert _manifest(completed_run, "dpo")["inputs"]["sft"] == _manifest(completed_run, "sft")["fingerprint"]
    assert _manifest(completed_run, "dpo")["start"] == "merge"
    report = json.loads((out / "prepare" / "report.json").read_text())
    for kind in ("sft", "dpo"):
        part = report[kind]
        assert part["rows_in"] == part["kept"] + part["dropped"] + part["deduplicated"]
    assert (out / "sft" / "adapter_model.safetensors").is_file()
    assert (out / "dpo" / "sft_merged" / "model.safetensors").is_file()


def test_second_run_skips_every_stage(completed_run):
    assert _run(completed_run) == {"prepare": "skipped", "sft": "skipped", "dpo": "skipped"}


def test_changed_setting_reruns_that_stage_and_later_only(completed_run):
    before = _manifest(completed_run, "prepare")["fingerprint"]
    assert _run(completed_run, "sft.learning_rate=5e-3") == {"prepare": "skipped", "sft": "ran", "dpo": "ran"}
    assert _manifest(completed_run, "prepare")["fingerprint"] == before
    assert _run(completed_run, "sft.learning_rate=5e-3", "dpo.beta=0.2") == {
        "prepare": "skipped", "sft": "skipped", "dpo": "ran"}


def test_new_preference_data_reruns_dpo_but_keeps_the_finished_sft(completed_run):
    sft_before = _manifest(completed_run, "sft")["fingerprint"]
    prefs = completed_run["data"]["dpo"][0]["path"]
    limited = f"data.dpo=[{{path: '{prefs}', limit: 10}}]"
    assert _run(completed_run, limited) == {"prepare": "ran", "sft": "skipped", "dpo": "ran"}
    assert _manifest(completed_run, "sft")["fingerprint"] == sft_before
    prepare = _manifest(completed_run, "prepare")
    assert _manifest(completed_run, "dpo")["inputs"]["prepare"] == prepare["parts"]["dpo"]
    assert len(load_from_disk(str(Path(completed_run["output_dir"]) / "prepare" / "dpo_train"))) < 10
    # new SFT rows change the SFT data: SFT and everything after it re-run
    sft_data = completed_run["data"]["sft"][0]["path"]
    assert _run(completed_run, limited, f"data.sft=[{{path: '{sft_data}', format: alpaca, limit: 20}}]") == {
        "prepare": "ran", "sft": "ran", "dpo": "ran"}


def test_stage_flag_runs_only_that_stage_and_from_reruns_the_rest(completed_run):
    assert _run(completed_run, stage="sft", force=True) == {"sft": "ran"}
    # dpo was built from the previous sft output: it is now stale and re-runs on the next full run
    assert not (Path(completed_run["output_dir"]) / "dpo" / "manifest.json").exists()
    assert _run(completed_run) == {"prepare": "skipped", "sft": "skipped", "dpo": "ran"}
    assert _run(completed_run, from_stage="sft") == {"sft": "ran", "dpo": "ran"}


def test_missing_upstream_names_the_stage_to_run(tiny_recipe):
    with pytest.raises(PipelineError, match=r"needs stage 'prepare'.*--stage prepare"):
        _run(tiny_recipe, stage="sft")


def test_interrupted_stage_resumes_from_its_checkpoint(tiny_recipe):
    # max_steps reached part-way: stop after 2 of 4 steps, leaving checkpoint-2 and no manifest.
    _run(tiny_recipe, stage="prepare")
    from transformers import TrainerCallback

    class StopAtTwo(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    import pipeline.stages.sft as sft_stage

    recipe = validate_recipe(tiny_recipe)
    original = sft_stage.StopOnNonFiniteLoss
    sft_stage.StopOnNonFiniteLoss = lambda: StopAtTwo()  # our own module: inject a kill at step 2
    try:
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe, stage="sft", log=lambda _: None)
    finally:
        sft_stage.StopOnNonFiniteLoss = original
    stage_dir = Path(tiny_recipe["output_dir"]) / "sft"
    assert not (stage_dir / "manifest.json").exists()
    assert (stage_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert _run(tiny_recipe, stage="sft") == {"sft": "resumed"}
    manifest = _manifest(tiny_recipe, "sft")
    assert manifest["resumed_from_step"] == 2
    assert manifest["metrics"]["train_runtime"] >= 0
    history = json.loads((stage_dir / "log_history.json").read_text())
    assert max(h["step"] for h in history) == 4


def test_sft_trains_the_turn_token_embeddings(completed_run):
    from safetensors.torch import load_file

    weights = load_file(Path(completed_run["output_dir"]) / "sft" / "adapter_model.safetensors")
    deltas = [v for k, v in weights.items() if "trainable_tokens" in k]
    assert deltas and all(d.abs().sum() > 0 for d in deltas)


def test_adapter_trains_in_the_model_dtype_when_the_recipe_asks(tiny_recipe):
    """lora.adapter_dtype: model keeps the adapter (turn-token rows included) in bf16 on bf16 weights; it trains."""
    from safetensors.torch import load_file

    out = Path(tiny_recipe["output_dir"])
    assert _run(tiny_recipe, "model.dtype=bfloat16") == {"prepare": "ran", "sft": "ran", "dpo": "ran"}
    default = load_file(out / "sft" / "adapter_model.safetensors")
    assert {v.dtype for v in default.values()} == {torch.float32}  # peft's default: float32 adapters
    assert _run(tiny_recipe, "model.dtype=bfloat16", "lora.adapter_dtype=model") == {
        "prepare": "skipped", "sft": "ran", "dpo": "ran"}
    for stage in ("sft", "dpo"):
        weights = load_file(out / stage / "adapter_model.safetensors")
        assert {v.dtype for v in weights.values()} == {torch.bfloat16}, stage
        assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k), stage  # B starts at zero
        assert all(torch.isfinite(v.float()).all() for v in weights.values())


def test_load_returns_adapter_model_that_generates_and_stops(completed_run):
    from pipeline.inference import generate, load

    model, tokenizer = load(Path(completed_run["output_dir"]) / "dpo")
    assert tokenizer.chat_template and "{% generation %}" in tokenizer.chat_template
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    msgs = [{"role": "user", "content": "Say hello."}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    results = generate(model, tokenizer, [msgs, msgs], max_new_tokens=4)
    assert len(results) == 2 and results[0]["text"] == results[1]["text"]


def test_stage_dir_loads_with_stock_peft(completed_run):
    from peft import AutoPeftModelForCausalLM, PeftModel

    model = AutoPeftModelForCausalLM.from_pretrained(Path(completed_run["output_dir"]) / "sft")
    assert isinstance(model, PeftModel)


def test_dpo_reference_is_the_sft_model_not_the_raw_base(completed_run):
    """In merge mode, the adapter-disabled DPO model (TRL's reference) equals base + SFT adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.inference import load

    out = Path(completed_run["output_dir"])
    dpo_model, tokenizer = load(out / "dpo", dtype="float32")
    base = AutoModelForCausalLM.from_pretrained(completed_run["model"]["name_or_path"], dtype=torch.float32)
    sft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(completed_run["model"]["name_or_path"], dtype=torch.float32), out / "sft")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello 3."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad(), dpo_model.disable_adapter():
        reference = dpo_model(input_ids=ids).logits
    with torch.no_grad():
        sft_logits, base_logits = sft(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.allclose(reference, sft_logits, atol=1e-2)
    assert (reference - base_logits).abs().max() > 1e-2


def test_dpo_lora_sets_the_dpo_adapter_and_leaves_sft_alone(completed_run):
    out = Path(completed_run["output_dir"])

    def rank(stage: str) -> int:
        return json.loads((out / stage / "adapter_config.json").read_text())["r"]

    assert rank("sft") == rank("dpo") == 4
    # an empty dpo.lora, or one equal to the lora section, is the same adapter: nothing re-runs
    assert set(_run(completed_run, "dpo.lora={}").values()) == {"skipped"}
    assert set(_run(completed_run, "dpo.lora.r=4").values()) == {"skipped"}
    assert _run(completed_run, "dpo.lora.r=8", "dpo.lora.lora_alpha=16") == {
        "prepare": "skipped", "sft": "skipped", "dpo": "ran"}
    assert (rank("sft"), rank("dpo")) == (4, 8)
    assert json.loads((out / "dpo" / "adapter_config.json").read_text())["lora_alpha"] == 16


def test_continue_adapter_mode_trains_the_sft_adapter(tiny_recipe):
    with pytest.raises(PipelineError, match="train_template_tokens"):
        _run(tiny_recipe, "dpo.start=continue_adapter")
    completed_run = tiny_recipe
    assert _run(completed_run, "dpo.start=continue_adapter", "lora.train_template_tokens=false") == {
        "prepare": "skipped", "sft": "ran", "dpo": "ran"}
    manifest = _manifest(completed_run, "dpo")
    assert manifest["start"] == "continue_adapter"
    from safetensors.torch import load_file

    out = Path(completed_run["output_dir"])
    sft_w, dpo_w = load_file(out / "sft" / "adapter_model.safetensors"), load_file(out / "dpo" / "adapter_model.safetensors")
    assert sft_w.keys() == dpo_w.keys()
    assert any(not torch.equal(sft_w[k], dpo_w[k]) for k in sft_w)


def test_eval_reference_for_dpo_scores_like_the_dpo_model_with_its_adapter_disabled(completed_run):
    """The eval stage scores DPO pairs against the merged SFT model; that must be TRL's reference exactly."""
    from pipeline.evaluation import pair_logps
    from pipeline.inference import load

    out = Path(completed_run["output_dir"])
    pairs = [{"prompt": [{"role": "user", "content": f"Say hello number {i}."}],
              "chosen": [{"role": "assistant", "content": f"hello {i}."}],
              "rejected": [{"role": "assistant", "content": f"no. I will ramble on {i} times."}]} for i in range(3)]
    sft_model, sft_tokenizer = load(out / "sft", merge=True)
    as_reference = pair_logps(sft_model, sft_tokenizer, pairs, desc="sft")
    dpo_model, dpo_tokenizer = load(out / "dpo")
    with dpo_model.disable_adapter():
        trl_reference = pair_logps(dpo_model, dpo_tokenizer, pairs, desc="dpo reference")
    policy = pair_logps(dpo_model, dpo_tokenizer, pairs, desc="dpo")
    for (c1, r1), (c2, r2) in zip(as_reference, trl_reference, strict=True):
        assert abs(c1 - c2) < 1e-3 and abs(r1 - r2) < 1e-3
    assert any(abs(p[0] - q[0]) > 1e-3 for p, q in zip(policy, trl_reference, strict=True))  # DPO moved the model
