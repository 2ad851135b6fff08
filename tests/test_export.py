"""Export: merged checkpoints and GGUF files, each read back by plain transformers and compared with the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, tiny_pref_rows, tiny_sft_rows, write_jsonl

from pipeline.cli import main_export
from pipeline.config import validate_recipe
from pipeline.errors import PipelineError
from pipeline.export import CHECK_CONVERSATIONS, check_export, export
from pipeline.gguf_export import runtime_chat_template
from pipeline.inference import chat_inputs, generate, load
from pipeline.runner import run_recipe

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare → sft → dpo (dpo.start: merge) on the tiny Llama; returns the run directory."""
    tmp = tmp_path_factory.mktemp("export-run")
    write_jsonl(tmp / "sft.jsonl", tiny_sft_rows())
    write_jsonl(tmp / "prefs.jsonl", tiny_pref_rows())
    raw = {
        "name": "tiny", "output_dir": str(tmp / "runs"),
        # float32 spelt out: the bounds below are float32's, and `auto` is bf16 on AVX512-BF16 / AMX CPUs
        "model": {"name_or_path": str(build_tiny_model(tmp / "model")), "chat_template": "chatml", "dtype": "float32"},
        "data": {"sft": [{"path": str(tmp / "sft.jsonl"), "format": "alpaca"}],
                 "dpo": [{"path": str(tmp / "prefs.jsonl")}], "eval_fraction": 0.2, "seed": 1},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "sft": {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_length": 128,
                "save_steps": 2, "logging_steps": 1, "report_to": "none"},
        "dpo": {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_length": 128,
                "save_steps": 2, "logging_steps": 1, "report_to": "none"},
    }
    run_recipe(validate_recipe(raw), log=lambda _: None)
    return tmp / "runs"


@torch.inference_mode()
def _logits(model, tokenizer, conversation) -> torch.Tensor:
    return model(**chat_inputs(tokenizer, conversation, model.device)).logits.float()


def _greedy(model, tokenizer) -> list[str]:
    return [a["text"] for a in generate(model, tokenizer, CHECK_CONVERSATIONS, max_new_tokens=16, continuous=False)]


def _gguf_metadata(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("tokenizer.ggml.") or key.endswith("_id") or key.endswith(".pre")}


