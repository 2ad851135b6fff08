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
    phrasings: Callable[[Kwargs], list[str]]  # instruction texts for the kwargs, variant 0 first
    check: Callable[[str, Kwargs], bool]  # strict check of a response
    apply: Callable[[str, Kwargs, str | None], str]  # (answer, kwargs, prompt) -> compliant answer
    sample_kwargs: Callable[[str, random.Random, str | None], Kwargs]  # (answer, rng, prompt) -> kwargs
    near_miss: Callable[[str, Kwargs], str]  # a compliance attempt that fails the check
    stage: int  # order in which apply() runs when constraints are combined (content → structure → wrappers)
    applicable: Callable[[str], bool] = lambda answer: True  # does this constraint suit the answer at all?


def _noargs(_answer: str, _rng: random.Random, _prompt: str | None) -> Kwargs:
    return {}


# ---- length_constraints --------------------------------------------------------------------------


def _number_words_phrasings(kw: Kwargs) -> list[str]:
    n = kw["num_words"]
    if kw["relation"] == "less than":
        return [f"Answer in fewer than {n} words.", f"Keep your response under {n} words.",
                f"Your whole reply must be shorter than {n} words."]
    return [f"Answer with at least {n} words.", f"Your response should be {n} words long or longer.",
            f"Write no fewer than {n} words."]


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


def _number_sentences_phrasings(kw: Kwargs) -> list[str]:
    n = kw["num_sentences"]
    if kw["relation"] == "less than":
        return [f"Answer in fewer than {n} sentences.", f"Use less than {n} sentences in your response.",
                f"Your reply must contain less than {n} sentences."]
    return [f"Answer in at least {n} sentences.", f"Your response must contain {n} or more sentences.",
            f"Write no fewer than {n} sentences."]


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


def _frequency_phrasings(kw: Kwargs) -> list[str]:
    w, n = kw["keyword"], kw["frequency"]
    if kw["relation"] == "less than":
        return [f'Use the word "{w}" fewer than {n} times.', f'The word "{w}" should appear less than {n} times.']
    return [f'Use the word "{w}" at least {n} times.', f'The word "{w}" should appear {n} or more times.',
            f'Mention "{w}" at least {n} times in your answer.']


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


# ---- the registry --------------------------------------------------------------------------------

