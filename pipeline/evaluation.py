"""Measuring a model: generation on IFEval-style prompts, constraint checks, log-prob metrics, plots.

Reusable on its own (any JSONL with ``prompt`` + ``instruction_id_list`` + ``kwargs``); the ``eval`` stage
(:mod:`pipeline.stages.evaluate`) runs it for base, SFT and DPO and writes the report.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.bootstrap import Estimate, Resamples, cluster_index, per_cluster, verdict
from pipeline.data.constraints import evaluate_response, get_constraint
from pipeline.data.formats import read_jsonl
from pipeline.errors import DataError, PipelineError
from pipeline.inference import generate
from pipeline.lm_head import labelled_log_probs


def load_prompts(path: str | Path, max_prompts: int | None = None) -> list[dict[str, Any]]:
    """Read IFEval-style prompts: ``prompt`` (string), ``instruction_id_list`` and ``kwargs`` lists.

    Every instruction id must be one this project can check; an unknown one is an error naming the line.
    """
    if not Path(path).is_file():
        raise DataError(f"eval prompts file not found (looked for {Path(path).absolute()}; relative paths start "
                        "from the current directory). Fix `eval.prompts` in the recipe.", path=str(path))
    rows = []
    for number, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or len(
            row.get("instruction_id_list", [])
        ) != len(row.get("kwargs", [])):
            raise DataError("needs 'prompt' and equally long 'instruction_id_list' and 'kwargs'",
                            path=str(path), line=number)
        row.setdefault("instruction_id_list", [])  # a plain prompt: answered and scored for format only
        row.setdefault("kwargs", [])
        for instruction_id in row["instruction_id_list"]:  # before any model generates: fail fast
            try:
                get_constraint(instruction_id)
            except PipelineError as exc:
                raise DataError(str(exc), path=str(path), line=number) from None
        rows.append(row)
    return rows[:max_prompts] if max_prompts else rows


ECHO_MIN_CHARS = 20  # a prompt line this long, repeated verbatim, is an echo rather than a shared phrase


def repeats_prompt(prompt: str, text: str) -> bool:
    """Whether the answer repeats a whole line of the prompt (at least :data:`ECHO_MIN_CHARS` characters)
    verbatim: what a base model does with a chat prompt it was never trained on, and how it passes checks such
    as "answer with one of these options" or "include [placeholders]" without following them."""
    return any(len(line.strip()) >= ECHO_MIN_CHARS and line.strip() in text for line in prompt.splitlines())


def _passed_without_echo(row: dict[str, Any], out: dict[str, Any], echo: bool) -> bool:
    """Strict pass by an answer that does not repeat the prompt (a prompt that asks for its request to be
    repeated, ``combination:repeat_prompt``, keeps its strict result)."""
    echo_asked = "combination:repeat_prompt" in row["instruction_id_list"]
    return all(out["constraints_strict"]) and (echo_asked or not echo)


def score_generations(prompts: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Check every answer (writes ``constraints_strict``, ``constraints_loose`` and ``repeats_prompt`` into its
    row) and return the point values of :func:`prompt_items`' metrics: format compliance (answered, then
    stopped on its own), IFEval's constraint accuracies overall and per type (None without a constrained
    prompt), how often the answer repeats the prompt (``prompt_echo``; ``prompt_level_strict_no_echo`` counts
    an echoing answer's pass as a fail: a diagnostic beside IFEval's metric, not a replacement) and answer
    length. The intervals and per-split values come from the same items (:func:`bootstrap_metrics`)."""
    if not outputs:
        raise PipelineError("No evaluation results to score; check that the eval prompt file is not empty.")
    for row, out in zip(prompts, outputs, strict=True):
        result = evaluate_response(out["text"], row["instruction_id_list"], row["kwargs"], row["prompt"])
        out["constraints_strict"], out["constraints_loose"] = result["strict"], result["loose"]
        out["repeats_prompt"] = repeats_prompt(row["prompt"], out["text"])
    totals = {key: (sum(num), sum(den)) for key, (num, den) in prompt_items(prompts, outputs).items()
              if not key.startswith("by_split/")}
    return {"per_type_strict": {}, **nest({key: round(num / den, 4) if den else None
                                           for key, (num, den) in sorted(totals.items())})}


