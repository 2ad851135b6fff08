"""Shared fixtures: a tiny tokenizer and tiny random causal LMs built locally (no network, seconds)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PIPELINE_ESTIMATE", "0")  # runs print no time estimate; tests/test_estimate.py turns it on

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea. Waves fold in silver light.",
    "Answer in all lowercase letters. keep it short and clear.",
    "user assistant system model: 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) { } [ ] , . ; : ! ? ' \"",
    "Summarise the passage. List three ideas. Explain how to boil an egg in simple steps.",
]


def build_tiny_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer with ChatML and Gemma turn tokens as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", padding_side="left",
    )
    fast.save_pretrained(directory)


def build_tiny_model(directory: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A 2-layer random causal LM (hidden 32, tied embeddings) saved with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    build_tiny_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "gemma3":  # scaled input embeddings (what the quickstart's gemma-3-270m has)
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, sliding_window=16))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def _test_user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never write to the user's cache (``~/.cache/instruct-pipeline``): the eval results, calibrations and
    hash memos of tiny models go to one directory per test session, set before any other fixture runs (so also
    for the subprocesses module-scoped fixtures start). A test may point it elsewhere."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PIPELINE_CACHE", str(tmp_path_factory.getbasetemp() / "user-cache"))
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_sft_rows(n: int = 24) -> list[dict]:
    topics = ["the sea", "a cat", "paris", "bread", "the moon", "rain", "a tree", "music"]
    rows = []
    for i in range(n):
        topic = topics[i % len(topics)]
        rows.append({"instruction": f"Write one line about {topic} ({i}).", "output": f"Here is {topic}: quiet {i}."})
    return rows


def tiny_pref_rows(n: int = 16) -> list[dict]:
    return [
        {"prompt": f"Say hello number {i}.", "chosen": f"hello {i}.", "rejected": f"no. I will ramble on {i} times."}
        for i in range(n)
    ]


@pytest.fixture
def tiny_recipe(tmp_path: Path, tiny_model_dir: Path) -> dict:
    """A complete raw recipe (prepare → sft → dpo) on the tiny model; tests tweak it."""
    write_jsonl(tmp_path / "data" / "sft.jsonl", tiny_sft_rows())
    write_jsonl(tmp_path / "data" / "prefs.jsonl", tiny_pref_rows())
    return {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs" / "tiny"),
        "model": {"name_or_path": str(tiny_model_dir), "chat_template": "chatml"},
        "data": {
            "sft": [{"path": str(tmp_path / "data" / "sft.jsonl"), "format": "alpaca"}],
            "dpo": [{"path": str(tmp_path / "data" / "prefs.jsonl")}],
            "eval_fraction": 0.2,
            "seed": 1,
        },
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "sft": {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1.0e-2, "max_length": 128,
                "save_steps": 2, "logging_steps": 1},
        "dpo": {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1.0e-2, "max_length": 128,
                "save_steps": 2, "logging_steps": 1},
    }


@pytest.fixture(scope="module")
def sft_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished SFT stage of the tiny model (prepare → sft), built once per test module."""
    from pipeline.config import validate_recipe
    from pipeline.runner import run_recipe

    tmp = tmp_path_factory.mktemp("sft-run")
    write_jsonl(tmp / "sft.jsonl", tiny_sft_rows())
    raw = {
        "name": "tiny", "output_dir": str(tmp / "runs"),
        "model": {"name_or_path": str(build_tiny_model(tmp / "model")), "chat_template": "chatml"},
        "data": {"sft": [{"path": str(tmp / "sft.jsonl"), "format": "alpaca"}], "eval_fraction": 0.2, "seed": 1},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "sft": {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_length": 128,
                "save_steps": 2, "logging_steps": 1, "report_to": "none"},
    }
    run_recipe(validate_recipe(raw), log=lambda _: None)
    return tmp / "runs" / "sft"


def lora_output_dtypes(model, compute):
    """``compute()``'s result and the dtypes the LoRA A products came out in while it ran."""
    seen = set()
    hooks = [module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for name, module in model.named_modules() if name.endswith("lora_A.default")]
    try:
        result = compute()
    finally:
        for hook in hooks:
            hook.remove()
    return result, seen


def relative_difference(ours: dict, theirs: dict) -> float:
    """||ours - theirs|| / ||theirs|| over every tensor of two same-keyed dicts (gradients), in float32."""
    num = sum(float((ours[name].float() - grad.float()).norm() ** 2) for name, grad in theirs.items())
    den = sum(float(grad.float().norm() ** 2) for grad in theirs.values())
    return (num / den) ** 0.5
