"""Hostile input corpus: every bad file either raises a DataError naming file and line, or drops rows with a
counted reason. The files live in tests/data/bad/; the big or binary ones are generated here into tmp_path.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.data.formats import MAX_LINE_BYTES, MAX_ROW_CHARS, load_preference_examples, load_sft_examples
from pipeline.errors import DataError

BAD = Path(__file__).parent / "data" / "bad"
GOOD_CHAT = {"messages": [{"role": "user", "content": "Hello?"},
                          {"role": "assistant", "content": "Hi there."}]}


@dataclass(frozen=True)
class Case:
    file: str
    expect: str  # "drop": loads, with the counts below; "error": DataError matching `error` (file and line)
    loader: str = "sft"  # or "preference"
    format: str | None = None
    error: str = ""
    kept: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    deduplicated: int = 0
    lines: dict[int, str] = field(default_factory=dict)  # line -> reason of each dropped row


def drop(file: str, kept: int, drops: dict[str, int], lines: dict[int, str] | None = None, **kw) -> Case:
    return Case(file, "drop", kept=kept, drops=drops, lines=lines or {}, **kw)


def error(file: str, pattern: str, **kw) -> Case:
    return Case(file, "error", error=pattern, **kw)


CASES = [
    # ---- rows dropped with a reason
    drop("invalid_json_line.jsonl", 2, {"invalid_json": 2}, {2: "invalid_json", 4: "invalid_json"}),
    drop("not_an_object.jsonl", 1, {"not_an_object": 4}, {2: "not_an_object", 3: "not_an_object",
                                                          4: "not_an_object", 5: "not_an_object"}),
    drop("missing_fields.jsonl", 1, {"missing_fields": 6}, {n: "missing_fields" for n in range(2, 8)}),
    drop("wrong_types.jsonl", 1, {"wrong_type": 8}, {n: "wrong_type" for n in range(2, 10)}),
    drop("empty_content.jsonl", 1, {"empty_content": 4}, {n: "empty_content" for n in range(2, 6)}),
    drop("unknown_role.jsonl", 1, {"unknown_role": 3}, {n: "unknown_role" for n in range(2, 5)}),
    drop("non_alternating.jsonl", 1, {"non_alternating": 2}, {2: "non_alternating", 3: "non_alternating"}),
    drop("ends_on_user.jsonl", 1, {"ends_with_user": 1}, {2: "ends_with_user"}),
    drop("no_assistant_turn.jsonl", 1, {"no_assistant_turn": 4},
         {n: "no_assistant_turn" for n in range(2, 6)}),
    drop("starts_with_assistant.jsonl", 1, {"starts_with_assistant": 1}, {2: "starts_with_assistant"}),
    drop("misplaced_system.jsonl", 1, {"misplaced_system": 1}, {2: "misplaced_system"}),
    drop("chosen_equals_rejected.jsonl", 1, {"chosen_equals_rejected": 3},
         {n: "chosen_equals_rejected" for n in range(2, 5)}, loader="preference"),
    drop("empty_prompt.jsonl", 1, {"empty_prompt": 4}, {n: "empty_prompt" for n in range(2, 6)},
         loader="preference"),
    drop("bad_preference_pairs.jsonl", 1,
         {"bad_completion": 2, "prompt_not_ending_on_user": 2, "missing_fields": 1, "wrong_type": 1},
         {2: "bad_completion", 3: "bad_completion", 4: "prompt_not_ending_on_user", 5: "missing_fields",
          6: "wrong_type", 7: "prompt_not_ending_on_user"}, loader="preference"),
    drop("preference_loader_given_sft_rows.jsonl", 2, {"not_preference": 2},
         {2: "not_preference", 3: "not_preference"}, loader="preference"),
    drop("nul_escaped.jsonl", 1, {"nul_byte": 1}, {2: "nul_byte"}),
    drop("nul_raw.jsonl", 1, {"invalid_json": 1}, {2: "invalid_json"}),  # raw control char inside a string
    drop("lone_surrogate.jsonl", 2, {"lone_surrogate": 1}, {2: "lone_surrogate"}),  # line 3's pair is fine
    drop("deep_nesting.jsonl", 1, {"invalid_json": 1}, {2: "invalid_json"}),
    drop("huge_integer.jsonl", 1, {"invalid_json": 1}, {2: "invalid_json"}),
    drop("duplicates.jsonl", 3, {}, deduplicated=3),
    drop("array_bad_element.json", 2, {"not_an_object": 1, "missing_fields": 1},
         {3: "not_an_object", 4: "missing_fields"}),
    drop("blank_lines_crlf.jsonl", 3, {"invalid_json": 1}, {5: "invalid_json"}),  # blank lines still numbered
    drop("huge_single_line.jsonl", 2, {"too_long": 1}, {2: "too_long"}),
    drop("over_long_row.jsonl", 1, {"too_long": 1}, {2: "too_long"}),
    drop("parquet_nulls_and_mixed.parquet", 2, {"missing_fields": 1}, {3: "missing_fields"}),
    # ---- accepted as they are
    drop("bom.jsonl", 2, {}),
    drop("mixed_formats.jsonl", 5, {}),
    drop("json_lines_in.json", 2, {}),
    drop("empty_system_turns.jsonl", 2, {}),
    # ---- the whole source is refused: DataError naming the file (and line when there is one)
    error("missing.jsonl", r"missing\.jsonl: file not found .*Fix `path`"),
    error("a_directory", r"a_directory: is a directory"),
    error("unsupported.csv", r"unsupported\.csv: unsupported file type '\.csv'; convert it to \.jsonl"),
    error("empty.jsonl", r"empty\.jsonl: has no rows"),
    error("whitespace_only.jsonl", r"whitespace_only\.jsonl: has no rows"),
    error("array_empty.json", r"array_empty\.json: has no rows"),
    error("non_utf8.jsonl", r"non_utf8\.jsonl:3: not valid UTF-8: byte 0xe9 at byte offset 174 .*iconv"),
    error("utf16.jsonl", r"utf16\.jsonl:1: is UTF-16 encoded .*re-save it as UTF-8"),
    error("array_syntax_error.json", r"array_syntax_error\.json:4: invalid JSON \(Expecting ',' delimiter"),
    error("pretty_object.json", r"pretty_object\.json:1: not valid JSON .*one JSON array of objects, or one "
                                r"JSON object per line"),
    error("trailing_garbage.json", r"trailing_garbage\.json:3: invalid JSON \(extra content after"),
    error("not_parquet.parquet", r"not_parquet\.parquet: cannot be read as Parquet"),
    error("format_mismatch.jsonl", r"format_mismatch\.jsonl:1: format 'alpaca' was given but no row has "
                                   r"any of its fields .*looks like 'sharegpt'", format="alpaca"),
    error("all_rows_dropped.jsonl", r"all_rows_dropped\.jsonl:1: no usable rows: 2 read, 2 dropped "
                                    r"\(invalid_json: 1, no_assistant_turn: 1\)"),
    error("parquet_wrong_types.parquet", r"parquet_wrong_types\.parquet:1: no usable rows: 2 read, 2 dropped "
                                         r"\(wrong_type: 2\).*output is int"),
]


# ---------------------------------------------------------------------- files too big or too odd to commit


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _huge_single_line(path: Path) -> None:
    huge = json.dumps({"instruction": "x" * (4 * MAX_LINE_BYTES), "output": "y"})
    _write_lines(path, [json.dumps(GOOD_CHAT), huge, json.dumps({"instruction": "Q?", "output": "A."})])


def _over_long_row(path: Path) -> None:
    row = {"instruction": "Summarise.", "input": "word " * (MAX_ROW_CHARS // 5), "output": "Short."}
    _write_lines(path, [json.dumps(GOOD_CHAT), json.dumps(row)])


def _parquet(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


GENERATED: dict[str, Callable[[Path], None]] = {
    "huge_single_line.jsonl": _huge_single_line,
    "over_long_row.jsonl": _over_long_row,
    "parquet_wrong_types.parquet": lambda p: _parquet(p, {"instruction": ["A?", "B?"], "output": [1, 2]}),
    "parquet_nulls_and_mixed.parquet": lambda p: _parquet(p, {
        "instruction": ["A?", None, None], "output": ["a", None, None],
        "messages": [None, GOOD_CHAT["messages"], None],
    }),
    "a_directory": lambda p: p.mkdir(),
    "missing.jsonl": lambda p: None,
}


def _path_for(case: Case, tmp_path: Path) -> Path:
    if case.file in GENERATED:
        GENERATED[case.file](tmp_path / case.file)
        return tmp_path / case.file
    return BAD / case.file


def _load(case: Case, path: Path) -> tuple[list[dict], dict]:
    source = {"path": str(path), **({"format": case.format} if case.format else {})}
    loader = load_preference_examples if case.loader == "preference" else load_sft_examples
    return loader([source], max_drop_fraction=None)  # per-row accounting; the threshold is tested below


def _assert_normalised(rows: list[dict], loader: str) -> None:
    for row in rows:
        messages = row["messages"] if loader == "sft" else row["prompt"] + row["chosen"] + row["rejected"]
        for message in messages:
            assert set(message) == {"role", "content"}
            assert message["role"] in {"system", "user", "assistant"}
            assert isinstance(message["content"], str) and message["content"].strip()


@pytest.mark.parametrize("case", CASES, ids=[case.file for case in CASES])
def test_hostile_input(case: Case, tmp_path: Path):
    path = _path_for(case, tmp_path)
    if case.expect == "error":
        with pytest.raises(DataError, match=case.error) as caught:
            _load(case, path)
        assert caught.value.path == str(path)
        return
    rows, report = _load(case, path)
    source = report["sources"][0]
    assert (source["kept"], source["drop_reasons"], source["deduplicated"]) == (case.kept, case.drops,
                                                                                case.deduplicated)
    assert len(rows) == case.kept
    assert source["rows_in"] == source["kept"] + source["dropped"] + source["deduplicated"]
    assert source["dropped"] == sum(case.drops.values())
    for key in ("rows_in", "kept", "dropped", "deduplicated", "drop_reasons"):
        assert report[key] == source[key]
    assert {example["line"]: example["reason"] for example in source["examples"]} == case.lines
    _assert_normalised(rows, case.loader)


def test_every_committed_bad_file_has_a_case():
    covered = {case.file for case in CASES}
    assert sorted(p.name for p in BAD.iterdir() if p.name not in covered) == []
    assert len(covered) >= 28


def test_huge_single_line_is_skipped_without_holding_it_in_memory(tmp_path: Path):
    path = tmp_path / "huge.jsonl"
    _write_lines(path, [json.dumps({"instruction": "x" * (8 * MAX_LINE_BYTES), "output": "y"}),  # ~13 MB
                        json.dumps(GOOD_CHAT)])
    tracemalloc.start()
    try:
        rows, report = load_sft_examples([{"path": str(path)}], max_drop_fraction=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report["drop_reasons"] == {"too_long": 1} and len(rows) == 1
    # Measured: ~4.8 MB peak for a 12.8 MB line; reading the line whole would need at least 12.8 MB.
    size = path.stat().st_size
    assert peak < 4 * MAX_LINE_BYTES < size, f"peak {peak / 1e6:.1f} MB skipping a {size / 1e6:.0f} MB line"


# ------------------------------------------------------------- data.max_drop_fraction: mostly bad data stops


MALFORMED_CASES = [case for case in CASES if case.expect == "drop" and sum(case.drops.values())]


@pytest.mark.parametrize("case", MALFORMED_CASES, ids=[case.file for case in MALFORMED_CASES])
def test_default_threshold_refuses_each_file_with_more_than_5_percent_malformed_rows(case: Case, tmp_path: Path):
    path = _path_for(case, tmp_path)
    source = {"path": str(path), **({"format": case.format} if case.format else {})}
    loader = load_preference_examples if case.loader == "preference" else load_sft_examples
    malformed = sum(case.drops.values())
    rows_in = case.kept + malformed + case.deduplicated
    assert malformed > 0.05 * rows_in  # every hostile file is far above the default
    counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(case.drops.items(), key=lambda kv: -kv[1]))
    with pytest.raises(DataError, match=rf"{malformed} of {rows_in} rows read \(.*\) are malformed, more than "
                                        r"data\.max_drop_fraction = 0\.05 allows: ") as caught:
        loader([source])
    message = str(caught.value)
    assert caught.value.path == str(path)
    for reason, n in case.drops.items():
        assert f"{reason}: {n}" in message
    if len(case.drops) == 1:
        assert counts in message
    first_line, first_reason = next(iter(case.lines.items()))
    assert f"line {first_line}: {first_reason} (" in message  # the first example, with what is wrong


def _hostile_like_reported(path: Path, bad: int, good: int) -> str:
    """`good` alpaca rows, then `bad` rows with a renamed column (question/answer instead of instruction/output)."""
    rows = [{"instruction": f"{path.stem} Q{i}?", "output": f"A{i}."} for i in range(good)]
    rows += [{"question": f"{path.stem} R{i}?", "answer": f"B{i}."} for i in range(bad)]
    _write_lines(path, [json.dumps(row) for row in rows])
    return str(path)


def test_a_source_losing_10_of_32_rows_stops_instead_of_training_on_the_rest(tmp_path: Path):
    path = _hostile_like_reported(tmp_path / "x.jsonl", bad=10, good=22)
    with pytest.raises(DataError, match=r"x\.jsonl: 10 of 32 rows read \(31\.2%\) are malformed.*missing_fields: 10"
                                        r".*First examples: line 23: missing_fields \(no fields of a known format "
                                        r"\(keys: question, answer\).*`columns`.*null disables"):
        load_sft_examples([{"path": path}])


def test_threshold_is_inclusive_per_source_and_null_disables_it(tmp_path: Path):
    at_limit = _hostile_like_reported(tmp_path / "at.jsonl", bad=1, good=19)  # exactly 5 %: allowed
    rows, report = load_sft_examples([{"path": at_limit}])
    assert (len(rows), report["malformed"]) == (19, 1)
    over = _hostile_like_reported(tmp_path / "over.jsonl", bad=2, good=18)  # 10 %
    with pytest.raises(DataError, match=r"over\.jsonl: 2 of 20 rows"):
        load_sft_examples([{"path": at_limit}, {"path": over}])  # per source: the good one does not dilute it
    rows, report = load_sft_examples([{"path": over}], max_drop_fraction=None)
    assert (len(rows), report["malformed"], report["dropped"]) == (18, 2, 2)
    rows, _ = load_sft_examples([{"path": over}], max_drop_fraction=0.1)
    assert len(rows) == 18


def test_duplicates_do_not_count_as_malformed(tmp_path: Path):
    path = tmp_path / "dups.jsonl"
    _write_lines(path, [json.dumps({"instruction": "Q?", "output": "A."})] * 10)
    rows, report = load_sft_examples([{"path": str(path)}])
    assert (len(rows), report["deduplicated"], report["malformed"]) == (1, 9, 0)