# ----------------------------------------------------------------------------------------------- merged
def test_merged_dpo_export_loads_with_plain_transformers_and_matches_inference_load(stages, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "merged"
    record = export(stages / "dpo", out, fmt="merged", dtype="float32", **QUIET)
    assert any(out.glob("*.safetensors")) and record["check"]["tokens_identical"]
    assert json.loads((out / "export.json").read_text())["source"] == str((stages / "dpo").resolve())

    exported = AutoModelForCausalLM.from_pretrained(out).eval()  # no peft, no pipeline code
    tokenizer = AutoTokenizer.from_pretrained(out)
    stage_model, stage_tok = load(stages / "dpo")  # base + merged SFT + DPO adapter (unmerged PeftModel)
    sft_model, _ = load(stages / "sft")
    assert tokenizer.chat_template == stage_tok.chat_template
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in GenerationConfig.from_pretrained(out).eos_token_id
    for conversation in CHECK_CONVERSATIONS:
        ours = _logits(exported, tokenizer, conversation)
        torch.testing.assert_close(ours, _logits(stage_model, stage_tok, conversation), atol=1e-4, rtol=1e-4)
        assert (ours - _logits(sft_model, stage_tok, conversation)).abs().max() > 1e-3  # DPO is in it
    assert _greedy(exported, tokenizer) == _greedy(stage_model, stage_tok)


def test_merged_export_defaults_to_bfloat16_weights_and_records_it_in_the_config(stages, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "merged"
    record = export(stages / "sft", out, fmt="merged", **QUIET)
    assert record["type"] == "bfloat16" and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
        assert "lm_head.weight" not in handle.keys()  # tied to the embedding: stored once
    assert record["check"]["relative_logit_diff"] <= 3e-2


# ----------------------------------------------------------------------------------------------- gguf
@pytest.mark.parametrize(("options", "relative_bound"), [
    ({"dtype": "float32"}, 1e-6),
    ({}, 1e-3),  # float16, the default
    ({"quant": "q8_0"}, 1e-2),
])
def test_gguf_export_reads_back_through_transformers_with_the_same_logits_and_answers(
        stages, tmp_path, options, relative_bound):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gguf"
    record = export(stages / "dpo", out, fmt="gguf", **options, **QUIET)
    gguf_file = record["gguf"] and next(out.glob("*.gguf")).name
    assert gguf_file == f"runs-dpo-{record['type']}.gguf"
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=gguf_file)
    stage_model, stage_tok = load(stages / "dpo", merge=True)
    assert tokenizer.chat_template == runtime_chat_template(stage_tok.chat_template)
    for conversation in CHECK_CONVERSATIONS:
        ids = chat_inputs(tokenizer, conversation, "cpu")["input_ids"]
        assert torch.equal(ids, chat_inputs(stage_tok, conversation, "cpu")["input_ids"])
        theirs = _logits(stage_model, stage_tok, conversation)
        diff = (_logits(model, tokenizer, conversation) - theirs).abs().max()
        assert diff <= relative_bound * theirs.abs().max()
    model.generation_config.eos_token_id = stage_model.generation_config.eos_token_id
    tokenizer.pad_token = stage_tok.pad_token
    assert _greedy(model, tokenizer) == _greedy(stage_model, stage_tok)

    metadata = _gguf_metadata(out / gguf_file)
    assert metadata["tokenizer.ggml.eot_token_id"] == stage_tok.convert_tokens_to_ids("<|im_end|>")
    assert metadata["tokenizer.ggml.eos_token_id"] == stage_tok.eos_token_id
    assert metadata["tokenizer.ggml.pre"] == "gpt-2"
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{gguf_file}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile


def test_gemma3_gguf_export_stores_norms_plus_one_and_round_trips(tmp_path):
    """Gemma's RMSNorm scales by (1 + w): llama.cpp and transformers' reader expect w + 1 in the file."""
    import gguf
    from test_gguf import write_tiny_gemma3_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.gguf import convert_gguf
    from pipeline.models import GEMMA_TEMPLATE

    # head_dim 256 = Gemma 3's query_pre_attn_scalar, which a GGUF cannot state; 6 layers: one full-attention
    source = convert_gguf(write_tiny_gemma3_gguf(tmp_path / "src.gguf", layers=6, head_dim=256),
                          cache_dir=tmp_path / "cache", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # like training would: weights off the q8_0 grid the source file had
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = GEMMA_TEMPLATE
    model.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")

    # f32: the file holds exactly these weights, so answers must match too (this random model's answers are too
    # close to ties for q8_0's rounding; the q8_0 bound is tested on the trained tiny Llama above)
    record = export(tmp_path / "merged", tmp_path / "out", fmt="gguf", dtype="float32", **QUIET)
    assert record["gguf"]["architecture"] == "gemma3" and record["gguf"]["tokenizer_model"] == "llama"
    assert record["check"]["tokens_identical"] and record["check"]["greedy_identical"] == len(CHECK_CONVERSATIONS)
    path = next((tmp_path / "out").glob("*.gguf"))
    reader = gguf.GGUFReader(str(path))
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    torch.testing.assert_close(torch.from_numpy(stored.data.copy()),
                               model.model.layers[0].input_layernorm.weight.detach() + 1)
    reread = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=path.name, dtype=torch.float32)
    reread_tok = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=path.name)
    conversation = [{"role": "user", "content": "hello the cat!  two  spaces\n\nand lines"}]
    ids = chat_inputs(tokenizer, conversation, "cpu")["input_ids"]
    assert torch.equal(chat_inputs(reread_tok, conversation, "cpu")["input_ids"], ids)
    with torch.no_grad():
        ours, theirs = reread(input_ids=ids).logits, model(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert 'PARAMETER stop "<end_of_turn>"' in (tmp_path / "out" / "Modelfile").read_text()


def test_qwen2_gguf_export_keeps_its_pre_tokenizer_split_and_qkv_biases(tmp_path):
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from pipeline.gguf_export import _BYTE_LEVEL_SPLITS
    from pipeline.models import CHATML_TEMPLATE

    build_tiny_model(tmp_path / "llama")
    backend = Tokenizer.from_file(str(tmp_path / "llama" / "tokenizer.json"))
    qwen2_split = next(p for p, name in _BYTE_LEVEL_SPLITS.items() if name == "qwen2")
    backend.pre_tokenizer = pre_tokenizers.Sequence([  # as in Qwen2's tokenizer.json
        pre_tokenizers.Split(Regex(qwen2_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", chat_template=CHATML_TEMPLATE)
    torch.manual_seed(0)
    # more embedding rows than tokens, as Qwen pads its vocabulary (and AutoTokenizer's Qwen2Tokenizer adds one)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer) + 16, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()  # biases are zero at init: make them count
    model.save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    assert len(AutoTokenizer.from_pretrained(tmp_path / "qwen2")) < model.config.vocab_size

    record = export(tmp_path / "qwen2", tmp_path / "out", fmt="gguf", dtype="float32", **QUIET)
    assert record["check"]["max_logit_diff"] < 1e-4 and record["check"]["tokens_identical"]
    metadata = _gguf_metadata(next((tmp_path / "out").glob("*.gguf")))
    assert metadata["tokenizer.ggml.pre"] == "qwen2" and metadata["general.architecture"] == "qwen2"


# ----------------------------------------------------------------------------------------------- refusals
def test_gguf_export_refuses_an_unsupported_architecture_and_writes_nothing(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    build_tiny_model(tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llama")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(PipelineError, match=r"GGUF export supports \['gemma3_text', 'llama', 'qwen2'\].*'gpt2'.*"
                                            r"--format merged"):
        export(tmp_path / "gpt2", tmp_path / "out", fmt="gguf", **QUIET)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_out_dir_without_force(stages, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main_export([str(stages / "sft"), str(out), "--format", "merged"]) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main_export([str(stages / "sft"), str(out), "--format", "gguf", "--quant", "q8_0", "--force"]) == 0
    assert not (out / "keep.txt").exists() and len(list(out.glob("*-q8_0.gguf"))) == 1
    with pytest.raises(PipelineError, match="overlaps the stage"):
        export(stages / "sft", stages / "sft" / "export", fmt="merged", force=True, **QUIET)
    with pytest.raises(PipelineError, match="--quant must be one of q8_0"):
        export(stages / "sft", tmp_path / "q4", fmt="gguf", quant="q4_k_m", **QUIET)


def test_round_trip_check_fails_on_an_export_of_other_weights(stages, tmp_path):
    """The check can fail: a GGUF of the SFT model does not pass as the DPO model's export."""
    export(stages / "sft", tmp_path / "sft", fmt="gguf", dtype="float32", **QUIET)
    gguf_file = next((tmp_path / "sft").glob("*.gguf")).name
    with pytest.raises(PipelineError, match="Round-trip check failed.*logits"):
        check_export(load(stages / "dpo", merge=True), tmp_path / "sft", "f32", gguf_file)
