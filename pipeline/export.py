"""Export a trained stage for serving: a merged checkpoint (vLLM, TGI, transformers) or a GGUF (llama.cpp,
Ollama, LM Studio), each checked by reading it back before it is kept.

Sits beside :mod:`pipeline.inference` and loads what it loads: the stage's base model with its adapter merged
in float32 (for the ``dpo`` stage that is base + SFT + DPO: with ``dpo.start: merge`` its base is the merged SFT
model in ``dpo/sft_merged``; with ``continue_adapter`` its adapter is the continued SFT adapter). Then:

- ``merged``: safetensors shards in the chosen dtype, the tokenizer with the chat template, and a generation
  config whose EOS ids include the end-of-turn token; loads with plain ``AutoModelForCausalLM.from_pretrained``.
- ``gguf``: one ``.gguf`` (f16, bf16, f32 or q8_0; see :mod:`pipeline.gguf_export`) with the chat template and
  stop tokens in its metadata, and an Ollama ``Modelfile`` beside it.

The round-trip check reloads the export the way its users will (transformers' ``from_pretrained``, for GGUF
its GGUF reader), renders a few conversations with the exported chat template and tokenizer (the token ids must
be identical), compares the logits with the merged model in memory (within a bound per type, below), and
compares greedy answers. The export is written to a temporary directory that replaces ``OUT_DIR`` only once
the check has passed; a non-empty ``OUT_DIR`` is replaced only with ``force``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import atomic_directory, atomic_write_json, library_versions, read_manifest
from pipeline.errors import PipelineError
from pipeline.inference import chat_inputs, load_model
from pipeline.models import CHAT_TEMPLATES, configure_generation, end_of_turn_token, stop_token_ids

FORMATS = ("merged", "gguf")
MERGED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
GGUF_QUANTS = ("q8_0",)
# Largest max|logit difference| / max|logit| the check accepts, per stored type. A broken conversion (a wrong
# rotary permutation, a missing norm offset, another tokenizer) is off by the order of the logits themselves.
# Measured (docs/export.md): f32 0, f16 ~2e-4, bf16 ~2e-3, q8_0 ~5e-3 (tiny test models) / ~1e-2 (gemma-3-270m).
LOGIT_BOUNDS = {"f32": 1e-4, "float32": 1e-4, "f16": 5e-3, "float16": 5e-3, "bf16": 3e-2, "bfloat16": 3e-2,
                "q8_0": 5e-2}
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one line about the sea."}],
    [{"role": "system", "content": "Answer in all lowercase letters."},
     {"role": "user", "content": "Explain how to boil an egg in simple steps."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "List three ideas for a short poem."}],
]
CHECK_NEW_TOKENS = 24
EXPORT_RECORD = "export.json"

# Ollama templates (Go text/template) rendering the same prompts as our Jinja templates (pipeline.models);
# Ollama passes the system prompt as a "system" message. BOS comes from the GGUF's add_bos_token.
_OLLAMA_TEMPLATES = {
    "gemma": (
        '{{- $system := "" }}\n'
        '{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}\n'
        "{{- $first := true }}\n"
        "{{- range .Messages }}\n"
        '{{- if eq .Role "user" }}<start_of_turn>user\n'
        "{{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
        "{{ $first = false }}\n"
        '{{- else if eq .Role "assistant" }}<start_of_turn>model\n'
        "{{ .Content }}<end_of_turn>\n"
        "{{ end }}\n"
        "{{- end }}<start_of_turn>model\n"
    ),
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
}


# ----------------------------------------------------------------------------------------------- options
def resolve_type(fmt: str, dtype: str | None, quant: str | None) -> str:
    """The stored type: a torch dtype name for ``merged``; f32/f16/bf16/q8_0 for ``gguf``."""
    if fmt not in FORMATS:
        raise PipelineError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if dtype and dtype not in MERGED_DTYPES:
        raise PipelineError(f"--dtype must be one of {', '.join(MERGED_DTYPES)}, got {dtype!r}.")
    if fmt == "merged":
        if quant:
            raise PipelineError("--quant is for --format gguf; a merged checkpoint takes --dtype.")
        return dtype or "bfloat16"  # what servers load by default; float32 doubles the size for no gain
    if quant and dtype:
        raise PipelineError("Give either --dtype or --quant for a GGUF, not both.")
    if quant:
        if quant.lower() not in GGUF_QUANTS:
            raise PipelineError(f"--quant must be one of {', '.join(GGUF_QUANTS)} (what the gguf package writes), "
                                f"got {quant!r}. For k-quants, quantise the f16 export with llama.cpp's llama-quantize.")
        return quant.lower()
    return GGUF_DTYPES[dtype or "float16"]  # llama.cpp's converter defaults to f16 too


def _check_out_dir(source: Path, out_dir: Path, force: bool) -> None:
    src, out = source.resolve(), out_dir.resolve()
    if out == src or out in src.parents or src in out.parents:
        raise PipelineError(f"OUT_DIR {out_dir} overlaps the stage {source}; choose a directory outside it.")
    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"OUT_DIR {out_dir} is a file; give a directory.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise PipelineError(f"OUT_DIR {out_dir} is not empty. Choose another directory, or add --force to replace it.")


# ----------------------------------------------------------------------------------------------- writing
def _write_merged(model: Any, tokenizer: Any, directory: Path, dtype: str, max_shard_size: str) -> None:
    # A cast copy of the weights is saved: the float32 model in memory stays the reference for the check.
    target = MERGED_DTYPES[dtype]
    state, seen = {}, set()
    for key, value in model.state_dict().items():  # in module order: the embedding comes before a tied LM head
        if value.data_ptr() not in seen:  # a tied LM head is the embedding matrix: store it once, as transformers does
            seen.add(value.data_ptr())
            state[key] = value.to(target)
    configure_generation(model, tokenizer)  # EOS ids: end-of-turn + EOS, saved in generation_config.json
    model.save_pretrained(directory, state_dict=state, max_shard_size=max_shard_size)
    config = copy.deepcopy(model.config)  # save_pretrained records the in-memory (float32) dtype: correct it
    config.dtype = target
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _template_name(tokenizer: Any) -> str | None:
    return next((name for name, (template, _, _) in CHAT_TEMPLATES.items() if tokenizer.chat_template == template),
                None)


def modelfile(gguf_name: str, tokenizer: Any) -> str:
    """An Ollama Modelfile for the GGUF: template (for our known chat templates) and stop parameters."""
    lines = ["# In this directory: ollama create MODEL_NAME -f Modelfile", f"FROM ./{gguf_name}"]
    name = _template_name(tokenizer)
    if name:
        lines.append(f'TEMPLATE """{_OLLAMA_TEMPLATES[name]}"""')
    else:
        lines.append("# The chat template is not one of ours: Ollama derives one from the GGUF's tokenizer.chat_template.")
    stops = dict.fromkeys([end_of_turn_token(tokenizer), tokenizer.eos_token])
    lines += [f"PARAMETER stop {json.dumps(token)}" for token in stops if token]
    return "\n".join(lines) + "\n"


def _write_gguf(model: Any, tokenizer: Any, directory: Path, kind: str, name: str) -> tuple[str, dict]:
    from pipeline.gguf_export import write_gguf

    filename = f"{name}-{kind}.gguf"
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    info = write_gguf(model, tokenizer, directory / filename, kind=kind, name=name, end_of_turn_id=eot)
    (directory / "Modelfile").write_text(modelfile(filename, tokenizer), encoding="utf-8")
    return filename, info


# ----------------------------------------------------------------------------------------------- the check
@torch.inference_mode()
def _greedy(model: Any, ids: torch.Tensor, stops: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    return out[0, ids.shape[1]:].tolist()


@torch.inference_mode()
def compare_models(reference: tuple[Any, Any], candidate: tuple[Any, Any], *,
                   conversations: list[list[dict[str, str]]] = CHECK_CONVERSATIONS,
                   max_new_tokens: int = CHECK_NEW_TOKENS) -> dict[str, Any]:
    """How closely ``candidate`` (model, tokenizer), as reloaded from an export, reproduces ``reference``.

    Returns ``tokens_identical`` (every conversation renders to the same token ids through each side's own chat
    template and tokenizer), ``max_logit_diff`` and ``relative_logit_diff`` (over every prompt position),
    ``greedy_identical`` (how many greedy answers of up to ``max_new_tokens`` are token-for-token the same) and
    ``prompts``.
    """
    (ref_model, ref_tok), (cand_model, cand_tok) = reference, candidate
    stops = stop_token_ids(ref_tok)
    tokens_identical, max_diff, scale, same = True, 0.0, 0.0, 0
    for conversation in conversations:
        ids = chat_inputs(ref_tok, conversation, "cpu")["input_ids"]
        cand_ids = chat_inputs(cand_tok, conversation, "cpu")["input_ids"]
        tokens_identical &= bool(torch.equal(ids, cand_ids))
        ref_logits = ref_model(input_ids=ids.to(ref_model.device)).logits.float().cpu()
        cand_logits = cand_model(input_ids=ids.to(cand_model.device)).logits.float().cpu()
        max_diff = max(max_diff, (ref_logits - cand_logits).abs().max().item())
        scale = max(scale, ref_logits.abs().max().item())
        same += _greedy(ref_model, ids.to(ref_model.device), stops, max_new_tokens) == \
            _greedy(cand_model, ids.to(cand_model.device), stops, max_new_tokens)
    return {"tokens_identical": tokens_identical, "max_logit_diff": max_diff,
            "relative_logit_diff": max_diff / max(scale, 1e-12), "greedy_identical": same,
            "prompts": len(conversations)}


def _reload(directory: Path, gguf_file: str | None) -> tuple[Any, Any]:
    """The export as its users load it: plain transformers, for a GGUF its own GGUF reader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
    return model, tokenizer


