"""Read instruction and preference data and normalise every row to one schema.

Where it sits: the ``prepare`` stage streams the recipe's data sources through :class:`ExampleStream` (rows
go to disk as they come; nothing holds a whole source in memory); :func:`load_sft_examples` /
:func:`load_preference_examples` collect the same rows into a list for small files (the eval stage's pairs,
tests). :mod:`pipeline.data.sources` finds and reads the raw rows (files, directories laid out like a Hub
data set, Hub ids; ``columns``, ``fraction``, ``limit``); this module normalises, deduplicates and counts.

Normalised schemas
  SFT         ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: an optional
              leading system turn, then user/assistant alternating, starting on user, ending on assistant.
  Preference  TRL's conversational explicit-prompt format: ``{"prompt": [optional system, user, ..., user],
              "chosen": [{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}]}``.

Input formats, detected per row unless the source names one (first match wins):
  preference  ``chosen`` + ``rejected`` (strings or message lists) with ``prompt`` (string or message list,
              "explicit") or without it ("implicit": the shared leading messages of chosen/rejected are the
              prompt). Chosen/rejected lists that repeat the explicit prompt first have it stripped. Used
              for SFT too: prompt + chosen.
  messages    ``messages: [{role, content}]``, or a bare ``prompt`` / ``completion`` pair (strings or lists).
  sharegpt    ``conversations: [{from, value}]``.
  alpaca      ``instruction``, optional ``input`` (appended after a blank line), ``output``.
Messages may use role/content or from/value keys; roles are case-insensitive (human → user,
gpt/model/bot → assistant). A top-level ``system`` string becomes the system turn unless the conversation
already has one. Content is kept byte for byte: nothing is stripped or rewritten, except that control-token
strings are neutralised (see :func:`neutralise_control_tokens`).

Policy for bad input: each problem ends in exactly one of two outcomes.
  Error (:class:`DataError` naming the file, and the line where there is one; nothing is loaded):
    missing file, unsupported extension, a directory with no files for the split, empty file (no rows;
    blank lines don't count), bytes that are not UTF-8 (line and byte offset named; UTF-16 is recognised and
    named), a ``.json`` file that is neither a JSON array nor JSON lines, an unreadable Parquet file, an
    explicit ``format`` that no row matches, a ``columns`` mapping naming a column the data does not have, a
    source that keeps zero rows, a source where more than ``max_drop_fraction`` of the rows read are
    malformed (wrong format guessed, a renamed column: training on the rest would be a silent loss), a Hub
    dataset that can't be loaded (offline or not).
  Drop (the row is skipped and counted under a reason; the first few are listed with line numbers):
    invalid_json, not_an_object, missing_fields, wrong_type (e.g. content not a string), empty_content,
    unknown_role, misplaced_system, starts_with_assistant, non_alternating (no merging of consecutive
    turns), ends_with_user and no_assistant_turn (SFT), empty_prompt, prompt_not_ending_on_user,
    bad_completion (chosen/rejected not exactly one assistant turn), chosen_equals_rejected (compared
    after ``.strip()``), not_preference (an SFT-format row given to the preference loader), nul_byte,
    lone_surrogate (a ``\\ud800``-style escape that no tokenizer can encode), too_long (more than
    MAX_ROW_CHARS characters of text, or a line over MAX_LINE_BYTES, which is skipped without being held
    in memory). These are the *malformed* rows.
  Filtered (a setting, not damage; counted apart from the malformed rows): rows the caller's ``row_filter``
    refuses, e.g. ``prepare``'s rows longer than the trainer's ``max_length`` tokens.
  Accepted silently: a UTF-8 BOM, CRLF line ends, blank lines (not rows, but line numbers still count
  them), extra keys, ``null`` for optional fields, an empty system prompt (omitted), an empty alpaca
  ``input`` (omitted), mixed formats in one file.
Exact duplicates of an already kept normalised row (in any source of the same call) are counted as
``deduplicated``; the first copy is kept; only a 16-byte hash per row is remembered.
``rows_in = kept + dropped + deduplicated`` per source and in total, with ``dropped = malformed + filtered``.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.sources import (
    MAX_LINE_BYTES,
    MAX_ROW_CHARS,
    SOURCE_KEYS,
    Drop,
    Source,
    SourceReader,
    parse_columns,
    read_json_lines,
)
from pipeline.errors import DataError, PipelineError

__all__ = [
    "DEFAULT_MAX_DROP_FRACTION", "FORMATS", "MAX_LINE_BYTES", "MAX_ROW_CHARS", "SOURCE_KEYS", "ZERO_WIDTH_SPACE",
    "ExampleStream", "load_preference_examples", "load_sft_examples", "neutralise_control_tokens", "parse_source",
    "read_jsonl", "source_files",
]

FORMATS = ("alpaca", "sharegpt", "messages", "preference")
DEFAULT_MAX_DROP_FRACTION = 0.05  # the recipe's data.max_drop_fraction default (pipeline/config.py)
DEFAULT_SEED = 42  # the recipe's data.seed default: picks the rows of a source's `fraction`
MAX_EXAMPLES = 10
FILTER_BATCH = 64  # rows handed to a row_filter at once (a tokenizer is faster on a batch)
ZERO_WIDTH_SPACE = "\u200b"

_ROLES = {
    "system": "system", "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
}
# Keys that identify each format, in detection order: the first format with any of its keys wins.
_SIGNATURES = {
    "preference": ("chosen", "rejected"),
    "messages": ("messages", "completion"),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
}
_BAD_CHARS = re.compile(r"[\x00\ud800-\udfff]")

RowFilter = Callable[[list[dict]], list[str | None]]  # rows -> per row: None (keep) or the reason to filter


@dataclass
class _SourceReport:
    source: Source
    files: list[str]
    rows_available: int | None = None  # rows in the whole source, when `fraction` needed the count
    rows_in: int = 0
    kept: int = 0
    filtered: int = 0
    deduplicated: int = 0
    neutralised: int = 0
    matched: int = 0  # rows carrying the fields of an explicitly named format
    first_row: tuple[int, str | None] | None = None  # (line, detected format) of the first object row
    reasons: Counter[str] = field(default_factory=Counter)  # malformed rows, by reason
    filter_reasons: Counter[str] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)  # rows read in each format (before dedup/filter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def malformed(self) -> int:
        return sum(self.reasons.values())

    @property
    def format(self) -> str:
        if self.source.format:
            return self.source.format
        return next(iter(self.formats)) if len(self.formats) == 1 else "mixed" if self.formats else "none"

    def drop(self, file: str, line: int, drop: Drop) -> None:
        self.reasons[drop.reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            where = {"file": file} if file != self.source.path else {}  # a shard of a directory source
            self.examples.append({**where, "line": line, "reason": drop.reason, "detail": drop.detail})

    def as_dict(self) -> dict[str, Any]:
        spec = self.source
        where: dict[str, Any] = {}
        if self.files != [spec.path]:  # a directory or a Hub id: say which split and files were read
            where = {"split": spec.split, "subset": spec.subset, "files": self.files}
            if not self.files:
                where["revision"] = spec.revision
        if self.rows_available is not None:
            where["rows_available"] = self.rows_available
        return {
            "path": spec.path, **where, "format": self.format, "format_detected": spec.format is None,
            "formats": dict(self.formats.most_common()),
            "rows_in": self.rows_in, "kept": self.kept, "dropped": self.malformed + self.filtered,
            "malformed": self.malformed, "filtered": self.filtered, "deduplicated": self.deduplicated,
            "drop_reasons": dict((self.reasons + self.filter_reasons).most_common()),
            "control_tokens_neutralised": self.neutralised, "examples": self.examples,
        }


# --------------------------------------------------------------------------------------------- public API


class ExampleStream:
    """The normalised rows of every source, read lazily, in source order; iterate once, then read ``report``.

    ``kind`` is "sft" or "preference". ``control_tokens`` (the tokenizer's special/added token strings) are
    neutralised in all content. A source where more than ``max_drop_fraction`` of the rows read are malformed
    raises :class:`DataError` with the per-reason counts and the first examples (``None`` disables the
    check). ``row_filter`` sees the kept rows in batches and may refuse some for a reason of its own (counted
    as ``filtered``, apart from the malformed rows). ``log`` receives one line per source: rows read and kept,
    and the format used (saying when it was detected). Only a 16-byte hash per kept row is held, for dedup.
    ``seed`` draws the rows of sources with a ``fraction`` (prepare passes the recipe's ``data.seed``). ``keep``
    names string fields copied as they are onto each kept row that has them, after deduplication (metadata such
    as the held-out question an eval pair was built from, ``source_id``).
    """

    def __init__(self, sources: list[dict], *, kind: str, control_tokens: Iterable[str] = (),
                 max_drop_fraction: float | None = DEFAULT_MAX_DROP_FRACTION, row_filter: RowFilter | None = None,
                 log: Callable[[str], None] | None = None, seed: int = DEFAULT_SEED,
                 keep: Iterable[str] = ()) -> None:
        if not isinstance(sources, list) or not sources:
            raise PipelineError("No data sources given: add at least one {path: data/x.jsonl} to the recipe's "
                                "data section.")
        self.kind = kind
        self.specs = [parse_source(source, index, kind) for index, source in enumerate(sources)]
        self.max_drop_fraction = max_drop_fraction
        self.row_filter = row_filter
        self.log = log
        self.seed = seed  # for sources with `fraction`
        self.keep = tuple(keep)
        self.report: dict[str, Any] | None = None  # set once every row has been read
        self._pattern = _control_token_pattern(frozenset(control_tokens))
        self._seen: set[bytes] = set()
        self._started = False

    def __iter__(self) -> Iterator[dict]:
        if self._started:
            raise RuntimeError("an ExampleStream can be iterated only once")
        self._started = True
        reports = []
        for spec in self.specs:
            reports.append((yield from self._read_source(spec)))
        self.report = _total(reports)

    def _read_source(self, spec: Source) -> Iterator[dict]:
        reader = SourceReader(spec)
        report = _SourceReport(spec, reader.files)
        pending: list[tuple[dict, int]] = []
        for raw in reader.selected_rows(self.seed):
            report.rows_in += 1
            record = raw.value
            if isinstance(record, dict):
                if report.first_row is None:
                    report.first_row = (raw.line, _detect_format(record))
                if spec.format and _has_signature(record, spec.format):
                    report.matched += 1
            try:
                if isinstance(record, Drop):
                    raise record
                row, fmt = _normalise(record, spec.format, self.kind)
            except Drop as drop:
                report.drop(raw.file, raw.line, drop)
                continue
            report.formats[fmt] += 1
            neutralised = _neutralise_row(row, self._pattern) if self._pattern is not None else 0
            key = hashlib.blake2b(json.dumps(row, ensure_ascii=False).encode(), digest_size=16).digest()
            if key in self._seen:
                report.deduplicated += 1
                continue
            self._seen.add(key)
            row.update({field: record[field] for field in self.keep if isinstance(record.get(field), str)})
            pending.append((row, neutralised))
            if len(pending) >= (FILTER_BATCH if self.row_filter else 1):
                yield from self._accept(pending, report)
        yield from self._accept(pending, report)
        report.rows_available = reader.rows_available
        reader.check_columns_found()
        _check_source_outcome(spec, report, self.max_drop_fraction)
        if self.log:
            self.log(_summary(self.kind, report))
        return report.as_dict()

    def _accept(self, pending: list[tuple[dict, int]], report: _SourceReport) -> Iterator[dict]:
        reasons = self.row_filter([row for row, _ in pending]) if self.row_filter and pending else []
        for index, (row, neutralised) in enumerate(pending):
            reason = reasons[index] if reasons else None
            if reason is not None:
                report.filtered += 1
                report.filter_reasons[reason] += 1
                continue
            report.kept += 1
            report.neutralised += neutralised
            yield row
        pending.clear()


def load_sft_examples(sources: list[dict], *, control_tokens: Iterable[str] = (),
                      max_drop_fraction: float | None = DEFAULT_MAX_DROP_FRACTION) -> tuple[list[dict], dict]:
    """Read every source and normalise each row to ``{"messages": [{"role", "content"}, ...]}``.

    Collects :class:`ExampleStream` into a list: for small sources (prepare streams instead). Returns
    ``(rows, report)``; see the module docstring for the report layout and the drop/error policy.
    """
    stream = ExampleStream(sources, kind="sft", control_tokens=control_tokens, max_drop_fraction=max_drop_fraction)
    rows = list(stream)
    return rows, stream.report


def load_preference_examples(sources: list[dict], *, control_tokens: Iterable[str] = (),
                             max_drop_fraction: float | None = DEFAULT_MAX_DROP_FRACTION, keep: Iterable[str] = ()
                             ) -> tuple[list[dict], dict]:
    """Read every source and normalise each row to TRL's conversational preference format.

    Rows are ``{"prompt": [optional system, user, ..., user], "chosen": [assistant msg], "rejected":
    [assistant msg]}`` (plus the ``keep`` fields a row has, see :class:`ExampleStream`). Returns ``(rows, report)``
    like :func:`load_sft_examples`.
    """
    stream = ExampleStream(sources, kind="preference", control_tokens=control_tokens,
                           max_drop_fraction=max_drop_fraction, keep=keep)
    rows = list(stream)
    return rows, stream.report


def source_files(source: dict | str) -> list[str]:
    """The local files a recipe source reads, in order ([] for a Hub id): what its content hash should cover."""
    return SourceReader(parse_source(source, 0, "sft")).files


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSONL file, read strictly.

    For files the project reads whole (eval prompts, the hand-written data): a line that is not JSON, not UTF-8
    or too long is a :class:`DataError` naming the file and line, not a dropped row. Blank lines and a UTF-8
    byte order mark are skipped.
    """
    for row in read_json_lines(Path(path), str(path)):
        if isinstance(row.value, Drop):
            what = "invalid JSON" if row.value.reason == "invalid_json" else "unreadable line"
            raise DataError(f"{what} ({row.value.detail}); fix or delete this line.", path=str(path), line=row.line)
        yield row.line, row.value


def neutralise_control_tokens(text: str, control_tokens: Iterable[str]) -> str:
    """Make control-token strings inside ``text`` tokenise as plain text.

    A zero-width space (U+200B) goes after the first character of each occurrence, so ``<start_of_turn>``
    becomes ``<\\u200bstart_of_turn>``, which no longer matches the added token. Longest match wins.
    Tokens of one character or only whitespace are left alone (breaking them would mangle normal text).
    The compiled pattern is cached per token set; pass a ``frozenset`` to make repeated calls cheap.
    """
    tokens = control_tokens if isinstance(control_tokens, frozenset) else frozenset(control_tokens)
    pattern = _control_token_pattern(tokens)
    return text if pattern is None else _neutralise(text, pattern)


# ------------------------------------------------------------------------------------------ orchestration


def _total(reports: list[dict[str, Any]]) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    for source_report in reports:
        reasons.update(source_report["drop_reasons"])
    total = {key: sum(r[key] for r in reports) for key in ("rows_in", "kept", "dropped", "malformed", "filtered",
                                                            "deduplicated", "control_tokens_neutralised")}
    total["drop_reasons"] = dict(reasons.most_common())
    total["sources"] = reports
    return total


def parse_source(source: Any, index: int, kind: str) -> Source:
    """Validate one recipe source (keys and values; nothing is read) for the "sft" or "preference" loader."""
    where = f"data source #{index + 1}"
    if isinstance(source, str):
        source = {"path": source}
    if not isinstance(source, dict):
        raise PipelineError(f"{where} must be a mapping like {{path: data/x.jsonl}}, got {source!r}.")
    for key in source:
        if key not in SOURCE_KEYS:
            close = difflib.get_close_matches(str(key), sorted(SOURCE_KEYS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(sorted(SOURCE_KEYS))
            raise PipelineError(f"{where} has unknown key {key!r}.{hint} Valid keys: {valid}.")
    path, fmt, limit, fraction = source.get("path"), source.get("format"), source.get("limit"), source.get("fraction")
    if not isinstance(path, str) or not path.strip():
        raise PipelineError(f"{where} needs a 'path': a .jsonl/.json/.parquet file, a directory of such files "
                            "laid out like a Hub data set, or a Hub dataset id.")
    where = f"{where} ({path})"
    if fmt is not None and fmt not in FORMATS:
        raise PipelineError(f"{where}: unknown format {fmt!r}; use one of {', '.join(FORMATS)} "
                            "or leave it out to detect the format per row.")
    if kind == "preference" and fmt not in (None, "preference"):
        raise PipelineError(f"{where}: format {fmt!r} has no chosen/rejected answers; preference "
                            "data needs format 'preference' (or leave format out).")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise PipelineError(f"{where}: limit must be a positive integer, got {limit!r}.")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction <= 1):
        raise PipelineError(f"{where}: fraction must be a number with 0 < fraction <= 1 (the share of the "
                            f"source's rows to read), got {fraction!r}.")
    for key in ("split", "subset", "revision"):
        if source.get(key) is not None and not isinstance(source[key], str):
            raise PipelineError(f"{where}: {key} must be a string, got {source[key]!r}.")
    return Source(path=path, format=fmt, split=source.get("split") or "train", subset=source.get("subset"),
                  revision=source.get("revision"), columns=parse_columns(source.get("columns"), where),
                  limit=limit, fraction=None if fraction is None else float(fraction))


def _check_source_outcome(spec: Source, report: _SourceReport, max_drop_fraction: float | None) -> None:
    if report.rows_in == 0:
        raise DataError("has no rows (the file is empty or only whitespace). Add data or remove this source "
                        "from the recipe.", path=spec.path)
    if spec.format and report.matched == 0:
        line, detected = report.first_row or (None, None)
        looks = f"; the first row looks like {detected!r}" if detected else ""
        fields = ", ".join(_SIGNATURES[spec.format])
        raise DataError(f"format {spec.format!r} was given but no row has any of its fields "
                        f"({fields}){looks}. Fix `format` in the recipe or leave it out to detect the format "
                        "per row.",
                        path=spec.path, line=line)
    reasons = ", ".join(f"{reason}: {n}" for reason, n in report.reasons.most_common())
    first = report.examples[0] if report.examples else None
    if report.kept == 0 and report.filtered == 0:
        problem = f" First problem: {first['reason']} ({first['detail']})." if first else ""
        raise DataError(f"no usable rows: {report.rows_in} read, {report.malformed} dropped "
                        f"({reasons or 'none'}), {report.deduplicated} duplicates of earlier rows.{problem} "
                        "Fix the rows or the source's `format`, or remove this source from the recipe.",
                        path=spec.path, line=first["line"] if first else None)
    if max_drop_fraction is not None and report.malformed > max_drop_fraction * report.rows_in:
        shown = "; ".join(f"{e.get('file', 'line')}{':' if 'file' in e else ' '}{e['line']}: {e['reason']} "
                          f"({e['detail']})" for e in report.examples[:3])
        raise DataError(f"{report.malformed} of {report.rows_in} rows read ({report.malformed / report.rows_in:.1%}) "
                        f"are malformed, more than data.max_drop_fraction = {max_drop_fraction} allows: "
                        f"{reasons}. First examples: {shown}. Training on the rest would silently lose data: "
                        "check the source's `format` (detected per row when left out) and `columns` (a renamed "
                        "column), fix the rows, or raise data.max_drop_fraction (null disables the check).",
                        path=spec.path)


def _summary(kind: str, report: _SourceReport) -> str:
    spec = report.source
    where = spec.path + (f" [{spec.split}]" if report.files != [spec.path] else "")
    if spec.format:
        how = f"format {spec.format} (given)"
    elif len(report.formats) > 1:
        how = "formats detected per row: " + ", ".join(f"{f} {n}" for f, n in report.formats.most_common())
    else:
        how = f"format {report.format} (detected)"
    counts = f"{report.rows_in} rows read, {report.kept} kept"
    if report.malformed:
        counts += f", {report.malformed} malformed ({', '.join(f'{r} {n}' for r, n in report.reasons.most_common(3))})"
    if report.filtered:
        counts += f", {report.filtered} filtered ({', '.join(report.filter_reasons)})"
    if report.deduplicated:
        counts += f", {report.deduplicated} duplicates"
    return f"  {kind} {where}: {how}; {counts}"


# ---------------------------------------------------------------------------------------------- normalise


def _detect_format(record: dict) -> str | None:
    return next((fmt for fmt in _SIGNATURES if _has_signature(record, fmt)), None)


def _has_signature(record: dict, fmt: str) -> bool:
    # Parquet and Hub rows carry every column, with None where a row has no value: None means absent.
    return any(record.get(key) is not None for key in _SIGNATURES[fmt])


def _normalise(record: Any, fmt_hint: str | None, kind: str) -> tuple[dict, str]:
    if not isinstance(record, dict):
        raise Drop("not_an_object", f"expected a JSON object, got {_type_name(record)}")
    fmt = fmt_hint or _detect_format(record)
    if fmt is None:
        raise Drop("missing_fields", f"no fields of a known format (keys: {_keys(record)}); expected "
                                      "messages, conversations, instruction/output or chosen/rejected")
    if not _has_signature(record, fmt):
        raise Drop("missing_fields", f"none of the {fmt} fields {', '.join(_SIGNATURES[fmt])} "
                                      f"(keys: {_keys(record)})")
    if kind == "preference":
        if fmt != "preference":
            raise Drop("not_preference", f"a {fmt} row has no chosen/rejected answers")
        return _preference_row(record), fmt
    if fmt == "preference":
        pair = _preference_row(record)
        messages = pair["prompt"] + pair["chosen"]
    else:
        messages = _READERS[fmt](record)
        _check_length(messages)
    _check_turn_order(messages, field="conversation", final="assistant")
    return {"messages": messages}, fmt


def _alpaca_messages(record: dict) -> list[dict]:
    missing = [key for key in ("instruction", "output") if record.get(key) is None]
    if missing:
        raise Drop("missing_fields", f"alpaca row without {' and '.join(missing)}")
    prompt = _text(record["instruction"], "instruction")
    extra = record.get("input")
    if extra is not None and _text(extra, "input", allow_empty=True).strip():
        prompt = f"{prompt}\n\n{extra}"
    messages = [_message("user", prompt), _message("assistant", _text(record["output"], "output"))]
    return _with_system(record, messages)


def _sharegpt_messages(record: dict) -> list[dict]:
    return _with_system(record, _parse_messages(record["conversations"], "conversations"))


def _openai_messages(record: dict) -> list[dict]:
    if record.get("messages") is not None:
        return _with_system(record, _parse_messages(record["messages"], "messages"))
    if record.get("prompt") is None:
        raise Drop("missing_fields", "a completion without a prompt")
    messages = _as_messages(record["prompt"], "prompt", "user") + _as_messages(
        record["completion"], "completion", "assistant")
    return _with_system(record, messages)


_READERS: dict[str, Callable[[dict], list[dict]]] = {
    "alpaca": _alpaca_messages, "sharegpt": _sharegpt_messages, "messages": _openai_messages,
}


def _preference_row(record: dict) -> dict:
    missing = [key for key in ("chosen", "rejected") if record.get(key) is None]
    if missing:
        raise Drop("missing_fields", f"preference row without {' and '.join(missing)}")
    prompt_raw = record.get("prompt")
    if prompt_raw is None:
        # Implicit prompt: chosen and rejected are whole conversations sharing their leading messages.
        if not (isinstance(record["chosen"], list) and isinstance(record["rejected"], list)):
            raise Drop("missing_fields", "no prompt, and chosen/rejected are not message lists to take one "
                                          "from")
        chosen = _parse_messages(record["chosen"], "chosen")
        rejected = _parse_messages(record["rejected"], "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        if isinstance(prompt_raw, str) and not prompt_raw.strip():
            raise Drop("empty_prompt", "prompt is empty")
        prompt = _with_system(record, _as_messages(prompt_raw, "prompt", "user"))
        # Some datasets (e.g. ultrafeedback_binarized) repeat the prompt at the start of chosen/rejected.
        chosen = _strip_prefix(_as_messages(record["chosen"], "chosen", "assistant"), prompt)
        rejected = _strip_prefix(_as_messages(record["rejected"], "rejected", "assistant"), prompt)
    _check_length(prompt + chosen + rejected)
    same = [(m["role"], m["content"].strip()) for m in chosen] == [
        (m["role"], m["content"].strip()) for m in rejected]
    if same and (chosen or prompt_raw is None):  # two empty explicit answers are a bad_completion instead
        raise Drop("chosen_equals_rejected", "chosen and rejected are the same text: nothing to learn")
    if not prompt:
        raise Drop("empty_prompt", "prompt has no messages (without a 'prompt' field, chosen and rejected "
                                    "must share their leading messages)")
    _check_turn_order(prompt, field="prompt", final="user")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if len(answer) != 1 or answer[0]["role"] != "assistant":
            roles = [m["role"] for m in answer]
            raise Drop("bad_completion", f"{name} must be exactly one assistant message after the prompt, "
                                          f"got roles {roles}")
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if record.get("instruction_id_list") is not None:
        row["constraints"] = _constraints(record)
    return row


def _constraints(record: dict) -> str:
    """The prompt's verifiable constraints (IFEval-style ``instruction_id_list`` + ``kwargs``) as JSON text.

    Kept as text because each constraint's kwargs have their own keys (Arrow would merge them into one struct).
    """
    ids, kwargs = record["instruction_id_list"], record.get("kwargs")
    if kwargs is None:
        kwargs = [{} for _ in ids] if isinstance(ids, list) else None
    if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids) and isinstance(kwargs, list)
            and len(kwargs) == len(ids) and all(isinstance(k, dict) for k in kwargs)):
        raise Drop("bad_constraints", "instruction_id_list must be a list of strings with one kwargs object each")
    return json.dumps({"instruction_id_list": ids, "kwargs": kwargs}, ensure_ascii=False)


def _parse_messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise Drop("wrong_type", f"{where} must be a list of messages, got {_type_name(value)}")
    messages = []
    for index, message in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(message, dict):
            raise Drop("wrong_type", f"{at} must be an object with role and content, "
                                      f"got {_type_name(message)}")
        role = message.get("role") if message.get("role") is not None else message.get("from")
        if role is None or ("content" not in message and "value" not in message):
            raise Drop("missing_fields", f"{at} needs 'role' and 'content' (or 'from' and 'value')")
        content = message.get("content") if message.get("content") is not None else message.get("value")
        if not isinstance(role, str):
            raise Drop("wrong_type", f"{at}.role is {_type_name(role)}, expected a string")
        normal = _ROLES.get(role.strip().lower())
        if normal is None:
            raise Drop("unknown_role", f"{at} has role {role!r}; expected system, user/human or "
                                        "assistant/gpt/model/bot")
        text = _text(content, f"{at}.content", allow_empty=normal == "system")
        if text.strip():  # empty system prompts are common in exports and carry nothing
            messages.append(_message(normal, text))
    return messages


def _as_messages(value: Any, where: str, role: str) -> list[dict]:
    if isinstance(value, str):
        return [_message(role, _text(value, where))]
    return _parse_messages(value, where)


def _with_system(record: dict, messages: list[dict]) -> list[dict]:
    system = record.get("system")
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    text = _text(system, "system", allow_empty=True)
    return [_message("system", text), *messages] if text.strip() else messages


def _strip_prefix(messages: list[dict], prefix: list[dict]) -> list[dict]:
    if len(messages) > len(prefix) and messages[:len(prefix)] == prefix:
        return messages[len(prefix):]
    return messages


def _text(value: Any, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise Drop("wrong_type", f"{where} is {_type_name(value)}, expected a string")
    bad = _BAD_CHARS.search(value)
    if bad is not None:
        if bad.group() == "\x00":
            raise Drop("nul_byte", f"{where} contains a NUL character")
        raise Drop("lone_surrogate", f"{where} contains an unpaired surrogate (U+{ord(bad.group()):04X})")
    if not allow_empty and not value.strip():
        raise Drop("empty_content", f"{where} is empty")
    return value


def _check_length(messages: list[dict]) -> None:
    total = sum(len(m["content"]) for m in messages)
    if total > MAX_ROW_CHARS:
        raise Drop("too_long", f"{total:,} characters of text; the limit is {MAX_ROW_CHARS:,}")


def _check_turn_order(messages: list[dict], *, field: str, final: str) -> None:
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise Drop("misplaced_system", f"{field}: a system message may only come first")
    if not body:
        raise Drop("no_assistant_turn" if final == "assistant" else "empty_prompt",
                    f"{field} has no user or assistant turns")
    if body[0]["role"] != "user":
        raise Drop("starts_with_assistant", f"{field} must start with a user turn (after an optional "
                                             "system)")
    for index in range(1, len(body)):
        if body[index]["role"] == body[index - 1]["role"]:
            role = body[index]["role"]
            raise Drop("non_alternating", f"{field}: two {role} turns in a row at turn {index + 1}")
    if final == "assistant" and len(body) == 1:
        raise Drop("no_assistant_turn", f"{field} has no assistant turn to learn from")
    if body[-1]["role"] != final:
        reason = "ends_with_user" if final == "assistant" else "prompt_not_ending_on_user"
        raise Drop(reason, f"{field} must end on a {final} turn")


def _message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _keys(record: dict) -> str:
    names = [str(key) for key, value in record.items() if value is not None]  # null columns say nothing
    return (", ".join(names[:8]) + (", ..." if len(names) > 8 else "")) or "none"


# --------------------------------------------------------------------------------------- control tokens


@functools.lru_cache(maxsize=16)
def _control_token_pattern(tokens: frozenset[str]) -> re.Pattern[str] | None:
    usable = sorted(token for token in tokens if isinstance(token, str) and len(token) > 1 and token.strip()
                    and ZERO_WIDTH_SPACE not in token)
    if not usable:
        return None
    trie: dict[str, Any] = {}
    for token in usable:
        node = trie
        for char in token:
            node = node.setdefault(char, {})
        node[""] = True  # a token ends here
    return re.compile(_trie_regex(trie))


def _trie_regex(node: dict[str, Any]) -> str:
    # Alternatives at one trie node start with distinct characters, so the regex engine tries at most one
    # branch per position: matching stays fast with thousands of added tokens (one big "a|b|c" would not).
    branches = []
    for char in sorted(key for key in node if key):
        child, prefix = node[char], re.escape(char)
        while len(child) == 1 and "" not in child:  # follow single-child chains without recursing
            (char, child), = child.items()
            prefix += re.escape(char)
        branches.append(prefix + _trie_regex(child))
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return f"(?:{body})?" if "" in node else body  # a shorter token ends here; the longer one wins if present


def _break_token(match: re.Match[str]) -> str:
    text = match.group()
    return text[0] + ZERO_WIDTH_SPACE + text[1:]


def _neutralise(text: str, pattern: re.Pattern[str]) -> str:
    # Breaking the longest match can leave a shorter token inside its tail (tokens "abcd" and "cd"), so
    # repeat until nothing matches; each pass only adds zero-width spaces, none of which is in a token.
    while True:
        text, count = pattern.subn(_break_token, text)
        if not count:
            return text


def _neutralise_row(row: dict, pattern: re.Pattern[str]) -> int:
    changed = 0
    for messages in row.values():
        if not isinstance(messages, list):  # e.g. a pair's constraints: metadata, not text the model reads
            continue
        for message in messages:
            text = _neutralise(message["content"], pattern)
            if text != message["content"]:
                message["content"] = text
                changed += 1
    return changed
