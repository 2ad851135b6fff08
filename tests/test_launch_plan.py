"""The launch plan: ``run_recipe.py RECIPE --dry-run`` and the per-stage memory estimate (pipeline/launch_plan.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.cli import main_run_recipe
from pipeline.config import load_recipe, validate_recipe
from pipeline.errors import PipelineError
from pipeline.launch_plan import GIB, NF4_DOUBLE_QUANT_BYTES, ModelShape, estimate_stage, parse_memory
from pipeline.model_config import gguf_config, read_model_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "model_configs"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
HUB_RECIPES = [r for r in RECIPES if r.stem != "quickstart"]


def fixture_config(slug: str) -> dict:
    return json.loads((FIXTURES / slug / "config.json").read_text())


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face hub cache holding only the fixtures' config.json files (what `huggingface-cli download` leaves)."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    for config_path in FIXTURES.glob("*/config.json"):
        repo = json.loads(config_path.read_text())["_name_or_path"]
        repo_dir = root / ("models--" + repo.replace("/", "--"))
        (repo_dir / "snapshots" / "abc123").mkdir(parents=True)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text("abc123")
        (repo_dir / "snapshots" / "abc123" / "config.json").write_text(config_path.read_text())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


@pytest.fixture
def empty_pipeline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "pipeline-cache"
    cache.mkdir()
    monkeypatch.setenv("PIPELINE_CACHE", str(cache))
    return cache


def dry_run(capsys: pytest.CaptureFixture[str], recipe: Path, *args: str) -> tuple[int, str]:
    code = main_run_recipe([str(recipe), "--dry-run", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*")) if path.exists() else []


# ----------------------------------------------------------------------------------------------- model shapes
@pytest.mark.parametrize("slug", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_parameter_count_and_bf16_weights_match_transformers_and_accelerates_calculator(slug: str) -> None:
    import torch
    from accelerate.commands.estimate import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    config = fixture_config(slug)
    shape = ModelShape.from_config(config)
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if not k.startswith("_")})
    hf_config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    assert shape.params == sum(p.numel() for p in model.parameters())
    # accelerate's model memory calculator (`accelerate estimate-memory`) on the same model, in bf16
    total_bytes, _ = calculate_maximum_sizes(model)
    recipe = validate_recipe({"model": {"name_or_path": "x"}, "data": {"sft": ["x.jsonl"]}, "sft": {}})
    weights = next(p for p in estimate_stage(recipe, "sft", shape).parts if p.name == "weights")
    assert weights.bytes == pytest.approx(total_bytes, rel=1e-5)


def test_four_bit_weights_pack_only_the_linear_layers_at_nf4_double_quant_size() -> None:
    shape = ModelShape.from_config(fixture_config("mistral-7b-v0.1"))
    raw = {"model": {"name_or_path": "x"}, "data": {"sft": ["x.jsonl"]}, "sft": {}}
    bf16 = estimate_stage(validate_recipe(raw), "sft", shape).parts[0].bytes
    raw["model"]["load_in_4bit"] = True
    nf4 = estimate_stage(validate_recipe(raw), "sft", shape).parts[0].bytes
    # the linear layers shrink from 16 bits to 4.13; embeddings and the untied head stay in bf16
    assert bf16 - nf4 == pytest.approx(shape.linear_params * (2 - NF4_DOUBLE_QUANT_BYTES))
    assert 3.4 < bf16 / nf4 < 3.6
    assert nf4 == pytest.approx(shape.linear_params * NF4_DOUBLE_QUANT_BYTES + shape.other_params * 2)


def test_llama2_7b_nf4_weights_match_the_published_measurement() -> None:
    # Llama-2-7B loaded with NF4 + double quantization occupies 3.60 GB on an H100 (Manning, "Quantization and Fast
    # Inference", sec. 8.4: torch.cuda.memory_allocated, i.e. GiB). Shape from meta-llama/Llama-2-7b-hf config.json.
    shape = ModelShape.from_config({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                                    "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
                                    "vocab_size": 32000, "tie_word_embeddings": False})
    recipe = validate_recipe({"model": {"name_or_path": "x", "load_in_4bit": True}, "data": {"sft": ["x.jsonl"]},
                              "sft": {}})
    weights = estimate_stage(recipe, "sft", shape).parts[0].bytes
    assert weights / GIB == pytest.approx(3.60, abs=0.02)


# ----------------------------------------------------------------------------------------------- estimate parts
def _part(estimate, name: str) -> float:
    return next(p.bytes for p in estimate.parts if p.name == name)


def test_activation_checkpointing_keeps_one_hidden_state_per_layer_instead_of_all_activations() -> None:
    shape = ModelShape.from_config(fixture_config("qwen2.5-0.5b"))
    raw = {"model": {"name_or_path": "x"}, "data": {"sft": ["x.jsonl"]},
           "sft": {"per_device_train_batch_size": 4, "max_length": 1024}}
    off = estimate_stage(validate_recipe(raw), "sft", shape)
    raw["sft"]["activation_checkpointing"] = True
    on = estimate_stage(validate_recipe(raw), "sft", shape)
    assert _part(on, "activations") < _part(off, "activations") / 5
    assert on.activations_other == _part(off, "activations")
    # everything else is unchanged
    assert _part(on, "logits") == _part(off, "logits") and _part(on, "weights") == _part(off, "weights")


def test_activations_and_sft_logits_grow_linearly_with_batch_and_length() -> None:
    shape = ModelShape.from_config(fixture_config("smollm2-360m"))

    def estimate(batch: int, length: int):
        return estimate_stage(validate_recipe({"model": {"name_or_path": "x"}, "data": {"sft": ["x.jsonl"]},
                                               "sft": {"per_device_train_batch_size": batch, "max_length": length}}),
                              "sft", shape)

    small, double_batch, double_length = estimate(2, 512), estimate(4, 512), estimate(2, 1024)
    for part in ("activations", "logits"):
        assert _part(double_batch, part) == pytest.approx(2 * _part(small, part))
        assert _part(double_length, part) == pytest.approx(2 * _part(small, part))
    # labelled-positions SFT loss: positions x vocabulary x (bf16 logits + fp32 log-softmax + fp32 gradient)
    assert _part(small, "logits") == 2 * 512 * shape.vocab * (2 + 4 + 4)


def test_dpo_without_precomputed_reference_counts_a_reference_forward() -> None:
    shape = ModelShape.from_config(fixture_config("llama-3.2-1b"))
    raw = {"model": {"name_or_path": "x"}, "data": {"sft": ["x.jsonl"], "dpo": ["y.jsonl"]}, "sft": {},
           "dpo": {"precompute_ref_log_probs": True}}
    precomputed = estimate_stage(validate_recipe(raw), "dpo", shape)
    raw["dpo"]["precompute_ref_log_probs"] = False
    live = estimate_stage(validate_recipe(raw), "dpo", shape)
    assert _part(precomputed, "reference") == 0
    assert _part(live, "reference") > 0
    assert live.training_peak > precomputed.training_peak
    # DPO runs chosen and rejected together: twice the tokens of an SFT batch of the same size and length
    sft = estimate_stage(validate_recipe({**raw, "sft": {"max_length": 1024, "per_device_train_batch_size": 2}}),
                         "sft", shape)
    raw["dpo"].update(max_length=1024, per_device_train_batch_size=2)
    assert _part(estimate_stage(validate_recipe(raw), "dpo", shape), "activations") == pytest.approx(
        2 * _part(sft, "activations"))


def test_dpo_merge_start_peaks_with_full_precision_weights_even_for_qlora() -> None:
    shape = ModelShape.from_config(fixture_config("mistral-7b-v0.1"))
    raw = {"model": {"name_or_path": "x", "load_in_4bit": True}, "data": {"sft": ["x.jsonl"], "dpo": ["y.jsonl"]},
           "sft": {}, "dpo": {"start": "merge"}}
    merged = estimate_stage(validate_recipe(raw), "dpo", shape)
    assert merged.merge_peak > shape.params * 2  # bf16 weights of the whole model, not 4-bit ones
    raw["dpo"]["start"] = "continue_adapter"
    raw["lora"] = {"train_template_tokens": False}
    assert estimate_stage(validate_recipe(raw), "dpo", shape).merge_peak == 0


def test_dpo_lora_sizes_the_dpo_adapter_only() -> None:
    shape = ModelShape.from_config(fixture_config("llama-3.2-1b"))
    raw = {"model": {"name_or_path": "x"}, "data": {"sft": ["x.jsonl"], "dpo": ["y.jsonl"]}, "sft": {}, "dpo": {},
           "lora": {"r": 16}}
    same = validate_recipe(raw)
    raw["dpo"]["lora"] = {"r": 64}
    own = validate_recipe(raw)
    assert _part(estimate_stage(own, "sft", shape), "LoRA adapter") == _part(estimate_stage(same, "sft", shape),
                                                                             "LoRA adapter")
    assert _part(estimate_stage(own, "dpo", shape), "LoRA adapter") == 4 * _part(estimate_stage(same, "dpo", shape),
                                                                                 "LoRA adapter")


def test_parse_memory_reads_gpu_sizes_and_refuses_nonsense() -> None:
    assert parse_memory("24GiB") == 24 * GIB
    assert parse_memory("24GB") == 24 * GIB  # a "24 GB" card holds 24 GiB
    assert parse_memory("16384MiB") == 16 * GIB
    assert parse_memory("80") == 80 * GIB
    with pytest.raises(PipelineError, match="give a size like 24GiB"):
        parse_memory("lots")


def test_gguf_header_gives_the_architecture_without_loading_tensors(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(64)
    writer.add_block_count(3)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_token_list([f"t{i}" for i in range(50)])
    writer.add_tensor("token_embd.weight", np.zeros((50, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = gguf_config(path)
    assert config == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 50,
                      "tie_word_embeddings": True}


# ----------------------------------------------------------------------------------------------- the dry run
@pytest.mark.parametrize("recipe", HUB_RECIPES, ids=lambda p: p.stem)
def test_dry_run_of_each_shipped_hub_recipe_prints_plan_and_estimate_offline_and_writes_nothing(
        recipe: Path, hub_cache: Path, empty_pipeline_cache: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # recipes name data/ and recipes/templates/ relative to the repository
    out = tmp_path / "run"
    hub_before = files_under(hub_cache)
    code, text = dry_run(capsys, recipe, "--gpu-memory", "24GiB", "--set", f"output_dir={out}")
    assert code == 0, text
    for stage in ("prepare", "sft", "dpo", "eval"):
        assert re.search(rf"^  {stage}\s+run\s+no output yet", text, re.M), text
    assert "fits in 24.00 GiB" in text and "WARNING" not in text
    assert not out.exists() and files_under(empty_pipeline_cache) == [] and files_under(hub_cache) == hub_before
    # the memory figures in the recipe's header are the estimator's (regenerate them when either changes)
    header = re.search(r"SFT (\d+\.\d) GiB, DPO (\d+\.\d) GiB", recipe.read_text())
    assert header, f"{recipe.name}: header lacks 'SFT x.x GiB, DPO y.y GiB'"
    loaded = load_recipe(recipe)
    shape = ModelShape.from_config(read_model_config(loaded.model).config)
    assert [float(x) for x in header.groups()] == [
        round(estimate_stage(loaded, stage, shape).peak / GIB, 1) for stage in ("sft", "dpo")]


def test_dry_run_of_the_quickstart_never_converts_the_model(
        empty_pipeline_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, text = dry_run(capsys, ROOT / "recipes" / "quickstart.yaml", "--set", f"output_dir={tmp_path / 'run'}")
    assert code == 0, text
    # with an empty model cache the config is unknown: the plan is printed, the estimate says what it needs
    assert "Memory estimate: needs the model's config.json" in text
    assert re.search(r"^  sft\s+run\s+fingerprint unknown until the model is converted", text, re.M), text
    assert files_under(empty_pipeline_cache) == [] and not (tmp_path / "run").exists()


def test_dry_run_offline_without_the_config_prints_the_plan_and_exits_0(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.chdir(ROOT)
    code, text = dry_run(capsys, ROOT / "recipes" / "qwen2.5-0.5b.yaml", "--set", f"output_dir={tmp_path / 'run'}")
    assert code == 0, text
    assert "Memory estimate: needs the model's config.json" in text and "huggingface-cli download" in text
    assert re.search(r"^  dpo\s+run\s+no output yet", text, re.M), text  # fingerprints need no config
    assert not (tmp_path / "run").exists()


def test_dry_run_warns_when_a_stage_will_not_fit_and_its_advice_fits(
        hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    recipe = ROOT / "recipes" / "zephyr-7b-qlora.yaml"
    unchecked = ["--set", "sft.activation_checkpointing=false", "--set", f"output_dir={tmp_path / 'run'}"]
    code, text = dry_run(capsys, recipe, "--gpu-memory", "16GiB", *unchecked)
    assert code == 3, text
    assert re.search(r"WARNING: sft needs [\d.]+ GiB and will not fit in 16.00 GiB", text), text
    advice = re.findall(r"--set (\S+=\S+(?: \S+=\S+)*)  ->  [\d.]+ GiB \(fits\)", text)
    assert advice and "sft.activation_checkpointing=true" in advice[0]
    fixed = [arg for change in advice[0].split() for arg in ("--set", change)]
    code, text = dry_run(capsys, recipe, "--gpu-memory", "16GiB", *unchecked, *fixed)
    assert code == 0 and "WARNING" not in text, text


def test_dry_run_says_which_stages_skip_or_resume_with_the_runners_fingerprints(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import tiny_sft_rows, write_jsonl

    from pipeline.runner import plan_recipe, run_recipe

    data = write_jsonl(tmp_path / "sft.jsonl", tiny_sft_rows())
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(json.dumps({
        "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tiny_model_dir), "chat_template": "chatml"},
        "data": {"sft": [{"path": str(data)}]}, "sft": {"max_steps": 1, "max_length": 64}}))
    recipe = load_recipe(recipe_path)
    planned = {p.stage: p for p in plan_recipe(recipe)}
    outcome = run_recipe(recipe, stage="prepare", log=lambda _: None)[0]
    assert planned["prepare"].fingerprint == outcome.fingerprint  # the plan computes what the run computes
    sft_dir = recipe.stage_dir("sft")
    (sft_dir / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (sft_dir / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (sft_dir / "in_progress.json").write_text(json.dumps({"fingerprint": planned["sft"].fingerprint}))
    before = files_under(tmp_path / "run")
    code, text = dry_run(capsys, recipe_path)
    assert code == 0, text
    assert re.search(r"^  prepare\s+skip\s+up to date", text, re.M), text
    assert re.search(r"^  sft\s+resume\s+from checkpoint-3", text, re.M), text
    assert files_under(tmp_path / "run") == before  # no lock file, nothing cleaned up or created
    code, text = dry_run(capsys, recipe_path, "--set", "sft.learning_rate=1e-3")
    assert re.search(r"^  sft\s+run\s+an interrupted run had other settings", text, re.M), text


# ----------------------------------------------------------------------------------------------- chat templates
def _tokenizer_with(directory: Path, specials: list[str], bos: str, eos: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user assistant system hello answer the question <|user|>"] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.save_pretrained(directory)
    (directory / "config.json").write_text('{"model_type": "llama"}')  # a model directory, as far as paths go
    return fast


@pytest.mark.parametrize(("template", "specials", "bos", "eos", "end_of_turn", "trained_rows"), [
    # Llama 3.x base vocabularies hold these (ids 128000, 128001, 128006, 128007, 128009)
    ("llama3.jinja", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
     "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", 3),
    # Mistral-7B-v0.1 has only <s>, </s>, <unk>: the turn ends with EOS
    ("zephyr.jinja", ["<unk>", "<s>", "</s>"], "<s>", "</s>", "</s>", 0),
])
def test_shipped_jinja_templates_train_the_answer_and_its_end_of_turn_only(
        tmp_path: Path, template: str, specials: list[str], bos: str, eos: str, end_of_turn: str,
        trained_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.models import load_tokenizer, stop_token_ids, template_token_ids

    monkeypatch.chdir(ROOT)
    _tokenizer_with(tmp_path, specials, bos, eos)
    model_cfg = {"name_or_path": str(tmp_path), "chat_template": f"recipes/templates/{template}", "revision": None,
                 "trust_remote_code": False}
    tokenizer = load_tokenizer(model_cfg)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "answer"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "answer" + end_of_turn  # the answer and the token that ends it; no prompt, no role header
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids(end_of_turn) in stop_token_ids(tokenizer)
    # the estimator budgets three trainable template-token rows; the Llama template has exactly three
    assert len(template_token_ids(tokenizer)) == trained_rows
