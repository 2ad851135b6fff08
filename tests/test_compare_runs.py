"""scripts/compare_runs.py: one model's answers in two runs, paired over the same eval prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script


def _compare_runs():
    return load_script("compare_runs")


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(tmp_path: Path, name: str, passed: list[bool], keys: list[str]) -> Path:
    rows = [{"key": k, "prompt": "p", "text": "an answer", "stopped": True, "new_tokens": 3,
             "constraints_strict": [ok], "constraints_loose": [ok]} for k, ok in zip(keys, passed, strict=True)]
    _write(tmp_path / name / "eval" / "generations_dpo.jsonl", rows)
    return tmp_path / name


def test_a_large_paired_gain_is_called_better_and_noise_is_not(tmp_path: Path, capsys) -> None:
    keys = [f"k{i}" for i in range(60)]
    prompts = _write(tmp_path / "prompts.jsonl", [
        {"key": k, "prompt": f"Say something {i}. Answer in all lowercase.", "split": "seen",
         "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]} for i, k in enumerate(keys)])
    reference = _run(tmp_path, "a", [i % 5 == 0 for i in range(60)], keys)  # 20 % pass
    variant = _run(tmp_path, "b", [i % 5 != 4 for i in range(60)], keys)  # 80 % pass, the 20 % among them
    noise = _run(tmp_path, "c", [i % 5 == 1 for i in range(60)], keys)  # 20 % pass, other prompts
    compare = _compare_runs()
    rows = {key: (a, b, diff) for key, a, b, diff in compare.compare(reference, variant, "dpo", str(prompts))}
    a, b, diff = rows["prompt_level_strict"]
    assert (a, b) == (pytest.approx(0.2), pytest.approx(0.8)) and diff.endswith("better")
    assert rows["by_split/seen/prompt_level_strict"][2].endswith("better")
    assert rows["format_compliance"][2].endswith("within noise")  # both stop on every prompt
    same = {key: diff for key, _, _, diff in compare.compare(reference, noise, "dpo", str(prompts))}
    assert same["prompt_level_strict"].endswith("within noise")
    assert compare.main([str(reference), str(variant), "--prompts", str(prompts)]) == 0
    assert "| prompt_level_strict | 0.200 | 0.800 |" in capsys.readouterr().out


def test_runs_on_different_prompt_files_are_refused(tmp_path: Path) -> None:
    prompts = _write(tmp_path / "prompts.jsonl", [
        {"key": k, "prompt": "Say hi in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
         "kwargs": [{}]} for k in ("x", "y")])
    reference = _run(tmp_path, "a", [True, False], ["x", "y"])
    other = _run(tmp_path, "b", [True, False], ["x", "z"])
    with pytest.raises(SystemExit, match="no answer for 1 of 2 prompts"):
        _compare_runs().compare(reference, other, "dpo", str(prompts))
    with pytest.raises(SystemExit, match="did that run evaluate the 'sft' model"):
        _compare_runs().compare(reference, other, "sft", str(prompts))


def _two_runs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A two-prompt eval file and two runs with the same answers to it."""
    keys = ["x", "y"]
    prompts = _write(tmp_path / "prompts.jsonl", [
        {"key": k, "prompt": "Say hi in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
         "kwargs": [{}]} for k in keys])
    return prompts, _run(tmp_path, "a", [True, False], keys), _run(tmp_path, "b", [True, False], keys)


def _pairs(run: Path, right: list[bool], prompt: str = "Q{i}", per_question: int = 0) -> None:
    """``per_question``: name a source question for every ``per_question`` consecutive pairs (0: none)."""
    _write(run / "eval" / "pairs_dpo.jsonl", [
        {"pair": i, "id": prompt.format(i=i), "group": "constraint" if i % 2 else "general", "prompt": "?",
         **({"source_id": f"h{i // per_question}"} if per_question else {}),
         "implicit_reward_correct": ok, "likelihood_correct": True} for i, ok in enumerate(right)])


