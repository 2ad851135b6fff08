"""The derived datasets shipped in data/ parse, have the promised shape, and keep eval held out.

They are produced by ``scripts/build_data.py``; the last test rebuilds them and compares byte for byte,
so editing the inputs or the constraint code without regenerating fails here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline.data import constraints as C
from pipeline.errors import DataError

DATA = Path(__file__).resolve().parents[1] / "data"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_data.py"
DERIVED = ["sft_constraints.jsonl", "preferences.jsonl", "preferences_complete.jsonl", "preferences_quickstart.jsonl",
           "eval_prompts.jsonl",
           "eval_preferences.jsonl", "sft_broad.jsonl", "preferences_broad.jsonl", "eval_prompts_large.jsonl",
           "eval_preferences_large.jsonl"]
EVAL_PROMPTS = ["eval_prompts.jsonl", "eval_prompts_large.jsonl"]
EVAL_PAIRS = ["eval_preferences.jsonl", "eval_preferences_large.jsonl"]


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def files() -> dict[str, list[dict]]:
    return {name: read(name) for name in DERIVED + ["instructions.jsonl", "heldout_prompts.jsonl"]}


@pytest.fixture(scope="module")
def instructions(files) -> dict[str, dict]:
    return {row["id"]: row for row in files["instructions.jsonl"]}


def source_of(row_id: str) -> str:
    """Derived rows are named ``<source id>/<suffix>``."""
    return row_id.split("/")[0]


def last_user(messages: list[dict]) -> str:
    return [m["content"] for m in messages if m["role"] == "user"][-1]


# ---- shape and counts ----------------------------------------------------------------------------


def test_sft_constraints_are_single_turn_messages_with_appended_instructions(files, instructions, build_data):
    rows = files["sft_constraints.jsonl"]
    assert len(rows) == build_data.N_SFT == 1000
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"id", "messages"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        base = last_user(instructions[source_of(row["id"])]["messages"])
        prompt = row["messages"][0]["content"]
        assert base in prompt and len(prompt) > len(base) + 10  # instructions go before or after the request


def test_broad_files_ask_only_for_training_only_types_each_leading_an_equal_share(files, build_data):
    sft, pairs = files["sft_broad.jsonl"], files["preferences_broad.jsonl"]
    assert (len(sft), len(pairs)) == (build_data.N_BROAD_SFT, build_data.N_BROAD_PAIRS)
    for rows, size in ((sft, build_data.N_BROAD_SFT), (pairs, build_data.N_BROAD_PAIRS)):
        share = size // len(C.TRAINING_ONLY)
        leads = Counter(next(t for t in C.TRAINING_ONLY if any(template_pattern(x).search(text_of(r))
                                                                for _, _, x in C.all_templates(t))) for r in rows)
        assert leads == {t: share for t in C.TRAINING_ONLY}, leads
    assert all(r["instruction_id_list"][0] in C.TRAINING_ONLY and len(r["instruction_id_list"]) == 1 for r in pairs)


def text_of(row: dict) -> str:
    return row["messages"][0]["content"] if "messages" in row else row["prompt"][-1]["content"]


@pytest.mark.parametrize("name, constraint_pairs, loop_pairs, quality_pairs", [
    ("preferences.jsonl", (280, 320), (70, 80), (140, 160)), ("eval_preferences.jsonl", (25, 35), (0, 0), (25, 35)),
    ("eval_preferences_large.jsonl", (85, 90), (0, 0), (85, 90))])
def test_preference_files_use_trl_conversational_format(files, name, constraint_pairs, loop_pairs, quality_pairs):
    rows = files[name]
    kinds = Counter(r["kind"] for r in rows)
    assert constraint_pairs[0] <= kinds.pop("constraint") <= constraint_pairs[1]
    assert loop_pairs[0] <= kinds.pop("loops", 0) <= loop_pairs[1]
    assert set(kinds) == {"wrong_number", "wrong_answer", "ramble", "runs_on_turn", "repeats"}
    assert quality_pairs[0] <= sum(kinds.values()) <= quality_pairs[1]
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert {"id", "kind", "prompt", "chosen", "rejected"} <= set(row)
        assert row["prompt"][-1]["role"] == "user"
        assert all(m["role"] in ("system", "user", "assistant") for m in row["prompt"])
        for side in ("chosen", "rejected"):
            assert len(row[side]) == 1 and row[side][0]["role"] == "assistant" and row[side][0]["content"].strip()


def test_quickstart_mix_is_rows_of_preferences_focused_on_the_types_sft_leaves(files, build_data):
    everything = {json.dumps(r, sort_keys=True) for r in files["preferences.jsonl"]}
    mix = files["preferences_quickstart.jsonl"]
    assert all(json.dumps(r, sort_keys=True) in everything for r in mix)  # a selection, no new pairs
    focus = Counter(t for r in mix if r["kind"] == "constraint" for t in r["instruction_id_list"]
                    if t in build_data.FOCUS_TYPES)
    assert all(focus[t] >= build_data.PER_FOCUS_TYPE for t in build_data.FOCUS_TYPES), focus
    kinds = Counter(r["kind"] for r in mix)
    assert kinds["loops"] > 0 and sum(kinds.values()) - kinds["constraint"] - kinds["loops"] > 0
    # every trained type leads enough pairs, and the top-up adds no more than that
    leads = Counter(r["instruction_id_list"][0] for r in mix if r["kind"] == "constraint")
    assert set(leads) == set(build_data.TYPES)
    assert min(leads.values()) >= build_data.MIN_PAIRS_PER_TYPE
    per_type, others = build_data.PER_FOCUS_TYPE, build_data.OTHER_CONSTRAINT_PAIRS
    base = len(build_data.FOCUS_TYPES) * per_type + others
    assert base < kinds["constraint"] <= base + len(build_data.TYPES) * build_data.MIN_PAIRS_PER_TYPE


@pytest.mark.parametrize("name", DERIVED)
def test_no_row_is_duplicated(files, name):
    bodies = [json.dumps({k: v for k, v in r.items() if k not in ("id", "key")}) for r in files[name]]
    assert len(set(bodies)) == len(bodies)


@pytest.mark.parametrize("name", ["preferences.jsonl", *EVAL_PAIRS, "preferences_broad.jsonl"])
def test_every_preference_pair_has_chosen_different_from_rejected(files, name):
    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in files[name])


@pytest.mark.parametrize("name", ["preferences.jsonl", *EVAL_PAIRS, "preferences_broad.jsonl"])
def test_constraint_pairs_chosen_passes_every_check_and_rejected_fails_one(files, name):
    for row in (r for r in files[name] if r["kind"] == "constraint"):
        ids, kwargs, prompt = row["instruction_id_list"], row["kwargs"], row["prompt"][-1]["content"]
        assert 1 <= len(ids) <= 2 and C.compatible(ids)
        assert C.evaluate_response(row["chosen"][0]["content"], ids, kwargs, prompt)["prompt_strict"], row["id"]
        assert not C.evaluate_response(row["rejected"][0]["content"], ids, kwargs, prompt)["prompt_strict"]


def test_loop_pairs_chosen_complies_and_rejected_repeats_a_fragment_of_it(files):
    rows = [r for r in files["preferences.jsonl"] if r["kind"] == "loops"]
    assert rows
    for row in rows:
        ids, kwargs, prompt = row["instruction_id_list"], row["kwargs"], row["prompt"][-1]["content"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert C.evaluate_response(chosen, ids, kwargs, prompt)["prompt_strict"], row["id"]
        pieces = [p.strip() for p in re.split(r"\n+| ", rejected) if p.strip()]
        fragment_counts = Counter(pieces)
        assert max(fragment_counts.values()) >= 12, row["id"]  # it loops
        assert len(rejected) > len(chosen.split("\n")[0])


def test_quality_pairs_chosen_is_the_reference_answer(files, instructions):
    for row in (r for r in files["preferences.jsonl"] if r["kind"] not in ("constraint", "loops")):
        source = instructions[source_of(row["id"])]
        assert row["prompt"] == source["messages"][:-1]
        assert row["chosen"][0]["content"] == source["messages"][-1]["content"]


def test_complete_pairs_prefer_the_reference_to_its_first_sentence_alone(files, instructions, build_data):
    rows = files["preferences_complete.jsonl"]
    assert len(rows) == build_data.N_COMPLETE_PAIRS and {r["kind"] for r in rows} == {"complete"}
    for row in rows:
        source = instructions[source_of(row["id"])]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["prompt"] == source["messages"][:-1] and chosen == source["messages"][-1]["content"]
        assert source["category"] in build_data.COMPLETE_CATEGORIES
        assert chosen.startswith(rejected) and C.count_sentences(rejected) == 1 < 3 <= C.count_sentences(chosen)
        assert C.count_words(rejected) <= build_data.INCOMPLETE_MAX_SHARE * C.count_words(chosen)


@pytest.mark.parametrize("name", EVAL_PROMPTS)
def test_eval_prompts_are_ifeval_format_with_compliant_references(files, name):
    rows = files[name]
    assert len(rows) >= 240
    assert sorted(r["key"] for r in rows) == list(range(1, len(rows) + 1))
    for row in rows:
        assert isinstance(row["key"], int) and isinstance(row["prompt"], str)
        assert 1 <= len(row["instruction_id_list"]) <= 2 and C.compatible(row["instruction_id_list"])
        assert len(row["kwargs"]) == len(row["instruction_id_list"]) == len(row["phrasing"])
        if "reference" not in row:  # only a check-only type (no rewriter: the response language) has none
            assert not all(C.can_rewrite(t) for t in row["instruction_id_list"]), row["key"]
            continue
        result = C.evaluate_response(row["reference"], row["instruction_id_list"], row["kwargs"], row["prompt"])
        assert result["prompt_strict"], row["key"]


def test_every_heldout_question_gives_one_seen_and_one_unseen_eval_prompt(files):
    by_source: dict[str, list[str]] = {}
    for row in files["eval_prompts.jsonl"]:
        by_source.setdefault(row["source_id"], []).append(row["split"])
    assert len(by_source) == len(files["heldout_prompts.jsonl"])
    assert all(splits[0] == "seen" and splits[1] in ("unseen_phrasing", "unseen_type") and len(splits) == 2
               for splits in by_source.values())
    counts = Counter(s for splits in by_source.values() for s in splits)
    assert counts["unseen_phrasing"] >= 50 and counts["unseen_type"] >= 50


@pytest.mark.parametrize("name", EVAL_PROMPTS)
def test_split_labels_match_the_types_and_phrasings_each_eval_prompt_uses(files, build_data, name):
    for row in files[name]:
        held_out_phrasing = []
        for instruction_id, kwargs, index in zip(row["instruction_id_list"], row["kwargs"], row["phrasing"],
                                                  strict=True):
            assert C.describe(instruction_id, kwargs, index) in row["prompt"], row["key"]
            n = len(C.phrasing_templates(instruction_id, kwargs))
            held_out_phrasing.append(index >= n - build_data.HELD_OUT_PHRASINGS)
        types_held_out = [t in build_data.HELD_OUT_TYPES for t in row["instruction_id_list"]]
        if row["split"] == "unseen_type":
            assert types_held_out[0], row["key"]
        elif row["split"] == "unseen_phrasing":
            assert not any(types_held_out) and all(held_out_phrasing), row["key"]
        else:
            assert row["split"] == "seen" and not any(types_held_out) and not any(held_out_phrasing), row["key"]


def test_the_large_eval_files_extend_the_shipped_ones_with_every_question_in_both_unseen_splits(files):
    base, large = files["eval_prompts.jsonl"], files["eval_prompts_large.jsonl"]
    assert large[:len(base)] == base  # the quickstart's prompts, unchanged: its runs pair with large-set runs
    by_source: dict[str, list[str]] = {}
    for row in large:
        by_source.setdefault(row["source_id"], []).append(row["split"])
    assert len(by_source) == len(files["heldout_prompts.jsonl"])
    assert all(sorted(splits) == ["seen", "unseen_phrasing", "unseen_type"] for splits in by_source.values())
    pairs, large_pairs = files["eval_preferences.jsonl"], files["eval_preferences_large.jsonl"]
    assert [{k: v for k, v in r.items() if k != "source_id"} for r in large_pairs[:len(pairs)]] == pairs
    assert len(large_pairs) >= 2.9 * len(pairs)
    assert all(r["source_id"] == source_of(r["id"]) for r in large_pairs)  # the bootstrap resamples questions


def test_every_constraint_type_appears_at_least_five_times_in_eval(files):
    counts = Counter(t for r in files["eval_prompts.jsonl"] for t in r["instruction_id_list"])
    assert {t: counts[t] for t in C.CONSTRAINTS if counts[t] < 5} == {}


# ---- held out means held out ---------------------------------------------------------------------


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def five_grams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + 5]) for i in range(max(1, len(words) - 4))}


def training_base_prompts(files, instructions) -> list[str]:
    """Every user prompt the model trains on, without appended constraint text."""
    prompts = [m["content"] for row in files["instructions.jsonl"] for m in row["messages"] if m["role"] == "user"]
    for row in files["sft_constraints.jsonl"]:
        prompts.append(last_user(instructions[source_of(row["id"])]["messages"]))
    for row in files["preferences.jsonl"]:
        base = last_user(instructions[source_of(row["id"])]["messages"])
        assert base in row["prompt"][-1]["content"]
        prompts += [m["content"] for m in row["prompt"][:-1] if m["role"] == "user"] + [base]
    return prompts


def eval_base_prompts(files) -> list[str]:
    heldout = {r["id"]: r["prompt"] for r in files["heldout_prompts.jsonl"]}
    prompts = []
    for row in files["eval_prompts_large.jsonl"]:  # the shipped eval prompts and more
        assert heldout[row["source_id"]] in row["prompt"]
        prompts.append(heldout[row["source_id"]])
    for row in files["eval_preferences.jsonl"] + files["eval_preferences_large.jsonl"]:
        base = heldout[source_of(row["id"])]
        assert base in row["prompt"][-1]["content"]
        prompts.append(base)
    return prompts


def test_eval_prompts_are_disjoint_from_training_prompts(files, instructions):
    training = training_base_prompts(files, instructions)
    evaluation = eval_base_prompts(files)
    assert not {normalise(p) for p in training} & {normalise(p) for p in evaluation}
    training_grams = [five_grams(p) for p in set(training)]
    for prompt in set(evaluation):
        grams = five_grams(prompt)
        worst = max(len(grams & t) / len(grams | t) for t in training_grams)
        assert worst < 0.5, prompt


def template_pattern(template: str) -> re.Pattern[str]:
    """A regex matching any rendering of a phrasing template ({fields} match any text)."""
    parts = re.split(r"\{[a-z_]+\}", template)
    return re.compile(".+?".join(re.escape(p) for p in parts), re.DOTALL)


def held_out_patterns(build_data) -> list[tuple[str, str, re.Pattern[str]]]:
    """(type, template, regex) of every phrasing training must not use: the held-out last ones of every type, and
    every phrasing of a held-out type."""
    patterns = []
    for instruction_id in C.CONSTRAINTS:
        templates = C.all_templates(instruction_id)
        for variant, index, template in templates:
            n = sum(v == variant for v, _, _ in templates)
            if instruction_id in build_data.HELD_OUT_TYPES or index >= n - build_data.HELD_OUT_PHRASINGS:
                patterns.append((instruction_id, template, template_pattern(template)))
    return patterns


def training_user_texts(files) -> list[str]:
    texts = [m["content"] for row in files["instructions.jsonl"] for m in row["messages"] if m["role"] == "user"]
    for name in ("sft_constraints.jsonl", "sft_broad.jsonl"):
        texts += [m["content"] for row in files[name] for m in row["messages"] if m["role"] == "user"]
    for name in ("preferences.jsonl", "preferences_quickstart.jsonl", "preferences_broad.jsonl"):
        texts += [m["content"] for row in files[name] for m in row["prompt"] if m["role"] == "user"]
    return texts


def test_held_out_phrasing_patterns_catch_a_rendered_held_out_instruction(build_data):
    patterns = held_out_patterns(build_data)
    kwargs = {"num_words": 40, "relation": "less than"}
    last = C.describe("length_constraints:number_words", kwargs, 5)
    first = C.describe("length_constraints:number_words", kwargs, 0)
    assert any(p.search(f"Tell me about owls. {last}") for _, _, p in patterns)
    assert not any(p.search(f"Tell me about owls. {first}") for _, _, p in patterns)


def test_no_training_row_uses_a_held_out_type_or_phrasing(files, build_data):
    for name in ("preferences.jsonl", "preferences_quickstart.jsonl", "preferences_broad.jsonl"):
        used = {t for row in files[name] for t in row["instruction_id_list"]}
        assert not used & set(build_data.HELD_OUT_TYPES), name
    patterns = held_out_patterns(build_data)
    leaks = [(instruction_id, template, text[:80]) for text in training_user_texts(files)
             for instruction_id, template, pattern in patterns if pattern.search(text)]
    assert leaks == []


def test_training_prompts_vary_phrasing_and_position(files, build_data):
    texts = [row["messages"][0]["content"] for row in files["sft_constraints.jsonl"]]
    for instruction_id in build_data.TYPES:
        templates = C.all_templates(instruction_id)
        used = {template for _, _, template in templates if any(template_pattern(template).search(t) for t in texts)}
        assert len(used) >= 3, (instruction_id, used)
    bases = [last_user(r["messages"]) for r in files["instructions.jsonl"]]
    first_lines = Counter(any(t.startswith(b) for b in bases) for t in texts)
    assert first_lines[True] > 100 and first_lines[False] > 50  # the request first, or an instruction first


def test_eval_rows_come_only_from_heldout_ids(files, instructions):
    heldout = {r["id"] for r in files["heldout_prompts.jsonl"]}
    for name in EVAL_PROMPTS:
        assert {r["source_id"] for r in files[name]} <= heldout
    for name in EVAL_PAIRS:
        assert {source_of(r["id"]) for r in files[name]} <= heldout
    assert not heldout & set(instructions)


# ---- reproducible --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def build_data():
    spec = importlib.util.spec_from_file_location("build_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_data"] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["build_data"]


def test_build_data_names_file_and_line_of_a_bad_input_row(build_data, tmp_path):
    good = {"id": "a", "category": "x", "messages": [{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello."}]}
    (tmp_path / "instructions.jsonl").write_text(json.dumps(good) + "\n{not json}\n")
    with pytest.raises(DataError, match=r"instructions.jsonl:2: invalid JSON"):
        build_data.main(["--data-dir", str(tmp_path)])
    (tmp_path / "instructions.jsonl").write_text('\n{"id": "a", "category": "x", "messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match=r"instructions.jsonl:2: a conversation must end with a user turn"):
        build_data.main(["--data-dir", str(tmp_path)])


def test_rebuilding_reproduces_the_shipped_files_byte_for_byte(build_data, tmp_path, capsys):
    assert build_data.main(["--data-dir", str(DATA), "--out-dir", str(tmp_path)]) == 0
    assert "eval_prompts.jsonl: " in capsys.readouterr().out
    for name in DERIVED:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
            f"{name} is stale: run `python scripts/build_data.py` and commit the result")
