"""Stage ``prepare``: read the recipe's data sources, normalise, filter, split, save.

Writes ``<output_dir>/prepare/{sft,dpo}_{train,eval}/`` (datasets on disk, in TRL's conversational
formats) and ``report.json``, where every row read is accounted for: rows in = kept + dropped
(with reason) + deduplicated. Control tokens written as text in the data are neutralised here, and rows
that would not fit the trainers' ``max_length`` are dropped (truncation would cut off the end-of-turn
token the model must learn to emit).
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from typing import Any

from datasets import Dataset

from pipeline.artifacts import atomic_write_json
from pipeline.data.formats import load_preference_examples, load_sft_examples
from pipeline.errors import PipelineError
from pipeline.models import control_tokens, load_tokenizer
from pipeline.stages.context import StageContext


def _token_count(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def _drop_over_length(rows: list[dict], report: dict, count: Any, limit: int | None, what: str) -> list[dict]:
    """Drop rows longer than ``limit`` tokens, recording the reason so counts still reconcile."""
    if not limit:
        return rows
    kept = [row for row in rows if count(row) <= limit]
    dropped = len(rows) - len(kept)
    if dropped:
        reason = f"longer than {what}.max_length ({limit} tokens)"
        report["kept"] -= dropped
        report["dropped"] += dropped
        report["drop_reasons"][reason] = report["drop_reasons"].get(reason, 0) + dropped
    return kept


def _split(rows: list[dict], fraction: float, cap: int, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(cap, round(len(rows) * fraction)) if len(rows) > 1 else 0
    if fraction > 0 and n_eval == 0 and len(rows) >= 4:
        n_eval = 1
    eval_idx = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_idx], [r for i, r in enumerate(rows) if i in eval_idx]


def _save(ctx: StageContext, name: str, rows: list[dict]) -> None:
    shutil.rmtree(ctx.stage_dir / name, ignore_errors=True)  # no split left over from an earlier run
    if rows:
        columns = list(dict.fromkeys(key for row in rows for key in row))  # optional ones (constraints) too
        Dataset.from_dict({key: [row.get(key) for row in rows] for key in columns}).save_to_disk(
            str(ctx.stage_dir / name))


def run(ctx: StageContext) -> dict[str, Any]:
    recipe, data = ctx.recipe, ctx.recipe.data
    tokenizer = load_tokenizer(recipe.model)
    controls = control_tokens(tokenizer)
    report: dict[str, Any] = {"control_tokens": len(controls)}
    metrics: dict[str, Any] = {}
    fraction, cap, seed = float(data["eval_fraction"]), int(data["max_eval_rows"]), int(data["seed"])

    if data["sft"] and recipe.sft is not None:
        rows, sft_report = load_sft_examples(data["sft"], control_tokens=controls)
        rows = _drop_over_length(rows, sft_report, lambda r: _token_count(tokenizer, r["messages"]),
                                 recipe.sft.get("max_length"), "sft")
        if not rows:
            raise PipelineError("No SFT rows are left after filtering; see the drop reasons in prepare/report.json.")
        train, held_out = _split(rows, fraction, cap, seed)
        _save(ctx, "sft_train", train)
        _save(ctx, "sft_eval", held_out)
        report["sft"] = sft_report
        metrics.update(sft_train_rows=len(train), sft_eval_rows=len(held_out))

    if data["dpo"] and recipe.dpo is not None:
        rows, dpo_report = load_preference_examples(data["dpo"], control_tokens=controls)

        def pair_length(row: dict) -> int:
            longer = max(row["chosen"], row["rejected"], key=lambda m: len(m[0]["content"]))
            return _token_count(tokenizer, row["prompt"] + longer)

        rows = _drop_over_length(rows, dpo_report, pair_length, recipe.dpo.get("max_length"), "dpo")
        if not rows:
            raise PipelineError("No preference pairs left after filtering; see prepare/report.json.")
        train, held_out = _split(rows, fraction, cap, seed + 1)
        _save(ctx, "dpo_train", train)
        _save(ctx, "dpo_eval", held_out)
        report["dpo"] = dpo_report
        metrics.update(dpo_train_rows=len(train), dpo_eval_rows=len(held_out))

    for kind in ("sft", "dpo"):
        if kind in report:
            part = report[kind]
            metrics[f"{kind}_rows_in"] = part["rows_in"]
            metrics[f"{kind}_dropped"] = part["dropped"]
            metrics[f"{kind}_deduplicated"] = part["deduplicated"]
            top = Counter(part["drop_reasons"]).most_common(3)
            if top:
                print(f"  {kind}: dropped {part['dropped']} rows; most common: {top}", flush=True)
    atomic_write_json(ctx.stage_dir / "report.json", report)
    return metrics
