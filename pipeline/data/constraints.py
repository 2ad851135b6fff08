"""Verifiable instruction constraints (IFEval / Tulu-3 style), written for this project.

Where it sits: ``scripts/build_data.py`` uses it to augment SFT data (append a constraint to a prompt and
transform the reference answer so it complies), to build constraint preference pairs (chosen complies,
rejected is the plain answer or a near miss), and to write the held-out eval prompts; the eval stage uses
:func:`evaluate_response` to score generations on any JSONL with IFEval-style ``prompt``,
``instruction_id_list`` and ``kwargs`` fields.

Each constraint type is one :class:`Constraint` in :data:`CONSTRAINTS`, keyed by an IFEval-style id
(``group:name``) and taking IFEval-style kwargs (``num_words`` + ``relation``, ``num_bullets``, ...).
Per type: ``describe`` (the instruction text, a few phrasings), ``check`` (strict), ``apply`` (make a
reference answer comply), ``sample_kwargs`` (parameters that make sense for an answer) and ``near_miss``
(a plausible response that just fails, for rejected preference answers). Pairs that cannot both hold
(lowercase + capitals, JSON + bullets, ...) are declared in ``_CONFLICTS``; see :func:`compatible`.
:data:`TRAINING_ONLY` holds a few types that are not IFEval's, for training data only (asked alone).
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError

Kwargs = dict[str, Any]
RELATIONS = ("less than", "at least")

# --------------------------------------------------------------------------------------------------
# Text measurements shared by the checks and transforms
# --------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")
# A line's list marker or section header is not part of its first sentence.
_LINE_MARKER = re.compile(r"^\s*(?:[*-]|\d+[.)]|(?:Section|SECTION|section)\s+\d+:?)(?:\s+|$)")
_TITLE_LINE = re.compile(r"^\s*<<[^\n]*>>\s*$")
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]*]*(?=\s|$)")
_ABBREVIATIONS = {"e.g.", "i.e.", "mr.", "mrs.", "ms.", "dr.", "vs.", "st.", "p.s.", "p.p.s.", "approx.", "no."}
_STOPWORDS = set(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has
    have having he her here hers him his how i if in into is it its itself just like make many may me
    might more most much must my no nor not now of off on once one only or other our out over own same
    she should so some such than that the their them then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your
    yours get got gets take takes use used using way ways thing things well even still every lot""".split()
)


def count_words(text: str) -> int:
    """Number of words (runs of letters/digits, keeping contractions and hyphenations whole)."""
    return len(_WORD.findall(text))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences in ``text``.

    Lines are sentence boundaries too; list markers (``* ``, ``1. ``), ``Section N`` headers, ``<<title>>``
    lines and divider lines (``***``) are not sentences. Common abbreviations (e.g., P.S.) do not end one.
    """
    spans: list[tuple[int, int]] = []
    for line in re.finditer(r"[^\n]+", text):
        body, base = line.group(), line.start()
        if _TITLE_LINE.match(body):
            continue
        marker = _LINE_MARKER.match(body)
        start = marker.end() if marker else 0
        for boundary in _BOUNDARY.finditer(body, start):
            token = body[:boundary.start() + 1].split()[-1].lstrip("(\"'*").lower()
            if token in _ABBREVIATIONS:
                continue
            _add_span(spans, body, base, start, boundary.end())
            start = boundary.end()
        _add_span(spans, body, base, start, len(body))
    return spans


def _add_span(spans: list[tuple[int, int]], body: str, base: int, start: int, end: int) -> None:
    piece = body[start:end]
    if any(ch.isalnum() for ch in piece):
        lead = len(piece) - len(piece.lstrip())
        spans.append((base + start + lead, base + end))


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` as strings (see :func:`sentence_spans`)."""
    return [text[s:e] for s, e in sentence_spans(text)]


def count_sentences(text: str) -> int:
    """Number of sentences in ``text`` (see :func:`sentence_spans`)."""
    return len(sentence_spans(text))


def _units(text: str) -> list[str]:
    """Pieces an answer can be regrouped from: its lines (markers stripped) if it has several, else sentences."""
    lines = [_LINE_MARKER.sub("", ln).strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if any(ch.isalnum() for ch in ln) and not _TITLE_LINE.match(ln)]
    if len(lines) >= 2:
        return lines
    return [s.strip() for s in split_sentences(text)]


def _group(units: Sequence[str], n: int) -> list[str]:
    """Split ``units`` into ``n`` contiguous, near-equal, non-empty groups (splitting words if too few units)."""
    units = list(units)
    if len(units) < n:  # too few pieces: fall back to splitting the words evenly
        units = " ".join(units).split()
    size, extra = divmod(len(units), n)
    groups, pos = [], 0
    for i in range(n):
        step = size + (1 if i < extra else 0)
        groups.append(" ".join(units[pos:pos + step]))
        pos += step
    return groups


def _keep_sentences(text: str, n: int) -> str:
    """``text`` cut just after its ``n``-th sentence (line structure before the cut is kept)."""
    spans = sentence_spans(text)
    if n >= len(spans):
        return text
    return text[:spans[n - 1][1]].rstrip() if n > 0 else ""


def _word_pattern(word: str) -> re.Pattern[str]:
    return re.compile(r"(?<![^\W_])" + re.escape(word) + r"(?![^\W_])", re.IGNORECASE)


def count_word(text: str, word: str) -> int:
    """Case-insensitive whole-word occurrences of ``word`` in ``text``."""
    return len(_word_pattern(word).findall(text))


def _content_words(text: str) -> list[str]:
    """Distinct content words of ``text`` in order of first appearance.

    A word keeps its capital only if it is capitalised everywhere (a name), else it is lowercased.
    """
    forms: dict[str, set[str]] = {}
    for word in _WORD.findall(text):
        low = word.lower()
        if len(low) >= 4 and low.isalpha() and low not in _STOPWORDS:
            forms.setdefault(low, set()).add(word)
    return [low if any(f == low for f in fs) or len(fs) > 1 else next(iter(fs)) for low, fs in forms.items()]


def _compare(value: int, relation: str, n: int) -> bool:
    if relation == "less than":
        return value < n
    if relation == "at least":
        return value >= n
    raise PipelineError(f"Unknown relation {relation!r} in constraint kwargs; use one of {list(RELATIONS)}.")


def _round_down(n: int, step: int = 5) -> int:
    return max(step, n - n % step) if n >= step else n


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _stable_pick(options: Sequence[str], text: str) -> str:
    """Pick an option from the content of ``text`` (same input, same pick; no RNG needed in apply)."""
    return options[zlib.crc32(text.encode("utf-8")) % len(options)]


def _join_paragraphs(answer: str, extra: str) -> str:
    sep = "\n\n" if "\n" in answer.strip() or count_words(answer) > 40 else " "
    return answer.rstrip() + sep + extra


# --------------------------------------------------------------------------------------------------
# The constraint types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """One verifiable constraint type: how to phrase it, check it, satisfy it, and just miss it."""

    instruction_id: str
    check: Callable[[str, Kwargs], bool]  # strict check of a response
    # (answer, kwargs, prompt) -> compliant answer; None for a check-only type (no reference answers, no pairs)
    apply: Callable[[str, Kwargs, str | None], str] | None
    sample_kwargs: Callable[[str, random.Random, str | None], Kwargs]  # (answer, rng, prompt) -> kwargs
    near_miss: Callable[[str, Kwargs], str] | None  # a compliance attempt that fails the check
    stage: int  # order in which apply() runs when constraints are combined (content → structure → wrappers)
    applicable: Callable[[str], bool] = lambda answer: True  # does this constraint suit the answer at all?


def _noargs(_answer: str, _rng: random.Random, _prompt: str | None) -> Kwargs:
    return {}


# ---- length_constraints --------------------------------------------------------------------------


def _number_words_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    if kw["relation"] == "at least" or count_words(answer) < kw["num_words"]:
        return answer
    kept = answer
    for n in range(count_sentences(answer), 0, -1):  # longest sentence-boundary prefix that fits
        kept = _keep_sentences(answer, n)
        if count_words(kept) < kw["num_words"]:
            return kept
    words = answer.split()[: kw["num_words"]]
    while words and count_words(" ".join(words)) >= kw["num_words"]:
        words.pop()
    return " ".join(words).rstrip(",;:") + "."


def _number_words_sample(answer: str, rng: random.Random, _prompt: str | None) -> Kwargs:
    total = count_words(answer)
    first = count_words(split_sentences(answer)[0]) if count_sentences(answer) else total
    if count_sentences(answer) >= 2 and first + 1 < total and rng.random() < 0.6:
        n = rng.randint(first + 1, total)
        if n + (5 - n % 5) % 5 <= total:  # round up to a multiple of 5 when that still binds
            n += (5 - n % 5) % 5
        return {"num_words": n, "relation": "less than"}
    return {"num_words": _round_down(int(total * rng.uniform(0.6, 0.95))), "relation": "at least"}


