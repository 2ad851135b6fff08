"""The eval stage end to end on the tiny model, and the scoring it relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from pipeline.config import validate_recipe
from pipeline.data.formats import load_preference_examples
from pipeline.errors import PipelineError
from pipeline.evaluation import question_clusters, score_generations
from pipeline.runner import run_recipe

PROMPTS = [
    {"key": 1, "prompt": "Describe the sea. Answer in all lowercase letters.", "split": "seen", "source_id": "h1",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 2, "prompt": "Describe the sea. Do not use any commas.", "split": "unseen_phrasing", "source_id": "h1",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 3, "prompt": "Say hi. End your response with the exact phrase 'Is there anything else?'",
     "split": "seen", "source_id": "h2",
     "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Is there anything else?"}]},
]


def test_score_generations_counts_compliance_and_constraints():
    outputs = [
        {"text": "the sea is wide.", "stopped": True, "new_tokens": 5},
        {"text": "Apples, pears", "stopped": True, "new_tokens": 4},
        {"text": "Hi. Is there anything else?", "stopped": False, "new_tokens": 9},
    ]
    metrics = score_generations(PROMPTS, outputs)
    assert metrics["format_compliance"] == round(2 / 3, 4)
    assert metrics["prompt_level_strict"] == round(2 / 3, 4)
    assert metrics["per_type_strict"]["punctuation:no_comma"] == 0.0
    assert metrics["per_type_strict"]["change_case:english_lowercase"] == 1.0
    assert metrics["mean_new_tokens"] == 6.0



def test_score_generations_leaves_plain_prompts_out_of_the_constraint_accuracies():
    lowercase = {"prompt": "Say it in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
                 "kwargs": [{}]}
    plain = {"prompt": "Say anything.", "instruction_id_list": [], "kwargs": []}
    answers = [{"text": "Not lower.", "stopped": True, "new_tokens": 3}, {"text": "Any answer.", "stopped": True,
                                                                          "new_tokens": 3}]
    metrics = score_generations([lowercase, plain], answers)  # nothing asked of the plain one: not a pass
    assert metrics["prompt_level_strict"] == 0.0 and metrics["instruction_level_loose"] == 0.0
    assert metrics["format_compliance"] == 1.0
    only_plain = score_generations([plain, plain], [dict(a) for a in answers])
    assert {k: only_plain[k] for k in ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict",
                                       "instruction_level_loose", "per_type_strict")} == {
        "prompt_level_strict": None, "prompt_level_loose": None, "instruction_level_strict": None,
        "instruction_level_loose": None, "per_type_strict": {}}
    with pytest.raises(PipelineError, match="eval prompt file is not empty"):
        score_generations([], [])


ECHO_PROMPTS = [
    {"key": 1, "prompt": "What are the northern lights?\n\nAnswer with one of the following options: My answer is "
     "yes., My answer is no., My answer is maybe.", "split": "unseen_type", "source_id": "h1",
     "instruction_id_list": ["detectable_format:constrained_response"], "kwargs": [{}]},
    {"key": 2, "prompt": "Why is the Dead Sea so salty?\n\nFirst repeat the request word for word without change, then "
     "give your answer.", "split": "seen", "source_id": "h2",
     "instruction_id_list": ["combination:repeat_prompt"], "kwargs": [{"prompt_to_repeat": "Why is the Dead Sea so salty?"}]},
]


def test_an_answer_that_echoes_the_prompt_passes_ifeval_but_not_the_no_echo_diagnostic():
    from pipeline.evaluation import prompt_items

    echoed = [{"text": ECHO_PROMPTS[0]["prompt"] + "\nWhat are", "stopped": False, "new_tokens": 200},
              {"text": "Why is the Dead Sea so salty? It has no outlet.", "stopped": True, "new_tokens": 12}]
    followed = [{"text": "My answer is yes. They are light from the solar wind.", "stopped": True, "new_tokens": 12},
                dict(echoed[1])]
    base, trained = score_generations(ECHO_PROMPTS, echoed), score_generations(ECHO_PROMPTS, followed)
    assert base["prompt_level_strict"] == trained["prompt_level_strict"] == 1.0   # IFEval cannot tell them apart
    assert base["prompt_level_strict_no_echo"] == 0.5     # the echo's pass is not counted; asked-for repeat is
    assert trained["prompt_level_strict_no_echo"] == 1.0
    assert base["prompt_echo"] == 1.0 and trained["prompt_echo"] == 0.5 and echoed[1]["repeats_prompt"]
    items = prompt_items(ECHO_PROMPTS, echoed)
    assert items["by_split/unseen_type/prompt_level_strict"][0] == [1.0, 0.0]
    assert items["by_split/unseen_type/prompt_level_strict_no_echo"][0] == [0.0, 0.0]
    assert items["prompt_echo"][0] == [1.0, 1.0]


def test_eval_prompts_with_an_unknown_instruction_id_fail_before_any_generation(tmp_path):
    from pipeline.errors import DataError
    from pipeline.evaluation import load_prompts

    rows = [*PROMPTS, {"prompt": "Hi.", "instruction_id_list": ["language:response_dialect"], "kwargs": [{}]}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(DataError, match=r"prompts.jsonl:4: .*language:response_dialect.*Supported ids"):
        load_prompts(path)
    assert len(load_prompts(write_jsonl(tmp_path / "ok.jsonl", PROMPTS))) == 3
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\ufeff" + json.dumps(PROMPTS[0]) + "\n\n{not json\n", encoding="utf-8")  # BOM, blank line
    with pytest.raises(DataError, match=r"broken.jsonl:3: invalid JSON"):
        load_prompts(broken)


def test_a_bad_eval_prompt_file_stops_the_recipe_before_training(tiny_recipe, tmp_path):
    from pipeline.errors import DataError

    bad = [{"prompt": "Hi.", "instruction_id_list": ["no:such_check"], "kwargs": [{}]}]
    tiny_recipe["eval"] = {"prompts": str(write_jsonl(tmp_path / "bad.jsonl", bad)), "max_new_tokens": 4}
    with pytest.raises(DataError, match="bad.jsonl:1: Unknown instruction id 'no:such_check'"):
        run_recipe(validate_recipe(tiny_recipe), log=lambda _: None)
    tiny_recipe["eval"]["prompts"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="missing.jsonl: eval prompts file not found"):
        run_recipe(validate_recipe(tiny_recipe), log=lambda _: None)
    assert not (Path(tiny_recipe["output_dir"]) / "prepare").exists()  # nothing ran


def test_a_bad_eval_preference_file_stops_the_recipe_before_training(tiny_recipe, tmp_path):
    from pipeline.errors import DataError

    prompts = str(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS))
    tiny_recipe["eval"] = {"prompts": prompts, "preferences": str(tmp_path / "missing.jsonl")}
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        run_recipe(validate_recipe(tiny_recipe), log=lambda _: None)
    no_pairs = write_jsonl(tmp_path / "no_pairs.jsonl", [{"prompt": "Hi.", "chosen": "Hello."}])
    tiny_recipe["eval"]["preferences"] = str(no_pairs)
    with pytest.raises(DataError, match=r"no_pairs.jsonl:1: no usable rows.*preference row without rejected"):
        run_recipe(validate_recipe(tiny_recipe), log=lambda _: None)
    assert not (Path(tiny_recipe["output_dir"]) / "prepare").exists()  # nothing ran


PAIRS = [  # held-out preference pairs: two whose prompt carries a constraint, one without; two from one question
    {"prompt": "Describe the sea. Answer in all lowercase letters.", "chosen": "the sea is wide.",
     "rejected": "The Sea is wide.", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}],
     "source_id": "h1"},
    {"prompt": "Say hi. Do not use any commas.", "chosen": "Hi there.", "rejected": "Hi, there.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "source_id": "h2"},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Blue blue blue blue blue blue.", "source_id": "h2"},
]


def test_pairs_of_a_file_naming_their_questions_are_resampled_by_question(tmp_path):
    named = write_jsonl(tmp_path / "named.jsonl", PAIRS)
    pairs, _ = load_preference_examples([{"path": str(named)}], keep=("source_id",))
    assert question_clusters(pairs) == ["h1", "h2", "h2"]
    assert "source_id" not in load_preference_examples([{"path": str(named)}])[0][0]  # only when asked
    # a row without a name is its own unit; a duplicate pair is dropped and the others keep their names
    unnamed = {k: v for k, v in PAIRS[2].items() if k != "source_id"}
    partly = write_jsonl(tmp_path / "partly.jsonl", [PAIRS[0], PAIRS[0], PAIRS[1], unnamed])
    pairs, _ = load_preference_examples([{"path": str(partly)}], keep=("source_id",))
    assert question_clusters(pairs) == ["h1", "h2", 2]


def test_eval_stage_writes_report_metrics_and_plots(tiny_recipe, tmp_path):
    prompts = write_jsonl(tmp_path / "eval_prompts.jsonl", PROMPTS)
    tiny_recipe["eval"] = {"prompts": str(prompts), "max_new_tokens": 6, "batch_size": 2, "num_samples": 2,
                           "preferences": str(write_jsonl(tmp_path / "eval_pairs.jsonl", PAIRS))}
    recipe = validate_recipe(tiny_recipe)
    actions = {o.stage: o.action for o in run_recipe(recipe, log=lambda _: None)}
    assert actions == {"prepare": "ran", "sft": "ran", "dpo": "ran", "eval": "ran"}
    out = Path(tiny_recipe["output_dir"]) / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"base", "sft", "dpo"}
    for name in ("sft", "dpo"):
        assert 0.0 <= metrics[name]["implicit_reward_acc"] <= 1.0
        assert metrics[name]["heldout_loss"] > 0
    assert "implicit_reward_acc" not in metrics["base"]
    scored = {n: [json.loads(x) for x in (out / f"heldout_{n}.jsonl").read_text().splitlines()] for n in metrics}
    for name, rows in scored.items():  # each reference answer's score, for compare_runs: they add up to the loss
        loss = -sum(r["logp"] for r in rows) / sum(r["tokens"] for r in rows)
        assert loss == pytest.approx(metrics[name]["heldout_loss"], abs=1e-3)
        assert [r["id"] for r in rows] == [r["id"] for r in scored["base"]] and len({r["id"] for r in rows}) > 1
    # every metric has its interval; later models carry paired differences against earlier ones
    for name in ("base", "sft", "dpo"):
        low, high = metrics[name]["ci95"]["prompt_level_strict"]
        assert low <= metrics[name]["prompt_level_strict"] <= high
        assert metrics[name]["by_split"]["seen"]["prompts"] == 2
        assert metrics[name]["by_split"]["unseen_phrasing"]["prompts"] == 1
    assert set(metrics["dpo"]["vs"]) == {"base", "sft"} and set(metrics["sft"]["vs"]) == {"base"}
    step = metrics["dpo"]["vs"]["sft"]
    for key in ("format_compliance", "instruction_level_strict", "likelihood_acc", "heldout_loss"):
        assert step[key]["verdict"] in ("better", "worse", "within noise"), key
        assert step[key]["ci95"][0] <= step[key]["diff"] <= step[key]["ci95"][1]
    assert "prompt_level_strict" in step["by_split"]["seen"]
    assert "ci95" in metrics["sft"] and "implicit_reward_acc" in metrics["sft"]["ci95"]
    for name in ("sft", "dpo"):  # preference accuracy also per group of pairs, which add up to the whole
        groups = metrics[name]["by_pairs"]
        assert {k: g["pairs"] for k, g in groups.items()} == {"constraint": 2, "general": 1}
        whole = sum(g["implicit_reward_acc"] * g["pairs"] for g in groups.values()) / 3
        assert whole == pytest.approx(metrics[name]["implicit_reward_acc"], abs=1e-3)
    assert "by_pairs" not in metrics["base"]
    for name in ("sft", "dpo"):  # each pair's outcome, for a look at the misses and for compare_runs
        ranked = [json.loads(line) for line in (out / f"pairs_{name}.jsonl").read_text().splitlines()]
        assert [r["group"] for r in ranked] == ["constraint", "constraint", "general"]
        assert [r["source_id"] for r in ranked] == ["h1", "h2", "h2"]  # compare_runs resamples by them too
        assert len({r["id"] for r in ranked}) == 3
        right = sum(r["implicit_reward_correct"] for r in ranked) / 3
        assert right == pytest.approx(metrics[name]["implicit_reward_acc"], abs=1e-3)
    assert not (out / "pairs_base.jsonl").exists()
    for png in ("loss_curves.png", "comparison.png", "per_type.png"):
        assert (out / png).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| format_compliance |" in report and "**dpo**" in report
    assert "## Is each step a real gain?" in report and "sft → dpo" in report
    assert "## Seen and unseen constraints" in report and "unseen_phrasing" in report
    assert "## Preference pairs with and without constraints" in report and "| general | 1 |" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert "ci95" not in manifest["metrics"]["dpo"]  # the manifest keeps the headline numbers only
    rows = [json.loads(line) for line in (out / "generations_dpo.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["new_tokens"] <= 6 for r in rows)
    # re-running finds everything up to date
    assert {o.action for o in run_recipe(recipe, log=lambda _: None)} == {"skipped"}


def test_plain_prompts_without_instructions_are_scored_for_format_only(tiny_recipe, tmp_path):
    prompts = write_jsonl(tmp_path / "plain.jsonl", [{"key": 1, "prompt": "Describe the sea."},
                                                     {"key": 2, "prompt": "Say hi.", "instruction_id_list": [],
                                                      "kwargs": []}])
    tiny_recipe["eval"] = {"prompts": str(prompts), "max_new_tokens": 4, "batch_size": 2, "models": ["base", "sft"]}
    del tiny_recipe["dpo"]  # prepare, SFT, eval
    run_recipe(validate_recipe(tiny_recipe), log=lambda _: None)
    out = Path(tiny_recipe["output_dir"]) / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("base", "sft"):
        assert 0.0 <= metrics[name]["format_compliance"] <= 1.0
        assert metrics[name]["prompt_level_strict"] is None and metrics[name]["per_type_strict"] == {}
        assert metrics[name]["ci95"]["prompt_level_strict"] == [None, None]
    assert metrics["sft"]["vs"]["base"]["prompt_level_strict"]["diff"] is None
    report = (out / "report.md").read_text()
    assert "| prompt_level_strict | – | – |" in report
    assert (out / "comparison.png").stat().st_size > 1000


@pytest.mark.parametrize(("arch", "softcap"), [("llama", None), ("gemma3", None), ("gemma3", 30.0)],
                         ids=["llama-chunked-head", "gemma3-chunked-head", "gemma3-softcapped-own-forward"])
def test_completion_logps_equal_a_full_forward(tmp_path, arch, softcap):
    import torch
    from conftest import build_tiny_model
    from transformers import AutoModelForCausalLM

    from pipeline.config import MODEL_DEFAULTS
    from pipeline.evaluation import completion_logps
    from pipeline.lm_head import decoder_and_head
    from pipeline.models import load_tokenizer

    model_dir = build_tiny_model(tmp_path / "model", arch=arch)
    tokenizer = load_tokenizer({**MODEL_DEFAULTS, "name_or_path": str(model_dir), "chat_template": "chatml"})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.get_text_config().final_logit_softcapping = softcap  # softcapping: the model's own forward runs
    assert (decoder_and_head(model) is None) == (softcap is not None)
    prompt, answer = [{"role": "user", "content": "Say hi."}], [{"role": "assistant", "content": "hi there."}]
    logp, n = completion_logps(model, tokenizer, prompt, answer)
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"]
    start = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0, :-1].float(), -1)
    expected = sum(logps[i - 1, full[i]].item() for i in range(start, len(full)))
    assert n == len(full) - start
    assert abs(logp - expected) < 1e-4


def test_batched_completion_logps_match_scoring_each_pair_alone(tiny_model_dir):
    """Left padding, restarted positions and the kept-logits window must not change any row's score."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import MODEL_DEFAULTS
    from pipeline.evaluation import completion_logps_batched
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer({**MODEL_DEFAULTS, "name_or_path": str(tiny_model_dir), "chat_template": "chatml"})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    items = [
        ([{"role": "user", "content": "Say hi."}], [{"role": "assistant", "content": "hi."}]),
        ([{"role": "user", "content": "Describe the sea in a few words, please, and keep it short."}],
         [{"role": "assistant", "content": "Waves fold in silver light, quiet and wide and deep."}]),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
         [{"role": "assistant", "content": "An apple, which is a fruit that grows on a tree."}]),
    ]
    alone = [completion_logps_batched(model, tokenizer, [item], batch_size=1)[0] for item in items]
    batched = completion_logps_batched(model, tokenizer, items, batch_size=3)
    for (logp_a, n_a), (logp_b, n_b) in zip(alone, batched, strict=True):
        assert n_a == n_b
        assert abs(logp_a - logp_b) < 1e-4
    assert len({n for _, n in batched}) == 3  # the rows really had different completion lengths