def generate_for_prompts(model: Any, tokenizer: Any, prompts: list[dict[str, Any]], *, max_new_tokens: int,
                         batch_size: int, desc: str, continuous: bool = True) -> list[dict[str, Any]]:
    """Greedy answers for every prompt (see ``inference.generate``), with a progress bar."""
    how = "continuous batching" if continuous else "padded batches"
    print(f"  {desc}: {len(prompts)} prompts, up to {max_new_tokens} new tokens each ({how})", flush=True)
    convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    return generate(model, tokenizer, convs, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True,
                    continuous=continuous)


def _encode_completion(tokenizer: Any, prompt: list[dict[str, str]],
                       completion: list[dict[str, str]]) -> tuple[list[int], int]:
    """Token ids of prompt + completion, and how many of them are the completion (end-of-turn included)."""
    prefix = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    return list(full), len(full) - len(prefix)


MAX_SCORED_POSITIONS = 1024  # rows x kept positions per scoring forward: 1 GiB of fp32 logits at 262k tokens
# (the bound of a model whose own forward must run: lm_head.labelled_log_probs scores others a chunk at a time)


def _position_batches(order: list[int], completion_lengths: list[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into batches of at most ``batch_size`` rows whose logits (rows x the batch's longest
    completion) stay within ``MAX_SCORED_POSITIONS`` (a row alone may exceed it)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        widest = max(longest, completion_lengths[i])
        if current and (len(current) == batch_size or (len(current) + 1) * widest > MAX_SCORED_POSITIONS):
            batches.append(current)
            current, widest = [], completion_lengths[i]
        current.append(i)
        longest = widest
    return batches + ([current] if current else [])


@torch.inference_mode()
def completion_logps_batched(model: Any, tokenizer: Any, items: list[tuple[list[dict], list[dict]]], *,
                             batch_size: int = 8) -> list[tuple[float, int]]:
    """``(sum of completion log-probs, completion tokens)`` for many (prompt, completion) pairs at once.

    Rows are left-padded (position ids restart after the padding, so a row scores as it would alone) and sorted by
    length; exactly each row's completion positions go through the LM head (:func:`lm_head.labelled_log_probs`).
    """
    encoded = [_encode_completion(tokenizer, prompt, completion) for prompt, completion in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[tuple[float, int] | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]))  # similar lengths: little padding
    for idx in _position_batches(order, [encoded[i][1] for i in range(len(items))], batch_size):
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(encoded[i][0])) + encoded[i][0] for i in idx], device=model.device)
        mask = torch.tensor([[0] * (width - len(encoded[i][0])) + [1] * len(encoded[i][0]) for i in idx],
                            device=model.device)
        counts = torch.tensor([encoded[i][1] for i in idx], device=model.device)
        # position p predicts token p + 1: a row's last ``count`` positions but one predict its completion
        labelled = torch.arange(width - 1, device=model.device) >= (width - 1 - counts).unsqueeze(-1)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        _, scored = labelled_log_probs(model, inputs, labelled, ids[:, 1:][labelled])
        sums = torch.zeros(len(idx), dtype=torch.float64, device=model.device)
        sums.index_add_(0, labelled.nonzero()[:, 0], scored["logp"].double())
        for row, i in enumerate(idx):
            results[i] = (float(sums[row]), encoded[i][1])
    return results  # type: ignore[return-value]


def completion_logps(model: Any, tokenizer: Any, prompt: list[dict[str, str]],
                     completion: list[dict[str, str]]) -> tuple[float, int]:
    """Sum of log-probs of the completion's tokens (its end-of-turn included) after the prompt, and count."""
    return completion_logps_batched(model, tokenizer, [(prompt, completion)])[0]


def _batched_with_progress(model: Any, tokenizer: Any, items: list[tuple[list[dict], list[dict]]], desc: str,
                           batch_size: int) -> list[tuple[float, int]]:
    results: list[tuple[float, int]] = []
    with tqdm(total=len(items), desc=desc, unit="seq") as bar:
        for start in range(0, len(items), batch_size * 4):
            chunk = items[start:start + batch_size * 4]
            results += completion_logps_batched(model, tokenizer, chunk, batch_size=batch_size)
            bar.update(len(chunk))
    return results


def heldout_scores(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], desc: str,
                   batch_size: int = 8) -> list[tuple[float, int]]:
    """``(log-prob sum, tokens)`` of the final assistant answer of each held-out conversation."""
    return _batched_with_progress(model, tokenizer, [(m[:-1], m[-1:]) for m in conversations], desc, batch_size)


def mean_nll(scored: Sequence[tuple[float, int]]) -> float:
    """Held-out loss: mean per-token NLL over all answers of :func:`heldout_scores` (token-weighted)."""
    total, count = sum(-logp for logp, _ in scored), sum(n for _, n in scored)
    return round(total / max(count, 1), 4)