def _number_words_miss(answer: str, kw: Kwargs) -> str:
    if kw["relation"] == "less than":
        return answer
    return _number_words_apply(answer, {"num_words": kw["num_words"], "relation": "less than"}, None)


def _number_sentences_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    if kw["relation"] == "less than":
        return _keep_sentences(answer, kw["num_sentences"] - 1)
    return answer


def _number_sentences_sample(answer: str, rng: random.Random, _prompt: str | None) -> Kwargs:
    total = count_sentences(answer)
    if total >= 2 and rng.random() < 0.6:
        return {"num_sentences": rng.randint(2, min(total, 6)), "relation": "less than"}
    return {"num_sentences": rng.randint(max(2, total - 2), max(2, total)), "relation": "at least"}


def _number_sentences_miss(answer: str, kw: Kwargs) -> str:
    if kw["relation"] == "less than":
        return answer
    return _keep_sentences(answer, kw["num_sentences"] - 1)


_PARAGRAPH_DIVIDER = re.compile(r"^[ \t]*\*\*\*[ \t]*$", re.MULTILINE)


def _paragraphs(text: str) -> list[str]:
    return _PARAGRAPH_DIVIDER.split(text)


def _number_paragraphs_check(response: str, kw: Kwargs) -> bool:
    parts = _paragraphs(response)
    return len(parts) == kw["num_paragraphs"] and all(p.strip() for p in parts)


def _number_paragraphs_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    return "\n\n***\n\n".join(_group(_units(answer), kw["num_paragraphs"]))


def _number_paragraphs_miss(answer: str, kw: Kwargs) -> str:
    # Paragraphs separated by blank lines only: the divider the instruction asked for is missing.
    return "\n\n".join(_group(_units(answer), kw["num_paragraphs"]))


# ---- detectable_format ---------------------------------------------------------------------------

_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)


def _number_bullets_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    return "\n".join("* " + g for g in _group(_units(answer), kw["num_bullets"]))


def _number_bullets_miss(answer: str, kw: Kwargs) -> str:
    n = kw["num_bullets"]
    wrong = n - 1 if n > 2 else n + 1
    if len(_units(answer)) < wrong:
        wrong = n - 1
    return _number_bullets_apply(answer, {"num_bullets": max(1, wrong)}, None)


def _strip_code_fence(text: str) -> str:
    text = text.strip()
    fence = re.fullmatch(r"```[a-zA-Z]*\s*\n?(.*?)\n?```", text, re.DOTALL)
    return fence.group(1).strip() if fence else text


def _json_check(response: str, _kw: Kwargs) -> bool:
    try:
        json.loads(_strip_code_fence(response))
    except ValueError:
        return False
    return True


_TITLE = re.compile(r"<<([^\n]+?)>>")
_TITLE_STOP_TAIL = _STOPWORDS | {"is", "are", "the", "a", "an"}


def _title_from(answer: str, prompt: str | None) -> str:
    """A short sentence-case title: the prompt's question if short, else the answer's opening words.

    Answers that open with a list, code, a formula or a one-word reply make poor titles; those use the
    prompt's first clause instead.
    """
    question = (prompt or "").strip().split("\n")[0]
    opening = re.split(r"[:;,.!?]\s", (split_sentences(answer) or [answer])[0] + " ")[0]
    words = opening.split()
    prose = len(words) >= 3 and sum(w.isalpha() for w in words) >= 0.7 * len(words)
    if question.endswith("?") and count_words(question) <= 10:
        text = re.sub(r"^how (do|can) (i|you|we)\b", "How to", question[:-1].strip(), flags=re.I)
    elif prose and not _LINE_MARKER.match(answer.strip()) and not answer.lstrip().startswith("`"):
        text = opening
    else:
        text = re.split(r"[:.?!\"]", (prompt or answer).strip())[0]
    words = re.sub(r"[<>*\"\n]", "", text).split()[:10]
    while len(words) > 1 and words[-1].lower().strip(".,;:!?") in _TITLE_STOP_TAIL:
        words.pop()
    title = " ".join(words).strip(" .,;:!?") or "Answer"
    return title[0].upper() + title[1:]


def _highlights(response: str) -> int:
    return len(re.findall(r"\*[^\n*]*[^\s*][^\n*]*\*", response))


def _highlight_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    need = kw["num_highlights"] - _highlights(answer)
    out, last = [], 0
    for start, end in sentence_spans(answer):
        if need <= 0:
            break
        if "*" in answer[start:end]:
            continue
        out += [answer[last:start], "*", answer[start:end], "*"]
        last, need = end, need - 1
    if need > 0:  # fewer sentences than highlights wanted: the build will see the check fail and skip
        return answer
    return "".join(out) + answer[last:]


def _highlight_miss(answer: str, kw: Kwargs) -> str:
    fewer = _highlight_apply(answer, {"num_highlights": kw["num_highlights"] - 1}, None)
    return fewer if kw["num_highlights"] > 1 else answer.replace("*", "")


def _section_header(splitter: str) -> re.Pattern[str]:
    return re.compile(r"^[ \t]*" + re.escape(splitter) + r"[ \t]+\d+", re.MULTILINE)


def _sections_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    groups = _group(_units(answer), kw["num_sections"])
    return "\n\n".join(f"{kw['section_spliter']} {i}\n{g}" for i, g in enumerate(groups, 1))


def _sections_miss(answer: str, kw: Kwargs) -> str:
    n = kw["num_sections"]
    if n > 2:
        return _sections_apply(answer, {**kw, "num_sections": n - 1}, None)
    # Sections marked with a markdown heading instead of the requested header word.
    return "\n\n".join(f"## Part {i}\n{g}" for i, g in enumerate(_group(_units(answer), n), 1))


# ---- change_case ---------------------------------------------------------------------------------


def _sentence_case(text: str) -> str:
    """Capitalise the first letter of each sentence: a 'lowercase' attempt that forgot the rule."""
    chars = list(text)
    for start, _end in sentence_spans(text):
        for i in range(start, len(chars)):
            if chars[i].isalpha():
                chars[i] = chars[i].upper()
                break
    return "".join(chars)


def _capital_miss(answer: str, _kw: Kwargs) -> str:
    spans = sentence_spans(answer)
    if len(spans) < 2:
        return answer
    cut = spans[-1][0]  # the last sentence was left in its original case
    return answer[:cut].upper() + answer[cut:]


# ---- keywords ------------------------------------------------------------------------------------


