"""How long the stages about to run will take on this machine, said before the long work starts.

The estimate is the stages' counted work (tokens of the prepared data, positions that carry a label, the eval
set's prompts and pairs) times what the model costs here, from a short calibration of the recipe's model with
its LoRA: forward + backward per token and per labelled position, forward per token and per scored position,
one decoding step at the eval batch size, and the time to load it. The calibration runs once (under 1.5 minutes
for gemma-3-270m in float32 on 2 AVX2 cores) and is kept in the user cache (``$PIPELINE_CACHE`` or
``~/.cache/instruct-pipeline``, under ``calibration/``) per machine, model, dtype, LoRA settings and library
versions. What it leaves out (optimizer steps, checkpoint saves, dataloading, the trainer around the model) made
the quickstart's stages take 1.1-1.3x their estimate on a 2-core AMD Zen 4; so each stage that runs in full records
its measured time against its estimate (``observe``), and the next estimate on the same machine, model and settings
is scaled by that ratio (``calibration/observed/`` in the same cache). docs/performance.md compares estimates with
measured stages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import load_from_disk

from pipeline.artifacts import atomic_write_json, fingerprint, library_versions
from pipeline.gguf import default_cache_dir
from pipeline.models import resolve_device, resolve_dtype

CALIBRATION_VERSION = 7  # 2: the loss through the chunked LM head (pipeline/lm_head.py); 3: under autocast; 4: the head's scratch tensors; 5: the trained rows' columns alone; 6: no LoRA input casts under autocast; 7: 512 tokens
_TOKENS = 512  # calibration sequence length (the quickstart's SFT rows are packed to 512)
_DECODE_STEPS = 16


@dataclasses.dataclass
class Speeds:
    """Seconds per unit of work for the recipe's model on this machine."""

    train_token: float       # backbone forward + backward (LoRA), per token
    train_position: float    # LM head + log-softmax forward + backward, per labelled position
    score_token: float       # backbone forward without gradient, per token
    score_position: float    # LM head + log-softmax forward, per scored position
    decode_step: float       # one greedy decoding step at the eval batch size
    load: float              # loading the model


def machine() -> dict[str, Any]:
    """CPU model, the flags that decide the fast path (bf16 / AMX / AVX-512 / AVX2), cores, torch threads and
    version, and the GPU if any: what makes one machine's speed differ from another's."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return {"cpu": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Any, device: str, reps: int = 2) -> float:
    fn()  # warm-up: allocator, kernels chosen
    _sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / reps


def _calibration_text(tokenizer: Any) -> torch.Tensor:
    text = ("Write a short answer in plain words, then stop. The quick brown fox jumps over the lazy dog, "
            "and the river runs past the old mill to the sea. ")
    ids = tokenizer(text * 64, add_special_tokens=False)["input_ids"][:_TOKENS]
    return torch.tensor([ids])


def _machine_and_model(recipe: Any) -> str:
    """Fingerprint of what the calibration measured: machine, model, dtype, LoRA, eval batch, library versions."""
    from pipeline.models import resolve_model_path

    return fingerprint({"version": CALIBRATION_VERSION, "machine": machine(), "model": resolve_model_path(
        recipe.model["name_or_path"]), "dtype": str(resolve_dtype(recipe.model)), "lora": recipe.lora,
        "batch": recipe.eval.get("batch_size") if recipe.eval else None, "versions": library_versions()})


def _observed_path(recipe: Any) -> Path:
    return default_cache_dir() / "calibration" / "observed" / f"{_machine_and_model(recipe)}.json"


def corrections(recipe: Any) -> dict[str, float]:
    """Measured ÷ estimated time of each stage's last full run with this machine, model and settings."""
    try:
        ratios = json.loads(_observed_path(recipe).read_text(encoding="utf-8"))
        return {str(k): float(v) for k, v in ratios.items() if math.isfinite(float(v)) and float(v) > 0}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def observe(recipe: Any, stage: str, estimated_s: float, measured_s: float) -> None:
    """Keep ``measured_s / estimated_s`` of a stage that ran in full, for the next estimate here (best effort)."""
    if estimated_s <= 0 or measured_s <= 0:
        return
    ratios = {**corrections(recipe), stage: round(measured_s / estimated_s, 3)}
    try:
        atomic_write_json(_observed_path(recipe), ratios)
    except OSError:
        pass