def check_export(reference: tuple[Any, Any], directory: Path, kind: str, gguf_file: str | None = None) -> dict:
    """Reload the export in ``directory`` and compare it with ``reference``; raise when it is broken."""
    result = compare_models(reference, _reload(directory, gguf_file))
    result["logit_bound"] = LOGIT_BOUNDS[kind]
    what = f"the {kind} export in {directory}"
    if not result["tokens_identical"]:
        raise PipelineError(f"Round-trip check failed: {what} renders conversations to other token ids than the "
                            "trained model (its chat template or tokenizer did not survive the export).")
    if result["relative_logit_diff"] > LOGIT_BOUNDS[kind]:
        raise PipelineError(
            f"Round-trip check failed: {what} gives logits {result['relative_logit_diff']:.2e} (relative) away "
            f"from the merged model; a {kind} export should stay within {LOGIT_BOUNDS[kind]:.0e}. Please report it."
        )
    if kind in ("f32", "float32") and result["greedy_identical"] != result["prompts"]:
        raise PipelineError(f"Round-trip check failed: {what} answers differently from the merged model.")
    return result


# ----------------------------------------------------------------------------------------------- entry point
def export(source: str | Path, out_dir: str | Path, *, fmt: str, dtype: str | None = None, quant: str | None = None,
           force: bool = False, check: bool = True, max_shard_size: str = "2GB",
           log: Any = print) -> dict[str, Any]:
    """Export ``source`` (an ``sft``/``dpo`` stage directory, or a merged export) to ``out_dir``.

    Returns the record also written to ``<out_dir>/export.json`` (source, format, type, files, check results).
    """
    source, out_dir = Path(source), Path(out_dir)
    kind = resolve_type(fmt, dtype, quant)
    _check_out_dir(source, out_dir, force)
    started = time.monotonic()
    log(f"loading {source} (adapters merged, float32)")
    model, tokenizer = load_model(source, dtype="float32", device="cpu")
    manifest = read_manifest(source) or {}
    name = f"{source.resolve().parent.name}-{source.resolve().name}"  # e.g. quickstart-dpo
    record: dict[str, Any] = {"source": str(source.resolve()), "source_fingerprint": manifest.get("fingerprint"),
                              "format": fmt, "type": kind, "versions": library_versions()}
    with atomic_directory(out_dir) as tmp:
        if fmt == "merged":
            log(f"writing the merged checkpoint ({kind})")
            _write_merged(model, tokenizer, tmp, kind, max_shard_size)
            gguf_file = None
        else:
            log(f"writing the GGUF ({kind})")
            gguf_file, record["gguf"] = _write_gguf(model, tokenizer, tmp, kind, name)
        record["files"] = sorted(p.name for p in tmp.iterdir())
        if check:
            log("round-trip check: reloading the export with transformers and comparing it with the merged model")
            record["check"] = check_export((model, tokenizer), tmp, kind, gguf_file)
            c = record["check"]
            log(f"  tokens identical: {c['tokens_identical']}; max logit difference {c['max_logit_diff']:.3g} "
                f"({c['relative_logit_diff']:.2e} relative, bound {c['logit_bound']:.0e}); greedy answers identical "
                f"{c['greedy_identical']}/{c['prompts']}")
        record["seconds"] = round(time.monotonic() - started, 1)
        atomic_write_json(tmp / EXPORT_RECORD, record)
    log(f"exported {source} -> {out_dir} ({fmt}, {kind})")
    return record