def _quoted(words: Sequence[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _existence_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    missing = [k for k in kw["keywords"] if not count_word(answer, k)]
    return _join_paragraphs(answer, f"Key terms: {', '.join(missing)}.") if missing else answer


def _existence_sample(answer: str, rng: random.Random, _prompt: str | None) -> Kwargs:
    words = _content_words(answer) or ["answer"]
    return {"keywords": rng.sample(words, min(len(words), rng.choice([1, 2, 2])))}


def _drop_sentences_with(answer: str, words: Sequence[str], keep_one: bool = True) -> str:
    """Remove the sentences mentioning any of ``words`` (keeping at least one sentence if asked)."""
    spans = sentence_spans(answer)
    hit = [(s, e) for s, e in spans if any(count_word(answer[s:e], w) for w in words)]
    if keep_one and len(hit) == len(spans):
        hit = hit[1:]
    out, last = [], 0
    for start, end in hit:
        out.append(answer[last:start])
        last = end
        while last < len(answer) and answer[last] in " \t":
            last += 1
    out.append(answer[last:])
    lines = [ln.rstrip() for ln in "".join(out).split("\n")]
    lines = [ln for ln in lines if not re.fullmatch(r"\s*(?:[*-]|\d+[.)])\s*", ln)]  # emptied list items
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _existence_miss(answer: str, kw: Kwargs) -> str:
    return _drop_sentences_with(answer, kw["keywords"][:1], keep_one=False)


_FILLER_WORDS = ("basically", "actually", "honestly", "literally", "simply", "really", "obviously", "truly")


def _forbidden_check(response: str, kw: Kwargs) -> bool:
    return not any(count_word(response, w) for w in kw["forbidden_words"])


def _forbidden_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    text = _drop_sentences_with(answer, kw["forbidden_words"])
    for word in kw["forbidden_words"]:  # still there (the only sentence): delete the word itself
        text = re.sub(r"[ \t]{2,}", " ", _word_pattern(word).sub("", text))
    return text.strip()


def _forbidden_sample(answer: str, rng: random.Random, prompt: str | None) -> Kwargs:
    spans = sentence_spans(answer)
    later = answer[spans[1][0]:] if len(spans) >= 2 else ""
    first = answer[: spans[1][0]] if len(spans) >= 2 else answer
    # Words only in later sentences can go without losing the core of the answer.
    candidates = [w for w in _content_words(later) if not count_word(first, w)
                  and not count_word(prompt or "", w)]
    fillers = [w for w in _FILLER_WORDS if not count_word(answer, w)]
    words = rng.sample(candidates, 1) if candidates and rng.random() < 0.7 else []
    words += rng.sample(fillers, 2 - len(words))
    return {"forbidden_words": words}


def _forbidden_miss(answer: str, kw: Kwargs) -> str:
    if not _forbidden_check(answer, kw):
        return answer
    return _join_paragraphs(answer, f"{kw['forbidden_words'][-1].capitalize()}, that is all there is to it.")


def _frequency_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    text = answer
    if kw["relation"] == "less than":
        while count_word(text, kw["keyword"]) >= kw["frequency"]:
            spans = [(s, e) for s, e in sentence_spans(text) if count_word(text[s:e], kw["keyword"])]
            if len(spans) <= 1:
                break
            text = (text[:spans[-1][0]].rstrip(" \t") + " " + text[spans[-1][1]:].lstrip(" \t")).strip()
    return text


def _frequency_sample(answer: str, rng: random.Random, _prompt: str | None) -> Kwargs:
    words = _content_words(answer) or ["answer"]
    repeated = [w for w in words if count_word(answer, w) >= 2]
    if repeated and rng.random() < 0.7:
        word = rng.choice(repeated)
        spread = sum(1 for s in split_sentences(answer) if count_word(s, word))
        if spread >= 2 and rng.random() < 0.5:  # cut the later mentions: apply() removes their sentences
            return {"keyword": word, "frequency": count_word(answer, word), "relation": "less than"}
        return {"keyword": word, "frequency": count_word(answer, word), "relation": "at least"}
    word = rng.choice(words)
    return {"keyword": word, "frequency": count_word(answer, word) + 1, "relation": "less than"}


def _frequency_miss(answer: str, kw: Kwargs) -> str:
    word, n = kw["keyword"], kw["frequency"]
    if kw["relation"] == "at least":
        return _drop_sentences_with(answer, [word], keep_one=False)
    if count_word(answer, word) >= n:
        return answer
    extra = " ".join([f"Again, {word} is the key point here."] * (n - count_word(answer, word)))
    return answer.rstrip() + "\n\n" + extra


# ---- startend ------------------------------------------------------------------------------------

END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have additional questions.",
               "Hope this helps!", "That is all.", "Any other questions?", "Thanks for asking.")


def _end_check(response: str, kw: Kwargs) -> bool:
    return response.strip().lower().endswith(kw["end_phrase"].strip().lower())


def _quotation_check(response: str, _kw: Kwargs) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# ---- detectable_content / punctuation / combination ---------------------------------------------

_POSTSCRIPTS = ("If anything here is unclear, just ask.", "I can go into more detail on any part of this.",
                "Happy to help with a follow-up question.", "Thanks for the interesting question.")


def _postscript_check(response: str, kw: Kwargs) -> bool:
    marker = kw["postscript_marker"].strip().lower()
    if marker in ("p.s.", "p.s"):
        pattern = r"^\s*p\.\s?s\."
    elif marker in ("p.p.s.", "p.p.s"):
        pattern = r"^\s*p\.\s?p\.\s?s"
    else:
        pattern = r"^\s*" + re.escape(marker)
    return re.search(pattern, response.lower(), re.MULTILINE) is not None


def _postscript_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    return answer.rstrip() + f"\n\n{kw['postscript_marker']} {_stable_pick(_POSTSCRIPTS, answer)}"


def _repeat_check(response: str, kw: Kwargs) -> bool:
    return response.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


def _repeat_sample(_answer: str, _rng: random.Random, prompt: str | None) -> Kwargs:
    if not prompt:
        raise PipelineError("combination:repeat_prompt needs the prompt: pass prompt= to sample_kwargs.")
    return {"prompt_to_repeat": prompt}


def _two_responses_parts(response: str) -> list[str]:
    return [p.strip() for p in response.split("******")]


def _two_responses_check(response: str, _kw: Kwargs) -> bool:
    parts = _two_responses_parts(response)
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


def _two_responses_apply(answer: str, _kw: Kwargs, _prompt: str | None) -> str:
    # The second response is the short version: the first half of the answer's sentences.
    short = _keep_sentences(answer, (count_sentences(answer) + 1) // 2)
    return f"{answer.strip()}\n******\n{short.strip()}"


# ---- the six types added to reach IFEval's 25 ----------------------------------------------------

_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_FIRST_WORDS = ("first", "overall", "however", "also", "finally", "importantly", "moreover", "additionally")


def _blank_line_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _BLANK_LINE.split(text) if p.strip()]


def _first_word(paragraph: str) -> str:
    word = paragraph.split()[0] if paragraph.split() else ""
    return re.sub(r"[^\w'’-]", "", word.strip("*_\"'“”‘’")).lower()


def _nth_paragraph_check(response: str, kw: Kwargs) -> bool:
    paragraphs = _blank_line_paragraphs(response)
    n = kw["nth_paragraph"]
    return (len(paragraphs) == kw["num_paragraphs"] and 1 <= n <= len(paragraphs)
            and _first_word(paragraphs[n - 1]) == kw["first_word"].lower())


def _nth_paragraph_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    groups = _group(_units(answer), kw["num_paragraphs"])
    n, word = kw["nth_paragraph"] - 1, kw["first_word"]
    body = groups[n]
    if _first_word(body) != word.lower():  # "Moreover, the tide ..." keeps the paragraph's own opening
        body = f"{word.capitalize()}, {body[:1].lower()}{body[1:]}"
    groups[n] = body
    return "\n\n".join(groups)


def _nth_paragraph_sample(answer: str, rng: random.Random, _prompt: str | None) -> Kwargs:
    n = rng.randint(2, min(4, max(2, len(_units(answer)))))
    return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n), "first_word": rng.choice(_FIRST_WORDS)}


def _nth_paragraph_miss(answer: str, kw: Kwargs) -> str:
    # The right paragraphs, but the required word opens the wrong one (or none, when there is one paragraph).
    wrong = kw["nth_paragraph"] % kw["num_paragraphs"] + 1
    if wrong == kw["nth_paragraph"]:
        return "\n\n".join(_group(_units(answer), kw["num_paragraphs"]))
    return _nth_paragraph_apply(answer, {**kw, "nth_paragraph": wrong}, None)


CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _constrained_check(response: str, _kw: Kwargs) -> bool:
    return any(option in response for option in CONSTRAINED_OPTIONS)


def _constrained_apply(answer: str, _kw: Kwargs, _prompt: str | None) -> str:
    # Open questions have no yes/no verdict: the honest option is "maybe", followed by the explanation.
    return f"{CONSTRAINED_OPTIONS[2]}\n\n{answer}"


def _capital_words(text: str) -> int:
    """Words written entirely in capitals (as in IFEval, a one-letter "I" or "A" counts)."""
    return sum(1 for word in _WORD.findall(text) if word.isupper())


def _capital_words_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    if kw["capital_relation"] == "less than":
        text = answer
        for word in sorted({w for w in _WORD.findall(answer) if w.isupper() and len(w) > 1}, key=len, reverse=True):
            if _capital_words(text) < kw["capital_frequency"]:
                break
            text = _word_pattern(word).sub(word.capitalize(), text)
        return text
    text, missing = answer, kw["capital_frequency"] - _capital_words(answer)
    for word in _content_words(answer):  # capitalise key words for emphasis, in order of first appearance
        if missing <= 0:
            break
        before = _capital_words(text)
        text = re.sub(r"(?<![^\W_])" + re.escape(word) + r"(?![^\W_])", word.upper(), text, count=1,
                      flags=re.IGNORECASE)
        missing -= _capital_words(text) - before
    return text


def _capital_words_sample(answer: str, rng: random.Random, _prompt: str | None) -> Kwargs:
    present = _capital_words(answer)
    if rng.random() < 0.7:
        return {"capital_frequency": present + rng.randint(1, 3), "capital_relation": "at least"}
    return {"capital_frequency": present + rng.randint(1, 3), "capital_relation": "less than"}


def _capital_words_miss(answer: str, kw: Kwargs) -> str:
    if kw["capital_relation"] == "at least":
        return _capital_words_apply(answer, {**kw, "capital_frequency": kw["capital_frequency"] - 1}, None)
    return _capital_words_apply(answer, {**kw, "capital_relation": "at least"}, None)


def _letter_sample(answer: str, rng: random.Random, _prompt: str | None) -> Kwargs:
    counts = {ch: answer.lower().count(ch) for ch in "abcdefghijklmnopqrstuvwxyz"}
    if rng.random() < 0.6:
        letter = rng.choice([ch for ch in sorted(counts) if counts[ch] >= 3] or ["e"])
        return {"letter": letter, "let_frequency": max(1, int(counts[letter] * rng.uniform(0.5, 0.9))),
                "let_relation": "at least"}
    letter = rng.choice(sorted(counts))
    return {"letter": letter, "let_frequency": counts[letter] + rng.randint(1, 4), "let_relation": "less than"}


