"""Build the derived datasets shipped in data/ from the hand-written ones (deterministic, seed 0).

Where it sits: offline, before any recipe runs. Inputs are the hand-written training conversations
``data/instructions.jsonl`` and the held-out ``data/heldout_prompts.jsonl``; outputs are

- ``sft_constraints.jsonl``   single-turn SFT examples whose prompt carries 1-2 verifiable constraints and
                              whose answer was transformed to satisfy them (``pipeline.data.constraints``);
- ``preferences.jsonl``       TRL conversational preference pairs from training prompts: constraint pairs
                              (chosen complies; rejected is the plain answer or a near miss), quality
                              pairs (correct vs wrong, answers vs rambles, stops vs runs on) and loop
                              pairs (a compliant answer vs the same answer degenerating into a repeated
                              line or marker, the way a small model fails under greedy decoding);
- ``preferences_quickstart.jsonl``  the quickstart's DPO mix, rows of ``preferences.jsonl``: constraint pairs
                              mostly of the types SFT does not teach (``FOCUS_TYPES``), quality and loop pairs;
- ``eval_prompts.jsonl``      IFEval-format prompts built only from held-out prompts, two per held-out prompt:
                              one ``seen`` (trained types, trained phrasings) and one ``unseen_phrasing`` (trained
                              types, phrasings no training row uses) or ``unseen_type`` (a type no training row
                              asks for), in the ``split`` field;
- ``eval_preferences.jsonl``  the same kinds of pairs, built only from held-out prompts;
- ``eval_prompts_large.jsonl``, ``eval_preferences_large.jsonl``  the two above, unchanged, then more of the same:
                              every held-out prompt's missing unseen split, and twice the pairs (each row naming its
                              held-out prompt in ``source_id``), for narrower intervals (docs/evaluation.md);
- ``preferences_complete.jsonl``  a training prompt's reference answer (chosen) against its first sentence alone
                              (rejected), for answers that need more than a sentence; not in the quickstart
                              (measured: docs/experiments.md);
- ``sft_broad.jsonl``, ``preferences_broad.jsonl``  SFT rows and constraint pairs of the training-only types
                              (``pipeline.data.constraints.TRAINING_ONLY``: not IFEval's, never evaluated); not
                              in the quickstart (measured: docs/experiments.md).

Usage::

    python scripts/build_data.py                      # regenerate data/*.jsonl in place
    python scripts/build_data.py --out-dir /tmp/check # write elsewhere (tests compare byte for byte)

Derived rows are named `<source id>/<suffix>` so every row can be traced to the prompt it came from.

Generalisation: ``HELD_OUT_TYPES`` never appear in training rows, and the last ``HELD_OUT_PHRASINGS`` templates of
every type (``pipeline.data.constraints.PHRASINGS``) are used only in eval prompts; instructions go before or after
the request (``place_instructions``), so the model cannot rely on one position either.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # let `python scripts/build_data.py` work without installing the package
    sys.path.insert(0, str(REPO))

from pipeline.data.constraints import (  # noqa: E402
    CONSTRAINTS,
    TRAINING_ONLY,
    apply_all,
    can_rewrite,
    check,
    compatible,
    count_words,
    describe,
    is_applicable,
    phrasing_templates,
    sample_kwargs,
    split_sentences,
)
from pipeline.data.formats import read_jsonl  # noqa: E402
from pipeline.errors import DataError  # noqa: E402

# Types no training row asks for (the six IFEval types added last: the quickstart never trained on them), and how
# many phrasings at the end of every type's list stay out of training (pipeline/data/constraints.py PHRASINGS).
HELD_OUT_TYPES = ("change_case:capital_word_frequency", "detectable_content:number_placeholders",
                  "detectable_format:constrained_response", "keywords:letter_frequency", "language:response_language",
                  "length_constraints:nth_paragraph_first_word")
HELD_OUT_PHRASINGS = 2
TYPES = sorted(t for t in CONSTRAINTS if t not in HELD_OUT_TYPES)  # the types training data uses
# Where an instruction goes: after the request on the same line, after it in a new paragraph, or before it.
POSITIONS = ("end", "end_paragraph", "start")
N_SFT, N_CONSTRAINT_PAIRS, N_EVAL_CONSTRAINT_PAIRS = 1000, 300, 30
# Training-only types (not IFEval's, never evaluated: pipeline/data/constraints.py TRAINING_ONLY): SFT rows and
# preference pairs in files of their own, so that a recipe adds them or not.
BROAD_TYPES = sorted(TRAINING_ONLY)
N_BROAD_SFT, N_BROAD_PAIRS = 250, 25
# "Stops vs loops" pairs: a constrained prompt, its compliant answer, and that answer collapsing into a loop.
N_LOOP_PAIRS = 75
# "Complete vs cut short" pairs: the reference answer against its first sentence alone, in a file of their own. Every
# quality pair above prefers the shorter answer; these prefer the longer one where the extra words carry the answer.
# Only categories whose answer needs more than a sentence (a classification, an extraction, a maths result or code
# can be complete in one), and only answers whose first sentence is at most INCOMPLETE_MAX_SHARE of their words.
N_COMPLETE_PAIRS = 30
COMPLETE_CATEGORIES = ("advice", "brainstorm", "compare", "definition", "how_to", "open_qa", "rewrite", "summarize")
INCOMPLETE_MAX_SHARE = 0.4
# Quality pairs per kind: (training, held-out).
QUALITY_QUOTA = {"wrong_number": (25, 5), "wrong_answer": (25, 5), "ramble": (50, 10),
                 "runs_on_turn": (25, 5), "repeats": (25, 5)}
SECOND_CONSTRAINT_P = 0.4  # share of prompts that get two constraints instead of one
NEAR_DUP_JACCARD = 0.5  # word 5-gram Jaccard at or above this counts as the same prompt
# The quickstart's DPO mix (rows of preferences.jsonl): PER_FOCUS_TYPE constraint pairs for each of the types one
# SFT epoch leaves at 0 % on gemma-3-270m (measured, README "Quickstart results"), drawn from FOCUS_CANDIDATES
# candidates per type; OTHER_CONSTRAINT_PAIRS more constraint pairs (mostly of other types) and the quality and loop
# pairs, all from the first QUICKSTART_HEAD rows. DPO's few steps go mostly where SFT failed, and the other types
# are not dropped: every trained type then leads at least MIN_PAIRS_PER_TYPE constraint pairs, topped up from the rest
# of preferences.jsonl in file order (141 rows; measured better than the 100 alone: docs/experiments.md).
FOCUS_TYPES = ("change_case:english_capital", "change_case:english_lowercase", "combination:repeat_prompt",
               "combination:two_responses", "length_constraints:number_paragraphs", "startend:end_checker")
FOCUS_CANDIDATES, PER_FOCUS_TYPE, OTHER_CONSTRAINT_PAIRS, QUICKSTART_HEAD = 10, 6, 24, 100
MIN_PAIRS_PER_TYPE = 5


@dataclass(frozen=True)
class Example:
    """A prompt (all messages before the final answer) and its reference answer."""

    id: str
    category: str
    context: tuple[dict, ...]  # messages before the answer: optional system, earlier turns, last user turn
    answer: str

    @property
    def prompt(self) -> str:
        return self.context[-1]["content"]

    @property
    def single_turn(self) -> bool:
        return len(self.context) == 1


# --------------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------------


def read_rows(path: Path, required: Sequence[str], problem: Callable[[dict], str | None] = lambda row: None
               ) -> list[dict]:
    """Rows of a JSONL file, each checked for the ``required`` fields and by ``problem`` (message or None)."""
    if not path.exists():
        raise DataError("file not found; it is hand-written and shipped with the project, restore it from git.",
                        path=str(path))
    rows = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise DataError("each line must be one JSON object.", path=str(path), line=n)
        missing = [k for k in required if k not in row]
        message = f"row is missing {missing}; every row needs {list(required)}." if missing else problem(row)
        if message:
            raise DataError(message, path=str(path), line=n)
        rows.append(row)
    return rows


def _conversation_problem(row: dict) -> str | None:
    roles = [m.get("role") for m in row["messages"]]
    if roles[-2:] != ["user", "assistant"]:
        return "a conversation must end with a user turn followed by an assistant turn."
    return None


def load_training(path: Path) -> list[Example]:
    """Training conversations as examples (the last assistant turn is the answer)."""
    return [Example(r["id"], r["category"], tuple(r["messages"][:-1]), r["messages"][-1]["content"])
            for r in read_rows(path, ["id", "category", "messages"], _conversation_problem)]


def load_heldout(path: Path) -> list[Example]:
    """Held-out prompts with their references, as single-turn examples."""
    return [Example(r["id"], r["category"], ({"role": "user", "content": r["prompt"]},), r["reference"])
            for r in read_rows(path, ["id", "category", "prompt", "reference"])]


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------
# Held-out hygiene
# --------------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Word n-grams of ``text``; a prompt shorter than n words is one gram (so only equal prompts overlap)."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def drop_near_duplicates(heldout: list[Example], training_prompts: Sequence[str]) -> list[Example]:
    """Held-out examples whose prompt is neither equal nor a near duplicate of any training prompt."""
    exact = {normalise(p) for p in training_prompts}
    grams = [shingles(p) for p in training_prompts]
    return [ex for ex in heldout if normalise(ex.prompt) not in exact
            and all(jaccard(shingles(ex.prompt), g) < NEAR_DUP_JACCARD for g in grams)]


# --------------------------------------------------------------------------------------------------
# Constraint examples
# --------------------------------------------------------------------------------------------------


def phrasing_indices(instruction_id: str, kwargs: dict, phrasings: str) -> list[int]:
    """Indices of the templates a row may use: ``"train"`` (all but the held-out last ones; every template of a
    held-out type is unseen anyway), ``"heldout"`` (only the held-out ones) or ``"any"``."""
    n = len(phrasing_templates(instruction_id, kwargs))
    if phrasings == "any" or instruction_id in HELD_OUT_TYPES or instruction_id in TRAINING_ONLY:
        return list(range(n))
    return list(range(n - HELD_OUT_PHRASINGS)) if phrasings == "train" else list(range(n - HELD_OUT_PHRASINGS, n))


def place_instructions(prompt: str, instructions: Sequence[str], positions: Sequence[str]) -> str:
    """The prompt with each instruction before or after it (``POSITIONS``); a prompt with lines keeps
    instructions in their own paragraph."""
    before = [text for text, where in zip(instructions, positions, strict=True) if where == "start"]
    after = [text for text, where in zip(instructions, positions, strict=True) if where != "start"]
    text = prompt.strip()
    if after:
        new_paragraph = "\n" in text or any(where == "end_paragraph" for where in positions)
        text = text + ("\n\n" if new_paragraph else " ") + " ".join(after)
    return " ".join(before) + "\n\n" + text if before else text


@dataclass(frozen=True)
class Constrained:
    ids: list[str]
    kwargs: list[dict]
    prompt: str  # base prompt + instruction text
    response: str | None  # the answer transformed to satisfy every constraint (checked); None: check-only type
    phrasing: list[int]  # index of each instruction's template in its type's PHRASINGS list


def constrain(ex: Example, primary: str, counts: Counter, rng: random.Random, phrasings: str = "train",
              second_types: Sequence[str] = TYPES) -> Constrained | None:
    """Ask ``ex`` for ``primary`` (plus, sometimes, the least-used compatible type of ``second_types``), phrased
    with templates of the ``phrasings`` pool (:func:`phrasing_indices`); None if it cannot work.

    A check-only primary (no rewriter, e.g. the response language) is asked for alone and has no response.
    """
    rewritable = can_rewrite(primary)
    if rewritable and not is_applicable(primary, ex.answer):
        return None
    ids = [primary]
    if rewritable and rng.random() < SECOND_CONSTRAINT_P:
        options = [t for t in second_types if compatible([primary, t]) and is_applicable(t, ex.answer)]
        if options:
            fewest = min(counts[t] for t in options)
            ids.append(rng.choice([t for t in options if counts[t] == fewest]))
    kwargs = [sample_kwargs(t, ex.answer, rng, ex.prompt) for t in ids]
    response = apply_all(ex.answer, ids, kwargs, ex.prompt) if rewritable else None
    if response is not None and (count_words(response) < 2 or not all(
            check(t, response, kw) for t, kw in zip(ids, kwargs, strict=True))):
        return None
    phrasing = [rng.choice(phrasing_indices(t, kw, phrasings)) for t, kw in zip(ids, kwargs, strict=True)]
    # "Repeat the request" must follow the request it points at, so a prompt asking for it keeps all at the end.
    positions = [rng.choice(POSITIONS) for _ in ids]
    if "combination:repeat_prompt" in ids:
        positions = ["end" if where == "start" else where for where in positions]
    texts = [describe(t, kw, i) for t, kw, i in zip(ids, kwargs, phrasing, strict=True)]
    return Constrained(ids, kwargs, place_instructions(ex.prompt, texts, positions), response, phrasing)


def constrained_stream(pool: Sequence[Example], n: int, rng: random.Random, primaries: Callable[[Counter], list[str]],
                       finish: Callable[[Example, Constrained], str | None] = lambda ex, c: "",
                       phrasings: str = "train"):
    """Yield up to ``n`` (example, constrained, finish(...)) triples, cycling through ``pool``.

    ``primaries`` proposes the types to lead with, in order; ``finish`` adds what else a row needs (e.g. the
    rejected answer) and returns None to reject the example.
    """
    counts: Counter = Counter()
    seen: set[tuple[str, str]] = set()  # (prompt, response): the same row twice would just be duplicated data
    cursor = 0
    for _ in range(n):
        for primary in primaries(counts):
            found = None
            for _attempt in range(len(pool)):
                ex = pool[cursor % len(pool)]
                cursor += 1
                made = constrain(ex, primary, counts, rng, phrasings)
                if made is None or (made.prompt, made.response) in seen:
                    continue
                extra = finish(ex, made)
                if extra is not None:
                    found = ex, made, extra
                    break
            if found is not None:
                counts.update(found[1].ids)
                seen.add((found[1].prompt, found[1].response))
                yield found
                break


def round_robin(types: Sequence[str] = TYPES) -> Callable[[Counter], list[str]]:
    """Primaries in turn, so each type leads the same number of examples."""
    state = {"i": 0}

    def next_primaries(_counts: Counter) -> list[str]:
        state["i"] += 1
        return [types[(state["i"] - 1) % len(types)]]
    return next_primaries


def least_used(rng: random.Random) -> Callable[[Counter], list[str]]:
    """Primaries ordered by how rarely they were used so far (ties broken at random)."""
    return lambda counts: sorted(TYPES, key=lambda t: (counts[t], rng.random()))


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def build_sft(training: Sequence[Example], rng: random.Random, n: int = N_SFT, types: Sequence[str] = TYPES,
              tag: str = "sft") -> list[dict]:
    """Single-turn SFT examples, each type leading an equal share, in ``{"id", "messages"}`` format."""
    pool = [ex for ex in training if ex.single_turn]
    rng.shuffle(pool)
    return [{"id": f"{ex.id}/{tag}{i:03d}", "messages": user(c.prompt) + assistant(c.response)}
            for i, (ex, c, _) in enumerate(constrained_stream(pool, n, rng, round_robin(types)))]


def constrained_pair(row_id: str, kind: str, c: Constrained, rejected: str) -> dict:
    """A preference row whose prompt carries constraints and whose chosen answer satisfies them."""
    return {"id": row_id, "kind": kind, "prompt": user(c.prompt), "chosen": assistant(c.response),
            "rejected": assistant(rejected), "instruction_id_list": c.ids, "kwargs": c.kwargs}


def rejected_for(ex: Example, c: Constrained, rng: random.Random, prefer_plain: bool) -> str | None:
    """The plain answer or a near miss on one constraint; must fail a check and differ from the chosen."""
    target = rng.choice(c.ids)
    miss = apply_all(ex.answer, c.ids, c.kwargs, ex.prompt, miss=target)
    options = [ex.answer, miss] if prefer_plain else [miss, ex.answer]
    for text in options:
        if (text != c.response and count_words(text) >= 2
                and not all(check(t, text, kw) for t, kw in zip(c.ids, c.kwargs, strict=True))):
            return text
    return None


def constraint_pairs(pool: Sequence[Example], n: int, rng: random.Random,
                     primaries: Callable[[Counter], list[str]], tag: str, phrasings: str = "train") -> list[dict]:
    """Pairs whose chosen answer satisfies the prompt's constraints and whose rejected one does not."""
    rows: list[dict] = []

    def rejected(ex: Example, c: Constrained) -> str | None:
        return rejected_for(ex, c, rng, prefer_plain=len(rows) % 2 == 0)  # alternate plain / near miss

    for i, (ex, c, text) in enumerate(constrained_stream(pool, n, rng, primaries, rejected, phrasings)):
        rows.append(constrained_pair(f"{ex.id}/{tag}{i:03d}", "constraint", c, text))
    return rows


