"""Measuring a model: generation on IFEval-style prompts, constraint checks, log-prob metrics, plots.

Reusable on its own (any JSONL with ``prompt`` + ``instruction_id_list`` + ``kwargs``); the ``eval`` stage
(:mod:`pipeline.stages.evaluate`) runs it for base, SFT and DPO and writes the report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.data.constraints import aggregate, evaluate_response
from pipeline.errors import DataError
from pipeline.inference import generate


def load_prompts(path: str | Path, max_prompts: int | None = None) -> list[dict[str, Any]]:
    """Read IFEval-style prompts: ``prompt`` (string), ``instruction_id_list`` and ``kwargs`` lists."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON ({exc.msg})", path=str(path), line=number) from None
            if not isinstance(row.get("prompt"), str) or len(row.get("instruction_id_list", [])) != len(
                row.get("kwargs", [])
            ):
                raise DataError("needs 'prompt' and equally long 'instruction_id_list' and 'kwargs'",
                                path=str(path), line=number)
            rows.append(row)
    return rows[:max_prompts] if max_prompts else rows


def score_generations(prompts: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Format compliance (answered, then stopped on its own) and IFEval constraint accuracies."""
    results = []
    for row, out in zip(prompts, outputs, strict=True):
        result = evaluate_response(out["text"], row["instruction_id_list"], row["kwargs"], row["prompt"])
        out["constraints_strict"] = result["strict"]
        results.append(result)
    compliant = [out["stopped"] and bool(out["text"]) for out in outputs]
    return {
        "format_compliance": round(sum(compliant) / max(len(compliant), 1), 4),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in aggregate(results).items()},
        "mean_new_tokens": round(sum(o["new_tokens"] for o in outputs) / max(len(outputs), 1), 1),
    }


def generate_for_prompts(model: Any, tokenizer: Any, prompts: list[dict[str, Any]], *, max_new_tokens: int,
                         batch_size: int, desc: str) -> list[dict[str, Any]]:
    """Greedy answers for every prompt, in length-sorted batches (less padding), with a progress bar."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["prompt"]))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        convs = [[{"role": "user", "content": prompts[i]["prompt"]}] for i in idx]
        for i, out in zip(idx, generate(model, tokenizer, convs, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size), strict=True):
            results[i] = out
    return results  # type: ignore[return-value]


@torch.inference_mode()
def completion_logps(model: Any, tokenizer: Any, prompt: list[dict[str, str]],
                     completion: list[dict[str, str]]) -> tuple[float, int]:
    """Sum of log-probs of the completion's tokens (its end-of-turn included) after the prompt, and count."""
    prefix = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    n = len(full) - len(prefix)  # completion tokens
    ids = torch.tensor([full], device=model.device)
    # Logits only where completion tokens are predicted: the vocabulary projection dominates small models.
    logits = model(input_ids=ids, logits_to_keep=n + 1).logits[0, :-1].float()
    targets = ids[0, len(prefix):]
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    return float(picked.sum()), int(picked.numel())


def heldout_loss(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], desc: str) -> float:
    """Mean per-token NLL of the final assistant answer of each held-out conversation."""
    total, count = 0.0, 0
    for messages in tqdm(conversations, desc=desc, unit="conv"):
        logp, n = completion_logps(model, tokenizer, messages[:-1], messages[-1:])
        total, count = total - logp, count + n
    return round(total / max(count, 1), 4)


def preference_accuracy(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], desc: str) -> dict[str, float]:
    """Held-out preference accuracy of a PEFT model against its own adapter-disabled reference.

    ``implicit_reward_acc``: the DPO implicit reward log π(y|x) − log π_ref(y|x) ranks chosen above rejected.
    ``likelihood_acc``: the model alone gives chosen a higher log-prob than rejected.
    """
    implicit, likelihood = [], []
    for pair in tqdm(pairs, desc=desc, unit="pair"):
        chosen = completion_logps(model, tokenizer, pair["prompt"], pair["chosen"])[0]
        rejected = completion_logps(model, tokenizer, pair["prompt"], pair["rejected"])[0]
        with model.disable_adapter():
            ref_chosen = completion_logps(model, tokenizer, pair["prompt"], pair["chosen"])[0]
            ref_rejected = completion_logps(model, tokenizer, pair["prompt"], pair["rejected"])[0]
        implicit.append((chosen - ref_chosen) > (rejected - ref_rejected))
        likelihood.append(chosen > rejected)
    n = max(len(pairs), 1)
    return {"implicit_reward_acc": round(sum(implicit) / n, 4), "likelihood_acc": round(sum(likelihood) / n, 4)}


# ------------------------------------------------------------------------------------------------ plots
def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(histories), 1), figsize=(5 * max(len(histories), 1), 3.5), squeeze=False)
    for ax, (name, history) in zip(axes[0], histories.items(), strict=False):
        for key, style in (("loss", "-"), ("eval_loss", "o--")):
            points = [(h["step"], h[key]) for h in history if key in h and math.isfinite(h[key])]
            if points:
                ax.plot(*zip(*points, strict=False), style, label=key)
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_model_comparison(metrics: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    keys = ["format_compliance", "prompt_level_strict", "prompt_level_loose", "instruction_level_strict"]
    names = list(metrics)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [metrics[name].get(k, float("nan")) for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], values, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(keys))], keys, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Held-out instruction following")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_type(metrics: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    types = sorted({t for m in metrics.values() for t in m.get("per_type_strict", {})})
    names = list(metrics)
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(types) + 1.5))
    height = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [metrics[name].get("per_type_strict", {}).get(t, 0.0) for t in types]
        ax.barh([y + i * height for y in range(len(types))], values, height, label=name)
    ax.set_yticks([y + height * (len(names) - 1) / 2 for y in range(len(types))], types, fontsize=7)
    ax.set_xlim(0, 1)
    ax.legend()
    ax.set_title("Strict accuracy per constraint type")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
