"""Stage ``eval``: base vs SFT vs DPO on held-out prompts, side by side.

Writes ``<output_dir>/eval/metrics.json``, ``report.md``, PNG plots and ``generations_<model>.jsonl``.
Metrics: format compliance (answers, then stops), IFEval-style constraint accuracy (strict/loose, per
type), held-out preference accuracy (DPO implicit reward vs the stage's reference), held-out loss of
reference answers; plus the SFT/DPO training loss curves.

The reference of each stage is the model it started from: the base model for ``sft``, the SFT model for
``dpo`` (in both ``dpo.start`` modes: the merged SFT weights, or TRL's frozen copy of the SFT adapter).
Each model scores the held-out pairs once, adapter merged, and serves as the next stage's reference.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from datasets import load_from_disk

from pipeline.artifacts import atomic_write_json, atomic_write_text
from pipeline.data.formats import load_preference_examples
from pipeline.errors import PipelineError
from pipeline.evaluation import (
    generate_for_prompts,
    heldout_loss,
    load_prompts,
    pair_logps,
    plot_loss_curves,
    plot_model_comparison,
    plot_per_type,
    preference_accuracy,
    score_generations,
)
from pipeline.inference import load
from pipeline.models import configure_generation, control_tokens, load_base_model, load_tokenizer
from pipeline.stages import eval_cache
from pipeline.stages.context import StageContext

MAX_HELDOUT_ROWS = 100


REFERENCE = {"sft": "base", "dpo": "sft"}  # the model each stage started from (its DPO reference)


def _load_for(ctx: StageContext, name: str) -> tuple[Any, Any]:
    if name == "base":
        model, tokenizer = load_base_model(ctx.recipe.model), load_tokenizer(ctx.recipe.model)
        configure_generation(model, tokenizer)
        return model.eval(), tokenizer
    return load(ctx.upstream_dir(name), merge=True)  # merged: faster, same outputs


def _evaluate_model(ctx: StageContext, name: str, prompts: list[dict], conversations: list, pairs: list,
                    logps: dict[str, list], needed: set[str]) -> dict:
    """Metrics of one model; fills ``logps[name]`` (its pair log-probs) when a stage needs them."""
    cfg = ctx.recipe.eval
    # The base model never changes: its results come from the user cache when it holds this exact evaluation.
    cache = _base_cache_path(ctx, prompts, conversations, pairs, name in needed) if name == "base" else None
    cached = eval_cache.load(cache)
    if cached is not None:
        print(f"  {name}: evaluation read from the cache {cache} (same model, eval data and generation "
              "settings; delete the file to recompute)", flush=True)
        if cached["logps"] is not None:
            logps[name] = [tuple(pair) for pair in cached["logps"]]
        atomic_write_text(ctx.stage_dir / f"generations_{name}.jsonl", cached["generations"])
        return cached["metrics"]
    model, tokenizer = _load_for(ctx, name)
    metrics: dict[str, Any] = {}
    if conversations:
        metrics["heldout_loss"] = heldout_loss(model, tokenizer, conversations, desc=f"{name} held-out loss")
    if pairs and name in needed:
        logps[name] = pair_logps(model, tokenizer, pairs, desc=f"{name} preference pairs")
    if pairs and name in REFERENCE:
        reference = REFERENCE[name]
        if reference not in logps:  # its reference is not evaluated itself: score the pairs with it alone
            ref_model, ref_tokenizer = _load_for(ctx, reference)
            logps[reference] = pair_logps(ref_model, ref_tokenizer, pairs, desc=f"{reference} preference pairs")
            del ref_model
        metrics.update(preference_accuracy(logps[name], logps[reference]))
    outputs = generate_for_prompts(model, tokenizer, prompts, max_new_tokens=cfg["max_new_tokens"],
                                   batch_size=cfg["batch_size"], desc=f"{name} generation",
                                   continuous=name not in cfg["padded_batches"])
    metrics.update(score_generations(prompts, outputs))
    rows = [{"key": p.get("key"), "prompt": p["prompt"], **o} for p, o in zip(prompts, outputs, strict=True)]
    generations = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(ctx.stage_dir / f"generations_{name}.jsonl", generations)
    eval_cache.store(cache, {"metrics": metrics, "logps": logps.get(name), "generations": generations})
    del model
    gc.collect()
    return metrics


def _base_cache_path(ctx: StageContext, prompts: list[dict], conversations: list, pairs: list,
                     scores_pairs: bool) -> Path | None:
    """The base model's cache entry for exactly this evaluation (see ``stages/eval_cache.py``)."""
    cfg = ctx.recipe.eval
    settings = {"max_new_tokens": cfg["max_new_tokens"], "batch_size": cfg["batch_size"],
                "continuous": "base" not in cfg["padded_batches"], "scores_pairs": bool(pairs) and scores_pairs}
    inputs = {"prompts": prompts, "conversations": conversations, "pairs": pairs if scores_pairs else []}
    return eval_cache.cache_path(ctx.recipe.model, load_tokenizer(ctx.recipe.model), inputs, settings)