def heldout_rows(conversations: Sequence[list[dict[str, str]]], scored: Sequence[tuple[float, int]]
                 ) -> list[dict[str, Any]]:
    """One row per held-out answer (``heldout_<model>.jsonl``): an id of its conversation, its summed log-prob and
    token count, so that ``scripts/compare_runs.py`` can pair the held-out loss of two runs answer by answer."""
    return [{"id": hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16], "logp": logp,
             "tokens": tokens} for c, (logp, tokens) in zip(conversations, scored, strict=True)]


def pair_logps(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], desc: str,
               batch_size: int = 8) -> list[tuple[float, float]]:
    """``(log π(chosen|x), log π(rejected|x))`` of every preference pair under ``model``."""
    items = [(p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")]
    scored = [logp for logp, _ in _batched_with_progress(model, tokenizer, items, desc, batch_size)]
    return list(zip(scored[0::2], scored[1::2], strict=True))


def pair_outcomes(policy: Sequence[tuple[float, float]], reference: Sequence[tuple[float, float]]
                  ) -> dict[str, list[bool]]:
    """Whether each held-out pair is ranked right, from :func:`pair_logps` of a model and of its reference model.

    ``implicit_reward_acc``: the DPO implicit reward log π(y|x) − log π_ref(y|x) ranks chosen above rejected.
    ``likelihood_acc``: the model alone gives chosen a higher log-prob than rejected.
    """
    return {"implicit_reward_acc": [(c - rc) > (r - rr) for (c, r), (rc, rr) in zip(policy, reference, strict=True)],
            "likelihood_acc": [c > r for c, r in policy]}


def preference_accuracy(policy: list[tuple[float, float]], reference: list[tuple[float, float]]) -> dict[str, float]:
    """Held-out preference accuracies: the share of pairs :func:`pair_outcomes` counts right."""
    n = max(len(policy), 1)
    return {key: round(sum(right) / n, 4) for key, right in pair_outcomes(policy, reference).items()}


# ------------------------------------------------------------------------------------------- intervals
# Per-item values of a metric, as (numerators, denominators): the metric is sum(num) / sum(den), so prompt-level
# accuracy is (pass, 1) per prompt, instruction-level accuracy (passed instructions, instructions) per prompt,
# and held-out loss (NLL sum, tokens) per answer. Keys nest with "/": "by_split/seen/prompt_level_strict".
Items = dict[str, tuple[list[float], list[float]]]

# Which way is better, for the words of a comparison (None: neither, e.g. answer length).
DIRECTION: dict[str, bool | None] = {"heldout_loss": False, "mean_new_tokens": None, "prompt_echo": None}


def prompt_items(prompts: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]]) -> Items:
    """Per-prompt values of the generation metrics (after :func:`score_generations`), overall, per constraint
    type and per ``split`` (the eval file's seen / unseen label, where it has one)."""
    items: Items = {}

    def add(key: str, i: int, num: float, den: float) -> None:
        nums, dens = items.setdefault(key, ([0.0] * len(prompts), [0.0] * len(prompts)))
        nums[i] += num
        dens[i] += den

    for i, (row, out) in enumerate(zip(prompts, outputs, strict=True)):
        strict, loose = out["constraints_strict"], out["constraints_loose"]
        echo = repeats_prompt(row["prompt"], out["text"])  # recomputed: answers stored before it lack the field
        asked = 1 if row["instruction_id_list"] else 0  # a plain prompt has no constraint accuracy
        values = {"format_compliance": (out["stopped"] and bool(out["text"]), 1),
                  "prompt_level_strict": (all(strict) * asked, asked), "prompt_level_loose": (all(loose) * asked, asked),
                  "instruction_level_strict": (sum(strict), len(strict)),
                  "instruction_level_loose": (sum(loose), len(loose)),
                  "prompt_level_strict_no_echo": (_passed_without_echo(row, out, echo) * asked, asked),
                  "prompt_echo": (echo, 1)}
        for key, (num, den) in values.items():
            add(key, i, num, den)
            if row.get("split"):
                add(f"by_split/{row['split']}/{key}", i, num, den)
        add("mean_new_tokens", i, out["new_tokens"], 1)
        for instruction_id, ok in zip(row["instruction_id_list"], strict, strict=True):
            add(f"per_type_strict/{instruction_id}", i, ok, 1)
    return items