# --------------------------------------------------------------------------------------------------
# Quality pairs: correct vs wrong, answers vs rambles, stops vs runs on
# --------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)*(?![\w])")
_RAMBLE_OPENINGS = (
    "What a great question! This is something a lot of people wonder about, and honestly there are so many "
    "different ways to think about it that I had to consider where to even begin. I want to give you a "
    "careful, thorough answer, so let me walk through my thinking before getting to the point.",
    "Okay, so let me think about this for a moment. There are several angles I could take here, and I "
    "considered a few of them before settling on one. I hope the way I have organised my thoughts makes "
    "sense to you. Anyway, let's dive in and see where we end up.",
    "Before I answer, I should say that I am going to try my best to be helpful, accurate and clear, which "
    "is always my goal. Questions like this can be approached from many directions, and it is worth keeping "
    "in mind that everyone's situation is a little different. With all of that said, here goes.",
)
_RAMBLE_CLOSINGS = (
    "I hope this answer was helpful. As I said, this is just one way of looking at it, and there are many "
    "others. Let me know if you want me to go over any part of it again, or explain it differently, or in "
    "more detail, or in less detail, whatever works best for you.",
    "Anyway, that is my take on it. I could say a lot more, and maybe I should have organised this "
    "differently, but I think the main points are in there somewhere. Feel free to ask me to expand on any "
    "of it, summarise it, or start over from a different angle.",
)
_TURN_MARKERS = (("User:", "Assistant:"), ("Human:", "AI:"), ("### User", "### Assistant"))


