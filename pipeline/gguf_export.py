"""Write a (merged) causal LM and its tokenizer as a GGUF file: the writing half beside :mod:`pipeline.gguf`.

Used by :mod:`pipeline.export` (``--format gguf``). Written with the ``gguf`` package's public ``GGUFWriter``
following the conventions of llama.cpp's ``convert_hf_to_gguf.py`` (``TextModel.set_gguf_parameters``,
``LlamaModel``, ``Qwen2Model``, ``Gemma3Model``, ``_set_vocab_gpt2`` / ``_set_vocab_sentencepiece``) so that
llama.cpp-based runtimes and transformers' GGUF reader (``modeling_gguf_pytorch_utils``,
``integrations/gguf/gguf_tokenizer_mapping.py``) read it back as the same model:

- tensor names from ``gguf.get_tensor_name_map`` (what llama.cpp's ``map_tensor_name`` uses);
- ``llama``: the q/k projections permuted to GGML's rotary layout (``LlamaModel.permute``);
- ``gemma3``: every ``*norm.weight`` stored as ``w + 1`` (Gemma's RMSNorm multiplies by ``1 + w``;
  ``Gemma3Model.norm_shift``);
- a tied LM head is not written (``output.weight`` absent means tied, for both readers);
- 1-D tensors (norms, biases) stay float32; matrices take the requested type (llama.cpp's rule).

Supported: ``llama``, ``qwen2`` and ``gemma3`` (text) models, with a byte-level BPE tokenizer (GPT-2, Llama-3 or
Qwen2 pre-tokenizer) or a sentencepiece-style BPE one with byte fallback (Gemma). Anything else is refused
with a message rather than written wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError

# transformers model_type -> gguf architecture name (gguf.MODEL_ARCH_NAMES values)
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

# llama.cpp's token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Byte-level pre-tokenizer split patterns -> llama.cpp's ``tokenizer.ggml.pre`` name. llama.cpp recognises a
# tokenizer by hashing its output on a test text (``get_vocab_base_pre``); we recognise the split pattern
# itself. Patterns as in the models' tokenizer.json files (and transformers' GGUF_PRE_TOKENIZER_SPLITS).
_BYTE_LEVEL_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


def runtime_chat_template(template: str) -> str:
    """The chat template without transformers' ``{% generation %}`` markers (a training-only extension that
    llama.cpp's Jinja engine does not know); it renders the same conversations."""
    return _GENERATION_TAG.sub("", template)


def _check_config(config: Any) -> str:
    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise PipelineError(
            f"GGUF export supports {sorted(ARCHITECTURES)} models; this one is '{model_type}'. Export it with "
            "--format merged and convert that with llama.cpp's convert_hf_to_gguf.py."
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    problems = []
    rope = getattr(config, "rope_parameters", None) or {}
    rope_types = {p.get("rope_type", "default") for p in (rope.values() if model_type == "gemma3_text" else [rope])}
    if rope_types - {"default"}:
        problems.append(f"rope scaling {sorted(rope_types)}")
    if model_type == "qwen2" and head_dim * config.num_attention_heads != config.hidden_size:
        problems.append("a head_dim other than hidden_size / num_attention_heads")
    if model_type == "gemma3_text":
        pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                   for i in range(config.num_hidden_layers)]
        if list(config.layer_types) != pattern:
            problems.append("a sliding/full attention layer pattern other than Gemma 3's one-in-six")
        if config.query_pre_attn_scalar != head_dim or config.attn_logit_softcapping or \
                config.final_logit_softcapping:
            problems.append("query_pre_attn_scalar != head_dim, or logit soft-capping")
    if problems:
        raise PipelineError(f"This {model_type} model has {'; '.join(problems)}, which this GGUF export does not "
                            "write. Use --format merged (and llama.cpp's converter).")
    return ARCHITECTURES[model_type]