def question_clusters(rows: Sequence[dict[str, Any]]) -> list[Hashable]:
    """The bootstrap unit of each eval prompt or preference pair: its held-out source question where the row names
    one in ``source_id`` (what is built from one question moves together), else the row itself (a prompt by its
    ``key``)."""
    return [row.get("source_id") or row.get("key") or i for i, row in enumerate(rows)]


def pair_groups(pairs: Sequence[dict[str, Any]]) -> list[str]:
    """Each eval pair's group for ``by_pairs``: ``constraint`` when its prompt carries checkable constraints,
    else ``general`` (answer quality: rambling, loops, wrong answers)."""
    return ["constraint" if pair.get("constraints") and json.loads(pair["constraints"])["instruction_id_list"]
            else "general" for pair in pairs]


def pair_rows(pairs: Sequence[dict[str, Any]], policy: Sequence[tuple[float, float]],
              reference: Sequence[tuple[float, float]]) -> list[dict[str, Any]]:
    """One row per held-out pair for ``pairs_<model>.jsonl``: its content hash, prompt, group, the summed log-probs
    of chosen and rejected under the model and its reference, and whether each accuracy counts it right."""
    outcomes = pair_outcomes(policy, reference)
    rows = []
    for i, (pair, group, (c, r), (rc, rr)) in enumerate(zip(pairs, pair_groups(pairs), policy, reference,
                                                            strict=True)):
        text = json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], ensure_ascii=False, sort_keys=True)
        rows.append({"pair": i, "id": hashlib.sha256(text.encode()).hexdigest()[:16], "group": group,
                     **({"source_id": pair["source_id"]} if pair.get("source_id") else {}),
                     "prompt": pair["prompt"][-1]["content"],
                     "logp_chosen": round(c, 4), "logp_rejected": round(r, 4),
                     "ref_logp_chosen": round(rc, 4), "ref_logp_rejected": round(rr, 4),
                     "implicit_reward_correct": outcomes["implicit_reward_acc"][i],
                     "likelihood_correct": outcomes["likelihood_acc"][i]})
    return rows


def pair_items(policy: Sequence[tuple[float, float]], reference: Sequence[tuple[float, float]],
               groups: Sequence[str] = ()) -> Items:
    """Per-pair values of :func:`preference_accuracy`; with ``groups`` (:func:`pair_groups`) holding more than
    one group, also per group (``by_pairs/<group>/<metric>``)."""
    return pair_outcome_items(pair_outcomes(policy, reference), groups)


def pair_outcome_items(outcomes: dict[str, Sequence[bool]], groups: Sequence[str] = ()) -> Items:
    """Items of per-pair right/wrong outcomes (``{metric: [bool per pair]}``), overall and, where ``groups`` holds
    more than one group, per group (``by_pairs/<group>/<metric>``)."""
    items: Items = {key: ([float(x) for x in v], [1.0] * len(v)) for key, v in outcomes.items()}
    for group in sorted(set(groups)) if len(set(groups)) > 1 else ():
        member = [float(g == group) for g in groups]
        for key in outcomes:
            items[f"by_pairs/{group}/{key}"] = ([x * m for x, m in zip(items[key][0], member, strict=True)], member)
    return items


def loss_items(scored: Sequence[tuple[float, int]]) -> Items:
    """Per-answer values of :func:`mean_nll`."""
    return {"heldout_loss": ([-logp for logp, _ in scored], [float(n) for _, n in scored])}


def bootstrap_metrics(groups: Sequence[tuple[Sequence[Hashable], dict[str, Items]]], order: Sequence[str]
                      ) -> tuple[dict[str, dict[str, Estimate]], dict[tuple[str, str], dict[str, Estimate]]]:
    """95 % intervals of every metric of every model, and paired differences between models.

    ``groups``: one ``(cluster key per item, {model: Items})`` per item set (eval prompts, preference pairs,
    held-out answers). Each group draws its resamples once, so every model and every comparison within the
    group sees the same resampled items. Returns ``({model: {metric: Estimate}}, {(earlier, later): {metric:
    Estimate of later − earlier}})`` for every ordered pair of models in ``order`` that share the metric.
    """
    intervals: dict[str, dict[str, Estimate]] = {name: {} for name in order}
    differences: dict[tuple[str, str], dict[str, Estimate]] = {}
    for number, (keys, by_model) in enumerate(groups):
        index, n_clusters = cluster_index(keys)
        draws = Resamples(n_clusters, seed=number)
        clustered = {name: {metric: (per_cluster(num, index, n_clusters), per_cluster(den, index, n_clusters))
                            for metric, (num, den) in items.items()} for name, items in by_model.items()}
        for name, metrics in clustered.items():
            for metric, ratio in metrics.items():
                intervals[name][metric] = draws.ratio(*ratio)
        present = [n for n in order if n in clustered]
        for i, earlier in enumerate(present):
            for later in present[i + 1:]:
                shared = clustered[earlier].keys() & clustered[later].keys()
                differences.setdefault((earlier, later), {}).update(
                    {m: draws.difference(clustered[earlier][m], clustered[later][m]) for m in sorted(shared)})
    return intervals, differences


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a/b": x}`` → ``{"a": {"b": x}}`` (metric keys of :data:`Items` back into the metrics.json shape)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)  # JSON has no NaN (a subgroup no resample could measure)