def wrong_number(ex: Example, rng: random.Random) -> str | None:
    """The answer with one key number altered (the result in maths, else the first fact-bearing number)."""
    if "`" in ex.answer:
        return None
    prompt_numbers = set(_NUMBER.findall(ex.prompt))

    def list_marker(m: re.Match) -> bool:
        line_start = ex.answer.rfind("\n", 0, m.start()) + 1
        return not ex.answer[line_start:m.start()].strip() and ex.answer[m.end():m.end() + 2] in (". ", ") ")

    found = [m for m in _NUMBER.finditer(ex.answer) if m.group() not in prompt_numbers and not list_marker(m)]
    if not found:
        return None
    m = found[-1] if ex.category == "math" else found[0]
    digits, present = m.group(), set(_NUMBER.findall(ex.answer))
    # Change the last digit, to a number the answer does not already contain ("6 to 7" must not become "7 to 7").
    shifts = rng.sample(range(1, 10), 9)
    options = [digits[:-1] + str((int(digits[-1]) + k) % 10) for k in shifts]
    wrong = next((o for o in options if o not in present), options[0])
    return ex.answer[:m.start()] + wrong + ex.answer[m.end():]


def wrong_answer(ex: Example, others: Sequence[Example], rng: random.Random) -> str | None:
    """A fluent answer to a different question of the same category (a wrong fact, stated confidently)."""
    options = [o for o in others if o.category == ex.category and o.single_turn and o.id != ex.id
               and normalise(o.prompt) != normalise(ex.prompt) and o.answer != ex.answer]
    return rng.choice(options).answer if options else None


