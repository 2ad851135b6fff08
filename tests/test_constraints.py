"""Spec tests for pipeline.data.constraints: every registered type is checked, applied, described.

The parametrized tests run over the registry itself, so registering a new type without adding its
hand-written cases to ``CASES`` fails here.
"""

from __future__ import annotations

import itertools
import random
import re

import pytest

from pipeline.data import constraints as C
from pipeline.errors import PipelineError

REGISTRY = sorted(C.CONSTRAINTS) + sorted(C.TRAINING_ONLY)  # IFEval types, then the training-only ones

# Per type: kwargs, responses that pass and fail the strict check, and a response that fails strictly
# but passes loosely (None where no loose variant can rescue a response, e.g. too few highlights).
CASES: dict[str, dict] = {
    "length_constraints:number_words": {
        "kwargs": {"num_words": 5, "relation": "less than"},
        "pass": ["Paris is the capital.", "It's well-known."],
        "fail": ["Paris is the capital of France."],
        "loose": "Sure, here is my answer in brief:\nParis it is.",
    },
    "length_constraints:number_sentences": {
        "kwargs": {"num_sentences": 3, "relation": "less than"},
        "pass": ["It rains. Take an umbrella.", "See e.g. the forecast. It says rain."],
        "fail": ["It rains. Take an umbrella. Stay dry."],
        "loose": "Here is my answer. It is short.\nIt rains. Take an umbrella.",
    },
    "length_constraints:number_paragraphs": {
        "kwargs": {"num_paragraphs": 2},
        "pass": ["First part.\n\n***\n\nSecond part."],
        "fail": ["First part.\n\nSecond part.", "First part.\n\n***\n\n***\n\nSecond part."],
        "loose": "First part.\n***\nSecond part.\n***",
    },
    "detectable_format:number_bullet_lists": {
        "kwargs": {"num_bullets": 2},
        "pass": ["* one\n* two", "Intro:\n- one\n- two"],
        "fail": ["* one\n* two\n* three", "1. one\n2. two"],
        "loose": "Here you go:\n* one\n* two\n- not really a point",
    },
    "detectable_format:json_format": {
        "kwargs": {},
        "pass": ['{"answer": "yes"}', '```json\n{"a": 1}\n```'],
        "fail": ['Sure! {"answer": "yes"}', "{answer: yes}"],
        "loose": 'Here is the JSON:\n{"answer": "yes"}',
    },
    "detectable_format:title": {
        "kwargs": {},
        "pass": ["<<Rain>>\n\nIt rains.", "It rains. <<A late title>>"],
        "fail": ["# Rain\n\nIt rains.", "<<>> It rains."],
        "loose": None,
    },
    "detectable_format:number_highlighted_sections": {
        "kwargs": {"num_highlights": 2},
        "pass": ["*One.* and *two*.", "**Bold** counts, *so does this*."],
        "fail": ["*One.* and two.", "* one\n* two"],
        "loose": None,
    },
    "detectable_format:multiple_sections": {
        "kwargs": {"section_spliter": "Section", "num_sections": 2},
        "pass": ["Section 1\nA.\n\nSection 2\nB."],
        "fail": ["Section 1\nA.\n\nPart 2\nB.", "Section 1\nA and B."],
        "loose": "**Section 1**\nA.\n**Section 2**\nB.",
    },
    "change_case:english_lowercase": {
        "kwargs": {},
        "pass": ["all quiet here.", "it is 5 °c today."],
        "fail": ["All quiet here.", "1234"],
        "loose": "Sure! Here it is:\nall quiet here.",
    },
    "change_case:english_capital": {
        "kwargs": {},
        "pass": ["ALL QUIET HERE.", "IT IS 5 °C."],
        "fail": ["ALL QUIET here.", "1234"],
        "loose": "Here it is:\nALL QUIET HERE.",
    },
    "keywords:existence": {
        "kwargs": {"keywords": ["rain", "umbrella"]},
        "pass": ["Rain is coming, bring an umbrella.", "RAIN. UMBRELLA."],
        "fail": ["Rain is coming.", "Rainy days call for umbrellas."],
        "loose": None,
    },
    "keywords:forbidden_words": {
        "kwargs": {"forbidden_words": ["rain"]},
        "pass": ["Bring an umbrella; rainy days are common.", "It pours."],
        "fail": ["Rain is coming.", "Expect heavy rain."],
        "loose": "Rain incoming!\nBring an umbrella.",
    },
    "keywords:frequency": {
        "kwargs": {"keyword": "rain", "frequency": 2, "relation": "at least"},
        "pass": ["Rain, rain, go away.", "rain and more RAIN"],
        "fail": ["Rain, go away.", "Rain and rainbows."],
        "loose": None,
    },
    "startend:end_checker": {
        "kwargs": {"end_phrase": "Any other questions?"},
        "pass": ["It rains. Any other questions?", "It rains. any other questions?  \n"],
        "fail": ["It rains. Any other questions? Bye.", "It rains."],
        "loose": "It rains. Any other questions?\n(end of answer)",
    },
    "startend:quotation": {
        "kwargs": {},
        "pass": ['"It rains."', '  "It rains.\nIt pours."  '],
        "fail": ["It rains.", "'It rains.'", '"'],
        "loose": 'Answer:\n"It rains."',
    },
    "punctuation:no_comma": {
        "kwargs": {},
        "pass": ["It rains so bring a coat.", "It costs 1000 euros."],
        "fail": ["It rains, so bring a coat.", "It costs 1,000 euros."],
        "loose": "Sure, here:\nIt rains.",
    },
    "detectable_content:postscript": {
        "kwargs": {"postscript_marker": "P.S."},
        "pass": ["It rains.\n\nP.S. Bring a coat.", "It rains.\np.s. bring a coat."],
        "fail": ["It rains. PS bring a coat.", "It rains.\n\nNote: bring a coat."],
        "loose": "It rains.\n\n**P.S.** Bring a coat.",
    },
    "combination:repeat_prompt": {
        "kwargs": {"prompt_to_repeat": "Is it raining?"},
        "pass": ["Is it raining?\n\nYes.", "  is it raining? Yes."],
        "fail": ["You asked: Is it raining? Yes.", "Yes. Is it raining?"],
        "loose": "Sure.\nIs it raining?\nYes.",
    },
    "combination:two_responses": {
        "kwargs": {},
        "pass": ["Yes.\n******\nProbably yes."],
        "fail": ["Yes.\n******\nYes.", "Yes.\n---\nNo.", "Yes.\n******\nNo.\n******\nMaybe."],
        "loose": "Here are two:\nYes.\n******\nNo.\n******",
    },
    "length_constraints:nth_paragraph_first_word": {
        "kwargs": {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        "pass": ["It rains.\n\nHowever, the sun returns.", "It rains.\n  \n\"However\" is my word.",
                 "It rains.\n\n**However**, it stops."],
        "fail": ["It rains.\nHowever, the sun returns.", "However, it rains.\n\nThe sun returns.",
                 "It rains.\n\nHowever.\n\nAnd more."],
        "loose": "Here you go:\n\nIt rains.\n\nHowever, it stops.",
    },
    "detectable_format:constrained_response": {
        "kwargs": {},
        "pass": ["My answer is yes.", "Hard to say. My answer is maybe. It depends on the tide."],
        "fail": ["My answer is Yes.", "Yes.", "my answer is no."],
        "loose": None,
    },
    "change_case:capital_word_frequency": {
        "kwargs": {"capital_frequency": 2, "capital_relation": "at least"},
        "pass": ["This is VERY IMPORTANT.", "I said NO."],
        "fail": ["This is VERY important.", "Nothing Here Is Capitalised."],
        "loose": None,
    },
    "keywords:letter_frequency": {
        "kwargs": {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
        "pass": ["Zany zebras zoom.", "jazz fizz"],
        "fail": ["Zany zebras run.", "no such letter"],
        "loose": None,
    },
    "language:response_language": {
        "kwargs": {"language": "es"},
        "pass": ["El agua hierve a cien grados porque la presión del aire es la que hay en el nivel del mar.",
                 "Para dormir mejor, es importante tener un horario fijo y no usar pantallas antes de la cama."],
        "fail": ["Water boils at one hundred degrees because of the air pressure at sea level.",
                 "L'eau bout à cent degrés parce que la pression de l'air est celle du niveau de la mer.", "42"],
        "loose": "Here is the answer that you asked for, and it is in the language that you wanted to see:\n"
                 "El agua hierve a cien grados por la presión del aire.",
    },
    "detectable_content:number_placeholders": {
        "kwargs": {"num_placeholders": 2},
        "pass": ["Dear [name], see you on [date].", "Meet at [place] [time]."],
        "fail": ["Dear [name], see you soon.", "Dear [], see you on (date)."],
        "loose": None,
    },
    "training_only:start_phrase": {
        "kwargs": {"phrase": "In short:"},
        "pass": ["In short: it rains.", "  In short:\n\nIt rains."],
        "fail": ["It rains. In short:", "in short: it rains.", "In short it rains."],
        "loose": "Sure.\nIn short: it rains.",
    },
    "training_only:include_sentence": {
        "kwargs": {"sentence": "Keep this in mind."},
        "pass": ["It rains. Keep this in mind. Take a coat.", "Keep this in mind."],
        "fail": ["It rains. Keep in mind. Take a coat.", "It rains. keep this in mind. Take a coat."],
        "loose": None,
    },
    "training_only:answer_tags": {
        "kwargs": {"tag": "answer"},
        "pass": ["<answer>It rains.</answer>", "<answer>\nIt rains.\n</answer>\n"],
        "fail": ["[answer]It rains.[/answer]", "<answer>It rains.", "Sure: <answer>It rains.</answer>",
                 "<reply>It rains.</reply>"],
        "loose": "Here you go:\n<answer>It rains.</answer>",
    },
    "training_only:exclamation_count": {
        "kwargs": {"num_exclamations": 1},
        "pass": ["It rains! Take a coat.", "It rains. Take a coat!"],
        "fail": ["It rains. Take a coat.", "It rains! Take a coat!"],
        "loose": "Wow!\nIt rains! Take a coat.",
    },
    "training_only:closing_question": {
        "kwargs": {},
        "pass": ["It rains. Does that help?", "It rains.\n\nShall I say more?  "],
        "fail": ["Does that help? It rains.", "It rains."],
        "loose": "It rains. Does that help?\nThanks.",
    },
}

# Every phrasing of a type must mention what the constraint is about (its number, word, phrase, ...).
DESCRIBE_MUST_MENTION = {
    "detectable_format:json_format": r"JSON",
    "detectable_format:title": r"<<",
    "change_case:english_lowercase": r"lowercase|capital letters",
    "change_case:english_capital": r"capital|uppercase",
    "startend:quotation": r"quot",
    "punctuation:no_comma": r"comma",
    "combination:repeat_prompt": r"request",
    "combination:two_responses": r"\*{6}",
    "detectable_format:constrained_response": r"My answer is yes\..*My answer is no\..*My answer is maybe\.",
    "change_case:capital_word_frequency": r"capital|caps|uppercase",
    "language:response_language": r"Spanish",
}

# Answers (with the prompt they answer) that apply() must make compliant.
ANSWERS = [
    ("Why is the sky blue?",
     "Sunlight contains all colours, and air molecules scatter short blue wavelengths much more than red ones. "
     "That scattered blue light reaches your eyes from every direction, e.g. when you look up at noon. "
     "At sunset the light crosses more air, so the blue is scattered away and reds remain."),
    ("How do I change a flat bicycle tyre?",
     "You will need tyre levers and a new tube.\n1. Take the wheel off the bike.\n2. Lever one side of the tyre "
     "off the rim and pull out the old tube.\n3. Fit the new tube, push the tyre back on and pump it up."),
    ("What is the capital of Australia?",
     "Canberra is the capital of Australia. It became the seat of government in 1927, as a compromise "
     "between Sydney and Melbourne."),
    ("Give me three ideas for a rainy afternoon.",
     "- Bake bread together and eat it warm\n- Build a blanket fort and read comics inside\n"
     "- Hold a board game tournament with silly prizes"),
    ("How can I sleep better?",
     "Keep a regular schedule, going to bed and getting up at the same time every day. A cool, dark and quiet "
     "bedroom helps.\n\nCut caffeine after lunch and avoid screens in the last hour before bed. If you cannot "
     "sleep after twenty minutes, get up and do something calm until you feel sleepy."),
    ("What is 12 times 7?", "12 × 7 = 84."),
    ("How do I reverse a list in Python?",
     "Use slicing or the built-in method:\n\n```python\nitems = [1, 2, 3]\nprint(items[::-1])\nitems.reverse()\n```"
     "\n\nSlicing returns a new list, while `reverse()` changes the list in place."),
]
SEEDS = range(4)


def _applicable_cases(instruction_id: str):
    for (prompt, answer), seed in itertools.product(ANSWERS, SEEDS):
        if C.is_applicable(instruction_id, answer):
            yield prompt, answer, seed


def _assert_check_only(instruction_id: str) -> None:
    prompt, answer = ANSWERS[0]
    kwargs = C.sample_kwargs(instruction_id, answer, random.Random(0), prompt)
    assert not C.is_applicable(instruction_id, answer)
    with pytest.raises(PipelineError, match="check-only.*evaluation prompts only"):
        C.apply(instruction_id, answer, kwargs, prompt)
    with pytest.raises(PipelineError, match="check-only"):
        C.near_miss(instruction_id, answer, kwargs)


def test_check_only_types_refuse_to_rewrite_and_are_never_applicable():
    assert [t for t in REGISTRY if not C.can_rewrite(t)] == ["language:response_language"]
    _assert_check_only("language:response_language")


@pytest.mark.parametrize("instruction_id", REGISTRY)
def test_strict_check_accepts_compliant_responses(instruction_id):
    case = CASES[instruction_id]
    for response in case["pass"]:
        assert C.check(instruction_id, response, case["kwargs"]), response


@pytest.mark.parametrize("instruction_id", REGISTRY)
def test_strict_check_rejects_violating_responses(instruction_id):
    case = CASES[instruction_id]
    for response in case["fail"]:
        assert not C.check(instruction_id, response, case["kwargs"]), response


@pytest.mark.parametrize("instruction_id", REGISTRY)
def test_loose_check_rescues_framing_lines_and_markdown_but_strict_does_not(instruction_id):
    case = CASES[instruction_id]
    if case["loose"] is None:  # declared not meaningful: loose must still reject every failing case
        assert not any(C.check_loose(instruction_id, r, case["kwargs"]) for r in case["fail"])
        return
    assert not C.check(instruction_id, case["loose"], case["kwargs"])
    assert C.check_loose(instruction_id, case["loose"], case["kwargs"])


@pytest.mark.parametrize("instruction_id", REGISTRY)
def test_apply_output_passes_check_for_sampled_kwargs(instruction_id):
    if not C.can_rewrite(instruction_id):
        _assert_check_only(instruction_id)
        return
    cases = list(_applicable_cases(instruction_id))
    assert len(cases) >= 8, "too few applicable answers to test this type; add answers to ANSWERS"
    for prompt, answer, seed in cases:
        kwargs = C.sample_kwargs(instruction_id, answer, random.Random(seed), prompt)
        out = C.apply(instruction_id, answer, kwargs, prompt)
        assert C.check(instruction_id, out, kwargs), (kwargs, out)


@pytest.mark.parametrize("instruction_id", REGISTRY)
def test_near_miss_fails_check(instruction_id):
    for prompt, answer, seed in _applicable_cases(instruction_id):
        kwargs = C.sample_kwargs(instruction_id, answer, random.Random(seed), prompt)
        miss = C.near_miss(instruction_id, answer, kwargs)
        if instruction_id == "change_case:english_capital" and C.count_sentences(answer) < 2:
            continue  # no second sentence to leave in lower case
        assert not C.check(instruction_id, miss, kwargs), (kwargs, miss)


@pytest.mark.parametrize("instruction_id", REGISTRY)
def test_apply_is_deterministic(instruction_id):
    if not C.can_rewrite(instruction_id):
        return  # nothing to apply: see test_check_only_types_refuse_to_rewrite_and_are_never_applicable
    prompt, answer, seed = next(_applicable_cases(instruction_id))
    kwargs = C.sample_kwargs(instruction_id, answer, random.Random(seed), prompt)
    assert C.sample_kwargs(instruction_id, answer, random.Random(seed), prompt) == kwargs
    assert C.apply(instruction_id, answer, kwargs, prompt) == C.apply(instruction_id, answer, kwargs, prompt)


@pytest.mark.parametrize("instruction_id", REGISTRY)
def test_describe_mentions_key_parameter_in_every_phrasing(instruction_id):
    kwargs = CASES[instruction_id]["kwargs"]
    phrasings = {C.describe(instruction_id, kwargs, i) for i in range(len(C.phrasing_templates(instruction_id, kwargs)))}
    assert len(phrasings) >= 6, "each type needs at least six phrasings (build_data holds some out of training)"
    for text in phrasings:
        for name, value in kwargs.items():
            if name in ("relation", "let_relation", "capital_relation", "prompt_to_repeat", "language"):
                # phrased in words / is the prompt itself / named, not coded
                continue
            for item in value if isinstance(value, list) else [value]:
                assert str(item) in text, (item, text)
        if instruction_id in DESCRIBE_MUST_MENTION:
            assert re.search(DESCRIBE_MUST_MENTION[instruction_id], text, re.I), text


def test_describe_picks_phrasing_deterministically_from_rng():
    kwargs = {"num_words": 40, "relation": "at least"}
    first = [C.describe("length_constraints:number_words", kwargs, random.Random(s)) for s in range(10)]
    again = [C.describe("length_constraints:number_words", kwargs, random.Random(s)) for s in range(10)]
    assert first == again and len(set(first)) > 1
    assert C.describe("length_constraints:number_words", kwargs) == first[0] or "40" in first[0]


def test_no_comma_rejects_response_with_comma():
    assert not C.check("punctuation:no_comma", "Yes, it does.", {})


def test_number_words_at_least_counts_contractions_and_hyphenated_words_once():
    kwargs = {"num_words": 4, "relation": "at least"}
    assert C.count_words("It's a well-known fact.") == 4
    assert C.check("length_constraints:number_words", "It's a well-known fact.", kwargs)
    assert not C.check("length_constraints:number_words", "It's well-known.", kwargs)


def test_sentence_count_ignores_abbreviations_decimals_list_markers_and_titles():
    text = "<<Title>>\nPi is about 3.14, e.g. in circles.\n1. First step.\n2. Second step!\n***\nP.S. Done."
    assert C.split_sentences(text) == ["Pi is about 3.14, e.g. in circles.", "First step.", "Second step!",
                                       "P.S. Done."]


def test_number_words_apply_cuts_at_a_sentence_boundary():
    answer = ANSWERS[0][1]
    out = C.apply("length_constraints:number_words", answer, {"num_words": 40, "relation": "less than"})
    assert C.count_words(out) < 40 and out.endswith(".") and answer.startswith(out)


def test_sampled_less_than_word_limit_binds_on_the_original_answer():
    answer = ANSWERS[0][1]
    for seed in range(20):
        kwargs = C.sample_kwargs("length_constraints:number_words", answer, random.Random(seed))
        if kwargs["relation"] == "less than":
            assert not C.check("length_constraints:number_words", answer, kwargs)


def test_loose_variants_drop_first_and_last_lines_and_asterisks():
    variants = C.loose_variants("Intro\n*body*\nOutro")
    assert {"Intro\n*body*\nOutro", "*body*\nOutro", "Intro\n*body*", "*body*", "body"} <= set(variants)


def test_repeat_prompt_check_falls_back_to_the_prompt_argument():
    assert C.check("combination:repeat_prompt", "Is it raining? Yes.", {}, prompt="Is it raining?")


def test_incompatible_pairs_are_declared_symmetrically():
    assert not C.compatible(["change_case:english_lowercase", "change_case:english_capital"])
    assert not C.compatible(["change_case:english_capital", "change_case:english_lowercase"])
    assert not C.compatible(["detectable_format:json_format", "detectable_format:number_bullet_lists"])
    assert not C.compatible(["startend:quotation", "startend:end_checker"])
    assert not C.compatible(["punctuation:no_comma", "punctuation:no_comma"])
    assert C.compatible(["punctuation:no_comma", "change_case:english_lowercase"])


def test_every_compatible_pair_can_be_satisfied_together():
    unsatisfied = []
    for a, b in itertools.combinations(REGISTRY, 2):
        if not C.compatible([a, b]):
            continue
        ok = False
        for (prompt, answer), seed in itertools.product(ANSWERS, SEEDS):
            if not (C.is_applicable(a, answer) and C.is_applicable(b, answer)):
                continue
            rng = random.Random(seed)
            kwargs = [C.sample_kwargs(t, answer, rng, prompt) for t in (a, b)]
            out = C.apply_all(answer, [a, b], kwargs, prompt)
            if C.evaluate_response(out, [a, b], kwargs, prompt)["prompt_strict"]:
                ok = True
                break
        if not ok:
            unsatisfied.append((a, b))
    assert unsatisfied == [], "declare these pairs in _CONFLICT_LIST or make apply() compose"


def test_training_only_types_are_asked_alone_and_never_in_the_ifeval_registry():
    for extra in C.TRAINING_ONLY:
        assert extra not in C.CONSTRAINTS and C.compatible([extra])
        assert not any(C.compatible([extra, other]) for other in REGISTRY if other != extra)


def test_apply_all_with_miss_breaks_only_the_named_constraint():
    prompt, answer = ANSWERS[0]
    ids = ["change_case:english_lowercase", "startend:end_checker"]
    kwargs = [{}, {"end_phrase": "Hope this helps!"}]
    rejected = C.apply_all(answer, ids, kwargs, prompt, miss="startend:end_checker")
    result = C.evaluate_response(rejected, ids, kwargs, prompt)
    assert result["strict"] == [True, False] and not result["prompt_strict"]


def test_evaluate_response_reports_strict_loose_and_prompt_level():
    response = "Here you go:\nrain, rain, go away."
    ids = ["change_case:english_lowercase", "keywords:frequency"]
    kwargs = [{}, {"keyword": "rain", "frequency": 2, "relation": "at least"}]
    result = C.evaluate_response(response, ids, kwargs, prompt="Sing about rain.")
    assert result["strict"] == [False, True] and result["loose"] == [True, True]
    assert not result["prompt_strict"] and result["prompt_loose"]


def test_an_empty_response_follows_no_instruction_strictly_or_loosely():
    result = C.evaluate_response("  \n", ["punctuation:no_comma", "length_constraints:number_words"],
                                 [{}, {"num_words": 5, "relation": "less than"}])
    assert result["strict"] == [False, False] and result["loose"] == [False, False]


def test_evaluate_response_ignores_null_kwargs_as_in_ifeval_files():
    kwargs = [{"num_bullets": 2, "keywords": None, "relation": None}]
    result = C.evaluate_response("* a\n* b", ["detectable_format:number_bullet_lists"], kwargs)
    assert result["prompt_strict"]


def test_unknown_instruction_id_raises_pipeline_error_listing_supported_ids():
    with pytest.raises(PipelineError, match="Supported ids: .*punctuation:no_comma"):
        C.check("language:response_dialect", "Hola", {"language": "es"})


def test_missing_kwarg_raises_pipeline_error_naming_it():
    with pytest.raises(PipelineError, match="num_bullets"):
        C.check("detectable_format:number_bullet_lists", "* a", {})
    with pytest.raises(PipelineError, match="num_words"):
        C.describe("length_constraints:number_words", {"relation": "at least"})


def test_mismatched_instruction_and_kwargs_lengths_raise():
    with pytest.raises(PipelineError, match="kwargs"):
        C.evaluate_response("x", ["punctuation:no_comma"], [])


def test_registry_has_at_least_sixteen_types_with_ifeval_style_ids():
    assert len(C.CONSTRAINTS) >= 16
    assert all(re.fullmatch(r"[a-z_]+:[a-z_]+", i) and C.CONSTRAINTS[i].instruction_id == i for i in C.CONSTRAINTS)


# Short answers as a model writes them (hand-written for these tests), one per language the detector knows.
LANGUAGE_SAMPLES = {
    "en": "The best way to learn a language is to use it every day, even when you make mistakes.",
    "es": "La mejor manera de aprender un idioma es usarlo todos los días, aunque cometas errores.",
    "fr": "La meilleure façon d'apprendre une langue est de la parler tous les jours, même avec des erreurs.",
    "de": "Der beste Weg, eine Sprache zu lernen, ist sie jeden Tag zu benutzen, auch wenn man Fehler macht.",
    "it": "Il modo migliore per imparare una lingua è usarla ogni giorno, anche quando si fanno errori.",
    "pt": "A melhor maneira de aprender uma língua é usá-la todos os dias, mesmo quando se cometem erros.",
    "nl": "De beste manier om een taal te leren is om die elke dag te gebruiken, ook als je fouten maakt.",
    "ru": "Лучший способ выучить язык — пользоваться им каждый день.",
    "ja": "言語を学ぶ一番の方法は、毎日使うことです。",
    "zh": "学习语言最好的方法是每天使用它。",
}


@pytest.mark.parametrize("language", sorted(LANGUAGE_SAMPLES))
def test_language_detector_names_the_language_of_a_one_sentence_answer(language):
    assert C.detect_language(LANGUAGE_SAMPLES[language]) == language


def test_language_detector_says_unknown_without_enough_evidence():
    assert C.detect_language("42 + 17 = 59") == "unknown"
    assert C.detect_language("Paris. Madrid. Berlin.") == "unknown"  # names only: no function words
    assert C.detect_language("") == "unknown"


def test_response_language_check_follows_the_requested_language_code():
    spanish = LANGUAGE_SAMPLES["es"]
    assert C.check("language:response_language", spanish, {"language": "es"})
    assert not C.check("language:response_language", spanish, {"language": "pt"})
    assert "Spanish" in C.describe("language:response_language", {"language": "es"})


def test_every_type_has_six_phrasings_per_variant_with_only_known_fields():
    for instruction_id in REGISTRY:
        templates = C.all_templates(instruction_id)
        for variant in {v for v, _, _ in templates}:
            assert sum(v == variant for v, _, _ in templates) >= 6, (instruction_id, variant)
        assert len({t for _, _, t in templates}) == len(templates), instruction_id  # no duplicate wording


def test_registry_covers_all_25_ifeval_instruction_types():
    ifeval = {"keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
              "language:response_language", "length_constraints:number_sentences",
              "length_constraints:number_paragraphs", "length_constraints:number_words",
              "length_constraints:nth_paragraph_first_word", "detectable_content:number_placeholders",
              "detectable_content:postscript", "detectable_format:number_bullet_lists",
              "detectable_format:constrained_response", "detectable_format:number_highlighted_sections",
              "detectable_format:multiple_sections", "detectable_format:json_format", "detectable_format:title",
              "combination:two_responses", "combination:repeat_prompt", "startend:end_checker", "startend:quotation",
              "change_case:capital_word_frequency", "change_case:english_capital", "change_case:english_lowercase",
              "punctuation:no_comma"}
    assert set(C.CONSTRAINTS) == ifeval