def interval_summary(intervals: dict[str, Estimate], differences: dict[str, dict[str, Estimate]]
                     ) -> dict[str, Any]:
    """The metrics.json additions of one model: ``ci95`` (``[low, high]`` per metric), ``by_split`` and
    ``by_pairs`` point values, and ``vs`` (per earlier model: the paired difference, its interval and a verdict in
    words)."""
    summary: dict[str, Any] = {"ci95": nest({k: [_r(e.low), _r(e.high)] for k, e in intervals.items()})}
    for section in ("by_split", "by_pairs"):
        values = nest({k.split("/", 1)[1]: _r(e.value) for k, e in intervals.items() if k.startswith(f"{section}/")})
        if values:
            summary[section] = values
    summary["vs"] = {}
    for earlier, diffs in differences.items():
        summary["vs"][earlier] = nest({
            k: {"diff": _r(e.value), "ci95": [_r(e.low), _r(e.high)],
                "verdict": verdict(e, DIRECTION.get(k.rsplit("/", 1)[-1], True))} for k, e in diffs.items()})
    return summary


# ------------------------------------------------------------------------------------------------ plots
def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# TensorBoardCallback's names for the Trainer's log keys ("loss" -> "train/loss", "eval_loss" -> "eval/loss")
_TENSORBOARD_TAGS = {"train/loss": "loss", "eval/loss": "eval_loss"}


def read_loss_history(stage_dir: Path) -> list[dict[str, Any]]:
    """A training stage's logged losses as ``[{"step", "loss" | "eval_loss"}]``.

    Read from the TensorBoard event files in ``<stage_dir>/runs/`` (what people watch during training); a stage
    written before TensorBoard was the default, or with ``report_to: none``, falls back to its
    ``log_history.json``. A step logged twice (a resumed run repeats the steps after its last checkpoint) keeps
    its latest value.
    """
    runs = Path(stage_dir) / "runs"
    if runs.is_dir() and any(runs.rglob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        latest: dict[tuple[str, int], tuple[float, float]] = {}
        for events_dir in sorted({p.parent for p in runs.rglob("events.out.tfevents.*")}):
            accumulator = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})  # 0: keep every point
            accumulator.Reload()
            for tag, key in _TENSORBOARD_TAGS.items():
                if tag in accumulator.Tags()["scalars"]:
                    for event in accumulator.Scalars(tag):
                        if latest.get((key, event.step), (-math.inf,))[0] <= event.wall_time:
                            latest[(key, event.step)] = (event.wall_time, event.value)
        if latest:
            return [{"step": step, key: value} for (key, step), (_, value) in sorted(latest.items(),
                                                                                   key=lambda kv: kv[0][1])]
    history = Path(stage_dir) / "log_history.json"
    return json.loads(history.read_text(encoding="utf-8")) if history.is_file() else []


def plot_loss_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """One panel per stage: training loss and held-out loss against the step (see :func:`read_loss_history`)."""
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
        values = [v if isinstance(v := metrics[name].get(k), int | float) else float("nan") for k in keys]
        # 95 % bootstrap intervals as error bars, where the metrics have them
        bounds = [ci if isinstance(ci := metrics[name].get("ci95", {}).get(k), list) and None not in ci else [v, v]
                  for k, v in zip(keys, values, strict=True)]
        errors = [[max(v - lo, 0) for v, (lo, _) in zip(values, bounds, strict=True)],
                  [max(hi - v, 0) for v, (_, hi) in zip(values, bounds, strict=True)]]
        ax.bar([x + i * width for x in range(len(keys))], values, width, yerr=errors, capsize=3, label=name)
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