_C = Constraint
CONSTRAINTS: dict[str, Constraint] = {c.instruction_id: c for c in [
    _C("length_constraints:number_words", _number_words_phrasings,
       lambda r, kw: _compare(count_words(r), kw["relation"], kw["num_words"]),
       _number_words_apply, _number_words_sample, _number_words_miss, stage=2,
       applicable=lambda a: count_words(a) >= 12),
    _C("length_constraints:number_sentences", _number_sentences_phrasings,
       lambda r, kw: _compare(count_sentences(r), kw["relation"], kw["num_sentences"]),
       _number_sentences_apply, _number_sentences_sample, _number_sentences_miss, stage=1,
       applicable=lambda a: count_sentences(a) >= 2),
    _C("length_constraints:number_paragraphs",
       lambda kw: [f"Write exactly {kw['num_paragraphs']} paragraphs, separated from each other by the "
                   "markdown divider ***.",
                   f"Your response should have {kw['num_paragraphs']} paragraphs. Put a line containing only "
                   "*** between paragraphs."],
       _number_paragraphs_check, _number_paragraphs_apply,
       lambda a, rng, p: {"num_paragraphs": rng.randint(2, min(4, max(2, len(_units(a)))))},
       _number_paragraphs_miss, stage=4, applicable=lambda a: len(_units(a)) >= 2),
    _C("detectable_format:number_bullet_lists",
       lambda kw: [f"Format your answer as exactly {kw['num_bullets']} markdown bullet points, such as:\n"
                   "* First point.\n* Second point.",
                   f"Your answer must contain exactly {kw['num_bullets']} bullet points, each on its own line "
                   "starting with \"* \".",
                   f"Answer with {kw['num_bullets']} markdown bullet points and nothing else."],
       lambda r, kw: len(_BULLET.findall(r)) == kw["num_bullets"], _number_bullets_apply,
       lambda a, rng, p: {"num_bullets": rng.randint(2, min(5, max(2, len(_units(a)))))},
       _number_bullets_miss, stage=4, applicable=lambda a: len(_units(a)) >= 2),
    _C("detectable_format:json_format",
       lambda kw: ["Wrap your entire output in JSON format.",
                   "Format your whole response as valid JSON. You may put it inside markdown ``` ticks.",
                   "Respond only with a JSON object."],
       _json_check, lambda a, kw, p: json.dumps({"answer": a}, ensure_ascii=False, indent=2), _noargs,
       lambda a, kw: "Here is the answer in JSON format:\n" + json.dumps({"answer": a}, ensure_ascii=False),
       stage=11),
    _C("detectable_format:title",
       lambda kw: ["Your answer must contain a title, wrapped in double angular brackets, such as <<my title>>.",
                   "Give your response a title inside double angle brackets, like <<title here>>.",
                   "Start with a title enclosed in << and >>."],
       lambda r, kw: any(t.strip() for t in _TITLE.findall(r)),
       lambda a, kw, p: f"<<{_title_from(a, p)}>>\n\n{a}", _noargs,
       lambda a, kw: f"# {_title_from(a, None)}\n\n{a}", stage=5),
    _C("detectable_format:number_highlighted_sections",
       lambda kw: [f"Highlight at least {_plural(kw['num_highlights'], 'section')} of your answer with "
                   "markdown, i.e. *highlighted section*.",
                   f"Mark at least {_plural(kw['num_highlights'], 'part')} of your response as *highlighted "
                   "text* using single asterisks."],
       lambda r, kw: _highlights(r) >= kw["num_highlights"], _highlight_apply,
       lambda a, rng, p: {"num_highlights": rng.randint(1, min(3, max(1, count_sentences(a) - 1)))},
       _highlight_miss, stage=4, applicable=lambda a: count_sentences(a) >= 1 and "*" not in a),
    _C("detectable_format:multiple_sections",
       lambda kw: [f"Your response must have {kw['num_sections']} sections. Mark the beginning of each section "
                   f"with {kw['section_spliter']} X, such as: {kw['section_spliter']} 1",
                   f"Divide your answer into {kw['num_sections']} sections, each starting with a line "
                   f"\"{kw['section_spliter']} N\" (N = 1, 2, ...)."],
       lambda r, kw: len(_section_header(kw["section_spliter"]).findall(r)) >= kw["num_sections"],
       _sections_apply,
       lambda a, rng, p: {"section_spliter": rng.choice(["Section", "SECTION"]),
                          "num_sections": rng.randint(2, min(4, max(2, len(_units(a)))))},
       _sections_miss, stage=4, applicable=lambda a: len(_units(a)) >= 2),
    _C("change_case:english_lowercase",
       lambda kw: ["Your entire response should be in English, and in all lowercase letters. No capital letters "
                   "are allowed.", "Write your whole answer in lowercase letters only.",
                   "Do not use any capital letters in your response."],
       lambda r, kw: r.islower(), lambda a, kw, p: a.lower(), _noargs,
       lambda a, kw: _sentence_case(a.lower()), stage=10, applicable=lambda a: any(ch.isupper() for ch in a)),
    _C("change_case:english_capital",
       lambda kw: ["Your entire response should be in English, and in all capital letters.",
                   "Write your whole answer in CAPITAL LETTERS only.", "Respond in all uppercase letters."],
       lambda r, kw: r.isupper(), lambda a, kw, p: a.upper(), _noargs, _capital_miss, stage=10,
       applicable=lambda a: count_sentences(a) >= 2),
    _C("keywords:existence",
       lambda kw: [f"Include the keywords {_quoted(kw['keywords'])} in the response.",
                   f"Make sure your answer mentions {_quoted(kw['keywords'])}.",
                   f"Use the words {_quoted(kw['keywords'])} somewhere in your reply."],
       lambda r, kw: all(count_word(r, k) for k in kw["keywords"]), _existence_apply, _existence_sample,
       _existence_miss, stage=3, applicable=lambda a: count_sentences(a) >= 2),
    _C("keywords:forbidden_words",
       lambda kw: [f"Do not include the words {_quoted(kw['forbidden_words'])} in the response.",
                   f"Avoid the words {_quoted(kw['forbidden_words'])} in your answer.",
                   f"Your reply must not contain the words {_quoted(kw['forbidden_words'])}."],
       _forbidden_check, _forbidden_apply, _forbidden_sample,
       _forbidden_miss, stage=0),
    _C("keywords:frequency", _frequency_phrasings,
       lambda r, kw: _compare(count_word(r, kw["keyword"]), kw["relation"], kw["frequency"]),
       _frequency_apply, _frequency_sample, _frequency_miss, stage=3,
       applicable=lambda a: bool(_content_words(a))),
    _C("startend:end_checker",
       lambda kw: [f"Finish your response with this exact phrase: {kw['end_phrase']} No other words should "
                   "follow this phrase.", f"End your answer with the exact phrase \"{kw['end_phrase']}\".",
                   f"The last words of your reply must be: {kw['end_phrase']}"],
       _end_check, lambda a, kw, p: _join_paragraphs(a, kw["end_phrase"]),
       lambda a, rng, p: {"end_phrase": rng.choice(END_PHRASES)},
       lambda a, kw: _join_paragraphs(a, kw["end_phrase"] + " Have a great day."), stage=7),
    _C("startend:quotation",
       lambda kw: ["Wrap your entire response with double quotation marks.",
                   "Put your whole answer inside double quotes.",
                   "Your response must start and end with a double quotation mark (\")."],
       _quotation_check, lambda a, kw, p: f'"{a}"', _noargs, lambda a, kw: f"'{a}'", stage=11),
    _C("punctuation:no_comma",
       lambda kw: ["Do not use any commas in your response.", "In your entire response, avoid commas.",
                   "Write your answer without a single comma."],
       lambda r, kw: "," not in r, lambda a, kw, p: re.sub(r",(\s?)", r"\1", a), _noargs,
       lambda a, kw: a.replace(",", "", a.count(",") - 1), stage=9, applicable=lambda a: "," in a),
    _C("detectable_content:postscript",
       lambda kw: [f"At the end of your response, add a postscript starting with {kw['postscript_marker']}",
                   f"Add a postscript at the end that begins with {kw['postscript_marker']}",
                   f"Finish with a short note starting with \"{kw['postscript_marker']}\"."],
       _postscript_check, _postscript_apply, lambda a, rng, p: {"postscript_marker": rng.choice(["P.S.", "P.P.S."])},
       lambda a, kw: a.rstrip() + "\n\nNote: " + _stable_pick(_POSTSCRIPTS, a), stage=6),
    _C("combination:repeat_prompt",
       lambda kw: ["First repeat the request word for word without change, then give your answer. Do not say "
                   "anything before repeating the request; the request to repeat does not include this sentence.",
                   "Begin by copying the request above exactly as written (not including this instruction), "
                   "then answer it."],
       _repeat_check, lambda a, kw, p: f"{kw['prompt_to_repeat'].strip()}\n\n{a}", _repeat_sample,
       lambda a, kw: f"You asked: {kw['prompt_to_repeat'].strip()}\n\n{a}", stage=8),
    _C("combination:two_responses",
       lambda kw: ["Give two different responses. Separate the responses, and only the responses, with 6 asterisk "
                   "symbols: ******.",
                   "Write two different answers, one after the other, separated by a line of six asterisks "
                   "(******)."],
       _two_responses_check, _two_responses_apply, _noargs,
       lambda a, kw: _two_responses_apply(a, kw, None).replace("******", "---"), stage=4,
       applicable=lambda a: count_sentences(a) >= 2),
]}

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
]
_CONFLICTS = {frozenset(pair) for pair in _CONFLICT_LIST}


