"""The eval stage's ``report.md``: metrics with their 95 % intervals, paired comparisons in words, seen vs
unseen constraints, per-type accuracy and sample generations.

Where it sits: beside :mod:`pipeline.evaluation` (which computes what this renders); the ``eval`` stage
(:mod:`pipeline.stages.evaluate`) calls :func:`render_report` with the contents of ``metrics.json``.
Pure text formatting: no torch, no files other than the generations it quotes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAIN_METRICS = ["format_compliance", "prompt_level_strict", "prompt_level_loose", "instruction_level_strict",
                "instruction_level_loose", "prompt_level_strict_no_echo", "prompt_echo", "implicit_reward_acc",
                "likelihood_acc", "heldout_loss", "mean_new_tokens"]
SPLIT_METRICS = ["prompt_level_strict", "instruction_level_strict", "prompt_level_loose", "format_compliance",
                 "prompt_level_strict_no_echo", "prompt_echo"]
ECHO_NOTE = ("`prompt_echo`: share of answers that repeat a whole line of the prompt verbatim (what a base model "
             "does with a chat prompt); `prompt_level_strict_no_echo`: prompt-level strict accuracy with an echoing "
             "answer's pass counted as a fail (unless the prompt asks to repeat its request). A diagnostic of how "
             "a model passes, beside IFEval's metric, not a replacement for it.")
# What the seen / unseen labels of data/eval_prompts.jsonl mean (scripts/build_data.py writes them).
SPLITS = {
    "seen": "constraint types and phrasings that the training data uses",
    "unseen_phrasing": "trained constraint types, asked for with phrasings no training prompt uses",
    "unseen_type": "at least one constraint type that no training prompt asks for",
}
# What the two groups of held-out preference pairs are (evaluation.pair_groups).
PAIR_GROUPS = {
    "constraint": "the prompt asks for a checkable constraint; the rejected answer breaks it",
    "general": "no constraint: the rejected answer rambles, loops, runs on past its turn or answers wrongly",
}
PAIR_METRICS = ["implicit_reward_acc", "likelihood_acc"]
_NOT_PERCENT = {"heldout_loss", "mean_new_tokens"}


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x


def format_value(metric: str, value: Any, ci: Any = None) -> str:
    """``97.6 % [95.1, 99.2]`` for a rate, ``1.234 [1.201, 1.270]`` for a loss; ``–`` when absent."""
    if not _is_number(value):
        return "–"
    pct = metric not in _NOT_PERCENT
    scale, digits = (100, 1) if pct else (1, 1 if metric == "mean_new_tokens" else 3)
    text = f"{value * scale:.{digits}f}" + (" %" if pct else "")
    if isinstance(ci, list) and len(ci) == 2 and all(_is_number(x) for x in ci):
        text += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
    return text


def format_difference(metric: str, entry: Any, with_verdict: bool = True) -> str:
    """``+9.4 [+2.1, +16.0] **better**`` (points for rates) from a ``vs`` entry of metrics.json."""
    if not isinstance(entry, dict) or not _is_number(entry.get("diff")):
        return "–"
    pct = metric not in _NOT_PERCENT
    scale, digits = (100, 1) if pct else (1, 1 if metric == "mean_new_tokens" else 3)
    low, high = entry["ci95"]
    text = f"{entry['diff'] * scale:+.{digits}f} [{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]"
    return text + (f" **{entry['verdict']}**" if with_verdict else "")


def _steps(names: list[str]) -> list[tuple[str, str]]:
    """Consecutive steps first (base → sft, sft → dpo), then the whole way (base → dpo)."""
    steps = list(zip(names, names[1:], strict=False))
    return steps + ([(names[0], names[-1])] if len(names) > 2 else [])


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _words(metrics: dict[str, dict], steps: list[tuple[str, str]], keys: list[tuple[str, str | None]]) -> list[str]:
    """One sentence per step and metric: is the step a real change or within noise?"""
    lines = []
    for earlier, later in steps:
        for metric, split in keys:
            vs = metrics[later].get("vs", {}).get(earlier, {})
            entry = vs.get("by_split", {}).get(split, {}).get(metric) if split else vs.get(metric)
            if not isinstance(entry, dict) or not _is_number(entry.get("diff")):
                continue
            where = f" on {split.replace('_', ' ')} prompts" if split else ""
            meaning = {"better": "a real gain (the 95 % interval excludes zero)",
                       "worse": "a real loss (the 95 % interval excludes zero)",
                       "within noise": "within noise (the 95 % interval includes zero: no conclusion)"}.get(
                entry["verdict"], f"{entry['verdict']} (the 95 % interval excludes zero)")
            lines.append(f"- {earlier} → {later}, {metric}{where}: {format_difference(metric, entry, False)}: "
                         f"{meaning}.")
    return lines


def _group_table(metrics: dict[str, dict], names: list[str], steps: list[tuple[str, str]], section: str,
                 label: str, groups: list[str], keys: list[str], size: str) -> list[str]:
    """One row per group and metric of ``metrics[model][section]``: each model's value, then each step's paired
    difference."""
    rows = []
    for group in groups:
        for key in keys:
            cells = [format_value(key, metrics[n].get(section, {}).get(group, {}).get(key),
                                  metrics[n].get("ci95", {}).get(section, {}).get(group, {}).get(key)) for n in names]
            cells += [format_difference(key, metrics[b].get("vs", {}).get(a, {}).get(section, {}).get(group, {})
                                        .get(key)) for a, b in steps]
            rows.append([group, str(metrics[names[0]].get(section, {}).get(group, {}).get(size, "")), key, *cells])
    return _table([label, size, "metric", *names, *(f"{a} → {b}" for a, b in steps)], rows)


def render_report(metrics: dict[str, dict], prompts: list[dict], stage_dir: Path, samples: int) -> str:
    """The whole report.md for the models in ``metrics`` (pipeline order), from metrics.json's contents."""
    names = list(metrics)
    steps = _steps(names)
    sources = len({p.get("source_id") or i for i, p in enumerate(prompts)})
    lines = ["# Evaluation: base → SFT → DPO", "",
             f"{len(prompts)} held-out prompts built from {sources} held-out questions, greedy decoding. "
             "Brackets hold the 95 % bootstrap interval (2000 resamples of the held-out questions; of the pairs "
             "for preference accuracy, of the answers for held-out loss). See docs/evaluation.md.", ""]
    lines += _table(["metric", *names], [[key, *(format_value(key, metrics[n].get(key), metrics[n].get("ci95", {})
                                                               .get(key)) for n in names)]
                                         for key in MAIN_METRICS if any(key in metrics[n] for n in names)])
    if steps:
        lines += ["", "## Is each step a real gain?", "",
                  "Paired bootstrap: both models' answers to the same resampled prompts; the difference is later − "
                  "earlier, in points for rates. **better** / **worse**: the interval excludes zero; "
                  "**within noise**: it includes zero, and this evaluation cannot tell the two apart.", ""]
        rows = [[key, *(format_difference(key, metrics[b].get("vs", {}).get(a, {}).get(key)) for a, b in steps)]
                for key in MAIN_METRICS if any(key in metrics[b].get("vs", {}).get(a, {}) for a, b in steps)]
        lines += _table(["metric", *(f"{a} → {b}" for a, b in steps)], rows)
        lines += ["", *_words(metrics, steps, [("format_compliance", None), ("prompt_level_strict", None),
                                              ("instruction_level_strict", None)])]
    splits = [s for s in SPLITS if any(s in metrics[n].get("by_split", {}) for n in names)]
    if splits:
        lines += ["", "## Seen and unseen constraints", ""]
        lines += [f"- **{s}**: {SPLITS[s]}." for s in splits] + ["", ECHO_NOTE, ""]
        lines += _group_table(metrics, names, steps, "by_split", "split", splits, SPLIT_METRICS, "prompts")
        lines += ["", *_words(metrics, steps, [("prompt_level_strict", s) for s in splits])]
    scored = [n for n in names if "by_pairs" in metrics[n]]
    kinds = [k for k in PAIR_GROUPS if any(k in metrics[n]["by_pairs"] for n in scored)]
    if kinds:
        lines += ["", "## Preference pairs with and without constraints", ""]
        lines += [f"- **{k}**: {PAIR_GROUPS[k]}." for k in kinds] + [""]
        lines += _group_table(metrics, scored, _steps(scored), "by_pairs", "group", kinds, PAIR_METRICS, "pairs")
    lines += ["", "![model comparison](comparison.png)", "", "![per constraint type](per_type.png)", "",
              "![training loss](loss_curves.png)", "", "## Strict accuracy per constraint type", "",
              "Per type, over the instructions of that type (few per type: wide intervals).", ""]
    types = sorted({t for m in metrics.values() for t in m.get("per_type_strict", {})})
    lines += _table(["constraint", *names], [[t, *(format_value(
        t, metrics[n].get("per_type_strict", {}).get(t), metrics[n].get("ci95", {}).get("per_type_strict", {}).get(t))
        for n in names)] for t in types])
    lines += ["", "## Sample generations", ""]
    generations = {n: [json.loads(x) for x in (stage_dir / f"generations_{n}.jsonl").read_text().splitlines()]
                   for n in names if (stage_dir / f"generations_{n}.jsonl").is_file()}
    step = max(len(prompts) // max(samples, 1), 1)
    for i in range(0, min(len(prompts), step * samples), step):
        lines += [f"### Prompt {i + 1}", "", "> " + prompts[i]["prompt"].replace("\n", "\n> "), ""]
        for n, rows_of in generations.items():
            out = rows_of[i]
            flag = "" if out["stopped"] else " *(did not stop)*"
            lines += [f"**{n}**{flag}:", "", "```text", out["text"][:1200], "```", ""]
    return "\n".join(lines) + "\n"