def _held_out(ctx: StageContext, split: str) -> list[dict]:
    path = ctx.upstream_dir("prepare") / split
    if not path.exists():
        return []
    rows = load_from_disk(str(path))
    return list(rows.select(range(min(MAX_HELDOUT_ROWS, len(rows)))))


def _report(metrics: dict[str, dict], prompts: list[dict], stage_dir: Path, samples: int) -> str:
    names = list(metrics)
    keys = ["format_compliance", "prompt_level_strict", "prompt_level_loose", "instruction_level_strict",
            "instruction_level_loose", "implicit_reward_acc", "likelihood_acc", "heldout_loss", "mean_new_tokens"]
    lines = ["# Evaluation: base → SFT → DPO", "", f"{len(prompts)} held-out prompts, greedy decoding.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(str(metrics[n].get(key, "–")) for n in names) + " |")
    lines += ["", "![model comparison](comparison.png)", "", "![per constraint type](per_type.png)", "",
              "![training loss](loss_curves.png)", "", "## Strict accuracy per constraint type", "",
              "| constraint | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    types = sorted({t for m in metrics.values() for t in m.get("per_type_strict", {})})
    for t in types:
        lines.append(f"| {t} | " + " | ".join(str(metrics[n]["per_type_strict"].get(t, "–")) for n in names) + " |")
    lines += ["", "## Sample generations", ""]
    generations = {n: [json.loads(x) for x in (stage_dir / f"generations_{n}.jsonl").read_text().splitlines()]
                   for n in names}
    step = max(len(prompts) // max(samples, 1), 1)
    for i in range(0, min(len(prompts), step * samples), step):
        lines += [f"### Prompt {i + 1}", "", "> " + prompts[i]["prompt"].replace("\n", "\n> "), ""]
        for n in names:
            out = generations[n][i]
            flag = "" if out["stopped"] else " *(did not stop)*"
            lines += [f"**{n}**{flag}:", "", "```text", out["text"][:1200], "```", ""]
    return "\n".join(lines) + "\n"


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.recipe.eval
    if not cfg["prompts"]:
        raise PipelineError("eval.prompts must name a JSONL of held-out prompts (IFEval-style).")
    prompts = load_prompts(cfg["prompts"], cfg["max_prompts"])
    # Held-out loss: on the eval prompts' reference answers where the file has them, else the SFT split.
    conversations = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["reference"]}]
                     for p in prompts if isinstance(p.get("reference"), str) and p["reference"].strip()]
    if not conversations:
        conversations = [row["messages"] for row in _held_out(ctx, "sft_eval")]
    conversations = conversations[:MAX_HELDOUT_ROWS]
    if cfg["preferences"]:
        tokenizer = load_tokenizer(ctx.recipe.model)
        pairs, _ = load_preference_examples([{"path": cfg["preferences"]}], control_tokens=control_tokens(tokenizer))
    else:
        pairs = _held_out(ctx, "dpo_eval")
    pairs = pairs[: cfg["max_pairs"]]
    # In pipeline order, so each reference is scored before the stage that uses it.
    names = [n for n in ("base", "sft", "dpo") if n in cfg["models"] and (n == "base" or n in ctx.upstream)]
    needed = {n for n in names if n in REFERENCE} | {REFERENCE[n] for n in names if n in REFERENCE}
    logps: dict[str, list] = {}
    metrics = {name: _evaluate_model(ctx, name, prompts, conversations, pairs, logps, needed) for name in names}

    histories = {}
    for stage in ("sft", "dpo"):
        path = ctx.upstream_dir(stage) / "log_history.json"
        if stage in ctx.upstream and path.is_file():
            histories[stage] = json.loads(path.read_text())
    plot_loss_curves(histories, ctx.stage_dir / "loss_curves.png")
    plot_model_comparison(metrics, ctx.stage_dir / "comparison.png")
    plot_per_type(metrics, ctx.stage_dir / "per_type.png")
    atomic_write_json(ctx.stage_dir / "metrics.json", metrics)
    atomic_write_text(ctx.stage_dir / "report.md", _report(metrics, prompts, ctx.stage_dir, cfg["num_samples"]))
    print(f"  report: {ctx.stage_dir / 'report.md'}", flush=True)
    return {name: {k: v for k, v in m.items() if k != "per_type_strict"} for name, m in metrics.items()}