def _letter_miss(answer: str, kw: Kwargs) -> str:
    letter, n = kw["letter"].lower(), kw["let_frequency"]
    if kw["let_relation"] == "less than":
        extra = max(0, n - answer.lower().count(letter))
        return answer.rstrip() + ("\n\n" + " ".join([letter.upper() * 3] * (extra // 3 + 1)) if extra else "")
    text = answer
    while text and text.lower().count(letter) >= n:
        text = text[: max(text.lower().rfind(letter), 0)]
    return text.rstrip() or answer.replace(letter, "").replace(letter.upper(), "")


_PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\]")
_PLACEHOLDER_NAMES = ("your name", "date", "place", "amount", "detail", "contact")


def _placeholders_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    need = kw["num_placeholders"] - len(_PLACEHOLDER.findall(answer))
    if need <= 0:
        return answer
    fields = ", ".join(f"[{name}]" for name in _PLACEHOLDER_NAMES[:need])
    return _join_paragraphs(answer, f"Adapt this to your case: {fields}.")


def _placeholders_miss(answer: str, kw: Kwargs) -> str:
    fewer = _placeholders_apply(answer, {"num_placeholders": kw["num_placeholders"] - 1}, None)
    return fewer if kw["num_placeholders"] > 1 else _join_paragraphs(answer, "Adapt this to your case: (your name).")


# Response language, offline and without a model: the language whose most frequent function words make up
# the largest share of the response's words; non-Latin scripts by their Unicode block. Enough to tell which of
# these languages a paragraph is in (tests), not to identify arbitrary text: anything else is "unknown".
LANGUAGE_NAMES = {"en": "English", "es": "Spanish", "fr": "French", "de": "German", "it": "Italian",
                  "pt": "Portuguese", "nl": "Dutch"}
_FUNCTION_WORDS = {
    "en": "the and of to is in that it for you are with as on this be not have or was by but they".split(),
    "es": "el la de que y en los las es un una por con para no se del al lo como más su pero muy está".split(),
    "fr": "le la les de des et est un une que en du pour pas dans qui sur au ce il elle vous avec sont".split(),
    "de": "der die das und ist nicht ein eine zu den mit von sie es auf für im dem auch sich des wird".split(),
    "it": "il la di che e è un una per non del della in sono con le gli si anche più questo ma".split(),
    "pt": "o a os as de que e é um uma para com não do da em no na por se mais são também ao".split(),
    "nl": "de het een en van is dat in niet op te met voor zijn ook die er maar als bij wordt".split(),
}
_SCRIPTS = {"ru": r"[\u0400-\u04ff]", "el": r"[\u0370-\u03ff]", "ar": r"[\u0600-\u06ff]", "he": r"[\u0590-\u05ff]",
            "hi": r"[\u0900-\u097f]", "ja": r"[\u3040-\u30ff]", "ko": r"[\uac00-\ud7af]", "zh": r"[\u4e00-\u9fff]",
            "th": r"[\u0e00-\u0e7f]"}


def detect_language(text: str) -> str:
    """ISO 639-1 code of the language ``text`` is written in, or ``"unknown"`` (see :data:`LANGUAGE_NAMES`).

    Non-Latin scripts win when they make up most letters (kana before Han: Japanese mixes both). Latin-script
    text goes to the language whose function words cover most of its words, if they cover at least 15 %
    and clearly more than the runner-up's.
    """
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return "unknown"
    for code, block in _SCRIPTS.items():
        if len(re.findall(block, text)) >= 0.3 * len(letters):
            return code
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return "unknown"
    scores = sorted(((sum(w in set(vocab) for w in words) / len(words), code)
                     for code, vocab in _FUNCTION_WORDS.items()), reverse=True)
    (best, code), (second, _) = scores[0], scores[1]
    return code if best >= 0.15 and best >= 1.3 * second else "unknown"



# ---- the registry --------------------------------------------------------------------------------

_C = Constraint
CONSTRAINTS: dict[str, Constraint] = {c.instruction_id: c for c in [
    _C("length_constraints:number_words",
       lambda r, kw: _compare(count_words(r), kw["relation"], kw["num_words"]),
       _number_words_apply, _number_words_sample, _number_words_miss, stage=2,
       applicable=lambda a: count_words(a) >= 12),
    _C("length_constraints:number_sentences",
       lambda r, kw: _compare(count_sentences(r), kw["relation"], kw["num_sentences"]),
       _number_sentences_apply, _number_sentences_sample, _number_sentences_miss, stage=1,
       applicable=lambda a: count_sentences(a) >= 2),
    _C("length_constraints:number_paragraphs",
       _number_paragraphs_check, _number_paragraphs_apply,
       lambda a, rng, p: {"num_paragraphs": rng.randint(2, min(4, max(2, len(_units(a)))))},
       _number_paragraphs_miss, stage=4, applicable=lambda a: len(_units(a)) >= 2),
    _C("length_constraints:nth_paragraph_first_word", _nth_paragraph_check, _nth_paragraph_apply,
       _nth_paragraph_sample, _nth_paragraph_miss, stage=4, applicable=lambda a: len(_units(a)) >= 2),
    _C("detectable_format:number_bullet_lists",
       lambda r, kw: len(_BULLET.findall(r)) == kw["num_bullets"], _number_bullets_apply,
       lambda a, rng, p: {"num_bullets": rng.randint(2, min(5, max(2, len(_units(a)))))},
       _number_bullets_miss, stage=4, applicable=lambda a: len(_units(a)) >= 2),
    _C("detectable_format:json_format",
       _json_check, lambda a, kw, p: json.dumps({"answer": a}, ensure_ascii=False, indent=2), _noargs,
       lambda a, kw: "Here is the answer in JSON format:\n" + json.dumps({"answer": a}, ensure_ascii=False),
       stage=11),
    _C("detectable_format:title",
       lambda r, kw: any(t.strip() for t in _TITLE.findall(r)),
       lambda a, kw, p: f"<<{_title_from(a, p)}>>\n\n{a}", _noargs,
       lambda a, kw: f"# {_title_from(a, None)}\n\n{a}", stage=5),
    _C("detectable_format:number_highlighted_sections",
       lambda r, kw: _highlights(r) >= kw["num_highlights"], _highlight_apply,
       lambda a, rng, p: {"num_highlights": rng.randint(1, min(3, max(1, count_sentences(a) - 1)))},
       _highlight_miss, stage=4, applicable=lambda a: count_sentences(a) >= 1 and "*" not in a),
    _C("detectable_format:multiple_sections",
       lambda r, kw: len(_section_header(kw["section_spliter"]).findall(r)) >= kw["num_sections"],
       _sections_apply,
       lambda a, rng, p: {"section_spliter": rng.choice(["Section", "SECTION"]),
                          "num_sections": rng.randint(2, min(4, max(2, len(_units(a)))))},
       _sections_miss, stage=4, applicable=lambda a: len(_units(a)) >= 2),
    _C("detectable_format:constrained_response", _constrained_check, _constrained_apply, _noargs,
       lambda a, kw: f"{a.rstrip()}\n\nMy answer is: it depends.", stage=7),
    _C("change_case:english_lowercase",
       lambda r, kw: r.islower(), lambda a, kw, p: a.lower(), _noargs,
       lambda a, kw: _sentence_case(a.lower()), stage=10, applicable=lambda a: any(ch.isupper() for ch in a)),
    _C("change_case:english_capital",
       lambda r, kw: r.isupper(), lambda a, kw, p: a.upper(), _noargs, _capital_miss, stage=10,
       applicable=lambda a: count_sentences(a) >= 2),
    _C("change_case:capital_word_frequency",
       lambda r, kw: _compare(_capital_words(r), kw["capital_relation"], kw["capital_frequency"]),
       _capital_words_apply, _capital_words_sample, _capital_words_miss, stage=3,
       applicable=lambda a: len(_content_words(a)) >= 3),
    _C("keywords:existence",
       lambda r, kw: all(count_word(r, k) for k in kw["keywords"]), _existence_apply, _existence_sample,
       _existence_miss, stage=3, applicable=lambda a: count_sentences(a) >= 2),
    _C("keywords:forbidden_words",
       _forbidden_check, _forbidden_apply, _forbidden_sample,
       _forbidden_miss, stage=0),
    _C("keywords:frequency",
       lambda r, kw: _compare(count_word(r, kw["keyword"]), kw["relation"], kw["frequency"]),
       _frequency_apply, _frequency_sample, _frequency_miss, stage=3,
       applicable=lambda a: bool(_content_words(a))),
    _C("keywords:letter_frequency",
       lambda r, kw: _compare(r.lower().count(kw["letter"].lower()), kw["let_relation"], kw["let_frequency"]),
       lambda a, kw, p: a, _letter_sample, _letter_miss, stage=12, applicable=lambda a: count_words(a) >= 12),
    _C("language:response_language",
       lambda r, kw: detect_language(r) == kw["language"], None,
       lambda a, rng, p: {"language": rng.choice(sorted(set(LANGUAGE_NAMES) - {"en"}))}, None, stage=0),
    _C("startend:end_checker",
       _end_check, lambda a, kw, p: _join_paragraphs(a, kw["end_phrase"]),
       lambda a, rng, p: {"end_phrase": rng.choice(END_PHRASES)},
       lambda a, kw: _join_paragraphs(a, kw["end_phrase"] + " Have a great day."), stage=7),
    _C("startend:quotation",
       _quotation_check, lambda a, kw, p: f'"{a}"', _noargs, lambda a, kw: f"'{a}'", stage=11),
    _C("punctuation:no_comma",
       lambda r, kw: "," not in r, lambda a, kw, p: re.sub(r",(\s?)", r"\1", a), _noargs,
       lambda a, kw: a.replace(",", "", a.count(",") - 1), stage=9, applicable=lambda a: "," in a),
    _C("detectable_content:postscript",
       _postscript_check, _postscript_apply, lambda a, rng, p: {"postscript_marker": rng.choice(["P.S.", "P.P.S."])},
       lambda a, kw: a.rstrip() + "\n\nNote: " + _stable_pick(_POSTSCRIPTS, a), stage=6),
    _C("detectable_content:number_placeholders",
       lambda r, kw: len(_PLACEHOLDER.findall(r)) >= kw["num_placeholders"], _placeholders_apply,
       lambda a, rng, p: {"num_placeholders": rng.randint(1, 3)}, _placeholders_miss, stage=6,
       applicable=lambda a: "[" not in a),
    _C("combination:repeat_prompt",
       _repeat_check, lambda a, kw, p: f"{kw['prompt_to_repeat'].strip()}\n\n{a}", _repeat_sample,
       lambda a, kw: f"You asked: {kw['prompt_to_repeat'].strip()}\n\n{a}", stage=8),
    _C("combination:two_responses",
       _two_responses_check, _two_responses_apply, _noargs,
       lambda a, kw: _two_responses_apply(a, kw, None).replace("******", "---"), stage=4,
       applicable=lambda a: count_sentences(a) >= 2),
]}

# ---- phrasings -----------------------------------------------------------------------------------
# Per type (and per relation, for the types that have one): at least six templates with {kwarg} fields.
# ``scripts/build_data.py`` trains on the first ones of each list and keeps the last HELD_OUT_PHRASINGS of each
# out of all training data (unseen phrasings for evaluation), so put new templates before the held-out ones
# only if you mean to train on them. Lists render as "a", "b" and "c".

_LESS, _LEAST = "less than", "at least"
PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "length_constraints:number_words": {
        _LESS: ("Answer in fewer than {num_words} words.", "Keep your response under {num_words} words.",
                "Your whole reply must be shorter than {num_words} words.", "Word limit: less than {num_words} words.",
                "Be brief: the answer has to stay below {num_words} words in total.",
                "Please limit the length of your answer so that it remains under a total of {num_words} words."),
        _LEAST: ("Answer with at least {num_words} words.", "Your response should be {num_words} words long or longer.",
                 "Write no fewer than {num_words} words.", "Length requirement: a minimum of {num_words} words.",
                 "Make sure the answer runs to {num_words} words or more.",
                 "I need a reply of at least {num_words} words, so do not be too brief."),
    },
    "length_constraints:number_sentences": {
        _LESS: ("Answer in fewer than {num_sentences} sentences.",
                "Use less than {num_sentences} sentences in your response.",
                "Your reply must contain less than {num_sentences} sentences.",
                "Sentence limit: fewer than {num_sentences}.", "Do not write {num_sentences} sentences or more.",
                "Say it in under {num_sentences} sentences, please."),
        _LEAST: ("Answer in at least {num_sentences} sentences.",
                 "Your response must contain {num_sentences} or more sentences.",
                 "Write no fewer than {num_sentences} sentences.", "Use a minimum of {num_sentences} sentences.",
                 "The answer needs {num_sentences} sentences at the very least.",
                 "Please explain this in {num_sentences} or more full sentences."),
    },
    "length_constraints:number_paragraphs": {"": (
        "Write exactly {num_paragraphs} paragraphs, separated from each other by the markdown divider ***.",
        "Your response should have {num_paragraphs} paragraphs. Put a line containing only *** between paragraphs.",
        "Split the answer into {num_paragraphs} paragraphs and put *** on its own line between each pair of them.",
        "Use {num_paragraphs} paragraphs, divided by lines of three asterisks (***).",
        "Organise your reply as {num_paragraphs} paragraphs; the separator between two paragraphs is a line with "
        "just ***.",
        "I want {num_paragraphs} paragraphs in total, with the markdown divider *** between consecutive "
        "paragraphs.")},
    "length_constraints:nth_paragraph_first_word": {"": (
        "Write {num_paragraphs} paragraphs separated by blank lines. Paragraph {nth_paragraph} must start with the "
        "word \"{first_word}\".",
        "There should be {num_paragraphs} paragraphs, separated from each other by an empty line, and paragraph "
        "number {nth_paragraph} has to begin with \"{first_word}\".",
        "Use {num_paragraphs} paragraphs (one blank line between paragraphs); start paragraph {nth_paragraph} with "
        "the word {first_word}.",
        "Answer in {num_paragraphs} paragraphs divided by blank lines, the first word of paragraph "
        "{nth_paragraph} being \"{first_word}\".",
        "Your reply needs {num_paragraphs} blank-line-separated paragraphs, and paragraph {nth_paragraph} opens "
        "with the word {first_word}.",
        "Give {num_paragraphs} paragraphs with an empty line between them; begin paragraph {nth_paragraph} with "
        "\"{first_word}\".")},
    "detectable_format:number_bullet_lists": {"": (
        "Format your answer as exactly {num_bullets} markdown bullet points, such as:\n* First point.\n* Second "
        "point.",
        "Your answer must contain exactly {num_bullets} bullet points, each on its own line starting with \"* \".",
        "Answer with {num_bullets} markdown bullet points and nothing else.",
        "Give the answer as a markdown list of exactly {num_bullets} items, each starting with \"* \".",
        "Reply using precisely {num_bullets} bullets (lines that begin with an asterisk and a space).",
        "Structure the response as {num_bullets} bullet points, no more and no fewer.")},
    "detectable_format:json_format": {"": (
        "Wrap your entire output in JSON format.",
        "Format your whole response as valid JSON. You may put it inside markdown ``` ticks.",
        "Respond only with a JSON object.", "The entire reply must be parseable as JSON.",
        "Return your answer as JSON, with no text outside the JSON.", "Output nothing but valid JSON.")},
    "detectable_format:title": {"": (
        "Your answer must contain a title, wrapped in double angular brackets, such as <<my title>>.",
        "Give your response a title inside double angle brackets, like <<title here>>.",
        "Start with a title enclosed in << and >>.", "Include a title for the answer, written as <<Title>>.",
        "Put a heading at the top in the form <<heading>>.",
        "Add a title to your reply; mark it with double angle brackets, e.g. <<A good title>>.")},
    "detectable_format:number_highlighted_sections": {"": (
        "Highlight at least {sections} of your answer with markdown, i.e. *highlighted section*.",
        "Mark at least {parts} of your response as *highlighted text* using single asterisks.",
        "Use markdown to highlight {num_highlights} or more sections, like *this*.",
        "Emphasise at least {passages} by wrapping each in single asterisks (*like this*).",
        "In your reply, at least {pieces} of text should be highlighted with *asterisks*.",
        "Make sure that {num_highlights} or more parts of the answer appear as *highlighted sections*.")},
    "detectable_format:multiple_sections": {"": (
        "Your response must have {num_sections} sections. Mark the beginning of each section with "
        "{section_spliter} X, such as: {section_spliter} 1",
        "Divide your answer into {num_sections} sections, each starting with a line \"{section_spliter} N\" "
        "(N = 1, 2, ...).",
        "Organise the reply in {num_sections} sections, labelled {section_spliter} 1, {section_spliter} 2 and so on.",
        "Write {num_sections} sections; begin each one with the header {section_spliter} followed by its number.",
        "Break the response into {num_sections} numbered parts, and open each part with \"{section_spliter} "
        "<number>\".",
        "There should be {num_sections} sections in your answer, headed {section_spliter} 1, {section_spliter} 2, "
        "etc.")},
    "detectable_format:constrained_response": {"": (
        "Answer with one of the following options: My answer is yes., My answer is no., My answer is maybe.",
        "Your reply must include one of these exact sentences: \"My answer is yes.\", \"My answer is no.\" or "
        "\"My answer is maybe.\"",
        "Give your verdict as \"My answer is yes.\", \"My answer is no.\" or \"My answer is maybe.\", word for word.",
        "Include exactly one of the phrases \"My answer is yes.\", \"My answer is no.\", \"My answer is maybe.\" in "
        "the reply.",
        "State your verdict with one of: My answer is yes. / My answer is no. / My answer is maybe.",
        "Whatever else you write, use one of these sentences: \"My answer is yes.\", \"My answer is no.\", "
        "\"My answer is maybe.\"")},
    "change_case:english_lowercase": {"": (
        "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
        "Write your whole answer in lowercase letters only.", "Do not use any capital letters in your response.",
        "Use only lowercase letters throughout the reply.",
        "Every letter of your answer must be lowercase; no capital letters at all.",
        "Reply entirely in lowercase, including the first word of each sentence.")},
    "change_case:english_capital": {"": (
        "Your entire response should be in English, and in all capital letters.",
        "Write your whole answer in CAPITAL LETTERS only.", "Respond in all uppercase letters.",
        "Use uppercase for every letter of the reply.", "Your answer must be written entirely in capital letters.",
        "Type the whole response in caps lock, i.e. ALL CAPITALS.")},
    "change_case:capital_word_frequency": {
        _LESS: ("Use fewer than {capital_frequency} words in all capital letters.",
                "Words written entirely in capitals should appear less than {capital_frequency} times.",
                "Do not write {capital_frequency} or more words in ALL CAPS.",
                "Keep the number of all-uppercase words below {capital_frequency}.",
                "Limit fully capitalised words to fewer than {capital_frequency}.",
                "You may use all-capital words, but fewer than {capital_frequency} of them."),
        _LEAST: ("In your response, words with all capital letters should appear at least {capital_frequency} "
                 "times.", "Write at least {capital_frequency} words in ALL CAPS for emphasis.",
                 "Use {capital_frequency} or more fully capitalised words.",
                 "Emphasise key words by writing at least {capital_frequency} of them in capital letters.",
                 "Include no fewer than {capital_frequency} words spelled entirely in uppercase.",
                 "At least {capital_frequency} words of your answer should be in all capitals."),
    },
    "keywords:existence": {"": (
        "Include the keywords {keywords} in the response.", "Make sure your answer mentions {keywords}.",
        "Use the words {keywords} somewhere in your reply.", "Your response must contain the words {keywords}.",
        "Work the terms {keywords} into your answer.", "Be sure to use {keywords} in what you write.")},
    "keywords:forbidden_words": {"": (
        "Do not include the words {forbidden_words} in the response.",
        "Avoid the words {forbidden_words} in your answer.",
        "Your reply must not contain the words {forbidden_words}.", "Never use the words {forbidden_words}.",
        "The words {forbidden_words} are not allowed anywhere in your answer.",
        "Steer clear of {forbidden_words} entirely when you reply.")},
    "keywords:frequency": {
        _LESS: ("Use the word \"{keyword}\" fewer than {frequency} times.",
                "The word \"{keyword}\" should appear less than {frequency} times.",
                "Do not use \"{keyword}\" {frequency} or more times.",
                "Mention \"{keyword}\" fewer than {frequency} times in your reply.",
                "Keep the number of times you write \"{keyword}\" below {frequency}.",
                "Limit the word \"{keyword}\" to less than {frequency} occurrences."),
        _LEAST: ("Use the word \"{keyword}\" at least {frequency} times.",
                 "The word \"{keyword}\" should appear {frequency} or more times.",
                 "Mention \"{keyword}\" at least {frequency} times in your answer.",
                 "Repeat the word \"{keyword}\" at least {frequency} times.",
                 "Your answer needs to contain \"{keyword}\" no fewer than {frequency} times.",
                 "Make the word \"{keyword}\" occur {frequency} times or more."),
    },
    "keywords:letter_frequency": {
        _LESS: ("Use the letter \"{letter}\" fewer than {let_frequency} times in your response.",
                "The letter \"{letter}\" should appear less than {let_frequency} times.",
                "Do not write the letter {letter} {let_frequency} or more times.",
                "Keep the count of the letter \"{letter}\" below {let_frequency}.",
                "Your reply should have fewer than {let_frequency} occurrences of the letter {letter}.",
                "Make sure the letter \"{letter}\" occurs fewer than {let_frequency} times."),
        _LEAST: ("In your response, the letter \"{letter}\" should appear at least {let_frequency} times.",
                 "Use the letter {letter} {let_frequency} or more times.",
                 "The letter \"{letter}\" must occur no fewer than {let_frequency} times.",
                 "Include the letter \"{letter}\" at least {let_frequency} times.",
                 "Your answer needs {let_frequency} or more occurrences of the letter {letter}.",
                 "Write a reply in which the letter \"{letter}\" appears at least {let_frequency} times."),
    },
    "language:response_language": {"": (
        "Your ENTIRE response should be in {language_name}, no other language is allowed.",
        "Answer in {language_name} only.", "Write the whole reply in the {language_name} language.",
        "Please respond in {language_name}.", "Do not use English: your answer must be written in {language_name}.",
        "Use {language_name} for the entire answer.")},
    "startend:end_checker": {"": (
        "Finish your response with this exact phrase: {end_phrase} No other words should follow this phrase.",
        "End your answer with the exact phrase \"{end_phrase}\".", "The last words of your reply must be: {end_phrase}",
        "Close the response with \"{end_phrase}\" and write nothing after it.",
        "Your final sentence must be exactly \"{end_phrase}\".",
        "Conclude with the words \"{end_phrase}\", and let nothing follow them.")},
    "startend:quotation": {"": (
        "Wrap your entire response with double quotation marks.", "Put your whole answer inside double quotes.",
        "Your response must start and end with a double quotation mark (\").",
        "Enclose the full reply in double quotation marks.",
        "Begin and end your answer with the \" character, so the whole of it is quoted.",
        "Present the complete answer as one quotation, inside double quotes.")},
    "punctuation:no_comma": {"": (
        "Do not use any commas in your response.", "In your entire response, avoid commas.",
        "Write your answer without a single comma.", "No commas are allowed in the reply.",
        "Refrain from using any comma anywhere in your answer.", "Your answer must be free of commas.")},
    "detectable_content:postscript": {"": (
        "At the end of your response, add a postscript starting with {postscript_marker}",
        "Add a postscript at the end that begins with {postscript_marker}",
        "Finish with a short note starting with \"{postscript_marker}\".",
        "After your answer, include a postscript marked {postscript_marker}",
        "Please end with an afterthought that opens with \"{postscript_marker}\".",
        "Append a {postscript_marker} note after the main answer.")},
    "detectable_content:number_placeholders": {"": (
        "The response must contain at least {num_placeholders} placeholders represented by square brackets, such "
        "as [address].", "Include at least {num_placeholders} placeholders in square brackets, like [name].",
        "Leave {num_placeholders} or more blanks for the reader to fill in, written as [placeholder].",
        "Use no fewer than {num_placeholders} bracketed placeholders such as [date] in your answer.",
        "Your reply should have at least {num_placeholders} fill-in fields in square brackets, e.g. [your city].",
        "Add {num_placeholders} or more placeholders in [square brackets].")},
    "combination:repeat_prompt": {"": (
        "First repeat the request word for word without change, then give your answer. Do not say anything before "
        "repeating the request; the request to repeat does not include this sentence.",
        "Begin by copying the request above exactly as written (not including this instruction), then answer it.",
        "Start your reply by restating the request verbatim (leave out this sentence), and only then answer.",
        "Repeat the request exactly (everything except this instruction) before you respond to it.",
        "Your response should open with an exact copy of the request, minus this sentence, followed by the answer.",
        "Echo the request back word for word, without this instruction, and then give your answer.")},
    "combination:two_responses": {"": (
        "Give two different responses. Separate the responses, and only the responses, with 6 asterisk symbols: "
        "******.",
        "Write two different answers, one after the other, separated by a line of six asterisks (******).",
        "Provide two distinct responses and put ****** between them.",
        "Answer twice, in two different ways, with ****** separating the two answers.",
        "I would like two alternative replies; use ****** as the only separator between them.",
        "Offer a pair of different answers divided by six asterisks, like this: ******.")},
}

# ---- training-only types ---------------------------------------------------------------------------
# Not IFEval types and never evaluated: broader instruction data for training (measured: docs/experiments.md). Each asks for a skill
# the held-out types also need (copy quoted text verbatim, keep exact delimiters, count a character), with its own
# check, so that no held-out type is trained under another name. Asked alone (see :func:`compatible`); every
# phrasing is a training phrasing.

_OPENINGS = ("Here is my answer:", "Good question, and here is why.", "In short:", "Let me explain.",
             "Here is what I know:", "The short answer follows.", "Thanks for asking.", "Happy to help with this.")
_INSERTS = ("This is worth remembering.", "There is more to it than that.", "Details can vary a little.",
            "That is the key point.", "Keep this in mind.", "It helps to go step by step.")
_TAGS = ("answer", "reply", "response", "final")
_CLOSING_QUESTIONS = ("Does that help?", "Would you like more detail?", "Is there anything else you want to know?",
                      "Shall I give an example?", "Does that answer your question?")


def _start_phrase_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    return kw["phrase"] + ("\n\n" if "\n" in answer.strip() else " ") + answer.lstrip()


def _include_sentence_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    """The sentence after the answer's first sentence (or first paragraph, for answers with lines)."""
    text = answer.strip()
    if "\n" in text:
        first, _, rest = text.partition("\n\n")
        return f"{first}\n\n{kw['sentence']}" + (f"\n\n{rest}" if rest else "")
    spans = sentence_spans(text)
    cut = spans[0][1] if spans else len(text)
    return f"{text[:cut]} {kw['sentence']} {text[cut:].lstrip()}".rstrip()


def _include_sentence_miss(answer: str, kw: Kwargs) -> str:
    words = kw["sentence"].split()
    return _include_sentence_apply(answer, {"sentence": " ".join(words[:1] + words[2:])}, None)  # a word left out


def _tags_check(response: str, kw: Kwargs) -> bool:
    tag = re.escape(kw["tag"])
    return re.fullmatch(rf"\s*<{tag}>.*</{tag}>\s*", response, flags=re.DOTALL) is not None


def _tags_apply(answer: str, kw: Kwargs, _prompt: str | None) -> str:
    sep = "\n" if "\n" in answer.strip() else ""
    return f"<{kw['tag']}>{sep}{answer.strip()}{sep}</{kw['tag']}>"


_PERIOD_END = re.compile(r"\.(?=\s|$)")


def _exclaim(answer: str, n: int) -> str:
    """``answer`` with its last ``n`` sentence-ending full stops turned into exclamation marks."""
    ends = [m.start() for m in _PERIOD_END.finditer(answer)][-n:] if n else []
    chars = list(answer)
    for i in ends:
        chars[i] = "!"
    return "".join(chars)


def _exclamations_sample(answer: str, rng: random.Random, _prompt: str | None) -> Kwargs:
    return {"num_exclamations": rng.randint(1, min(3, len(_PERIOD_END.findall(answer)) - 1))}


def _exclamations_miss(answer: str, kw: Kwargs) -> str:
    return _exclaim(answer, kw["num_exclamations"] + 1)


TRAINING_ONLY: dict[str, Constraint] = {c.instruction_id: c for c in [
    _C("training_only:start_phrase", lambda r, kw: r.lstrip().startswith(kw["phrase"]), _start_phrase_apply,
       lambda a, rng, p: {"phrase": rng.choice(_OPENINGS)},
       lambda a, kw: a.rstrip() + " " + kw["phrase"], stage=6),  # the phrase, but at the end
    _C("training_only:include_sentence", lambda r, kw: kw["sentence"] in r, _include_sentence_apply,
       lambda a, rng, p: {"sentence": rng.choice(_INSERTS)}, _include_sentence_miss, stage=3,
       applicable=lambda a: count_sentences(a) >= 2),
    _C("training_only:answer_tags", _tags_check, _tags_apply, lambda a, rng, p: {"tag": rng.choice(_TAGS)},
       lambda a, kw: f"[{kw['tag']}]{a.strip()}[/{kw['tag']}]", stage=7),  # the wrong brackets
    _C("training_only:exclamation_count", lambda r, kw: r.count("!") == kw["num_exclamations"],
       lambda a, kw, p: _exclaim(a, kw["num_exclamations"]), _exclamations_sample, _exclamations_miss, stage=2,
       applicable=lambda a: "!" not in a and len(_PERIOD_END.findall(a)) >= 3),
    _C("training_only:closing_question", lambda r, kw: r.rstrip().endswith("?"),
       lambda a, kw, p: _join_paragraphs(a, _stable_pick(_CLOSING_QUESTIONS, a)), _noargs,
       lambda a, kw: _join_paragraphs(a, _stable_pick(_CLOSING_QUESTIONS, a) + " Let me know."), stage=6,
       applicable=lambda a: not a.rstrip().endswith("?")),
]}
PHRASINGS.update({
    "training_only:start_phrase": {"": (
        'Begin your answer with the exact words "{phrase}"', 'Start your reply with "{phrase}" and then answer.',
        'Your response must open with the phrase "{phrase}"', "The first words of your answer should be: {phrase}",
        'Make "{phrase}" the very beginning of your response.', 'Open with "{phrase}", word for word.')},
    "training_only:include_sentence": {"": (
        'Include the sentence "{sentence}" somewhere in your answer.',
        "Somewhere in your reply, write this exact sentence: {sentence}",
        'Use the sentence "{sentence}" word for word in your response.',
        'Work the line "{sentence}" into your answer, unchanged.', 'Your answer must contain the sentence "{sentence}"',
        'Somewhere in the middle of the answer, add "{sentence}" exactly as written.')},
    "training_only:answer_tags": {"": (
        "Wrap your whole answer in <{tag}> and </{tag}> tags.", "Put the answer between <{tag}> and </{tag}>.",
        "Enclose your response in the tags <{tag}>...</{tag}>.",
        "Format: <{tag}>your answer</{tag}>, with nothing outside the tags.",
        "Your entire reply goes inside <{tag}></{tag}>.", "Start with <{tag}>, end with </{tag}>, answer in between.")},
    "training_only:exclamation_count": {"": (
        "Use exactly {num_exclamations} exclamation mark(s) in your answer.",
        'Your reply must contain {num_exclamations} "!" character(s), no more and no fewer.',
        "Put precisely {num_exclamations} exclamation point(s) in your response.",
        "Include exactly {num_exclamations} exclamation mark(s).",
        "The answer should have {num_exclamations} exclamation mark(s) in total.",
        "Count your exclamation marks: there must be exactly {num_exclamations}.")},
    "training_only:closing_question": {"": (
        "End your answer with a question to the reader.", "Finish your reply by asking me a question.",
        "The last sentence of your response must be a question.", "Close with a question mark: ask me something.",
        "Make the final line of your answer a question.", "Answer, then end on a question of your own.")},
})

# The kwarg that picks a type's list of phrasings (types without one have a single list, keyed "").
_VARIANT_KEY = {"length_constraints:number_words": "relation", "length_constraints:number_sentences": "relation",
                "keywords:frequency": "relation", "keywords:letter_frequency": "let_relation",
                "change_case:capital_word_frequency": "capital_relation"}


def _fields(kw: Kwargs) -> Kwargs:
    """Template fields: the kwargs (lists as "a", "b" and "c") plus a few worded forms."""
    fields: Kwargs = {k: _quoted(v) if isinstance(v, list) else v for k, v in kw.items()}
    if "num_highlights" in kw:
        n = kw["num_highlights"]
        fields.update({noun: _plural(n, noun[:-1]) for noun in ("sections", "parts", "passages", "pieces")})
    if "language" in kw:
        fields["language_name"] = LANGUAGE_NAMES.get(kw["language"], kw["language"])
    return fields


def phrasing_templates(instruction_id: str, kwargs: Kwargs | None = None) -> tuple[str, ...]:
    """The instruction templates of a type; for types with a relation, those of ``kwargs``' relation."""
    get_constraint(instruction_id)
    variants = PHRASINGS[instruction_id]
    key = _VARIANT_KEY.get(instruction_id)
    if key is None:
        return variants[""]
    kw = _clean(kwargs)
    if key not in kw:
        raise PipelineError(f"Constraint {instruction_id} needs the kwarg '{key}'; got {sorted(kw)}.")
    if kw[key] not in variants:
        raise PipelineError(f"Unknown relation {kw[key]!r} in constraint kwargs; use one of {list(RELATIONS)}.")
    return variants[kw[key]]


def all_templates(instruction_id: str) -> list[tuple[str, int, str]]:
    """Every ``(variant, index, template)`` of a type (variant: the relation, or "")."""
    return [(variant, i, t) for variant, templates in PHRASINGS[instruction_id].items()
            for i, t in enumerate(templates)]


# Types whose apply() leaves code intact (the others restructure, re-case or cut text and would break it).
_CODE_SAFE = {"detectable_format:title", "detectable_content:postscript", "startend:end_checker",
              "combination:repeat_prompt", "detectable_format:json_format", "keywords:existence"}


def _has_code(text: str) -> bool:
    return "`" in text


# Pairs of constraints that cannot (or cannot sensibly) hold together; combined prompts never use them.
_JSON_OK = {"change_case:english_lowercase", "punctuation:no_comma", "keywords:existence",
            "keywords:forbidden_words", "keywords:frequency", "length_constraints:number_words"}
_CONFLICT_LIST = [
    ("change_case:english_lowercase", "change_case:english_capital"),
    ("change_case:english_lowercase", "detectable_format:multiple_sections"),
    ("change_case:english_capital", "detectable_format:multiple_sections"),
    ("startend:quotation", "combination:repeat_prompt"),
    ("startend:quotation", "detectable_format:number_bullet_lists"),
    ("startend:quotation", "detectable_format:multiple_sections"),
    ("startend:quotation", "startend:end_checker"),
    ("startend:quotation", "combination:two_responses"),
    ("detectable_format:number_bullet_lists", "length_constraints:number_paragraphs"),
    ("detectable_format:number_bullet_lists", "detectable_format:multiple_sections"),
    ("detectable_format:number_bullet_lists", "length_constraints:number_sentences"),
    ("length_constraints:number_paragraphs", "detectable_format:multiple_sections"),
    ("combination:repeat_prompt", "change_case:english_lowercase"),
    ("combination:repeat_prompt", "change_case:english_capital"),
    ("combination:repeat_prompt", "punctuation:no_comma"),
    ("combination:repeat_prompt", "keywords:forbidden_words"),
    ("combination:repeat_prompt", "keywords:frequency"),
    ("combination:repeat_prompt", "length_constraints:number_words"),
    ("combination:repeat_prompt", "length_constraints:number_sentences"),
    *[("combination:two_responses", other) for other in (
        "combination:repeat_prompt", "detectable_format:number_bullet_lists", "length_constraints:number_paragraphs",
        "detectable_format:multiple_sections", "length_constraints:number_sentences",
        "length_constraints:number_words", "detectable_content:postscript", "keywords:frequency",
        "startend:end_checker")],
    *[("detectable_format:json_format", other) for other in CONSTRAINTS if other not in _JSON_OK],
    # Check-only: nothing can rewrite an answer into another language, so it is always asked for alone.
    *[("language:response_language", other) for other in CONSTRAINTS if other != "language:response_language"],
    # Paragraph counts break when another constraint adds or regroups paragraphs.
    *[("length_constraints:nth_paragraph_first_word", other) for other in (
        "length_constraints:number_paragraphs", "detectable_format:number_bullet_lists",
        "detectable_format:multiple_sections", "combination:two_responses", "combination:repeat_prompt",
        "detectable_format:title", "detectable_content:postscript", "startend:end_checker", "keywords:existence",
        "detectable_content:number_placeholders", "detectable_format:constrained_response",
        "length_constraints:number_sentences", "length_constraints:number_words")],
    ("detectable_format:constrained_response", "change_case:english_lowercase"),
    ("detectable_format:constrained_response", "change_case:english_capital"),
    ("change_case:capital_word_frequency", "change_case:english_lowercase"),
    ("change_case:capital_word_frequency", "change_case:english_capital"),
]
_CONFLICTS = {frozenset(pair) for pair in _CONFLICT_LIST}


def compatible(instruction_ids: Sequence[str]) -> bool:
    """True if the constraints can all be asked for in one prompt (no duplicates, no declared conflict)."""
    ids = list(instruction_ids)
    if len(set(ids)) != len(ids) or (len(ids) > 1 and any(i in TRAINING_ONLY for i in ids)):
        return False
    return not any(frozenset((a, b)) in _CONFLICTS for i, a in enumerate(ids) for b in ids[i + 1:])


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def get_constraint(instruction_id: str) -> Constraint:
    """The registered constraint type, or a PipelineError listing the supported ids."""
    try:
        return CONSTRAINTS[instruction_id] if instruction_id in CONSTRAINTS else TRAINING_ONLY[instruction_id]
    except KeyError:
        raise PipelineError(
            f"Unknown instruction id {instruction_id!r}. Supported ids: {', '.join(sorted(CONSTRAINTS))}. "
            "Remove prompts using other ids from the eval file or add the type to pipeline/data/constraints.py."
        ) from None


def is_applicable(instruction_id: str, answer: str) -> bool:
    """Does the constraint suit this answer (e.g. enough sentences to make bullets; no code to re-case)?

    Check-only types (no ``apply``, e.g. the response language) suit no answer: they cannot be rewritten into."""
    spec = get_constraint(instruction_id)
    return (spec.apply is not None and (instruction_id in _CODE_SAFE or not _has_code(answer))
            and spec.applicable(answer))


def can_rewrite(instruction_id: str) -> bool:
    """Can :func:`apply` make an answer follow this type (else it is check-only: evaluation prompts only)?"""
    return get_constraint(instruction_id).apply is not None


def _clean(kwargs: Kwargs | None) -> Kwargs:
    # IFEval-style files often carry every kwarg name with null values; only the set ones matter.
    return {k: v for k, v in (kwargs or {}).items() if v is not None}


def describe(instruction_id: str, kwargs: Kwargs, rng: random.Random | int | None = None) -> str:
    """The natural-language instruction for a constraint; ``rng`` (a Random, or an int: the index into
    :func:`phrasing_templates`) picks the phrasing, ``None`` the first one."""
    kw = _clean(kwargs)
    options = phrasing_templates(instruction_id, kw)
    if rng is None:
        template = options[0]
    else:
        template = options[rng.randrange(len(options)) if isinstance(rng, random.Random) else rng % len(options)]
    try:
        return template.format(**_fields(kw))
    except KeyError as missing:
        raise PipelineError(f"Constraint {instruction_id} needs the kwarg {missing}; got {sorted(kw)}.") from None


def check(instruction_id: str, response: str, kwargs: Kwargs, prompt: str | None = None) -> bool:
    """Strict check: does ``response`` follow the constraint as written?"""
    kw = _clean(kwargs)
    if instruction_id == "combination:repeat_prompt" and "prompt_to_repeat" not in kw and prompt:
        kw["prompt_to_repeat"] = prompt
    try:
        return bool(get_constraint(instruction_id).check(response, kw))
    except KeyError as missing:
        raise PipelineError(f"Constraint {instruction_id} needs the kwarg {missing}; got {sorted(kw)}.") from None


def loose_variants(response: str) -> list[str]:
    """The response, without its first line, last line, or both; each also with markdown ``*`` removed."""
    lines = response.split("\n")
    base = [response, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    return [v for v in base + [v.replace("*", "") for v in base] if v.strip()]


def check_loose(instruction_id: str, response: str, kwargs: Kwargs, prompt: str | None = None) -> bool:
    """Loose check (as in IFEval): strict check passes on any of :func:`loose_variants`."""
    return any(check(instruction_id, v, kwargs, prompt) for v in loose_variants(response))


def apply(instruction_id: str, answer: str, kwargs: Kwargs, prompt: str | None = None) -> str:
    """Deterministically transform ``answer`` so it satisfies the constraint (``prompt`` only shapes titles).

    For "at least" relations the kwargs from :func:`sample_kwargs` already hold for the answer; callers
    should still :func:`check` the result (:func:`apply_all` does not).
    """
    return _rewriter(instruction_id, "apply")(answer, _clean(kwargs), prompt)


def _rewriter(instruction_id: str, kind: str) -> Callable:
    fn = getattr(get_constraint(instruction_id), kind)
    if fn is None:
        raise PipelineError(f"{instruction_id} is check-only: there is no {kind} for it (it cannot rewrite an "
                            "answer into, e.g., another language). Use it in evaluation prompts only.")
    return fn


def apply_all(answer: str, instruction_ids: Sequence[str], kwargs_list: Sequence[Kwargs],
              prompt: str | None = None, miss: str | None = None) -> str:
    """Apply several constraints in their stage order; the one named ``miss`` gets its near miss instead."""
    order = sorted(range(len(instruction_ids)), key=lambda i: get_constraint(instruction_ids[i]).stage)
    text = answer
    for i in order:
        iid, kw = instruction_ids[i], _clean(kwargs_list[i])
        text = _rewriter(iid, "near_miss")(text, kw) if iid == miss else _rewriter(iid, "apply")(text, kw, prompt)
    return text


def near_miss(instruction_id: str, answer: str, kwargs: Kwargs) -> str:
    """A response that tries to follow the constraint but fails its check (for rejected preference answers)."""
    return _rewriter(instruction_id, "near_miss")(answer, _clean(kwargs))


def sample_kwargs(instruction_id: str, answer: str, rng: random.Random, prompt: str | None = None) -> Kwargs:
    """Parameters that make sense for ``answer`` (e.g. a word limit the answer can be cut to)."""
    return get_constraint(instruction_id).sample_kwargs(answer, rng, prompt)


def evaluate_response(response: str, instruction_id_list: Sequence[str], kwargs_list: Sequence[Kwargs],
                      prompt: str | None = None) -> dict[str, Any]:
    """Score one response: strict and loose result per instruction, and prompt-level all-pass for both."""
    if len(instruction_id_list) != len(kwargs_list):
        raise PipelineError(f"Got {len(instruction_id_list)} instruction ids but {len(kwargs_list)} kwargs dicts; "
                            "each instruction id needs its own kwargs entry (use {} when it has none).")
    # As in IFEval, an empty response follows nothing (it would otherwise pass "no commas", "fewer than N words").
    answered = bool(response.strip())
    strict = [answered and check(i, response, kw, prompt)
              for i, kw in zip(instruction_id_list, kwargs_list, strict=True)]
    loose = [answered and check_loose(i, response, kw, prompt)
             for i, kw in zip(instruction_id_list, kwargs_list, strict=True)]
    return {"instruction_id_list": list(instruction_id_list), "strict": strict, "loose": loose,
            "prompt_strict": all(strict), "prompt_loose": all(loose)}
