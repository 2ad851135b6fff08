"""Stage ``eval``: base vs SFT vs DPO on held-out prompts, side by side.

Writes ``<output_dir>/eval/metrics.json``, ``report.md``, PNG plots, ``generations_<model>.jsonl``,
``heldout_<model>.jsonl`` (each reference answer's log-prob) and, for the trained models, ``pairs_<model>.jsonl``
(each held-out preference pair's log-probs and whether it was ranked right).
Metrics: format compliance (answers, then stops), IFEval-style constraint accuracy (strict/loose, per
type, per seen/unseen split), held-out preference accuracy (DPO implicit reward vs the stage's reference),
held-out loss of reference answers; plus the SFT/DPO training loss curves. Every metric carries a 95 %
bootstrap interval, and each model is compared with the earlier ones by a paired bootstrap on the same
prompts (:func:`pipeline.evaluation.bootstrap_metrics`; docs/evaluation.md).

The reference of each stage is the model it started from: the base model for ``sft``, the SFT model for
``dpo`` (in both ``dpo.start`` modes: the merged SFT weights, or TRL's frozen copy of the SFT adapter).
Each model scores the held-out pairs once, adapter merged, and serves as the next stage's reference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import load_from_disk

from pipeline import memory
from pipeline.artifacts import atomic_write_json, atomic_write_text
from pipeline.data.formats import load_preference_examples
from pipeline.errors import PipelineError
from pipeline.eval_report import render_report
from pipeline.evaluation import (
    bootstrap_metrics,
    generate_for_prompts,
    heldout_rows,
    heldout_scores,
    interval_summary,
    load_prompts,
    loss_items,
    mean_nll,
    pair_groups,
    pair_items,
    pair_logps,
    pair_rows,
    plot_loss_curves,
    plot_model_comparison,
    plot_per_type,
    preference_accuracy,
    prompt_items,
    question_clusters,
    read_loss_history,
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


def _evaluate_model(ctx: StageContext, tokenizer: Any, name: str, prompts: list[dict], conversations: list,
                    pairs: list, logps: dict[str, list], needed: set[str], losses: dict[str, list]) -> dict:
    """Metrics of one model; fills ``logps[name]`` (its pair log-probs) when a stage needs them, and
    ``losses[name]`` (per-answer held-out log-probs, for the loss's interval).

    What the model produced (answers, log-probs) may come from the user cache; the scores are always computed
    here, so a changed checker re-scores cached answers.
    """
    rows = _model_outputs(ctx, tokenizer, name, prompts, conversations, pairs, logps, needed, losses)
    metrics: dict[str, Any] = {}
    if conversations:
        metrics["heldout_loss"] = mean_nll(losses[name])
        atomic_write_text(ctx.stage_dir / f"heldout_{name}.jsonl", _jsonl(heldout_rows(conversations, losses[name])))
    if pairs and name in REFERENCE:
        metrics.update(preference_accuracy(logps[name], logps[REFERENCE[name]]))
        atomic_write_text(ctx.stage_dir / f"pairs_{name}.jsonl",
                          _jsonl(pair_rows(pairs, logps[name], logps[REFERENCE[name]])))
    metrics.update(score_generations(prompts, rows))  # also writes each row's constraint results into it
    atomic_write_text(ctx.stage_dir / f"generations_{name}.jsonl", _jsonl(rows))
    return metrics


def _model_outputs(ctx: StageContext, tokenizer: Any, name: str, prompts: list[dict], conversations: list,
                   pairs: list, logps: dict[str, list], needed: set[str], losses: dict[str, list]) -> list[dict]:
    """Model ``name``'s answers to ``prompts`` (one row each), its held-out scores and pair log-probs: from the
    user cache when this exact model had exactly this evaluation before (the base model; an SFT model that a
    DPO-only re-run kept), else by running it."""
    cfg = ctx.recipe.eval
    cache = cache_path(ctx.recipe, tokenizer, name, prompts, conversations, pairs, name in needed)
    cached = eval_cache.load(cache)
    if cached is not None and (cached.get("losses") is not None or not conversations):
        print(f"  {name}: answers and log-probs read from the cache {cache} (same model weights, eval data and "
              "generation settings; delete the file to recompute)", flush=True)
        if cached["logps"] is not None:
            logps[name] = [tuple(pair) for pair in cached["logps"]]
        if cached.get("reference_logps") is not None:  # its reference's, when that model is not evaluated itself
            logps.setdefault(REFERENCE[name], [tuple(pair) for pair in cached["reference_logps"]])
        if conversations:  # per-answer scores: the held-out loss and its interval need them
            losses[name] = cached["losses"]
        return [json.loads(line) for line in cached["generations"].splitlines()]
    model, model_tokenizer = _load_for(ctx, name)
    if conversations:
        losses[name] = heldout_scores(model, model_tokenizer, conversations, desc=f"{name} held-out loss")
    if pairs and name in needed:
        logps[name] = pair_logps(model, model_tokenizer, pairs, desc=f"{name} preference pairs")
    reference = REFERENCE.get(name)
    if pairs and reference and reference not in logps:  # its reference is not evaluated itself: score with it alone
        ref_model, ref_tokenizer = _load_for(ctx, reference)
        logps[reference] = pair_logps(ref_model, ref_tokenizer, pairs, desc=f"{reference} preference pairs")
        del ref_model
    outputs = generate_for_prompts(model, model_tokenizer, prompts, max_new_tokens=cfg["max_new_tokens"],
                                   batch_size=cfg["batch_size"], desc=f"{name} generation",
                                   continuous=name not in cfg["padded_batches"])
    rows = [{"key": p.get("key"), "prompt": p["prompt"], **o} for p, o in zip(prompts, outputs, strict=True)]
    eval_cache.store(cache, {"logps": logps.get(name), "losses": losses.get(name),
                             "reference_logps": logps.get(reference or ""), "generations": _jsonl(rows)})
    del model
    memory.release()  # the next model loads into the memory this one held
    return rows


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def cache_path(recipe: Any, tokenizer: Any, name: str, prompts: list[dict], conversations: list, pairs: list,
               scores_pairs: bool) -> Path | None:
    """Model ``name``'s cache entry for exactly this evaluation, None if not cacheable (``stages/eval_cache.py``).

    A trained model is known by the files its stage's manifest records: call this for ``sft`` / ``dpo`` only
    once that stage is final (in the eval stage, or in a plan that does not re-run it).
    """
    cfg = recipe.eval
    base = eval_cache.base_model_fingerprint(recipe.model)
    identity = {"base": base}
    for stage in (name, REFERENCE.get(name)):
        if stage in REFERENCE:
            identity[stage] = eval_cache.stage_fingerprint(recipe.stage_dir(stage), base)
    settings = {"max_new_tokens": cfg["max_new_tokens"], "batch_size": cfg["batch_size"],
                "continuous": name not in cfg["padded_batches"], "scores_pairs": bool(pairs) and scores_pairs}
    if name in REFERENCE and pairs:  # its preference accuracy is measured against its reference model
        if identity[REFERENCE[name]] is None:
            return None
        settings["reference"] = identity[REFERENCE[name]]
    inputs = {"prompts": prompts, "conversations": conversations, "pairs": pairs if scores_pairs else []}
    return eval_cache.cache_path(name, identity[name], recipe.model, tokenizer, inputs, settings)


def _held_out(prepared: Path, split: str) -> list[dict]:
    path = prepared / split
    if not path.exists():
        return []
    rows = load_from_disk(str(path))
    return list(rows.select(range(min(MAX_HELDOUT_ROWS, len(rows)))))


def eval_inputs(recipe: Any, prepared: Path, tokenizer: Any, log: Callable[[str], None] | None = None
                ) -> tuple[list[dict], list[list[dict]], list[dict]]:
    """What the stage evaluates: the prompts, the held-out conversations it scores and the preference pairs
    (``log`` hears of pairs left out by ``eval.max_pairs``)."""
    cfg = recipe.eval
    if not cfg["prompts"]:
        raise PipelineError("eval.prompts must name a JSONL of held-out prompts (IFEval-style).")
    prompts = load_prompts(cfg["prompts"], cfg["max_prompts"])
    # Held-out loss: on the eval prompts' reference answers where the file has them, else the SFT split.
    conversations = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["reference"]}]
                     for p in prompts if isinstance(p.get("reference"), str) and p["reference"].strip()]
    if not conversations:
        conversations = [row["messages"] for row in _held_out(prepared, "sft_eval")]
    if cfg["preferences"]:
        # a pair naming the held-out question it was built from is resampled with that question's other pairs
        pairs, _ = load_preference_examples([{"path": cfg["preferences"]}], control_tokens=control_tokens(tokenizer),
                                            keep=("source_id",))
    else:
        pairs = _held_out(prepared, "dpo_eval")
    if log is not None and cfg["max_pairs"] is not None and len(pairs) > cfg["max_pairs"]:
        log(f"  preference accuracy on the first {cfg['max_pairs']} of {len(pairs)} held-out pairs (eval.max_pairs)")
    return prompts, conversations[:MAX_HELDOUT_ROWS], pairs[: cfg["max_pairs"]]


def _add_intervals(ctx: StageContext, metrics: dict[str, dict], prompts: list[dict], pairs: list,
                   logps: dict[str, list], losses: dict[str, list]) -> None:
    """Add 95 % bootstrap intervals and paired model-to-model differences to ``metrics`` (docs/evaluation.md)."""
    names = list(metrics)
    outputs = {n: [json.loads(x) for x in (ctx.stage_dir / f"generations_{n}.jsonl").read_text().splitlines()]
               for n in names}
    groups = [(question_clusters(prompts), {n: prompt_items(prompts, outputs[n]) for n in names})]
    scored = [n for n in names if n in REFERENCE and n in logps and REFERENCE[n] in logps]
    kinds = pair_groups(pairs)
    if pairs and scored:
        groups.append((question_clusters(pairs), {n: pair_items(logps[n], logps[REFERENCE[n]], kinds)
                                                 for n in scored}))
    if losses:
        groups.append((list(range(len(next(iter(losses.values()))))), {n: loss_items(v) for n, v in losses.items()}))
    intervals, differences = bootstrap_metrics(groups, names)
    sizes: dict[str, int] = {}
    for row in prompts:
        if row.get("split"):
            sizes[row["split"]] = sizes.get(row["split"], 0) + 1
    for name in names:
        metrics[name].update(interval_summary(intervals[name], {a: d for (a, b), d in differences.items()
                                                                if b == name}))
        for split, size in sizes.items():
            metrics[name].setdefault("by_split", {}).setdefault(split, {})["prompts"] = size
        for kind, group in metrics[name].get("by_pairs", {}).items():
            group["pairs"] = kinds.count(kind)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.recipe.eval
    tokenizer = load_tokenizer(ctx.recipe.model)  # about 6 s for gemma's: loaded once, for every model's cache key
    prompts, conversations, pairs = eval_inputs(ctx.recipe, ctx.upstream_dir("prepare"), tokenizer, log=print)
    # In pipeline order, so each reference is scored before the stage that uses it.
    names = [n for n in ("base", "sft", "dpo") if n in cfg["models"] and (n == "base" or n in ctx.upstream)]
    needed = {n for n in names if n in REFERENCE} | {REFERENCE[n] for n in names if n in REFERENCE}
    logps: dict[str, list] = {}
    losses: dict[str, list] = {}
    metrics = {name: _evaluate_model(ctx, tokenizer, name, prompts, conversations, pairs, logps, needed, losses)
               for name in names}
    _add_intervals(ctx, metrics, prompts, pairs, logps, losses)

    histories = {stage: read_loss_history(ctx.upstream_dir(stage)) for stage in ("sft", "dpo") if stage in ctx.upstream}
    plot_loss_curves(histories, ctx.stage_dir / "loss_curves.png")
    plot_model_comparison(metrics, ctx.stage_dir / "comparison.png")
    plot_per_type(metrics, ctx.stage_dir / "per_type.png")
    atomic_write_json(ctx.stage_dir / "metrics.json", metrics)
    atomic_write_text(ctx.stage_dir / "report.md", render_report(metrics, prompts, ctx.stage_dir, cfg["num_samples"]))
    print(f"  report: {ctx.stage_dir / 'report.md'}", flush=True)
    # metrics.json has the nested parts; the manifest keeps the headline numbers
    nested = ("per_type_strict", "ci95", "by_split", "by_pairs", "vs")
    return {name: {k: v for k, v in m.items() if k not in nested} for name, m in metrics.items()}
