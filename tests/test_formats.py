"""pipeline/data/formats.py: each format, detection, dedup, the report, control-token neutralisation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.formats import (
    FORMATS,
    SOURCE_KEYS,
    ZERO_WIDTH_SPACE,
    load_preference_examples,
    load_sft_examples,
    neutralise_control_tokens,
)
from pipeline.errors import PipelineError

ZW = ZERO_WIDTH_SPACE
REPO = Path(__file__).resolve().parents[1]


def write_lines(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def sft_one(tmp_path: Path, row: dict, **source) -> list[dict]:
    rows, _ = load_sft_examples([{"path": write_lines(tmp_path / "one.jsonl", [row]), **source}])
    return rows


def pref_one(tmp_path: Path, row: dict) -> list[dict]:
    rows, _ = load_preference_examples([{"path": write_lines(tmp_path / "one.jsonl", [row])}])
    return rows


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def assert_reconciles(report: dict) -> None:
    for part in [report, *report["sources"]]:
        assert part["rows_in"] == part["kept"] + part["dropped"] + part["deduplicated"]
        assert part["dropped"] == sum(part["drop_reasons"].values())
    for key in ("rows_in", "kept", "dropped", "deduplicated", "control_tokens_neutralised"):
        assert report[key] == sum(source[key] for source in report["sources"])


# ------------------------------------------------------------------------------------------- each format


def test_public_constants_name_the_source_keys_and_formats():
    assert SOURCE_KEYS == {"path", "format", "split", "subset", "revision", "columns", "limit", "fraction"}
    assert FORMATS == ("alpaca", "sharegpt", "messages", "preference")


def test_alpaca_input_is_appended_after_a_blank_line_and_system_comes_first(tmp_path):
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour",
           "system": "Be brief."}
    assert sft_one(tmp_path, row) == [{"messages": [
        msg("system", "Be brief."), msg("user", "Translate to French.\n\nGood morning"),
        msg("assistant", "Bonjour"),
    ]}]


def test_alpaca_empty_input_and_null_system_are_omitted(tmp_path):
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue.", "system": None}
    assert sft_one(tmp_path, row) == [{"messages": [msg("user", "Name a colour."),
                                                    msg("assistant", "Blue.")]}]


def test_sharegpt_roles_are_normalised_and_top_level_system_is_prepended(tmp_path):
    row = {"system": "You are kind.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "USER", "value": "Again"}, {"from": "model", "value": "Hello again"},
        {"from": "user", "value": "Once more"}, {"from": "bot", "value": "Still here"},
    ]}
    assert sft_one(tmp_path, row) == [{"messages": [
        msg("system", "You are kind."), msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "Again"),
        msg("assistant", "Hello again"), msg("user", "Once more"), msg("assistant", "Still here"),
    ]}]


def test_sharegpt_system_turn_wins_over_top_level_system_and_empty_system_turns_vanish(tmp_path):
    row = {"system": "ignored", "conversations": [
        {"from": "system", "value": "Inline system."}, {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Yo"},
    ]}
    assert sft_one(tmp_path, row)[0]["messages"][0] == msg("system", "Inline system.")
    row = {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Yo"}]}
    assert sft_one(tmp_path, row) == [{"messages": [msg("user", "Hi"), msg("assistant", "Yo")]}]


def test_messages_content_is_kept_byte_for_byte(tmp_path):
    row = {"messages": [msg("user", "  padded question \n"), msg("assistant", "\tanswer with tab\n\n")],
           "id": 3}
    assert sft_one(tmp_path, row) == [{"messages": row["messages"]}]


def test_prompt_completion_strings_become_one_user_and_one_assistant_turn(tmp_path):
    row = {"prompt": "Capital of France?", "completion": "Paris."}
    assert sft_one(tmp_path, row) == [{"messages": [msg("user", "Capital of France?"),
                                                    msg("assistant", "Paris.")]}]


def test_prompt_completion_message_lists_are_concatenated(tmp_path):
    row = {"prompt": [msg("system", "Terse."), msg("user", "2+2?")], "completion": [msg("assistant", "4")]}
    assert sft_one(tmp_path, row) == [{"messages": [msg("system", "Terse."), msg("user", "2+2?"),
                                                    msg("assistant", "4")]}]


def test_preference_with_string_prompt_becomes_trl_conversational_format(tmp_path):
    row = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    assert pref_one(tmp_path, row) == [{
        "prompt": [msg("user", "Say hi.")], "chosen": [msg("assistant", "Hi!")],
        "rejected": [msg("assistant", "No.")],
    }]


def test_preference_constraints_travel_with_the_pair_as_json_text(tmp_path):
    row = {"prompt": "Say hi. Use no commas.", "chosen": "Hi there.", "rejected": "Hi, there.",
           "instruction_id_list": ["punctuation:no_comma", "startend:end_checker"],
           "kwargs": [{}, {"end_phrase": "there."}]}
    (pair,) = pref_one(tmp_path, row)
    assert json.loads(pair["constraints"]) == {"instruction_id_list": row["instruction_id_list"],
                                               "kwargs": row["kwargs"]}
    rows, report = load_preference_examples([{"path": write_lines(tmp_path / "bad.jsonl", [
        {**row, "kwargs": [{}]}, {**row, "instruction_id_list": "punctuation:no_comma"}, row])}],
        max_drop_fraction=None)  # the drops are the point here; the threshold has its own tests
    assert rows == [pair] and report["drop_reasons"] == {"bad_constraints": 2}


def test_preference_message_lists_keep_a_leading_system_and_earlier_turns(tmp_path):
    prompt = [msg("system", "Be nice."), msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "Joke?")]
    row = {"prompt": prompt, "chosen": [msg("assistant", "Knock knock.")],
           "rejected": [msg("assistant", "No.")]}
    assert pref_one(tmp_path, row) == [{
        "prompt": prompt, "chosen": [msg("assistant", "Knock knock.")], "rejected": [msg("assistant", "No.")],
    }]


def test_preference_implicit_prompt_is_the_shared_leading_messages(tmp_path):
    shared = [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "Joke?")]
    row = {"chosen": [*shared, msg("assistant", "Knock knock.")],
           "rejected": [*shared, msg("assistant", "No.")]}
    assert pref_one(tmp_path, row) == [{
        "prompt": shared, "chosen": [msg("assistant", "Knock knock.")], "rejected": [msg("assistant", "No.")],
    }]


def test_preference_answers_that_repeat_the_prompt_have_it_stripped(tmp_path):
    # The ultrafeedback_binarized layout: a prompt string plus chosen/rejected whole conversations.
    row = {"prompt": "Q?", "chosen": [msg("user", "Q?"), msg("assistant", "A.")],
           "rejected": [msg("user", "Q?"), msg("assistant", "B.")]}
    assert pref_one(tmp_path, row) == [{
        "prompt": [msg("user", "Q?")], "chosen": [msg("assistant", "A.")],
        "rejected": [msg("assistant", "B.")],
    }]


def test_sft_on_preference_rows_trains_on_prompt_plus_chosen(tmp_path):
    row = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    assert sft_one(tmp_path, row) == [{"messages": [msg("user", "Say hi."), msg("assistant", "Hi!")]}]


# ------------------------------------------------------------------------------------- files and detection


def test_format_is_detected_per_row_and_the_report_counts_each(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [
        {"instruction": "A?", "output": "a"},
        {"conversations": [{"from": "human", "value": "B?"}, {"from": "gpt", "value": "b"}]},
        {"messages": [msg("user", "C?"), msg("assistant", "c")]},
        {"prompt": "D?", "completion": "d"},
        {"prompt": "E?", "chosen": "e", "rejected": "x"},
    ])
    rows, report = load_sft_examples([{"path": path}])
    assert [row["messages"][0]["content"] for row in rows] == ["A?", "B?", "C?", "D?", "E?"]
    source = report["sources"][0]
    assert source["format"] == "mixed"
    assert source["formats"] == {"alpaca": 1, "sharegpt": 1, "messages": 2, "preference": 1}


def test_detection_prefers_preference_then_messages_then_sharegpt_then_alpaca(tmp_path):
    everything = {"messages": [msg("user", "M?"), msg("assistant", "m")],
                  "conversations": [{"from": "human", "value": "S?"}, {"from": "gpt", "value": "s"}],
                  "instruction": "A?", "output": "a"}
    assert sft_one(tmp_path, everything)[0]["messages"][0]["content"] == "M?"
    assert sft_one(tmp_path, {k: v for k, v in everything.items() if k != "messages"})[0]["messages"][0][
        "content"] == "S?"
    assert sft_one(tmp_path, everything, format="alpaca")[0]["messages"][0]["content"] == "A?"


def test_explicit_format_drops_rows_without_its_fields(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"instruction": "A?", "output": "a"},
                                              {"messages": [msg("user", "M?"), msg("assistant", "m")]}])
    rows, report = load_sft_examples([{"path": path, "format": "alpaca"}], max_drop_fraction=None)
    assert len(rows) == 1
    assert report["drop_reasons"] == {"missing_fields": 1}
    assert report["sources"][0]["format"] == "alpaca"


def test_json_array_json_lines_and_parquet_give_identical_rows(tmp_path):
    records = [{"instruction": "A?", "output": "a"}, {"messages": [msg("user", "B?"), msg("assistant", "b")]}]
    (tmp_path / "x.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One table holding both formats: each row has nulls in the other format's columns.
    columns = {key: [record.get(key) for record in records] for key in ("instruction", "output", "messages")}
    pq.write_table(pa.table(columns), tmp_path / "x.parquet")
    results = [load_sft_examples([{"path": str(tmp_path / name)}])[0]
               for name in ("x.json", "x.parquet")] + [load_sft_examples([{"path": write_lines(
                   tmp_path / "x.jsonl", records)}])[0]]
    assert results[0] == results[1] == results[2] == [
        {"messages": [msg("user", "A?"), msg("assistant", "a")]},
        {"messages": [msg("user", "B?"), msg("assistant", "b")]},
    ]


def test_json_array_drops_are_reported_at_the_elements_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n  {"instruction": "A?", "output": "a"},\n  {"instruction": "no output"},\n  7\n]',
                    encoding="utf-8")
    _, report = load_sft_examples([{"path": str(path)}], max_drop_fraction=None)
    assert [(e["line"], e["reason"]) for e in report["sources"][0]["examples"]] == [
        (3, "missing_fields"), (4, "not_an_object")]


def test_relative_paths_are_resolved_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_lines(tmp_path / "data" / "x.jsonl", [{"instruction": "A?", "output": "a"}])
    monkeypatch.chdir(tmp_path)
    rows, report = load_sft_examples([{"path": "data/x.jsonl"}])
    assert len(rows) == 1 and report["sources"][0]["path"] == "data/x.jsonl"


def test_limit_caps_the_rows_read_from_a_source(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"instruction": f"Q{i}?", "output": "a"} for i in range(10)])
    rows, report = load_sft_examples([{"path": path, "limit": 3}])
    assert [row["messages"][0]["content"] for row in rows] == ["Q0?", "Q1?", "Q2?"]
    assert report["rows_in"] == 3


def test_shipped_instruction_data_loads_without_drops():
    rows, report = load_sft_examples([{"path": str(REPO / "data" / "instructions.jsonl")}])
    assert report["dropped"] == 0 and report["kept"] == len(rows) > 0
    assert_reconciles(report)


# ---------------------------------------------------------------------------------------- dedup and report


def test_exact_duplicates_are_removed_across_sources_keeping_the_first(tmp_path):
    first = write_lines(tmp_path / "a.jsonl", [{"instruction": "Q?", "output": "A"}, {"instruction": "R?",
                                                                                      "output": "B"}])
    # Same normalised row written in another format: still a duplicate.
    second = write_lines(tmp_path / "b.jsonl", [{"messages": [msg("user", "Q?"), msg("assistant", "A")]},
                                                {"instruction": "Q?", "output": "A "}])
    rows, report = load_sft_examples([{"path": first}, {"path": second}])
    assert [row["messages"][1]["content"] for row in rows] == ["A", "B", "A "]
    assert [s["deduplicated"] for s in report["sources"]] == [0, 1]
    assert report["deduplicated"] == 1


def test_report_counts_reconcile_per_source_and_in_total(tmp_path):
    first = write_lines(tmp_path / "a.jsonl", [{"instruction": "Q?", "output": "A"}, {"instruction": "Q?",
                                                                                      "output": "A"}, "junk"])
    second = write_lines(tmp_path / "b.jsonl", [{"messages": [msg("user", "Hi")]},
                                                {"prompt": "P", "completion": "C"}])
    rows, report = load_sft_examples([{"path": first}, {"path": second}], max_drop_fraction=None)
    assert (report["rows_in"], report["kept"], report["dropped"], report["deduplicated"]) == (5, 2, 2, 1)
    assert report["drop_reasons"] == {"not_an_object": 1, "no_assistant_turn": 1}
    assert len(rows) == report["kept"]
    assert_reconciles(report)


def test_report_examples_name_line_reason_and_what_is_wrong(tmp_path):
    bad = {"messages": [msg("user", "Hi"), {"role": "assistant", "content": 5}]}
    path = write_lines(tmp_path / "x.jsonl", [{"instruction": "Q?", "output": "A"}, bad])
    _, report = load_sft_examples([{"path": path}], max_drop_fraction=None)
    assert report["sources"][0]["examples"] == [
        {"line": 2, "reason": "wrong_type", "detail": "messages[1].content is int, expected a string"}]


# ----------------------------------------------------------------------------------------- source checks


def test_unknown_source_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(PipelineError, match=r"unknown key 'fromat'\. Did you mean 'format'\?"):
        load_sft_examples([{"path": "x.jsonl", "fromat": "alpaca"}])


def test_unknown_format_name_is_rejected():
    with pytest.raises(PipelineError, match=r"unknown format 'openai'; use one of alpaca, sharegpt"):
        load_sft_examples([{"path": "x.jsonl", "format": "openai"}])


def test_preference_loader_rejects_an_sft_format():
    with pytest.raises(PipelineError, match=r"format 'alpaca' has no chosen/rejected"):
        load_preference_examples([{"path": "x.jsonl", "format": "alpaca"}])


@pytest.mark.parametrize("limit", [0, -1, "10", True])
def test_limit_must_be_a_positive_integer(limit):
    with pytest.raises(PipelineError, match="limit must be a positive integer"):
        load_sft_examples([{"path": "x.jsonl", "limit": limit}])


def test_no_sources_is_an_error():
    with pytest.raises(PipelineError, match="No data sources"):
        load_sft_examples([])


def test_hub_id_that_is_not_cached_fails_offline_with_a_clear_message(tmp_path):
    # A subprocess pins HF_HUB_OFFLINE=1 from the start, so this can never reach the network.
    code = ("from pipeline.data.formats import load_sft_examples\n"
            "from pipeline.errors import PipelineError\n"
            "try:\n    load_sft_examples([{'path': 'nobody-xyz/no-such-dataset'}])\n"
            "except PipelineError as exc:\n    print(exc)\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.startswith("nobody-xyz/no-such-dataset: is not a local file, and the Hub dataset isn't "
                                 "available offline"), out.stdout + out.stderr


# -------------------------------------------------------------------------------------- control tokens


def test_neutralise_puts_a_zero_width_space_after_the_first_character():
    text = "Use <start_of_turn>model\nand <end_of_turn><eos> here"
    tokens = ["<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>"]
    assert neutralise_control_tokens(text, tokens) == (
        f"Use <{ZW}start_of_turn>model\nand <{ZW}end_of_turn><{ZW}eos> here")


def test_neutralise_handles_regex_metacharacters_and_longest_match():
    assert neutralise_control_tokens("<|im_start|>user", ["<|im_start|>", "<|im"]) == f"<{ZW}|im_start|>user"
    assert neutralise_control_tokens("x [INST] y", {"[INST]", "[/INST]"}) == f"x [{ZW}INST] y"


def test_neutralise_leaves_no_shorter_token_inside_a_broken_longer_one():
    assert neutralise_control_tokens("abcd", ["abcd", "cd"]) == f"a{ZW}bc{ZW}d"


def test_neutralise_is_idempotent_and_leaves_plain_text_alone():
    tokens = frozenset({"<eos>", "<bos>"})
    once = neutralise_control_tokens("a <eos> b", tokens)
    assert neutralise_control_tokens(once, tokens) == once
    assert neutralise_control_tokens("a < eos > b", tokens) == "a < eos > b"


def test_neutralise_ignores_single_character_and_whitespace_tokens():
    assert neutralise_control_tokens("a\n\n b", ["\n\n", "a", "  ", ""]) == "a\n\n b"


def test_neutralised_text_does_not_tokenise_as_the_control_token():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<start_of_turn>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello start of turn <> world"] * 10, trainer=trainer)
    control_id = tokenizer.token_to_id("<start_of_turn>")
    assert control_id in tokenizer.encode("hi <start_of_turn>").ids
    safe = neutralise_control_tokens("hi <start_of_turn>", ["<start_of_turn>"])
    assert control_id not in tokenizer.encode(safe).ids


def test_neutralise_stays_fast_with_thousands_of_added_tokens():
    tokens = frozenset([f"<unused{i}>" for i in range(6000)] + [f"[TOKEN_{i}]" for i in range(2000)]
                       + ["<start_of_turn>", "<end_of_turn>"])
    text = "plain <b>tag</b> a<b [x] <unused12> <start_of_turn> " * 20_000  # ~1 MB
    started = time.perf_counter()
    out = neutralise_control_tokens(text, tokens)
    elapsed = time.perf_counter() - started
    assert out.count(ZW) == 2 * 20_000
    assert elapsed < 2.0, f"took {elapsed:.2f}s; a plain alternation of 8000 tokens takes ~10 s"


def test_loaders_neutralise_all_content_and_count_the_strings_changed(tmp_path):
    sft = write_lines(tmp_path / "sft.jsonl", [
        {"system": "<eos> sys", "instruction": "Say <start_of_turn>", "output": "ok <start_of_turn><eos>"},
        {"instruction": "clean", "output": "clean"},
    ])
    rows, report = load_sft_examples([{"path": sft}], control_tokens=["<start_of_turn>", "<eos>"])
    assert rows[0]["messages"] == [msg("system", f"<{ZW}eos> sys"), msg("user", f"Say <{ZW}start_of_turn>"),
                                   msg("assistant", f"ok <{ZW}start_of_turn><{ZW}eos>")]
    assert report["control_tokens_neutralised"] == 3
    prefs = write_lines(tmp_path / "p.jsonl", [{"prompt": "<eos>?", "chosen": "<eos>", "rejected": "no"}])
    rows, report = load_preference_examples([{"path": prefs}], control_tokens=["<eos>"])
    assert rows == [{"prompt": [msg("user", f"<{ZW}eos>?")], "chosen": [msg("assistant", f"<{ZW}eos>")],
                     "rejected": [msg("assistant", "no")]}]
    assert report["control_tokens_neutralised"] == 2