# ----------------------------------------------------------------------------------------------- hyper-parameters
def _write_hparams(writer: Any, config: Any, arch: str) -> None:
    """``TextModel.set_gguf_parameters`` + the per-architecture additions of convert_hf_to_gguf.py."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = config.rope_parameters or {}
    if arch == "gemma3":
        writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])  # global layers; local ones use 10 000
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    else:
        writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
        writer.add_rope_dimension_count(head_dim)
        if head_dim * config.num_attention_heads != config.hidden_size:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)


# ----------------------------------------------------------------------------------------------- tensors
def _permute_rotary(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> GGML's interleaved rotary layout (convert_hf_to_gguf ``LlamaModel.permute``)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def _encode(data: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """The array to write and its raw GGML type (None: the writer infers it from the numpy dtype)."""
    import gguf

    if data.ndim == 1 or kind == "f32":
        return data.astype(np.float32), None
    if kind == "f16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if kind == "bf16" else gguf.GGMLQuantizationType.Q8_0
    try:
        return gguf.quants.quantize(data.astype(np.float32), qtype), qtype
    except gguf.QuantError:  # a row length that is no multiple of the block size: llama.cpp falls back to f16
        return data.astype(np.float16), None


def _write_tensors(writer: Any, model: Any, arch: str, kind: str) -> int:
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    count = 0
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # an absent output.weight means "tied" to llama.cpp and transformers alike
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base)
        if gguf_name is None:
            raise PipelineError(f"GGUF export has no name for the tensor '{hf_name}' of this {arch} model.")
        data = tensor.detach().to(torch.float32).cpu()
        if arch == "llama" and base.endswith("self_attn.q_proj"):
            data = _permute_rotary(data, config.num_attention_heads)
        elif arch == "llama" and base.endswith("self_attn.k_proj"):
            data = _permute_rotary(data, config.num_key_value_heads)
        elif arch == "gemma3" and hf_name.endswith("norm.weight"):
            data = data + 1.0
        array, raw_dtype = _encode(data.numpy(), kind)
        writer.add_tensor(f"{gguf_name}.{suffix}", array, raw_dtype=raw_dtype)
        count += 1
    return count


# ----------------------------------------------------------------------------------------------- tokenizer
def _vocabulary(tokenizer: Any, size: int) -> tuple[list[str], list[int], set[int]]:
    """Tokens by id, llama.cpp token types, and the ids of special (control) tokens; padded to ``size``."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > size:
        raise PipelineError(f"The tokenizer has {len(by_id)} tokens but the model only {size} embeddings.")
    added = tokenizer.added_tokens_decoder
    control = {i for i, tok in added.items() if tok.special}
    tokens, types = [], []
    for index in range(size):
        if index not in by_id:  # embedding rows without a token (vocabularies padded for speed)
            tokens.append(f"[PAD{index}]")
            types.append(_UNUSED)
            continue
        tokens.append(by_id[index])
        if index in control:  # before "unknown": gemma-3's own GGUF marks <unk> as a control token too
            types.append(_CONTROL)
        elif index == tokenizer.unk_token_id:
            types.append(_UNKNOWN)
        elif index in added:
            types.append(_USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", by_id[index]):
            types.append(_BYTE)
        else:
            types.append(_NORMAL)
    return tokens, types, control


def _tokenizer_kind(tokenizer: Any) -> tuple[str, dict[str, Any]]:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise PipelineError(f"GGUF export writes BPE tokenizers only; this one is {model.get('type')!r}.")
    text = json.dumps(spec.get("pre_tokenizer"))
    if '"ByteLevel"' in text:
        return "gpt2", spec
    if model.get("byte_fallback"):
        return "llama", spec
    raise PipelineError("GGUF export: the tokenizer is neither byte-level BPE nor sentencepiece-style BPE with "
                        "byte fallback, so llama.cpp could not reproduce it.")


def _byte_level_pre(spec: dict[str, Any]) -> str:
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
    if not splits and [p.get("type") for p in parts] == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own split pattern, built into the ByteLevel pre-tokenizer
    if len(splits) == 1 and splits[0] in _BYTE_LEVEL_SPLITS:
        return _BYTE_LEVEL_SPLITS[splits[0]]
    raise PipelineError(
        "GGUF export: this byte-level tokenizer splits text in a way it does not recognise (known: GPT-2, "
        "Llama-3, Qwen2), so llama.cpp would tokenise differently. Use --format merged and llama.cpp's converter."
    )


def _write_tokenizer(writer: Any, tokenizer: Any, arch: str, vocab_size: int, *, chat_template: str,
                     end_of_turn_id: int | None) -> str:
    kind, spec = _tokenizer_kind(tokenizer)
    tokens, types, _ = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(_byte_level_pre(spec))
        merges = spec["model"].get("merges", [])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    else:
        writer.add_tokenizer_pre("default")
        if arch == "gemma3":
            # transformers' GGUF reader spells Gemma's whitespace-run tokens "▁▁…" in the vocabulary; the
            # sentencepiece model (and llama.cpp) hold them as user-defined tokens of real spaces
            # (transformers' gguf_tokenizer_mapping.gemma_tokenizer undoes exactly this).
            for i, token in enumerate(tokens):
                if len(token) >= 2 and set(token) == {"\u2581"}:
                    tokens[i], types[i] = " " * len(token), _USER_DEFINED
            writer.add_add_space_prefix(False)
        # A sentencepiece BPE model's piece score falls with its id (pieces are numbered in merge order);
        # llama.cpp merges the best-scoring pair first, so -id reproduces that order.
        writer.add_token_scores([-float(i) if t == _NORMAL else 0.0 for i, t in enumerate(types)])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id, "eot": end_of_turn_id}
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
    for key, value in ids.items():
        if value is not None:
            adders[key](int(value))
    encoded = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(encoded) and encoded[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(encoded) and encoded[-1] == tokenizer.eos_token_id)
    writer.add_chat_template(runtime_chat_template(chat_template))
    return kind


# ----------------------------------------------------------------------------------------------- entry point
def write_gguf(model: Any, tokenizer: Any, path: Path, *, kind: str, name: str, end_of_turn_id: int | None) -> dict:
    """Write ``model`` (a plain transformers causal LM, adapters merged) and ``tokenizer`` to ``path``.

    ``kind`` is the tensor type of the matrices: f32, f16, bf16 or q8_0. Returns what was written (architecture,
    tokenizer model, tensor count), for the export's record.
    """
    import gguf

    if kind not in GGUF_TYPES:
        raise PipelineError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {kind!r}.")
    if not tokenizer.chat_template:
        raise PipelineError("The tokenizer has no chat template to write into the GGUF.")
    arch = _check_config(model.config)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    _write_hparams(writer, model.config, arch)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer_model = _write_tokenizer(writer, tokenizer, arch, model.config.vocab_size,
                                       chat_template=tokenizer.chat_template, end_of_turn_id=end_of_turn_id)
    tensors = _write_tensors(writer, model, arch, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "tokenizer_model": tokenizer_model, "tensors": tensors, "type": kind}