def ramble(ex: Example, rng: random.Random) -> str:
    """The answer wrapped in meta-commentary that adds nothing."""
    shape = rng.choice(["open", "close", "both"])
    parts = [rng.choice(_RAMBLE_OPENINGS)] if shape in ("open", "both") else []
    parts.append(ex.answer)
    if shape in ("close", "both"):
        parts.append(rng.choice(_RAMBLE_CLOSINGS))
    return "\n\n".join(parts)


def reference_pair(ex: Example, suffix: str, kind: str, rejected: str) -> dict:
    """A preference row on ``ex``'s conversation whose chosen answer is its reference answer."""
    return {"id": f"{ex.id}/{suffix}", "kind": kind, "prompt": list(ex.context), "chosen": assistant(ex.answer),
            "rejected": assistant(rejected), "instruction_id_list": [], "kwargs": []}


def cut_short(ex: Example) -> str | None:
    """The answer's first sentence alone, when the rest carries most of the answer (see ``COMPLETE_CATEGORIES``).
    None for answers of several lines (lists, paragraphs), whose first sentence is not a shorter answer."""
    if ex.category not in COMPLETE_CATEGORIES or "\n" in ex.answer.strip():
        return None
    sentences = split_sentences(ex.answer)
    if len(sentences) < 3 or count_words(sentences[0]) > INCOMPLETE_MAX_SHARE * count_words(ex.answer):
        return None
    return sentences[0].strip()


