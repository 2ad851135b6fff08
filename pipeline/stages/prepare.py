"""Stage ``prepare``: read the recipe's data sources, normalise, filter, split, save.

Writes ``<output_dir>/prepare/{sft,dpo}_{train,eval}/`` (datasets on disk, in TRL's conversational
formats) and ``report.json``, where every row read is accounted for: rows in = kept + dropped + deduplicated,
with dropped = malformed (bad rows, with reasons) + filtered (longer than the trainer's ``max_length``: a
setting, not damage; truncation would cut off the end-of-turn token the model must learn to emit). A source
with more than ``data.max_drop_fraction`` malformed rows stops the stage (see ``pipeline.data.formats``).
Control tokens written as text in the data are neutralised here.

Rows stream from the readers to an Arrow file on disk (``Dataset.from_generator``), the length filter runs
on batches as they pass, and the train/eval split selects row indices: memory stays flat however many rows
the sources hold (docs/data.md has the measurement).
"""

from __future__ import annotations

import random
import shutil
import uuid
from collections.abc import Callable
from typing import Any

from datasets import Dataset, Features, List, Value
from datasets.exceptions import DatasetGenerationError

from pipeline.artifacts import atomic_write_json
from pipeline.data.formats import ExampleStream, RowFilter
from pipeline.errors import PipelineError
from pipeline.models import control_tokens, load_tokenizer
from pipeline.stages.context import StageContext

PARTS = (("sft", "sft"), ("dpo", "preference"))  # recipe section and data key, ExampleStream kind
_MESSAGES = List({"role": Value("string"), "content": Value("string")})
FEATURES = {
    "sft": Features({"messages": _MESSAGES}),
    "dpo": Features({"prompt": _MESSAGES, "chosen": _MESSAGES, "rejected": _MESSAGES,
                     "constraints": Value("string")}),
}


def _length_filter(tokenizer: Any, limit: int | None, kind: str) -> RowFilter | None:
    """Refuse rows longer than ``limit`` tokens under the chat template (a preference pair: its longer answer)."""
    if not limit:
        return None
    reason = f"longer than {kind}.max_length ({limit} tokens)"

    def conversation(row: dict) -> list[dict]:
        if kind == "sft":
            return row["messages"]
        return row["prompt"] + max(row["chosen"], row["rejected"], key=lambda m: len(m[0]["content"]))

    def refuse(rows: list[dict]) -> list[str | None]:
        ids = tokenizer.apply_chat_template([conversation(r) for r in rows], tokenize=True,
                                            return_dict=True)["input_ids"]
        return [reason if len(row_ids) > limit else None for row_ids in ids]

    return refuse


def _split_indices(n: int, fraction: float, cap: int, seed: int) -> tuple[list[int], list[int]]:
    """Train and eval row indices, each in row order; the eval rows are a seeded sample."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(cap, round(n * fraction)) if n > 1 else 0
    if fraction > 0 and n_eval == 0 and n >= 4:
        n_eval = 1
    held_out = set(order[:n_eval])
    return [i for i in range(n) if i not in held_out], sorted(held_out)


def _stream_to_disk(ctx: StageContext, stream: ExampleStream, kind: str) -> Dataset:
    """Write the stream's rows to an Arrow file under the stage dir, one batch at a time; memory-mapped back."""
    written = with_constraints = 0

    def rows() -> Any:
        nonlocal written, with_constraints
        for row in stream:
            written += 1
            if kind == "dpo":
                with_constraints += "constraints" in row
                row = {"constraints": None, **row}
            yield row

    shutil.rmtree(ctx.stage_dir / "_cache", ignore_errors=True)  # left by a killed run
    try:
        # A fresh fingerprint: the cache must never hand back rows from an earlier run (and hashing the
        # generator would pickle the tokenizer).
        dataset = Dataset.from_generator(rows, features=FEATURES[kind], cache_dir=str(ctx.stage_dir / "_cache"),
                                         fingerprint=uuid.uuid4().hex)
    except DatasetGenerationError as exc:  # datasets wraps what the generator raised
        if isinstance(exc.__cause__, PipelineError):
            raise exc.__cause__ from None
        raise
    except ValueError:
        if written == 0:  # datasets cannot build a split of zero rows
            counts = {key: stream.report[key] for key in ("rows_in", "malformed", "filtered", "deduplicated")}
            raise PipelineError(f"No {kind.upper()} rows are left after filtering ({counts}; reasons: "
                                f"{stream.report['drop_reasons']}). A larger {kind}.max_length keeps longer "
                                "rows.") from None
        raise
    if kind == "dpo" and not with_constraints:
        dataset = dataset.remove_columns("constraints")  # no pair carries constraints: keep the schema lean
    return dataset


def _prepare_part(ctx: StageContext, kind: str, stream: ExampleStream, seed: int) -> dict[str, Any]:
    data = ctx.recipe.data
    dataset = _stream_to_disk(ctx, stream, kind)
    train, held_out = _split_indices(len(dataset), float(data["eval_fraction"]), int(data["max_eval_rows"]), seed)
    for name, indices in ((f"{kind}_train", train), (f"{kind}_eval", held_out)):
        shutil.rmtree(ctx.stage_dir / name, ignore_errors=True)  # no split left over from an earlier run
        if indices:
            dataset.select(indices).save_to_disk(str(ctx.stage_dir / name))
    del dataset
    shutil.rmtree(ctx.stage_dir / "_cache", ignore_errors=True)
    return {f"{kind}_train_rows": len(train), f"{kind}_eval_rows": len(held_out)}


def run(ctx: StageContext) -> dict[str, Any]:
    recipe, data = ctx.recipe, ctx.recipe.data
    tokenizer = load_tokenizer(recipe.model)
    controls = control_tokens(tokenizer)
    report: dict[str, Any] = {"control_tokens": len(controls)}
    metrics: dict[str, Any] = {}
    seed = int(data["seed"])
    log: Callable[[str], None] = lambda line: print(line, flush=True)  # noqa: E731

    for offset, (kind, loader_kind) in enumerate(PARTS):
        section = getattr(recipe, kind)
        if not data[kind] or section is None:
            continue
        stream = ExampleStream(data[kind], kind=loader_kind, control_tokens=controls,
                               max_drop_fraction=data["max_drop_fraction"],
                               row_filter=_length_filter(tokenizer, section.get("max_length"), kind), log=log,
                               seed=seed)
        metrics.update(_prepare_part(ctx, kind, stream, seed + offset))  # each part's eval split: its own seed
        report[kind] = stream.report

    for kind in ("sft", "dpo"):
        if kind in report:
            part = report[kind]
            for key in ("rows_in", "dropped", "malformed", "filtered", "deduplicated"):
                metrics[f"{kind}_{key}"] = part[key]
    atomic_write_json(ctx.stage_dir / "report.json", report)
    return metrics
