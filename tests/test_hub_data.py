"""Hub-shaped data: local directories laid out like HuggingFaceH4/ultrachat_200k and ultrafeedback_binarized
(what ``huggingface-cli download`` gives), ``split`` / ``subset`` / ``columns`` / ``fraction`` / ``limit``, and
``prepare`` streaming such a set to disk with every row accounted for.

The fixtures are written here, in the exact column types of the real sets (Parquet schemas below); the rows are
our own text.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import load_from_disk

from pipeline.config import DATA_DEFAULTS, validate_recipe
from pipeline.data.formats import (
    DEFAULT_MAX_DROP_FRACTION,
    ExampleStream,
    load_preference_examples,
    load_sft_examples,
    source_files,
)
from pipeline.errors import DataError, PipelineError
from pipeline.runner import run_recipe

MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])
ULTRACHAT = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", pa.list_(MESSAGE))])
ULTRAFEEDBACK = pa.schema([
    ("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", pa.list_(MESSAGE)),
    ("rejected", pa.list_(MESSAGE)), ("messages", pa.list_(MESSAGE)), ("score_chosen", pa.float64()),
    ("score_rejected", pa.float64()),
])


def msg(role: str, content: str) -> dict:
    return {"content": content, "role": role}


def ultrachat_row(split: str, i: int) -> dict:
    """One to three exchanges; under the tiny tokenizer and ChatML: 56, 97, 138 tokens."""
    turns = 1 + i % 3
    prompt = f"[{split}] Tell me about topic {i}."
    messages = [msg("user", prompt), msg("assistant", f"Topic {i} is interesting.")]
    for t in range(1, turns):
        messages += [msg("user", f"More on {i}, part {t}?"), msg("assistant", f"Part {t} of {i}: details.")]
    return {"prompt": prompt, "prompt_id": f"{i:064x}", "messages": messages}


def ultrafeedback_row(split: str, i: int) -> dict:
    prompt = f"[{split}] Which is better, {i} or {i + 1}?"
    chosen = [msg("user", prompt), msg("assistant", f"{i + 1}, because it is larger.")]
    rejected = [msg("user", prompt), msg("assistant", "I refuse.")]
    return {"prompt": prompt, "prompt_id": f"{i:064x}", "chosen": chosen, "rejected": rejected,
            "messages": chosen, "score_chosen": 8.0, "score_rejected": 3.5}


def write_hub_like(root: Path, schema: pa.Schema, row, splits: dict[str, tuple[int, int]], readme: bool = True
                   ) -> Path:
    """``root/data/{split}-0000i-of-0000n-<hash>.parquet`` as on the Hub; ``splits``: name -> (rows, shards)."""
    (root / "data").mkdir(parents=True)
    for split, (rows, shards) in splits.items():
        per = -(-rows // shards)
        for s in range(shards):
            part = [row(split, i) for i in range(s * per, min(rows, (s + 1) * per))]
            name = f"{split}-{s:05d}-of-{shards:05d}-{s:016x}.parquet"
            pq.write_table(pa.Table.from_pylist(part, schema=schema), root / "data" / name)
    if readme:
        configs = "".join(f"  - split: {split}\n    path: data/{split}-*\n" for split in splits)
        (root / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}---\n")
    return root


@pytest.fixture(scope="module")
def ultrachat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    splits = {"train_sft": (30, 3), "test_sft": (4, 1), "train_gen": (5, 1), "test_gen": (3, 1)}
    return write_hub_like(tmp_path_factory.mktemp("hub") / "ultrachat_200k", ULTRACHAT, ultrachat_row, splits)


@pytest.fixture(scope="module")
def ultrafeedback(tmp_path_factory: pytest.TempPathFactory) -> Path:
    splits = {"train_prefs": (12, 2), "test_prefs": (4, 1), "train_sft": (6, 1), "test_sft": (2, 1),
              "train_gen": (2, 1), "test_gen": (2, 1)}
    return write_hub_like(tmp_path_factory.mktemp("hub") / "ultrafeedback_binarized", ULTRAFEEDBACK,
                          ultrafeedback_row, splits)


def write_jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------- directories like the Hub


def test_ultrachat_directory_reads_every_shard_of_the_split_in_order(ultrachat: Path):
    rows, report = load_sft_examples([{"path": str(ultrachat), "split": "train_sft"}])
    assert [r["messages"][0]["content"] for r in rows] == [f"[train_sft] Tell me about topic {i}." for i in range(30)]
    assert rows[3]["messages"] == [{"role": m["role"], "content": m["content"]}
                                   for m in ultrachat_row("train_sft", 3)["messages"]]
    source = report["sources"][0]
    assert source["split"] == "train_sft" and [Path(f).name[:27] for f in source["files"]] == [
        "train_sft-00000-of-00003-00", "train_sft-00001-of-00003-00", "train_sft-00002-of-00003-00"]
    assert (source["format"], source["format_detected"], source["rows_in"], source["kept"]) == (
        "messages", True, 30, 30)


def test_ultrachat_other_splits_are_their_own_files(ultrachat: Path):
    rows, _ = load_sft_examples([{"path": str(ultrachat), "split": "test_gen"}])
    assert [r["messages"][0]["content"] for r in rows] == [f"[test_gen] Tell me about topic {i}." for i in range(3)]


def test_ultrafeedback_pairs_lose_the_repeated_prompt_and_keep_one_answer_each(ultrafeedback: Path):
    rows, report = load_preference_examples([{"path": str(ultrafeedback), "split": "train_prefs"}])
    assert len(rows) == 12 and report["sources"][0]["format"] == "preference"
    prompt = "[train_prefs] Which is better, 5 or 6?"
    assert rows[5] == {"prompt": [{"role": "user", "content": prompt}],
                       "chosen": [{"role": "assistant", "content": "6, because it is larger."}],
                       "rejected": [{"role": "assistant", "content": "I refuse."}]}


def test_ultrafeedback_train_sft_split_trains_on_the_prompt_and_the_chosen_answer(ultrafeedback: Path):
    rows, _ = load_sft_examples([{"path": str(ultrafeedback), "split": "train_sft"}])
    expected = [[{"role": m["role"], "content": m["content"]} for m in ultrafeedback_row("train_sft", i)["messages"]]
                for i in range(6)]
    assert [r["messages"] for r in rows] == expected  # the set's own `messages` column: prompt + chosen


def test_flat_directory_finds_a_split_by_its_file_names(tmp_path: Path):
    # Without data/ and a README, datasets' patterns lump train_prefs and train_sft into one "train" split.
    for split in ("train_prefs", "train_sft", "test_prefs"):
        pq.write_table(pa.Table.from_pylist([ultrafeedback_row(split, i) for i in range(3)], schema=ULTRAFEEDBACK),
                       tmp_path / f"{split}-00000-of-00001.parquet")
    rows, _ = load_preference_examples([{"path": str(tmp_path), "split": "train_prefs"}])
    assert [r["prompt"][0]["content"][:13] for r in rows] == ["[train_prefs]"] * 3


def test_directory_without_the_split_lists_the_splits_it_has(ultrachat: Path):
    with pytest.raises(DataError, match=r"ultrachat_200k: is a directory with no data files for split 'train'\. "
                                        r"Splits found: test_gen, test_sft, train_gen, train_sft\. Set `split`"):
        load_sft_examples([{"path": str(ultrachat)}])


def test_readme_configs_choose_files_and_subset_picks_a_config(tmp_path: Path):
    write_jsonl(tmp_path / "chat" / "part-a.jsonl", [{"instruction": "A?", "output": "a"}])
    write_jsonl(tmp_path / "chat" / "part-b.jsonl", [{"instruction": "B?", "output": "b"}])
    write_jsonl(tmp_path / "code" / "all.jsonl", [{"instruction": "C?", "output": "c"}])
    (tmp_path / "README.md").write_text(yaml.safe_dump({"configs": [
        {"config_name": "chat", "data_files": [{"split": "train", "path": "chat/*.jsonl"}]},
        {"config_name": "code", "data_files": [{"split": "train", "path": "code/*.jsonl"}]},
    ]}).join(["---\n", "---\n"]))
    rows, _ = load_sft_examples([{"path": str(tmp_path), "subset": "chat"}])
    assert [r["messages"][0]["content"] for r in rows] == ["A?", "B?"]
    rows, _ = load_sft_examples([{"path": str(tmp_path), "subset": "code"}])
    assert [r["messages"][0]["content"] for r in rows] == ["C?"]
    with pytest.raises(DataError, match=r"cannot use subset 'prose' of this directory"):
        load_sft_examples([{"path": str(tmp_path), "subset": "prose"}])


def test_jsonl_shards_report_bad_lines_by_shard_and_line(tmp_path: Path):
    good = [{"instruction": f"Q{i}?", "output": "a"} for i in range(40)]
    write_jsonl(tmp_path / "data" / "train-00000-of-00002.jsonl", good[:20])
    write_jsonl(tmp_path / "data" / "train-00001-of-00002.jsonl", [*good[20:], "{not json"])
    rows, report = load_sft_examples([{"path": str(tmp_path), "split": "train"}])
    assert len(rows) == 40
    (example,) = report["sources"][0]["examples"]
    assert example["file"].endswith("train-00001-of-00002.jsonl") and example["line"] == 21
    assert example["reason"] == "invalid_json"
    assert source_files({"path": str(tmp_path), "split": "train"}) == report["sources"][0]["files"]


# ---------------------------------------------------------------------------------------- columns mapping


def test_columns_rename_a_sets_columns_to_the_names_the_readers_expect(tmp_path: Path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A.", "id": 1}])
    rows, report = load_sft_examples([{"path": path, "columns": {"question": "instruction", "answer": "output"}}])
    assert rows == [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}]
    assert report["sources"][0]["format"] == "alpaca"


def test_columns_mapping_written_backwards_is_refused_with_the_right_way_round():
    with pytest.raises(PipelineError, match=r"columns maps 'instruction' to 'question', which no reader uses\. It "
                                            r"looks reversed: write \{question: instruction\}"):
        load_sft_examples([{"path": "x.jsonl", "columns": {"instruction": "question"}}])


def test_columns_naming_a_missing_column_lists_the_columns_the_data_has(tmp_path: Path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"query": "Q?", "output": "A."}])
    with pytest.raises(DataError, match=r"qa\.jsonl: `columns` renames 'question', but the data has no column "
                                        r"'question' \(its columns: output, query\)"):
        load_sft_examples([{"path": path, "columns": {"question": "instruction"}}])
    parquet = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"query": ["Q?"], "output": ["A."]}), parquet)
    with pytest.raises(DataError, match=r"qa\.parquet: `columns` renames 'question'"):  # before any row is read
        load_sft_examples([{"path": str(parquet), "columns": {"question": "instruction"}}])


def test_columns_renaming_onto_an_existing_column_is_refused(tmp_path: Path):
    parquet = tmp_path / "both.parquet"
    pq.write_table(pa.table({"question": ["Q?"], "instruction": ["I?"], "output": ["A."]}), parquet)
    with pytest.raises(DataError, match=r"renames a column to 'instruction', but the data already has"):
        load_sft_examples([{"path": str(parquet), "columns": {"question": "instruction"}}])


def test_columns_apply_to_hub_like_directories(ultrachat: Path):
    rows, _ = load_sft_examples([{"path": str(ultrachat), "split": "test_sft",
                                  "columns": {"messages": "conversations"}}])
    assert rows[0]["messages"][0]["content"] == "[test_sft] Tell me about topic 0."


# ------------------------------------------------------------------------------------- fraction and limit


def _questions(rows: list[dict]) -> list[str]:
    return [r["messages"][0]["content"] for r in rows]


def test_fraction_reads_a_seeded_sample_in_file_order_and_limit_caps_it(tmp_path: Path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": f"Q{i:02d}?", "output": "a"} for i in range(40)]
                       + [""])  # a blank line is not a row
    stream = ExampleStream([{"path": path, "fraction": 0.25}], kind="sft")
    rows = _questions(list(stream))
    assert len(rows) == 10 and rows == sorted(rows) and len(set(rows)) == 10  # a subset, in file order
    assert rows != [f"Q{i:02d}?" for i in range(10)]  # not simply the first rows
    assert (stream.report["sources"][0]["rows_available"], stream.report["rows_in"]) == (40, 10)
    assert _questions(ExampleStream([{"path": path, "fraction": 0.25}], kind="sft")) == rows  # same seed
    assert _questions(ExampleStream([{"path": path, "fraction": 0.25}], kind="sft", seed=7)) != rows
    assert _questions(ExampleStream([{"path": path, "fraction": 0.25, "limit": 4}], kind="sft")) == rows[:4]
    assert len(list(ExampleStream([{"path": path, "fraction": 0.001}], kind="sft"))) == 1  # at least one row
    assert len(list(ExampleStream([{"path": path, "fraction": 1}], kind="sft"))) == 40


def test_fraction_of_a_sharded_split_samples_across_all_shards(ultrachat: Path):
    stream = ExampleStream([{"path": str(ultrachat), "split": "train_sft", "fraction": 0.5}], kind="sft")
    numbers = [int(q.split("topic ")[1].rstrip(".")) for q in _questions(list(stream))]
    assert len(numbers) == 15 and numbers == sorted(numbers)
    assert {n // 10 for n in numbers} == {0, 1, 2}  # rows from each of the three shards of ten
    assert stream.report["sources"][0]["rows_available"] == 30


@pytest.mark.parametrize("fraction", [0, 1.5, -0.1, True, "0.5"])
def test_fraction_must_be_in_zero_to_one(fraction):
    with pytest.raises(PipelineError, match=r"fraction must be a number with 0 < fraction <= 1"):
        load_sft_examples([{"path": "x.jsonl", "fraction": fraction}])


# ------------------------------------------------------------------------------------------------ memory


def test_streaming_holds_a_hash_per_row_not_the_rows(tmp_path: Path):
    def peak(n: int) -> int:
        path = write_jsonl(tmp_path / f"{n}.jsonl", [{"messages": [
            {"role": "user", "content": f"question {i} " + "lorem ipsum " * 20},
            {"role": "assistant", "content": f"answer {i} " + "dolor sit amet " * 30}]} for i in range(n)])
        tracemalloc.start()
        try:
            count = sum(1 for _ in ExampleStream([{"path": path}], kind="sft"))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert count == n

    small, large = peak(1_000), peak(4_000)
    # A kept row here is ~1 KB as Python objects; the dedup set costs ~100 bytes per row.
    assert large - small < 3_000 * 250, f"peak grew {(large - small) / 3_000:.0f} bytes per extra row"


# ------------------------------------------------------------------------------------------------ prepare


def _recipe(tmp_path: Path, tiny_model_dir: Path, sft: list, dpo: list, **data) -> dict:
    trainer = {"max_steps": 1, "max_length": 100}  # ultrachat_row: every third row is longer
    return {"name": "hub", "output_dir": str(tmp_path / "run"),
            "model": {"name_or_path": str(tiny_model_dir), "chat_template": "chatml"},
            "data": {"sft": sft, "dpo": dpo, "eval_fraction": 0.2, "seed": 3, **data},
            "sft": dict(trainer), "dpo": dict(trainer)}


def test_prepare_streams_hub_like_sets_and_every_row_is_accounted_for(tmp_path, tiny_model_dir, ultrachat,
                                                                      ultrafeedback, capsys):
    raw = _recipe(tmp_path, tiny_model_dir, sft=[{"path": str(ultrachat), "split": "train_sft"}],
                  dpo=[{"path": str(ultrafeedback), "split": "train_prefs", "limit": 10}])
    run_recipe(validate_recipe(raw), stage="prepare", log=lambda line: None)
    out = tmp_path / "run" / "prepare"
    report = json.loads((out / "report.json").read_text())
    sft = report["sft"]
    # Three-turn rows exceed 100 tokens: filtered by a setting, not damage.
    assert sft["filtered"] >= 10 and sft["malformed"] == 0 and sft["kept"] + sft["filtered"] == 30
    assert sft["drop_reasons"] == {"longer than sft.max_length (100 tokens)": sft["filtered"]}
    for part in (sft, *sft["sources"], report["dpo"]):
        assert part["rows_in"] == part["kept"] + part["dropped"] + part["deduplicated"]
        assert part["dropped"] == part["malformed"] + part["filtered"]
    train, held_out = load_from_disk(str(out / "sft_train")), load_from_disk(str(out / "sft_eval"))
    assert len(train) + len(held_out) == sft["kept"] and len(held_out) == round(0.2 * sft["kept"])
    kept = {json.dumps(r["messages"]) for r in [*train, *held_out]}
    assert len(kept) == sft["kept"]
    assert report["dpo"]["rows_in"] == 10
    assert set(load_from_disk(str(out / "dpo_train")).column_names) == {"prompt", "chosen", "rejected"}
    assert not (out / "_cache").exists()
    printed = capsys.readouterr().out
    assert "ultrachat_200k [train_sft]: format messages (detected); 30 rows read" in printed


def test_prepare_length_filter_keeps_the_rows_the_list_loader_would_keep(tmp_path, tiny_model_dir, ultrachat):
    from pipeline.models import load_tokenizer

    raw = _recipe(tmp_path, tiny_model_dir, sft=[{"path": str(ultrachat), "split": "train_gen"},
                                                 {"path": str(ultrachat), "split": "train_sft"}], dpo=[])
    del raw["dpo"]
    raw["data"]["eval_fraction"] = 0.0
    recipe = validate_recipe(raw)
    run_recipe(recipe, stage="prepare", log=lambda line: None)
    tokenizer = load_tokenizer(recipe.model)
    rows, _ = load_sft_examples(raw["data"]["sft"])
    expected = [r["messages"] for r in rows
                if len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) <= 100]
    saved = load_from_disk(str(tmp_path / "run" / "prepare" / "sft_train"))
    assert saved["messages"] == expected and 0 < len(expected) < len(rows)
    report = json.loads((tmp_path / "run" / "prepare" / "report.json").read_text())["sft"]
    assert [s["filtered"] for s in report["sources"]] == [
        sum(1 for r in rows if r["messages"][0]["content"].startswith(f"[{split}]") and r["messages"] not in expected)
        for split in ("train_gen", "train_sft")]


def test_prepare_stops_on_a_mostly_bad_source_and_names_the_reasons(tmp_path, tiny_model_dir):
    rows = [{"instruction": f"Q{i}?", "output": "a"} for i in range(22)]
    rows += [{"question": f"R{i}?", "answer": "b"} for i in range(10)]
    path = write_jsonl(tmp_path / "hostile.jsonl", rows)
    raw = _recipe(tmp_path, tiny_model_dir, sft=[{"path": path}], dpo=[])
    del raw["dpo"]
    with pytest.raises(DataError, match=r"hostile\.jsonl: 10 of 32 rows read \(31\.2%\) are malformed.*"
                                        r"missing_fields: 10"):
        run_recipe(validate_recipe(raw), stage="prepare", log=lambda line: None)
    assert not (tmp_path / "run" / "prepare" / "manifest.json").exists()
    raw["data"]["max_drop_fraction"] = None
    run_recipe(validate_recipe(raw), stage="prepare", log=lambda line: None)
    assert json.loads((tmp_path / "run" / "prepare" / "report.json").read_text())["sft"]["malformed"] == 10


def test_max_drop_fraction_default_and_validation(tmp_path, tiny_model_dir):
    assert DATA_DEFAULTS["max_drop_fraction"] == DEFAULT_MAX_DROP_FRACTION == 0.05
    raw = _recipe(tmp_path, tiny_model_dir, sft=[{"path": "x.jsonl"}], dpo=[])
    del raw["dpo"]
    for bad in (1.5, -0.1, "all", True):
        raw["data"]["max_drop_fraction"] = bad
        with pytest.raises(PipelineError, match=r"data\.max_drop_fraction must be a number in \[0, 1\]"):
            validate_recipe(raw)


def test_recipe_validation_checks_source_values_before_any_model_loads(tmp_path, tiny_model_dir):
    raw = _recipe(tmp_path, tiny_model_dir, sft=[{"path": "not-read-yet.jsonl", "fraction": 2}], dpo=[])
    del raw["dpo"]
    with pytest.raises(PipelineError, match=r"not-read-yet\.jsonl\): fraction must be a number"):
        validate_recipe(raw)
    raw["data"]["sft"] = [{"path": "x.jsonl", "columns": {"output": "answer"}}]
    with pytest.raises(PipelineError, match=r"It looks reversed: write \{answer: output\}"):
        validate_recipe(raw)
    raw["data"]["sft"] = [{"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "revision": "8049631",
                           "fraction": 0.5, "limit": 1000, "columns": {"conversation": "messages"}}]
    assert validate_recipe(raw).data["sft"] == raw["data"]["sft"]


def test_a_changed_shard_of_a_hub_like_directory_changes_the_prepare_fingerprint(tmp_path: Path):
    from pipeline.runner import _content_hash

    root = write_hub_like(tmp_path / "uc", ULTRACHAT, ultrachat_row, {"train_sft": (6, 2), "test_sft": (2, 1)})
    source = {"path": str(root), "split": "train_sft"}
    before = _content_hash(str(root), source)
    test_shard = next((root / "data").glob("test_sft-*"))
    test_shard.write_bytes(test_shard.read_bytes() + b"\0")  # another split's shard: not read, same hash
    assert _content_hash(str(root), source) == before
    shard = sorted((root / "data").glob("train_sft-*"))[1]
    pq.write_table(pa.Table.from_pylist([ultrachat_row("train_sft", 99)], schema=ULTRACHAT), shard)
    assert _content_hash(str(root), source) != before
    assert not _content_hash(str(root), source).startswith("remote:")