def complete_pairs(pool: Sequence[Example], n: int, tag: str) -> list[dict]:
    """Up to ``n`` pairs from the single-turn ``pool``, in its order, whose chosen answer is the reference and
    rejected its first sentence."""
    rows: list[dict] = []
    for ex in pool:
        rejected = cut_short(ex)
        if rejected is None:
            continue
        rows.append(reference_pair(ex, f"{tag}-complete{len(rows):02d}", "complete", rejected))
        if len(rows) == n:
            break
    return rows


def runs_on_turn(ex: Example, others: Sequence[Example], rng: random.Random) -> str | None:
    """The answer followed by an invented next user turn and the start of a reply to it."""
    options = [o for o in others if o.single_turn and o.id != ex.id]
    if not options:
        return None
    other = rng.choice(options)
    user_tag, bot_tag = rng.choice(_TURN_MARKERS)
    reply = (split_sentences(other.answer) or [other.answer])[0]
    return f"{ex.answer}\n\n{user_tag} {other.prompt}\n{bot_tag} {reply}"


def repeats(ex: Example, rng: random.Random) -> str:
    """The answer followed by its last paragraph (or sentence) over again, as a looping model does."""
    paragraphs = [p for p in ex.answer.split("\n\n") if p.strip()]
    if "```" in ex.answer:  # splitting inside a code block would leave a stray fence: repeat it all
        tail = ex.answer
    elif len(paragraphs) > 1:
        tail = paragraphs[-1]
    else:
        tail = (split_sentences(ex.answer) or [ex.answer])[-1]
    return ex.answer + "".join(["\n\n" + tail.strip()] * rng.randint(1, 2))


