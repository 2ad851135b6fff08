"""Bootstrap intervals and paired comparisons (pipeline.bootstrap, pipeline.evaluation, pipeline.eval_report)."""

from __future__ import annotations

import math
import random

import pytest

from pipeline.bootstrap import Estimate, Resamples, cluster_index, per_cluster, verdict
from pipeline.errors import PipelineError
from pipeline.eval_report import format_difference, format_value, render_report
from pipeline.evaluation import (
    bootstrap_metrics,
    interval_summary,
    nest,
    pair_groups,
    pair_items,
    prompt_items,
    question_clusters,
)


def coin(n: int, p: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.random() < p) for _ in range(n)]


def test_interval_of_a_proportion_matches_the_normal_approximation():
    n, values = 400, coin(400, 0.4, seed=1)
    estimate = Resamples(n).ratio(values, [1.0] * n)
    p = sum(values) / n
    half_width = 1.96 * math.sqrt(p * (1 - p) / n)
    assert estimate.value == pytest.approx(p)
    assert estimate.low < p < estimate.high
    assert (estimate.high - estimate.low) / 2 == pytest.approx(half_width, rel=0.15)


def test_resamples_are_deterministic_for_a_seed_and_differ_between_seeds():
    values, ones = coin(100, 0.5, seed=2), [1.0] * 100
    assert Resamples(100, seed=0).ratio(values, ones) == Resamples(100, seed=0).ratio(values, ones)
    assert Resamples(100, seed=0).ratio(values, ones) != Resamples(100, seed=1).ratio(values, ones)


def test_paired_difference_sees_a_small_consistent_gain_that_separate_intervals_cannot():
    # The later model passes every prompt the earlier one passes, plus 12 more out of 200.
    n = 200
    earlier = coin(n, 0.4, seed=3)
    failed = [i for i, v in enumerate(earlier) if not v]
    later = list(earlier)
    for i in failed[:12]:
        later[i] = 1.0
    ones = [1.0] * n
    draws = Resamples(n)
    first, second = draws.ratio(earlier, ones), draws.ratio(later, ones)
    assert second.low < first.high  # the two intervals overlap ...
    difference = draws.difference((earlier, ones), (later, ones))
    assert difference.value == pytest.approx(12 / n)
    assert difference.low > 0  # ... but the paired difference excludes zero
    assert verdict(difference) == "better"


def test_identical_models_differ_by_exactly_zero_within_noise():
    values, ones = coin(50, 0.5, seed=4), [1.0] * 50
    difference = Resamples(50).difference((values, ones), (values, ones))
    assert (difference.value, difference.low, difference.high) == (0.0, 0.0, 0.0)
    assert verdict(difference) == "within noise"


def test_verdict_follows_the_direction_of_the_metric():
    lower = Estimate(-0.2, -0.3, -0.1)
    assert verdict(lower) == "worse"
    assert verdict(lower, higher_is_better=False) == "better"  # e.g. held-out loss went down
    assert verdict(lower, higher_is_better=None) == "lower"
    assert verdict(Estimate(0.1, -0.01, 0.2)) == "within noise"