def compatible(instruction_ids: Sequence[str]) -> bool:
    """True if the constraints can all be asked for in one prompt (no duplicates, no declared conflict)."""
    ids = list(instruction_ids)
    if len(set(ids)) != len(ids):
        return False
    return not any(frozenset((a, b)) in _CONFLICTS for i, a in enumerate(ids) for b in ids[i + 1:])


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def get_constraint(instruction_id: str) -> Constraint:
    """The registered constraint type, or a PipelineError listing the supported ids."""
    try:
        return CONSTRAINTS[instruction_id]
    except KeyError:
        raise PipelineError(
            f"Unknown instruction id {instruction_id!r}. Supported ids: {', '.join(sorted(CONSTRAINTS))}. "
            "Remove prompts using other ids from the eval file or add the type to pipeline/data/constraints.py."
        ) from None


def is_applicable(instruction_id: str, answer: str) -> bool:
    """Does the constraint suit this answer (e.g. enough sentences to make bullets; no code to re-case)?"""
    spec = get_constraint(instruction_id)
    return (instruction_id in _CODE_SAFE or not _has_code(answer)) and spec.applicable(answer)


def _clean(kwargs: Kwargs | None) -> Kwargs:
    # IFEval-style files often carry every kwarg name with null values; only the set ones matter.
    return {k: v for k, v in (kwargs or {}).items() if v is not None}