def looped(response: str, rng: random.Random) -> str | None:
    """``response`` cut after one of its lines, then that line's start (a marker or phrase) repeated many times.

    Mimics the failure greedy decoding shows after preference training: "Section 2 / Section 2 / …",
    "* * * *", "<<title>> <<title>> …". None when the answer is a single short line with nothing to loop on.
    """
    lines = [line for line in response.split("\n") if line.strip()]
    if not lines:
        return None
    cut = rng.randrange(len(lines))
    words = lines[cut].split()
    fragment = " ".join(words[:rng.randint(1, min(4, len(words)))])
    if len(fragment) < 1:
        return None
    kept = "\n".join(lines[:cut + 1])
    separator = rng.choice(["\n", " ", "\n\n"])
    return kept + separator + separator.join([fragment] * rng.randint(12, 24))


def loop_pairs(pool: Sequence[Example], n: int, rng: random.Random, tag: str) -> list[dict]:
    """Constrained prompts whose chosen answer complies and whose rejected one runs into a loop."""
    rows: list[dict] = []
    stream = constrained_stream(pool, n, rng, round_robin(), lambda ex, c: looped(c.response, rng))
    for i, (ex, c, text) in enumerate(stream):
        rows.append(constrained_pair(f"{ex.id}/{tag}-loops{i:03d}", "loops", c, text))
    return rows


def quality_pairs(pool: Sequence[Example], quota: dict[str, int], rng: random.Random, tag: str) -> list[dict]:
    """Pairs where chosen is the reference answer and rejected a wrong, rambling or run-on version of it."""
    makers: dict[str, Callable[[Example], str | None]] = {
        "wrong_number": lambda ex: wrong_number(ex, rng),
        "wrong_answer": lambda ex: wrong_answer(ex, pool, rng),
        "ramble": lambda ex: ramble(ex, rng),
        "runs_on_turn": lambda ex: runs_on_turn(ex, pool, rng),
        "repeats": lambda ex: repeats(ex, rng),
    }
    rows = []
    for kind, wanted in quota.items():
        order = list(pool)
        rng.shuffle(order)
        made = 0
        for ex in order:
            if made == wanted:
                break
            rejected = makers[kind](ex)
            if rejected is None or rejected.strip() == ex.answer.strip():
                continue
            rows.append(reference_pair(ex, f"{tag}-{kind}{made:02d}", kind, rejected))
            made += 1
    return rows


# --------------------------------------------------------------------------------------------------
# Eval prompts
# --------------------------------------------------------------------------------------------------


def _eval_prompt(ex: Example, split: str, counts: Counter, rng: random.Random, key: int) -> dict | None:
    """One IFEval-style prompt of ``split`` for ``ex``, its least-used possible primary type first; None if none
    applies. ``counts`` (instructions per type so far) is updated."""
    primaries, phrasings = {"seen": (TYPES, "train"), "unseen_phrasing": (TYPES, "heldout"),
                            "unseen_type": (HELD_OUT_TYPES, "train")}[split]
    for primary in sorted(primaries, key=lambda t: (counts[t], rng.random())):
        made = constrain(ex, primary, counts, rng, phrasings)
        if made is None:
            continue
        counts.update(made.ids)
        row = {"key": key, "prompt": made.prompt, "instruction_id_list": made.ids, "kwargs": made.kwargs,
               "split": split, "phrasing": made.phrasing}
        if made.response is not None:  # check-only types (response language) have no reference answer
            row["reference"] = made.response
        return {**row, "source_id": ex.id, "category": ex.category}
    return None


def _unseen_split(number: int) -> str:
    """The unseen split of held-out example ``number`` in ``eval_prompts.jsonl`` (they alternate)."""
    return "unseen_phrasing" if number % 2 == 0 else "unseen_type"


