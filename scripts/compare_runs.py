"""Compare the answers of two runs on the same eval prompts: paired differences with 95 % intervals.

A recipe variant is only better than another if the difference survives the noise of the eval prompts. Each run's
``eval/report.md`` compares base, SFT and DPO *within* the run; this compares one model *across* runs (e.g. the DPO
model of a data variant against the DPO model of the shipped recipe), resampling the same prompts for both
(``pipeline.evaluation.bootstrap_metrics``, the eval stage's own bootstrap), and says in words whether each
difference is a real gain:

    python scripts/compare_runs.py runs/quickstart runs/variant --model dpo
    python scripts/compare_runs.py runs/quickstart runs/variant --model sft --prompts data/eval_prompts.jsonl

Both runs must have answered every prompt of one prompt file (the generations are matched by prompt key; by default
the file the first run's eval manifest names). Where both runs
wrote ``eval/pairs_<model>.jsonl``, held-out preference accuracy is compared on the pairs both ranked; where both
wrote ``eval/heldout_<model>.jsonl``, the held-out loss of the reference answers on the same answers. The training
seed moves these metrics too (docs/experiments.md): compare two seeds of each before believing a variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.bootstrap import verdict  # noqa: E402
from pipeline.eval_report import MAIN_METRICS  # noqa: E402
from pipeline.evaluation import (  # noqa: E402
    DIRECTION,
    bootstrap_metrics,
    load_prompts,
    loss_items,
    pair_outcome_items,
    prompt_items,
    question_clusters,
)


def read_generations(run: Path, model: str, prompts: list[dict]) -> list[dict]:
    path = run / "eval" / f"generations_{model}.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: did that run evaluate the {model!r} model?")
    by_key = {row["key"]: row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    missing = [p["key"] for p in prompts if p["key"] not in by_key]
    if missing:
        raise SystemExit(f"{path} has no answer for {len(missing)} of {len(prompts)} prompts (first: "
                         f"{missing[0]!r}): the runs evaluated different prompt files; --prompts names one both answered "
                         "(a run on the larger set answered every prompt of data/eval_prompts.jsonl)")
    return [by_key[p["key"]] for p in prompts]


def read_scores(run: Path, kind: str, model: str) -> list[dict] | None:
    """The run's ``eval/<kind>_<model>.jsonl``, if it has one: ``pairs`` (held-out preference pairs ranked by that
    model) or ``heldout`` (each reference answer's log-prob under it)."""
    path = run / "eval" / f"{kind}_{model}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else None


def _pair_items(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Per-pair values of the preference accuracies, overall and per group, from ``pairs_<model>.jsonl`` rows."""
    return pair_outcome_items({"implicit_reward_acc": [r["implicit_reward_correct"] for r in rows],
                               "likelihood_acc": [r["likelihood_correct"] for r in rows]}, [r["group"] for r in rows])


def common_pairs(first: list[dict], second: list[dict]) -> tuple[list[dict], list[dict]]:
    """Each run's rows of the pairs both runs ranked, in the first run's order: a run on the larger eval set
    (docs/evaluation.md) pairs with one on the shipped set on the shipped set's pairs, its first rows."""
    by_id = {row["id"]: row for row in second}
    kept = [row for row in first if row["id"] in by_id]
    if not kept:
        raise SystemExit("the runs' pairs_*.jsonl hold different preference pairs: they cannot be paired")
    if len(kept) < max(len(first), len(second)):
        print(f"preference accuracy on the {len(kept)} pairs both runs ranked ({len(first)} and {len(second)})")
    return kept, [by_id[row["id"]] for row in kept]


def compare(first: Path, second: Path, model: str, prompts_path: str) -> list[tuple[str, float, float, str]]:
    """``(metric, first value, second value − first value with its interval and verdict)`` per metric."""
    prompts = load_prompts(prompts_path)
    names = [f"{first}", f"{second}"]
    items = {name: prompt_items(prompts, read_generations(Path(name), model, prompts)) for name in names}
    groups = [(question_clusters(prompts), items)]
    pairs = {name: read_scores(Path(name), "pairs", model) for name in names}
    if all(pairs.values()):  # both runs ranked held-out pairs: compare preference accuracy on the same pairs too
        kept = common_pairs(pairs[names[0]], pairs[names[1]])
        groups.append((question_clusters(kept[0]), {n: _pair_items(rows) for n, rows in zip(names, kept, strict=True)}))
    heldout = {name: read_scores(Path(name), "heldout", model) for name in names}
    if all(heldout.values()):  # both runs scored the reference answers: compare the held-out loss on the same ones
        if [r["id"] for r in heldout[names[0]]] != [r["id"] for r in heldout[names[1]]]:
            raise SystemExit("the runs' heldout_*.jsonl hold different reference answers: they cannot be paired")
        groups.append((list(range(len(heldout[names[0]]))),
                       {n: loss_items([(r["logp"], r["tokens"]) for r in heldout[n]]) for n in names}))
    intervals, differences = bootstrap_metrics(groups, names)
    diffs = differences[(names[0], names[1])]
    keys = [k for k in MAIN_METRICS if k in diffs] + sorted(
        k for k in diffs if k.startswith(("by_split/", "by_pairs/")))
    rows = []
    for key in keys:
        diff = diffs[key]
        words = verdict(diff, DIRECTION.get(key.rsplit("/", 1)[-1], True))
        rows.append((key, intervals[names[0]][key].value, intervals[names[1]][key].value,
                     f"{diff.value:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] {words}"))
    return rows


def prompts_of(run: Path) -> str:
    """The eval prompt file ``run``'s eval stage used (its manifest's config), else the shipped one."""
    try:
        manifest = json.loads((run / "eval" / "manifest.json").read_text(encoding="utf-8"))
        return str(manifest["config"]["eval"]["prompts"])
    except (OSError, ValueError, KeyError, TypeError):
        return "data/eval_prompts.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="a run's output_dir (the reference)")
    parser.add_argument("second", type=Path, help="another run's output_dir (the variant)")
    parser.add_argument("--model", default="dpo", help="which evaluated model to compare (base, sft, dpo)")
    parser.add_argument("--prompts", default=None,
                        help="the eval prompt file both runs used (default: the one the first run's eval "
                             "manifest names, else data/eval_prompts.jsonl)")
    args = parser.parse_args(argv)
    rows = compare(args.first, args.second, args.model, args.prompts or prompts_of(args.first))
    print(f"{args.model}: {args.first} → {args.second} (paired bootstrap over the same prompts, 95 % intervals)")
    print(f"| metric | {args.first} | {args.second} | difference |\n|---|---|---|---|")
    for key, a, b, diff in rows:
        print(f"| {key} | {a:.3f} | {b:.3f} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