def test_pairs_naming_their_question_are_resampled_by_question(tmp_path: Path) -> None:
    prompts, first, second = _two_runs(tmp_path)
    compare = _compare_runs()

    def interval(per_question: int) -> str:
        _pairs(first, [i < 30 for i in range(60)], per_question=per_question)
        _pairs(second, [i < 40 for i in range(60)], per_question=per_question)  # 10 more pairs right, all in a row
        rows = {key: diff for key, _, _, diff in compare.compare(first, second, "dpo", str(prompts))}
        return rows["implicit_reward_acc"]

    # as 60 independent pairs, 10 more right is a real gain; as 6 questions of 10 pairs that move together, one
    # question's worth of gain is not
    assert interval(0).endswith("better")
    assert interval(10).endswith("within noise")


def test_the_prompt_file_defaults_to_the_one_the_first_run_evaluated(tmp_path: Path) -> None:
    compare = _compare_runs()
    run = tmp_path / "run"
    assert compare.prompts_of(run) == "data/eval_prompts.jsonl"
    _write(run / "eval" / "manifest.json", [{"config": {"eval": {"prompts": "data/eval_prompts_large.jsonl"}}}])
    assert compare.prompts_of(run) == "data/eval_prompts_large.jsonl"


def test_preference_accuracy_is_compared_on_the_same_pairs_when_both_runs_ranked_them(tmp_path: Path) -> None:
    prompts, first, second = _two_runs(tmp_path)
    compare = _compare_runs()
    assert "implicit_reward_acc" not in {row[0] for row in compare.compare(first, second, "dpo", str(prompts))}
    _pairs(first, [i < 30 for i in range(60)])  # 50 % right
    _pairs(second, [True] * 60)  # every pair right: the 30 the first run got wrong among them
    rows = {key: (a, b, diff) for key, a, b, diff in compare.compare(first, second, "dpo", str(prompts))}
    a, b, diff = rows["implicit_reward_acc"]
    assert (a, b) == (pytest.approx(0.5), pytest.approx(1.0)) and diff.endswith("better")
    assert rows["likelihood_acc"][2].startswith("+0.000 [+0.000, +0.000]")
    assert rows["by_pairs/general/implicit_reward_acc"][:2] == (pytest.approx(0.5), pytest.approx(1.0))
    _pairs(second, [True] * 90)  # a run on a larger set of pairs: paired on the 60 both ranked
    assert {key: (a, b) for key, a, b, _ in compare.compare(first, second, "dpo", str(prompts))}[
        "implicit_reward_acc"] == (pytest.approx(0.5), pytest.approx(1.0))
    _pairs(first, [True] * 60 + [False] * 30)
    assert {key: (a, b) for key, a, b, _ in compare.compare(first, second, "dpo", str(prompts))}[
        "implicit_reward_acc"] == (pytest.approx(2 / 3), pytest.approx(1.0))
    assert {key: d for key, _, _, d in compare.compare(first, first, "dpo", str(prompts))}[
        "implicit_reward_acc"].startswith("+0.000 [+0.000, +0.000]")  # a run against itself
    _pairs(second, [True] * 60, prompt="another question {i}")
    with pytest.raises(SystemExit, match="different preference pairs"):
        compare.compare(first, second, "dpo", str(prompts))


def _heldout(run: Path, nll: list[float], text: str = "a{i}") -> None:
    _write(run / "eval" / "heldout_dpo.jsonl", [{"id": text.format(i=i), "logp": -x * 10, "tokens": 10}
                                                for i, x in enumerate(nll)])


def test_heldout_loss_is_compared_on_the_same_reference_answers_when_both_runs_scored_them(tmp_path: Path) -> None:
    prompts, first, second = _two_runs(tmp_path)
    compare = _compare_runs()
    assert "heldout_loss" not in {row[0] for row in compare.compare(first, second, "dpo", str(prompts))}
    _heldout(first, [2.0 + (i % 7) / 10 for i in range(50)])
    _heldout(second, [2.5 + (i % 7) / 10 for i in range(50)])  # every answer 0.5 nats per token less likely
    a, b, diff = {key: (a, b, d) for key, a, b, d in compare.compare(first, second, "dpo", str(prompts))}[
        "heldout_loss"]
    assert (a, b) == (pytest.approx(2.3, abs=0.01), pytest.approx(2.8, abs=0.01)) and diff.endswith("worse")
    _heldout(second, [2.5] * 50, text="b{i}")
    with pytest.raises(SystemExit, match="different reference answers"):
        compare.compare(first, second, "dpo", str(prompts))