def build_eval_prompts(heldout: Sequence[Example], rng: random.Random) -> list[dict]:
    """Two IFEval-style prompts per held-out example: a ``seen`` one (trained types and phrasings) and an unseen
    one, alternately ``unseen_phrasing`` (trained types, held-out phrasings) and ``unseen_type`` (a held-out type
    first). Least-used types go first so all are covered; both prompts of an example are adjacent."""
    counts: Counter = Counter()
    rows: list[dict] = []
    for number, ex in enumerate(heldout):
        for split in ("seen", _unseen_split(number)):
            row = _eval_prompt(ex, split, counts, rng, len(rows) + 1)
            if row is not None:
                rows.append(row)
    return rows


def build_eval_prompts_large(heldout: Sequence[Example], base: Sequence[dict], rng: random.Random) -> list[dict]:
    """``base`` (``eval_prompts.jsonl``, unchanged and first) plus, per held-out example, a prompt of the unseen
    split it lacks there: both unseen splits then have one prompt per held-out question, twice the prompts of
    ``eval_prompts.jsonl`` (narrower intervals, at about 1.5x the eval's time)."""
    counts = Counter(t for row in base for t in row["instruction_id_list"])
    rows = list(base)
    for number, ex in enumerate(heldout):
        other = "unseen_type" if _unseen_split(number) == "unseen_phrasing" else "unseen_phrasing"
        row = _eval_prompt(ex, other, counts, rng, len(rows) + 1)
        if row is not None:
            rows.append(row)
    return rows


def eval_pairs(heldout: Sequence[Example], rng: random.Random, scale: int, tag: str) -> list[dict]:
    """Held-out preference pairs: ``scale`` x ``N_EVAL_CONSTRAINT_PAIRS`` constraint pairs (any phrasing) and
    ``scale`` x the eval quota of quality pairs (``QUALITY_QUOTA``)."""
    pool = list(heldout)
    rng.shuffle(pool)
    return (constraint_pairs(pool, scale * N_EVAL_CONSTRAINT_PAIRS, rng, least_used(rng), tag, phrasings="any")
            + quality_pairs(heldout, {k: scale * v[1] for k, v in QUALITY_QUOTA.items()}, rng, tag))


def build_eval_preferences_large(heldout: Sequence[Example], base: Sequence[dict], rng: random.Random) -> list[dict]:
    """``base`` (``eval_preferences.jsonl``, unchanged and first) plus twice as many new pairs of the same kinds
    (none repeating a base pair); every row names its held-out question in ``source_id``, so that the bootstrap
    resamples questions, not pairs (pairs on one question move together)."""
    seen = {json.dumps([r["prompt"], r["chosen"], r["rejected"]]) for r in base}
    extra = [r for r in eval_pairs(heldout, rng, 2, "evalpref2")
             if json.dumps([r["prompt"], r["chosen"], r["rejected"]]) not in seen]
    return [{**row, "source_id": row["id"].split("/")[0]} for row in [*base, *extra]]


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _first_per_focus_type(pairs: Sequence[dict], n: int) -> list[dict]:
    """The first ``n`` constraint pairs of each focus type, in order (a pair counts for its first focus type)."""
    per_type: Counter = Counter()
    kept = []
    for pair in (p for p in pairs if p["kind"] == "constraint"):
        focus = next((t for t in pair["instruction_id_list"] if t in FOCUS_TYPES), None)
        if focus is not None and per_type[focus] < n:
            per_type[focus] += 1
            kept.append(pair)
    return kept


def quickstart_mix(preferences: Sequence[dict], seed: int) -> list[dict]:
    """Rows of ``preferences`` for the quickstart's DPO stage (see ``FOCUS_TYPES``), shuffled."""
    head = preferences[:QUICKSTART_HEAD]
    constraint = [p for p in preferences if p["kind"] == "constraint"]
    candidates = _first_per_focus_type(sorted(constraint, key=lambda p: len(p["instruction_id_list"])),
                                       FOCUS_CANDIDATES)  # single-constraint pairs first
    # One shuffle draws PER_FOCUS_TYPE of each type's candidates and orders the quality/loop pairs; a second one
    # mixes the result. (Candidates and quality pairs are shuffled together: that is the order that was measured.)
    drawn = candidates + [p for p in head if p["kind"] != "constraint"]
    random.Random(seed).shuffle(drawn)
    taken = {p["id"] for p in candidates}
    others = [p for p in head if p["kind"] == "constraint" and p["id"] not in taken][:OTHER_CONSTRAINT_PAIRS]
    rows = _first_per_focus_type(drawn, PER_FOCUS_TYPE) + others + [p for p in drawn if p["kind"] != "constraint"]
    random.Random(seed + 2).shuffle(rows)  # the 100-pair mix measured before the top-up; only its order
    rows += _top_up(rows, constraint, MIN_PAIRS_PER_TYPE)  # reaches the shipped file (through the shuffle below)
    random.Random(seed).shuffle(rows)
    return rows