def describe(instruction_id: str, kwargs: Kwargs, rng: random.Random | int | None = None) -> str:
    """The natural-language instruction for a constraint; ``rng`` (a Random or an int) picks the phrasing."""
    kw = _clean(kwargs)
    try:
        options = get_constraint(instruction_id).phrasings(kw)
    except KeyError as missing:
        raise PipelineError(f"Constraint {instruction_id} needs the kwarg {missing}; got {sorted(kw)}.") from None
    if rng is None:
        return options[0]
    index = rng.randrange(len(options)) if isinstance(rng, random.Random) else rng % len(options)
    return options[index]


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
    return get_constraint(instruction_id).apply(answer, _clean(kwargs), prompt)


def apply_all(answer: str, instruction_ids: Sequence[str], kwargs_list: Sequence[Kwargs],
              prompt: str | None = None, miss: str | None = None) -> str:
    """Apply several constraints in their stage order; the one named ``miss`` gets its near miss instead."""
    order = sorted(range(len(instruction_ids)), key=lambda i: get_constraint(instruction_ids[i]).stage)
    text = answer
    for i in order:
        spec, kw = get_constraint(instruction_ids[i]), _clean(kwargs_list[i])
        text = spec.near_miss(text, kw) if instruction_ids[i] == miss else spec.apply(text, kw, prompt)
    return text


def near_miss(instruction_id: str, answer: str, kwargs: Kwargs) -> str:
    """A response that tries to follow the constraint but fails its check (for rejected preference answers)."""
    return get_constraint(instruction_id).near_miss(answer, _clean(kwargs))


def sample_kwargs(instruction_id: str, answer: str, rng: random.Random, prompt: str | None = None) -> Kwargs:
    """Parameters that make sense for ``answer`` (e.g. a word limit the answer can be cut to)."""
    return get_constraint(instruction_id).sample_kwargs(answer, rng, prompt)


def evaluate_response(response: str, instruction_id_list: Sequence[str], kwargs_list: Sequence[Kwargs],
                      prompt: str | None = None) -> dict[str, Any]:
    """Score one response: strict and loose result per instruction, and prompt-level all-pass for both."""
    if len(instruction_id_list) != len(kwargs_list):
        raise PipelineError(f"Got {len(instruction_id_list)} instruction ids but {len(kwargs_list)} kwargs dicts; "
                            "each instruction id needs its own kwargs entry (use {} when it has none).")
    strict = [check(i, response, kw, prompt) for i, kw in zip(instruction_id_list, kwargs_list, strict=True)]
    loose = [check_loose(i, response, kw, prompt) for i, kw in zip(instruction_id_list, kwargs_list, strict=True)]
    return {"instruction_id_list": list(instruction_id_list), "strict": strict, "loose": loose,
            "prompt_strict": all(strict), "prompt_loose": all(loose)}


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """IFEval's four accuracies (prompt/instruction level × strict/loose) and strict accuracy per type."""
    if not results:
        raise PipelineError("No evaluation results to aggregate; check that the eval prompt file is not empty.")
    per_type: dict[str, list[bool]] = {}
    for r in results:
        for iid, ok in zip(r["instruction_id_list"], r["strict"], strict=True):
            per_type.setdefault(iid, []).append(ok)
    flat = [ok for r in results for ok in r["strict"]]
    flat_loose = [ok for r in results for ok in r["loose"]]
    return {
        "prompt_level_strict": sum(r["prompt_strict"] for r in results) / len(results),
        "prompt_level_loose": sum(r["prompt_loose"] for r in results) / len(results),
        "instruction_level_strict": sum(flat) / len(flat),
        "instruction_level_loose": sum(flat_loose) / len(flat_loose),
        "per_type_strict": {k: sum(v) / len(v) for k, v in sorted(per_type.items())},
    }
