"""Load a finished stage for inference, and generate from it.

``load("runs/quickstart/dpo")`` returns ``(model, tokenizer)``: the stage's base model with its adapter
applied, and the tokenizer saved with the stage (chat template included). The same directory also loads
with stock ``peft.AutoPeftModelForCausalLM.from_pretrained``. Before loading, the stage's files are checked
against its manifest (sizes always, hashes where cheap: see :func:`load`), so a truncated or replaced file
is an error naming the stage, not a broken model or a safetensors traceback. ``load_model`` also takes what
:mod:`pipeline.export` writes: a merged checkpoint directory or a ``.gguf`` file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from threading import Thread
from typing import Any

import torch

from pipeline.artifacts import FILES, read_manifest, verify_stage
from pipeline.config import MODEL_DEFAULTS
from pipeline.data.formats import neutralise_control_tokens
from pipeline.errors import PipelineError
from pipeline.models import configure_generation, control_tokens, load_base_model

# load(verify=None) hashes at most this many bytes. Hashing a file held in the page cache ran at ~370 MB/s on
# the 2-core AMD EPYC (Zen 3) this was measured on, busy with other work: 256 MiB in ~0.7 s, under a second. The
# quickstart's sft stage holds ~50 MB (a 15 MB adapter, a 33 MB tokenizer): hashed; its dpo stage adds the
# ~1 GB merged SFT model (fp32): size-checked only, unless verify=True.
HASH_BUDGET_BYTES = 256 << 20
MERGED_BASE = "sft_merged"  # the merged SFT model a dpo stage (start: merge) trained on; ~1 GB in fp32


def _files_to_hash(manifest: dict[str, Any], verify: bool | None) -> list[str] | bool:
    """Which recorded files ``load`` hashes: ``verify`` True/False: all/none; None: as many as are cheap.

    Cheap: all of them if they fit ``HASH_BUDGET_BYTES``, else the stage's own files without the merged SFT
    model if those fit, else none (sizes are checked in any case).
    """
    if verify is not None:
        return verify
    files = {rel: f["size"] for rel, f in manifest.get(FILES, {}).items()}
    own = {rel: size for rel, size in files.items() if not rel.startswith(f"{MERGED_BASE}/")}
    return next((list(group) for group in (files, own) if sum(group.values()) <= HASH_BUDGET_BYTES), [])


def _model_cfg(stage_dir: Path, manifest: dict[str, Any], dtype: str | None, device: str | None) -> dict[str, Any]:
    cfg = dict(MODEL_DEFAULTS)
    cfg.update(manifest.get("config", {}).get("model", {}))
    cfg["load_in_4bit"] = False if device == "cpu" else cfg.get("load_in_4bit", False)
    if dtype:
        cfg["dtype"] = dtype
    if device:
        cfg["device"] = device
    return cfg


def load(stage_dir: str | Path, *, merge: bool = False, dtype: str | None = None,
         device: str | None = None, verify: bool | None = None) -> tuple[Any, Any]:
    """Load a completed ``sft`` or ``dpo`` stage as ``(model, tokenizer)``, ready for ``generate``.

    ``merge=True`` folds the adapter into the weights (faster generation; the result is no PeftModel).
    The sizes of all the stage's files are checked against its manifest. ``verify`` decides which hashes
    are too: ``True`` all (the merged SFT model of a dpo stage included), ``False`` none, ``None`` (default)
    what takes under a second: every file if they total at most ``HASH_BUDGET_BYTES`` (256 MiB), else the
    adapter's files without the merged model, if those fit. A mismatch raises a :class:`PipelineError`
    naming the file and the stage to re-run.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise PipelineError(f"{stage_dir} is not a completed stage (no manifest.json). Run the recipe first.")
    verify_stage(stage_dir, manifest, hashed=_files_to_hash(manifest, verify), recipe=manifest.get("recipe"))
    if not (stage_dir / "adapter_config.json").is_file():
        raise PipelineError(f"{stage_dir} holds no adapter: load() takes an 'sft' or 'dpo' stage directory.")
    adapter_cfg = json.loads((stage_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base = manifest.get("base_model") or adapter_cfg["base_model_name_or_path"]
    if manifest.get("start") == "merge":  # the merged SFT weights live beside the adapter
        base = str(stage_dir / "sft_merged")
    cfg = _model_cfg(stage_dir, manifest, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(stage_dir)
    model = load_base_model(cfg, path=base)
    model = PeftModel.from_pretrained(model, str(stage_dir))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    configure_generation(model, tokenizer)
    return model, tokenizer


def load_model(path: str | Path, *, dtype: str | None = None, device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a stage directory (adapter merged), a merged export, or a GGUF export.

    A ``.gguf`` file is read by transformers' GGUF loader once and cached as a plain checkpoint
    (:func:`pipeline.gguf.convert_gguf`, keyed by the file's hash), so the next load takes a second.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if (path / "adapter_config.json").is_file() or (path / "manifest.json").is_file():
        return load(path, merge=True, dtype=dtype, device=device)
    cfg = _model_cfg(path, {}, dtype, device)
    if path.suffix == ".gguf" and path.is_file():
        from pipeline.gguf import convert_gguf
        from pipeline.models import resolve_dtype

        path = convert_gguf(path, dtype=resolve_dtype(cfg))
    elif not (path / "config.json").is_file():
        raise PipelineError(f"{path} is neither a stage directory, a merged export (config.json) nor a .gguf file.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise PipelineError(f"{path} has no chat template; export a trained stage with scripts/export.py.")
    model = load_base_model(cfg, path=str(path))
    model.eval()
    configure_generation(model, tokenizer)
    return model, tokenizer


def _plain_text(messages: list[dict[str, str]], controls: list[str]) -> list[dict[str, str]]:
    """The conversation with control tokens typed as text neutralised, so they stay plain text."""
    return [{**m, "content": neutralise_control_tokens(m["content"], controls)} for m in messages]


def chat_inputs(tokenizer: Any, messages: list[dict[str, str]], device: Any) -> dict[str, torch.Tensor]:
    """Tokenise a conversation for generation; control tokens typed as text stay plain text."""
    safe = _plain_text(messages, control_tokens(tokenizer))
    encoded = tokenizer.apply_chat_template(safe, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    return {k: v.to(device) for k, v in encoded.items()}


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *,
             max_new_tokens: int = 256, batch_size: int = 16, progress: bool = False,
             continuous: bool = True) -> list[dict[str, Any]]:
    """Greedy answers for many conversations, ``batch_size`` decoded at once.

    ``continuous=True`` (transformers' ``generate_batch``): an answer that stops frees its slot for the next
    conversation at once, so one long answer does not keep a whole batch decoding to ``max_new_tokens``.
    ``continuous=False``: left-padded batches of similar prompt length through ``model.generate``; faster when
    (nearly) every answer runs to the limit, as a base model's do (see README "Evaluation").
    Each result holds the ``text`` and whether the model ``stopped`` on its own (end-of-turn/EOS) before
    ``max_new_tokens``, in the order of ``conversations``.
    """
    if not conversations:
        return []
    controls = control_tokens(tokenizer)
    stops = list(model.generation_config.eos_token_id or [])
    inputs = [
        list(tokenizer.apply_chat_template(_plain_text(conv, controls), add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"])
        for conv in conversations
    ]
    run = _generate_continuous if continuous else _generate_padded
    answers = run(model, tokenizer, inputs, stops, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  progress=progress)
    if len(answers) != len(inputs):
        raise PipelineError(f"Generation returned {len(answers)} answers for {len(inputs)} prompts.")
    results = []
    for tokens in answers:  # in input order
        stop_at = next((i for i, t in enumerate(tokens) if t in stops), None)
        answer = tokens[:stop_at] if stop_at is not None else tokens[:max_new_tokens]
        results.append({
            "text": tokenizer.decode(answer, skip_special_tokens=True).strip(),
            "stopped": stop_at is not None,
            "new_tokens": len(answer),
        })
    return results


MAX_BATCH_TOKENS = 1024  # tokens per forward in continuous batching (prefill chunks)


def _generate_continuous(model: Any, tokenizer: Any, inputs: list[list[int]], stops: list[int], *,
                         max_new_tokens: int, batch_size: int, progress: bool) -> list[list[int]]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                              pad_token_id=tokenizer.pad_token_id)
    # A KV cache that holds the whole batch at its longest, not one sized from free memory: transformers zero-fills
    # the cache on every call. Measured on the quickstart's SFT model, 123 prompts: 66 s instead of 74-79 s, same
    # answers. (A smaller cache stays correct: requests then wait for room.)
    # And at most 1024 tokens per forward (transformers' default is 8192): prefilling a whole batch of prompts in
    # one forward held attention scores over (8192 x cache) positions. Measured (AMD Zen 3, float32, quickstart SFT
    # model, 64 eval prompts): peak RSS 6.5 -> 3.0 GB, 170 -> 157 s, identical answers.
    longest = max(len(ids) for ids in inputs) + max_new_tokens
    blocks = math.ceil(min(batch_size, len(inputs)) * longest / ContinuousBatchingConfig.page_size) + 1
    outputs = model.generate_batch(
        inputs, generation_config=config, progress_bar=progress,
        continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=batch_size, num_blocks=blocks,
                                                            max_batch_tokens=MAX_BATCH_TOKENS),
    )
    return [list(output.generated_tokens) for output in outputs.values()]


def _generate_padded(model: Any, tokenizer: Any, inputs: list[list[int]], stops: list[int], *,
                     max_new_tokens: int, batch_size: int, progress: bool) -> list[list[int]]:
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    answers: list[list[int]] = [[] for _ in inputs]
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # similar lengths: little padding
    with tqdm(total=len(inputs), desc="generating", unit="answer", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(inputs[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(inputs[i])) + inputs[i] for i in idx], device=model.device)
            mask = torch.tensor([[0] * (width - len(inputs[i])) + [1] * len(inputs[i]) for i in idx],
                                device=model.device)
            # generate stops the batch once every row has produced a stop token
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stops, pad_token_id=pad)
            for row, i in enumerate(idx):
                answers[i] = out[row, width:].tolist()
            bar.update(len(idx))
    return answers


def stream(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 512, *,
           temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
    """Yield the answer to a conversation piece by piece as it is generated.

    ``temperature`` 0 (the default) decodes greedily; above 0 it samples, from the smallest set of tokens whose
    probabilities add up to ``top_p``. ``seed`` makes sampling repeatable.
    """
    from transformers import TextIteratorStreamer

    if temperature < 0 or not 0 < top_p <= 1:
        raise PipelineError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature} and {top_p}.")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    inputs = chat_inputs(tokenizer, messages, model.device)
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if seed is not None:
            torch.manual_seed(seed)
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
    thread = Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