def _top_up(rows: Sequence[dict], constraint: Sequence[dict], n: int) -> list[dict]:
    """Constraint pairs of ``constraint`` (in order, not in ``rows``) until every type leads ``n`` pairs of the mix."""
    leads = Counter(p["instruction_id_list"][0] for p in rows if p["kind"] == "constraint")
    taken = {p["id"] for p in rows}
    extra = []
    for pair in constraint:
        lead = pair["instruction_id_list"][0]
        if pair["id"] not in taken and leads[lead] < n:
            leads[lead] += 1
            extra.append(pair)
    return extra


def build(data_dir: Path, seed: int = 0) -> dict[str, list[dict]]:
    """All derived files as rows (not written); each has its own RNG stream derived from ``seed``."""
    training = load_training(data_dir / "instructions.jsonl")
    training_prompts = [m["content"] for ex in training for m in ex.context if m["role"] == "user"]
    heldout_all = load_heldout(data_dir / "heldout_prompts.jsonl")
    heldout = drop_near_duplicates(heldout_all, training_prompts)
    if len(heldout) < len(heldout_all):
        print(f"dropped {len(heldout_all) - len(heldout)} held-out prompts that duplicate training prompts")

    def stream(name: str) -> random.Random:
        return random.Random(f"{seed}:{name}")

    single = [ex for ex in training if ex.single_turn]
    pref_rng = stream("preferences")
    pool = list(single)
    pref_rng.shuffle(pool)
    preferences = constraint_pairs(pool, N_CONSTRAINT_PAIRS, pref_rng, round_robin(), "pref") + quality_pairs(
        training, {k: v[0] for k, v in QUALITY_QUOTA.items()}, pref_rng, "pref")
    loop_pool = list(single)
    loop_rng = stream("loops")
    loop_rng.shuffle(loop_pool)
    preferences += loop_pairs(loop_pool, N_LOOP_PAIRS, loop_rng, "pref")
    # Mixed order, so that a recipe's `limit: N` on this file takes every kind of pair, not the first kind.
    stream("preferences-order").shuffle(preferences)
    broad_pool = list(single)
    stream("broad_pool").shuffle(broad_pool)
    complete_pool = list(single)
    stream("complete_pool").shuffle(complete_pool)
    eval_prompts = build_eval_prompts(heldout, stream("eval_prompts"))
    eval_preferences = eval_pairs(heldout, stream("eval_preferences"), 1, "evalpref")
    return {
        "sft_constraints.jsonl": build_sft(training, stream("sft")),
        "sft_broad.jsonl": build_sft(training, stream("sft_broad"), N_BROAD_SFT, BROAD_TYPES, "broad"),
        "preferences_broad.jsonl": constraint_pairs(broad_pool, N_BROAD_PAIRS, stream("preferences_broad"),
                                                    round_robin(BROAD_TYPES), "broadpref"),
        "preferences.jsonl": preferences,
        "preferences_complete.jsonl": complete_pairs(complete_pool, N_COMPLETE_PAIRS, "pref"),
        "preferences_quickstart.jsonl": quickstart_mix(preferences, seed),
        "eval_prompts.jsonl": eval_prompts,
        "eval_preferences.jsonl": eval_preferences,
        "eval_prompts_large.jsonl": build_eval_prompts_large(heldout, eval_prompts, stream("eval_prompts_large")),
        "eval_preferences_large.jsonl": build_eval_preferences_large(heldout, eval_preferences,
                                                                     stream("eval_preferences_large")),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data",
                        help="where instructions.jsonl and heldout_prompts.jsonl are (default: data/)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write (default: the data dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out_dir = args.out_dir or args.data_dir
    files = build(args.data_dir, args.seed)
    for name, rows in files.items():
        write_jsonl(out_dir / name, rows)
        kinds = Counter(r.get("kind") for r in rows if "kind" in r)
        print(f"{out_dir / name}: {len(rows)} rows" + (f" {dict(sorted(kinds.items()))}" if kinds else ""))
    types = Counter(t for r in files["eval_prompts.jsonl"] for t in r["instruction_id_list"])
    print(f"eval prompts per constraint type: min {min(types[t] for t in CONSTRAINTS)}, max {max(types.values())}; "
          f"per split: {dict(sorted(Counter(r['split'] for r in files['eval_prompts.jsonl']).items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