def calibrate(recipe: Any) -> Speeds:
    """Time the recipe's model on this machine, or read the cached result of an earlier calibration."""
    from peft import get_peft_model

    from pipeline.inference import generate
    from pipeline.lm_head import labelled_nll
    from pipeline.models import configure_generation, load_base_model, load_tokenizer, lora_config
    from pipeline.stages.training import without_lora_input_casts

    path = default_cache_dir() / "calibration" / f"{_machine_and_model(recipe)}.json"
    try:
        return Speeds(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        pass
    print("  timing the model on this machine for the estimate (once per machine and model) ...", flush=True)
    device = resolve_device(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    started = time.perf_counter()
    model = load_base_model(recipe.model)
    load = time.perf_counter() - started
    ids = _calibration_text(tokenizer).to(model.device)
    n = ids.shape[1]
    every, one = torch.arange(n - 1, device=model.device), torch.tensor([n - 2], device=model.device)
    speeds = {"load": load}
    configure_generation(model, tokenizer)
    batch = (recipe.eval or {}).get("batch_size") or 16
    prompt = tokenizer.decode(ids[0, :24])
    model.eval()
    elapsed = time.perf_counter()
    generate(model, tokenizer, [[{"role": "user", "content": prompt}]] * batch, max_new_tokens=_DECODE_STEPS,
             batch_size=batch, continuous=False)
    speeds["decode_step"] = (time.perf_counter() - elapsed) / _DECODE_STEPS

    def scoring(keep: torch.Tensor) -> Any:
        def run() -> None:
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
                F.log_softmax(logits, dim=-1, dtype=torch.float32)
        return run

    score_one, score_all = _timed(scoring(one), device), _timed(scoring(every), device)
    speeds["score_token"] = score_one / n
    speeds["score_position"] = max(score_all - score_one, 0.0) / (n - 2)

    peft_model = get_peft_model(model, lora_config(recipe.lora, tokenizer))
    peft_model.train()
    # the trainers' mixed precision (stages/training.py sets bf16 / fp16 for such a model): accelerate's autocast
    half = model.dtype in (torch.bfloat16, torch.float16)
    mixed_precision = torch.autocast(model.device.type, dtype=model.dtype if half else None, enabled=half)

    def training(keep: torch.Tensor) -> Any:
        def run() -> None:  # the SFT stage's loss (stages/sft.py), without the trainer around it
            labels = torch.full_like(ids, -100)
            labels[0, keep + 1] = ids[0, keep + 1]  # position p predicts token p + 1
            with mixed_precision, without_lora_input_casts(peft_model, model.device.type):
                _, nll, count = labelled_nll(peft_model, {"input_ids": ids, "labels": labels})
            (nll / count).backward()
            peft_model.zero_grad(set_to_none=True)
        return run

    train_one, train_all = _timed(training(one), device), _timed(training(every), device)
    speeds["train_token"] = train_one / n
    speeds["train_position"] = max(train_all - train_one, 0.0) / (n - 2)
    result = Speeds(**speeds)
    try:
        atomic_write_json(path, dataclasses.asdict(result))
    except OSError:
        pass  # a read-only cache only costs the calibration next time
    return result


# ------------------------------------------------------------------------------------------- work
def _tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def _answer_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of the assistant turns, each with its end-of-turn."""
    return sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + 1
               for m in messages if m["role"] == "assistant")


def _pair_work(tokenizer: Any, pairs: Any) -> tuple[int, int]:
    """(tokens, completion positions) of chosen + rejected, which share a forward padded to the longer."""
    tokens = positions = 0
    for row in pairs:
        prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        lengths = []
        for side in ("chosen", "rejected"):
            answer = row[side] if isinstance(row[side], list) else [{"role": "assistant", "content": row[side]}]
            lengths.append(_tokens(tokenizer, prompt + answer))
            positions += _answer_tokens(tokenizer, answer)
        tokens += 2 * max(lengths)
    return tokens, positions


def _epochs(section: dict[str, Any], sequences: int) -> float:
    """Passes over the data: ``num_train_epochs``, or what ``max_steps`` covers of it when set."""
    epochs = float(section.get("num_train_epochs", 3))
    max_steps = int(section.get("max_steps", -1) or -1)
    if max_steps > 0 and sequences:
        per_step = int(section.get("per_device_train_batch_size", 8)) * int(section.get("gradient_accumulation_steps", 1))
        epochs = max_steps / math.ceil(sequences / per_step)
    return epochs


@dataclasses.dataclass
class StageEstimate:
    stage: str
    seconds: float  # what the user is told: the model compute, times this machine's last measured ratio if any
    detail: str
    compute_seconds: float = 0.0  # the model compute alone (what ``observe`` compares a measured time with)


def _conversation_work(tokenizer: Any, prepared: Path, split: str) -> tuple[int, int, int]:
    """(conversations, tokens, answer tokens) of a prepared SFT split; zeros when it is absent."""
    if not (prepared / split).exists():
        return 0, 0, 0
    rows = [row["messages"] for row in load_from_disk(str(prepared / split))]
    return (len(rows), sum(_tokens(tokenizer, m) for m in rows), sum(_answer_tokens(tokenizer, m) for m in rows))


def _sft(recipe: Any, prepared: Path, tokenizer: Any, speeds: Speeds, train: tuple[int, int, int]) -> StageEstimate:
    rows, tokens, labelled = train
    packed = recipe.sft.get("packing", False) and recipe.sft.get("max_length")
    epochs = _epochs(recipe.sft, math.ceil(tokens / recipe.sft["max_length"]) if packed else rows)
    seconds = speeds.load + epochs * (tokens * speeds.train_token + labelled * speeds.train_position)
    _, held_tokens, held_labelled = _conversation_work(tokenizer, prepared, "sft_eval")
    seconds += held_tokens * speeds.score_token + held_labelled * speeds.score_position
    return StageEstimate("sft", seconds, f"{epochs:.3g} epoch(s) of {tokens:,} tokens, {labelled:,} labelled")


def _dpo(recipe: Any, prepared: Path, tokenizer: Any, speeds: Speeds) -> StageEstimate:
    pairs = load_from_disk(str(prepared / "dpo_train"))
    tokens, positions = _pair_work(tokenizer, pairs)
    epochs = _epochs(recipe.dpo, len(pairs))
    seconds = 3 * speeds.load + epochs * (tokens * speeds.train_token + positions * speeds.train_position)
    if recipe.dpo.get("precompute_ref_log_probs", False):
        seconds += tokens * speeds.score_token + positions * speeds.score_position
    else:  # a reference forward at every step
        seconds += epochs * (tokens * speeds.score_token + positions * speeds.score_position)
    if (prepared / "dpo_eval").exists():
        held_tokens, held_positions = _pair_work(tokenizer, load_from_disk(str(prepared / "dpo_eval")))
        seconds += 2 * (held_tokens * speeds.score_token + held_positions * speeds.score_position)
    return StageEstimate("dpo", seconds, f"{epochs:.3g} epoch(s) of {tokens:,} tokens, {positions:,} in answers")


def _eval(recipe: Any, prepared: Path, tokenizer: Any, speeds: Speeds, train: tuple[int, int, int],
          stages: list[str]) -> StageEstimate:
    from pipeline.stages.evaluate import REFERENCE, cache_path, eval_inputs

    cfg = recipe.eval
    prompts, conversations, pairs = eval_inputs(recipe, prepared, tokenizer)
    # the eval stage evaluates every model of eval.models whose stage the recipe has, each time it runs
    names = [n for n in ("base", "sft", "dpo") if n in cfg["models"] and (n == "base" or n in recipe.enabled_stages())]
    needed = {n for n in names if n in REFERENCE} | {REFERENCE[n] for n in names if n in REFERENCE}
    held = (sum(_tokens(tokenizer, c) for c in conversations), sum(_answer_tokens(tokenizer, c) for c in conversations))
    pair_tokens, pair_positions = _pair_work(tokenizer, pairs)
    # A trained model answers about as long as its training answers do; the base model never stops.
    rows, _, answers = train
    typical = min(answers / rows, cfg["max_new_tokens"]) if rows else cfg["max_new_tokens"]
    batch = cfg["batch_size"]
    seconds, cached = 0.0, []
    for name in names:
        if name not in stages:  # the base model, or a stage the plan keeps: evaluated before?
            path = cache_path(recipe, tokenizer, name, prompts, conversations, pairs, name in needed)
            if path is not None and path.is_file():
                cached.append(name)
                continue
        seconds += speeds.load + held[0] * speeds.score_token + held[1] * speeds.score_position
        if pairs and name in needed:
            seconds += pair_tokens * speeds.score_token + pair_positions * speeds.score_position
        if name in cfg["padded_batches"]:
            steps = math.ceil(len(prompts) / batch) * cfg["max_new_tokens"]
        else:
            steps = math.ceil(len(prompts) * typical / batch)
        seconds += steps * speeds.decode_step
    detail = f"{len(prompts)} prompts x {len(names) - len(cached)} model(s)"
    return StageEstimate("eval", seconds, detail + (f"; {', '.join(cached)} read from the cache" if cached else ""))


def estimate(recipe: Any, stages: list[str], prepared: Path) -> list[StageEstimate]:
    """Estimated wall time of each of ``stages`` (of sft, dpo, eval) once ``prepared`` holds prepare's output."""
    return estimate_with(recipe, stages, prepared, calibrate(recipe), corrections(recipe))


def estimate_with(recipe: Any, stages: list[str], prepared: Path, speeds: Speeds,
                  ratios: dict[str, float] | None = None) -> list[StageEstimate]:
    """The estimates from ``speeds``; a stage with a measured ratio (:func:`corrections`) is scaled by it."""
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    train = _conversation_work(tokenizer, prepared, "sft_train")  # SFT's work, and the eval's typical answer
    out = []
    if "sft" in stages:
        out.append(_sft(recipe, prepared, tokenizer, speeds, train))
    if "dpo" in stages:
        out.append(_dpo(recipe, prepared, tokenizer, speeds))
    if "eval" in stages and recipe.eval:
        out.append(_eval(recipe, prepared, tokenizer, speeds, train, stages))
    for item in out:
        item.compute_seconds = item.seconds
        if (ratio := (ratios or {}).get(item.stage)) is not None:
            item.seconds *= ratio
            item.detail += f"; x{ratio:.2f}, as measured in the last run here"
    return out


def describe(estimates: list[StageEstimate]) -> str:
    here = machine()
    where = here["cuda"] or f"{here['cpu']} ({', '.join(here['flags']) or 'no avx2'}), {here['torch_threads']} threads"
    lines = [f"Estimated time on this machine ({where}):"]
    for item in estimates:
        lines.append(f"  {item.stage:<5} ~{_minutes(item.seconds):>7}   {item.detail}")
    total = sum(item.seconds for item in estimates)
    scaled = ", times the last run's measured ratio" if any(i.seconds != i.compute_seconds for i in estimates) else ""
    lines.append(f"  total ~{_minutes(total)} (model compute from a short calibration{scaled}; the progress bars "
                 "refine it)")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def enabled() -> bool:
    return os.environ.get("PIPELINE_ESTIMATE", "1") != "0"