def test_instruction_level_accuracy_resamples_prompts_not_instructions():
    # Ten prompts of ten instructions each, all passed or all failed: as many independent units as prompts,
    # so the interval must be as wide as a prompt-level one, not as narrow as 100 independent instructions.
    passed = [float(i % 2) * 10 for i in range(10)]
    counts = [10.0] * 10
    clustered = Resamples(10).ratio(passed, counts)
    flat = Resamples(100).ratio([float(i // 10 % 2) for i in range(100)], [1.0] * 100)
    assert clustered.value == flat.value == 0.5
    assert (clustered.high - clustered.low) > 2 * (flat.high - flat.low)


def test_cluster_index_groups_items_and_sums_their_values():
    index, n = cluster_index(["q1", "q1", "q2", "q3", "q2"])
    assert (index, n) == ([0, 0, 1, 2, 1], 3)
    assert per_cluster([1, 0, 1, 1, 1], index, n) == [1.0, 2.0, 1.0]


def test_resamples_reject_empty_sets_and_mismatched_lengths():
    with pytest.raises(PipelineError, match="empty evaluation set"):
        Resamples(0)
    with pytest.raises(PipelineError, match="3 per-cluster values for 4 clusters"):
        Resamples(4).ratio([1, 0, 1], [1, 1, 1])


def test_a_subgroup_absent_from_every_item_has_no_value_and_no_interval():
    estimate = Resamples(5).ratio([0.0] * 5, [0.0] * 5)
    assert all(math.isnan(x) for x in (estimate.value, estimate.low, estimate.high))


PROMPTS = [
    {"key": 1, "source_id": "h1", "split": "seen", "instruction_id_list": ["punctuation:no_comma"], "prompt": "A?"},
    {"key": 2, "source_id": "h1", "split": "unseen_type", "prompt": "B?",
     "instruction_id_list": ["keywords:letter_frequency", "punctuation:no_comma"]},
    {"key": 3, "source_id": "h2", "split": "seen", "instruction_id_list": ["punctuation:no_comma"], "prompt": "C?"},
]


def outputs(strict: list[list[bool]], stopped: list[bool]) -> list[dict]:
    return [{"text": "x", "stopped": s, "new_tokens": 10, "constraints_strict": c, "constraints_loose": c}
            for c, s in zip(strict, stopped, strict=True)]


def test_prompt_items_count_prompts_instructions_types_and_splits():
    items = prompt_items(PROMPTS, outputs([[True], [False, True], [False]], [True, True, False]))
    assert items["prompt_level_strict"] == ([1.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert items["instruction_level_strict"] == ([1.0, 1.0, 0.0], [1.0, 2.0, 1.0])
    assert items["format_compliance"] == ([1.0, 1.0, 0.0], [1.0, 1.0, 1.0])
    assert items["per_type_strict/punctuation:no_comma"] == ([1.0, 1.0, 0.0], [1.0, 1.0, 1.0])
    assert items["by_split/seen/prompt_level_strict"] == ([1.0, 0.0, 0.0], [1.0, 0.0, 1.0])
    assert items["by_split/unseen_type/instruction_level_strict"] == ([0.0, 1.0, 0.0], [0.0, 2.0, 0.0])
    assert question_clusters(PROMPTS) == ["h1", "h1", "h2"]


def test_bootstrap_metrics_give_every_model_intervals_and_every_later_model_paired_differences():
    base = prompt_items(PROMPTS, outputs([[False], [False, False], [False]], [False, False, False]))
    sft = prompt_items(PROMPTS, outputs([[True], [False, True], [True]], [True, True, True]))
    intervals, differences = bootstrap_metrics([(question_clusters(PROMPTS), {"base": base, "sft": sft})],
                                               ["base", "sft"])
    assert intervals["sft"]["format_compliance"].value == 1.0
    assert set(differences) == {("base", "sft")}
    summary = interval_summary(intervals["sft"], {"base": differences[("base", "sft")]})
    assert summary["ci95"]["format_compliance"] == [1.0, 1.0]
    assert summary["by_split"]["seen"]["prompt_level_strict"] == 1.0
    assert summary["vs"]["base"]["format_compliance"]["diff"] == 1.0
    assert summary["vs"]["base"]["format_compliance"]["verdict"] == "better"
    assert "punctuation:no_comma" in summary["vs"]["base"]["per_type_strict"]


def test_nest_turns_slash_keys_back_into_the_metrics_json_shape():
    assert nest({"a": 1, "b/c/d": 2, "b/e": 3}) == {"a": 1, "b": {"c": {"d": 2}, "e": 3}}


def test_report_formats_rates_in_percent_and_states_each_step_in_words(tmp_path):
    assert format_value("prompt_level_strict", 0.4, [0.3, 0.5]) == "40.0 % [30.0, 50.0]"
    assert format_value("heldout_loss", 1.23456, [1.2, 1.3]) == "1.235 [1.200, 1.300]"
    assert format_difference("prompt_level_strict", {"diff": 0.05, "ci95": [-0.01, 0.11], "verdict": "within noise"}
                             ) == "+5.0 [-1.0, +11.0] **within noise**"
    metrics = {
        "base": {"prompt_level_strict": 0.2, "ci95": {"prompt_level_strict": [0.1, 0.3]},
                 "by_split": {"seen": {"prompts": 2, "prompt_level_strict": 0.2}}},
        "sft": {"prompt_level_strict": 0.5, "ci95": {"prompt_level_strict": [0.4, 0.6]},
                "by_split": {"seen": {"prompts": 2, "prompt_level_strict": 0.6}},
                "vs": {"base": {"prompt_level_strict": {"diff": 0.3, "ci95": [0.2, 0.4], "verdict": "better"},
                                "by_split": {"seen": {"prompt_level_strict": {"diff": 0.4, "ci95": [-0.1, 0.9],
                                                                              "verdict": "within noise"}}}}}},
    }
    prompts = [{"prompt": "Hi.", "source_id": "h1"}, {"prompt": "Yo.", "source_id": "h1"}]
    report = render_report(metrics, prompts, tmp_path, samples=0)
    assert "| prompt_level_strict | 20.0 % [10.0, 30.0] | 50.0 % [40.0, 60.0] |" in report
    assert "2 held-out prompts built from 1 held-out questions" in report
    assert "base → sft, prompt_level_strict: +30.0 [+20.0, +40.0]: a real gain" in report
    assert "on seen prompts: +40.0 [-10.0, +90.0]: within noise" in report


PAIRS = [{"constraints": '{"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}'}, {"constraints": None},
         {"constraints": '{"instruction_id_list": [], "kwargs": []}'},
         {"constraints": '{"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}'}]


def test_pair_items_split_preference_accuracy_into_constraint_and_general_pairs():
    # (chosen, rejected) log-probs: the policy raises chosen over its reference on pairs 0 and 2 only
    policy = [(-10.0, -12.0), (-20.0, -15.0), (-5.0, -9.0), (-30.0, -29.0)]
    reference = [(-11.0, -11.0), (-20.0, -20.0), (-6.0, -6.0), (-30.0, -30.0)]
    groups = pair_groups(PAIRS)
    assert groups == ["constraint", "general", "general", "constraint"]
    items = pair_items(policy, reference, groups)
    assert items["implicit_reward_acc"] == ([1.0, 0.0, 1.0, 0.0], [1.0] * 4)
    assert items["by_pairs/constraint/implicit_reward_acc"] == ([1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0])
    assert items["by_pairs/general/likelihood_acc"] == ([0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0])
    # one group only: nothing to split
    assert set(pair_items(policy, reference, ["general"] * 4)) == {"implicit_reward_acc", "likelihood_acc"}
    intervals, differences = bootstrap_metrics([(list(range(4)), {"sft": items, "dpo": items})], ["sft", "dpo"])
    summary = interval_summary(intervals["dpo"], {"sft": differences[("sft", "dpo")]})
    assert summary["by_pairs"] == {"constraint": {"implicit_reward_acc": 0.5, "likelihood_acc": 0.5},
                                   "general": {"implicit_reward_acc": 0.5, "likelihood_acc": 0.5}}
    assert summary["vs"]["sft"]["by_pairs"]["general"]["implicit_reward_acc"]["diff"] == 0.0
    assert "by_split" not in summary


def test_report_shows_preference_accuracy_per_pair_group_for_the_trained_models(tmp_path):
    def model(acc: float) -> dict:
        return {"implicit_reward_acc": acc, "by_pairs": {"constraint": {"pairs": 30, "implicit_reward_acc": acc},
                                                         "general": {"pairs": 30, "implicit_reward_acc": 1.0}},
                "ci95": {"by_pairs": {"constraint": {"implicit_reward_acc": [acc - 0.1, acc + 0.1]}}}}

    metrics = {"base": {"prompt_level_strict": 0.2}, "sft": model(0.8), "dpo": model(0.9)}
    metrics["dpo"]["vs"] = {"sft": {"by_pairs": {"constraint": {"implicit_reward_acc": {
        "diff": 0.1, "ci95": [0.0, 0.2], "verdict": "within noise"}}}}}
    report = render_report(metrics, [{"prompt": "Hi."}], tmp_path, samples=0)
    assert "| group | pairs | metric | sft | dpo | sft → dpo |" in report
    assert ("| constraint | 30 | implicit_reward_acc | 80.0 % [70.0, 90.0] | 90.0 % [80.0, 100.0] | "
            "+10.0 [+0.0, +20.0] **within noise** |") in report
    assert "| general | 30 | implicit_reward_acc | 100.0 % | 100.0 % | – |" in report