def test_scoring_batches_stay_within_the_position_budget():
    """Rows x the batch's longest completion stay within MAX_SCORED_POSITIONS (the eval's logits memory);
    every row is scored once, in the order given."""
    from pipeline.evaluation import MAX_SCORED_POSITIONS, _position_batches

    lengths = [50] * 30 + [300] * 10 + [MAX_SCORED_POSITIONS + 5]
    order = list(range(len(lengths)))
    batches = _position_batches(order, lengths, batch_size=8)
    assert [i for batch in batches for i in batch] == order
    assert all(len(b) <= 8 for b in batches)
    assert all(len(b) * max(lengths[i] for i in b) <= MAX_SCORED_POSITIONS for b in batches if len(b) > 1)
    assert max(len(b) for b in batches if lengths[b[0]] == 300) == MAX_SCORED_POSITIONS // 300


def _tiny_generator(tiny_model_dir: Path) -> tuple:
    """The tiny model with weights drawn wide enough that greedy answers differ between prompts (its own
    initialisation repeats one token whatever the prompt), its tokenizer, five prompts, and plain ``generate``."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import MODEL_DEFAULTS
    from pipeline.models import configure_generation, load_tokenizer

    tokenizer = load_tokenizer({**MODEL_DEFAULTS, "name_or_path": str(tiny_model_dir), "chat_template": "chatml"})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 1.0)
    configure_generation(model, tokenizer)
    convs = [[{"role": "user", "content": text}] for text in
             ["Say hi.", "Describe the sea in a few words, please.", "Name a fruit.", "What is the capital of France?",
              "Write a short poem about the sea and the moon and the rain."]]

    def one_at_a_time(conv: list[dict], max_new_tokens: int) -> list[int]:
        ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens,
                             eos_token_id=None)
        return out[0, ids["input_ids"].shape[1]:].tolist()

    return model, tokenizer, convs, one_at_a_time


def _check_against(expected: list[list[int]], results: list[dict], stops: list[int], tokenizer) -> None:
    for tokens, result in zip(expected, results, strict=True):
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        kept = tokens[:cut] if cut is not None else tokens
        assert result["stopped"] == (cut is not None)
        assert result["new_tokens"] == len(kept)
        assert result["text"] == tokenizer.decode(kept, skip_special_tokens=True).strip()


def test_continuous_batching_generation_matches_greedy_generate_one_prompt_at_a_time(tiny_model_dir):
    """More prompts than slots (slots are refilled), mixed lengths: same tokens, same order, stops detected."""
    from pipeline.inference import generate

    model, tokenizer, convs, one_at_a_time = _tiny_generator(tiny_model_dir)
    expected = [one_at_a_time(c, 8) for c in convs]
    assert len({tuple(e) for e in expected}) == len(convs)  # the prompts really get different answers
    # Make the third token of the second answer a stop token: that answer must end there.
    stop = expected[1][2]
    stops = [*model.generation_config.eos_token_id, stop]
    model.generation_config.eos_token_id = stops
    results = generate(model, tokenizer, convs, max_new_tokens=8, batch_size=2)
    _check_against(expected, results, stops, tokenizer)
    assert results[1]["stopped"] and results[1]["new_tokens"] <= 2
    assert not all(r["stopped"] for r in results)  # and the stop did not end every answer


def test_continuous_batching_generation_of_answers_longer_than_a_cache_page(tiny_model_dir):
    """``generate`` sizes the KV cache for the batch; answers that span several cache pages stay exact."""
    from transformers import ContinuousBatchingConfig

    from pipeline.inference import generate

    model, tokenizer, convs, one_at_a_time = _tiny_generator(tiny_model_dir)
    page = ContinuousBatchingConfig().page_size
    expected = [one_at_a_time(c, page + 60) for c in convs[:3]]
    stops = list(model.generation_config.eos_token_id)
    results = generate(model, tokenizer, convs[:3], max_new_tokens=page + 60, batch_size=2)
    _check_against(expected, results, stops, tokenizer)
    assert max(r["new_tokens"] for r in results) > page


def test_continuous_batching_prefills_in_chunks_with_the_same_answers(tiny_model_dir, monkeypatch):
    """``MAX_BATCH_TOKENS`` caps the tokens of one forward (prompts are then prefilled over several): the memory
    fix for the quickstart's eval; the answers stay those of one prompt at a time."""
    from pipeline import inference

    model, tokenizer, convs, one_at_a_time = _tiny_generator(tiny_model_dir)
    expected = [one_at_a_time(c, 8) for c in convs]
    shortest = min(len(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)
                       ["input_ids"]) for c in convs)
    monkeypatch.setattr(inference, "MAX_BATCH_TOKENS", shortest // 2)  # every prompt needs two forwards or more
    results = inference.generate(model, tokenizer, convs, max_new_tokens=8, batch_size=3)
    _check_against(expected, results, list(model.generation_config.eos_token_id), tokenizer)


def test_padded_generation_matches_greedy_generate_one_prompt_at_a_time(tiny_model_dir):
    """Left-padded batches of mixed prompt lengths give each prompt its own greedy answer, in input order;
    a stop ends its answer while the rest of the batch decodes on."""
    from pipeline.inference import generate

    model, tokenizer, convs, one_at_a_time = _tiny_generator(tiny_model_dir)
    expected = [one_at_a_time(c, 8) for c in convs]
    stop = expected[3][4]
    stops = [*model.generation_config.eos_token_id, stop]
    model.generation_config.eos_token_id = stops
    results = generate(model, tokenizer, convs, max_new_tokens=8, batch_size=3, continuous=False)
    _check_against(expected, results, stops, tokenizer)
    assert results[3]["stopped"] and results[3]["new_tokens"] <= 4
    assert not all(r["stopped"] for r in results)


def test_eval_model_lists_are_checked(tiny_recipe, tmp_path):
    from pipeline.errors import PipelineError

    tiny_recipe["eval"] = {"prompts": "p.jsonl", "padded_batches": ["bsae"]}
    with pytest.raises(PipelineError, match=r"eval.padded_batches must be a list drawn from"):
        validate_recipe(tiny_recipe)
    tiny_recipe["eval"] = {"prompts": "p.jsonl", "models": ["sft", "dop"]}
    with pytest.raises(PipelineError, match=r"eval.models"):
        validate_recipe(tiny_recipe)
    tiny_recipe["eval"] = {"prompts": "p.jsonl", "models": ["sft"], "padded_batches": []}
    assert validate_recipe(tiny_recipe).eval["padded_batches"] == []
