"""Read instruction and preference data and normalise every row to one schema.

Where it sits: the ``prepare`` stage calls :func:`load_sft_examples` / :func:`load_preference_examples`
with the recipe's data sources. Everything downstream (chat template, tokenisation, SFT, DPO) only sees
the rows returned here; ``prepare`` writes the returned report to ``prepare/report.json``.

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
    missing file, directory, unsupported extension, empty file (no rows; blank lines don't count), bytes
    that are not UTF-8 (line and byte offset named; UTF-16 is recognised and named), a ``.json`` file
    that is neither a JSON array nor JSON lines, an unreadable Parquet file, an explicit ``format`` that
    no row matches, a source that keeps zero rows, a Hub dataset that can't be loaded (offline or not).
  Drop (the row is skipped and counted under a reason; the first few are listed with line numbers):
    invalid_json, not_an_object, missing_fields, wrong_type (e.g. content not a string), empty_content,
    unknown_role, misplaced_system, starts_with_assistant, non_alternating (no merging of consecutive
    turns), ends_with_user and no_assistant_turn (SFT), empty_prompt, prompt_not_ending_on_user,
    bad_completion (chosen/rejected not exactly one assistant turn), chosen_equals_rejected (compared
    after ``.strip()``), not_preference (an SFT-format row given to the preference loader), nul_byte,
    lone_surrogate (a ``\\ud800``-style escape that no tokenizer can encode), too_long (more than
    MAX_ROW_CHARS characters of text, or a line over MAX_LINE_BYTES, which is skipped without being held
    in memory).
  Accepted silently: a UTF-8 BOM, CRLF line ends, blank lines (not rows, but line numbers still count
  them), extra keys, ``null`` for optional fields, an empty system prompt (omitted), an empty alpaca
  ``input`` (omitted), mixed formats in one file.
Exact duplicates of an already kept normalised row (in any source of the same call) are counted as
``deduplicated``; the first copy is kept. ``rows_in = kept + dropped + deduplicated`` per source and in
total. ``limit`` caps the rows *read* from a source (the first N rows of the file), so it is cheap and
deterministic. ``split`` and ``subset`` only apply to Hub datasets and are ignored for local files.

Reading streams: JSON lines are read one line at a time (bounded by MAX_LINE_BYTES), Parquet one batch
at a time. A ``.json`` array is parsed whole (use JSON lines for big files).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import DataError, PipelineError

SOURCE_KEYS = frozenset({"path", "format", "split", "subset", "limit"})
FORMATS = ("alpaca", "sharegpt", "messages", "preference")

MAX_ROW_CHARS = 200_000
# Every character of text costs at least one byte and at most six (a \uXXXX escape), so a line this long
# cannot hold a row we would keep unless it carries megabytes of unrelated fields.
MAX_LINE_BYTES = 8 * MAX_ROW_CHARS
MAX_EXAMPLES = 10
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
_JSON_WS = re.compile(r"[ \t\n\r]*")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".gz", ".zip", ".arrow", ".yaml"}
_BOM = b"\xef\xbb\xbf"


class _Drop(Exception):
    """A row-level problem: the row is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class _Source:
    path: str
    format: str | None
    split: str
    subset: str | None
    limit: int | None


@dataclass
class _SourceReport:
    path: str
    format: str | None
    rows_in: int = 0
    kept: int = 0
    deduplicated: int = 0
    neutralised: int = 0
    matched: int = 0  # rows carrying the fields of an explicitly named format
    first_row: tuple[int, str | None] | None = None  # (line, detected format) of the first object row
    reasons: Counter[str] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return sum(self.reasons.values())

    def drop(self, line: int, drop: _Drop) -> None:
        self.reasons[drop.reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"line": line, "reason": drop.reason, "detail": drop.detail})

    def as_dict(self) -> dict[str, Any]:
        detected = self.format or (next(iter(self.formats)) if len(self.formats) == 1 else "mixed")
        return {
            "path": self.path, "format": detected, "formats": dict(self.formats.most_common()),
            "rows_in": self.rows_in, "kept": self.kept, "dropped": self.dropped,
            "deduplicated": self.deduplicated, "drop_reasons": dict(self.reasons.most_common()),
            "control_tokens_neutralised": self.neutralised, "examples": self.examples,
        }


# --------------------------------------------------------------------------------------------- public API


def load_sft_examples(sources: list[dict], *, control_tokens: Iterable[str] = ()) -> tuple[list[dict], dict]:
    """Read every source and normalise each row to ``{"messages": [{"role", "content"}, ...]}``.

    ``control_tokens`` (the tokenizer's special/added token strings) are neutralised in all content.
    Returns ``(rows, report)``; see the module docstring for the report layout and the drop/error policy.
    """
    return _load(sources, control_tokens, kind="sft")


def load_preference_examples(
    sources: list[dict], *, control_tokens: Iterable[str] = ()
) -> tuple[list[dict], dict]:
    """Read every source and normalise each row to TRL's conversational preference format.

    Rows are ``{"prompt": [optional system, user, ..., user], "chosen": [assistant msg], "rejected":
    [assistant msg]}``. Returns ``(rows, report)`` like :func:`load_sft_examples`.
    """
    return _load(sources, control_tokens, kind="preference")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSONL file, read strictly.

    For files the project reads whole (eval prompts, the hand-written data): a line that is not JSON, not UTF-8
    or too long is a :class:`DataError` naming the file and line, not a dropped row. Blank lines and a UTF-8
    byte order mark are skipped.
    """
    for line, value in _json_lines(Path(path), str(path)):
        if isinstance(value, _Drop):
            what = "invalid JSON" if value.reason == "invalid_json" else "unreadable line"
            raise DataError(f"{what} ({value.detail}); fix or delete this line.", path=str(path), line=line)
        yield line, value


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


def _load(sources: list[dict], control_tokens: Iterable[str], *, kind: str) -> tuple[list[dict], dict]:
    if not isinstance(sources, list) or not sources:
        raise PipelineError("No data sources given: add at least one {path: data/x.jsonl} to the recipe's "
                            "data section.")
    specs = [_parse_source(source, index, kind) for index, source in enumerate(sources)]
    pattern = _control_token_pattern(frozenset(control_tokens))
    seen: set[bytes] = set()
    rows: list[dict] = []
    source_reports = [_read_source(spec, kind, pattern, seen, rows) for spec in specs]
    reasons: Counter[str] = Counter()
    for source_report in source_reports:
        reasons.update(source_report["drop_reasons"])
    report = {
        key: sum(r[key] for r in source_reports)
        for key in ("rows_in", "kept", "dropped", "deduplicated", "control_tokens_neutralised")
    }
    report["drop_reasons"] = dict(reasons.most_common())
    report["sources"] = source_reports
    return rows, report


def _parse_source(source: Any, index: int, kind: str) -> _Source:
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
    path, fmt, limit = source.get("path"), source.get("format"), source.get("limit")
    if not isinstance(path, str) or not path.strip():
        raise PipelineError(f"{where} needs a 'path': a .jsonl/.json/.parquet file or a Hub dataset id.")
    if fmt is not None and fmt not in FORMATS:
        raise PipelineError(f"{where} ({path}): unknown format {fmt!r}; use one of {', '.join(FORMATS)} "
                            "or leave it out to detect the format per row.")
    if kind == "preference" and fmt not in (None, "preference"):
        raise PipelineError(f"{where} ({path}): format {fmt!r} has no chosen/rejected answers; preference "
                            "data needs format 'preference' (or leave format out).")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise PipelineError(f"{where} ({path}): limit must be a positive integer, got {limit!r}.")
    split, subset = source.get("split") or "train", source.get("subset")
    return _Source(path=path, format=fmt, split=str(split), subset=subset, limit=limit)


def _read_source(spec: _Source, kind: str, pattern: re.Pattern[str] | None, seen: set[bytes],
                 rows: list[dict]) -> dict[str, Any]:
    report = _SourceReport(spec.path, spec.format)
    for line, record in itertools.islice(_records(spec), spec.limit):
        report.rows_in += 1
        if isinstance(record, dict):
            if report.first_row is None:
                report.first_row = (line, _detect_format(record))
            if spec.format and _has_signature(record, spec.format):
                report.matched += 1
        try:
            if isinstance(record, _Drop):
                raise record
            row, fmt = _normalise(record, spec.format, kind)
        except _Drop as drop:
            report.drop(line, drop)
            continue
        neutralised = _neutralise_row(row, pattern) if pattern is not None else 0
        key = hashlib.blake2b(json.dumps(row, ensure_ascii=False).encode(), digest_size=16).digest()
        if key in seen:
            report.deduplicated += 1
            continue
        seen.add(key)
        rows.append(row)
        report.kept += 1
        report.formats[fmt] += 1
        report.neutralised += neutralised
    _check_source_outcome(spec, report)
    return report.as_dict()


def _check_source_outcome(spec: _Source, report: _SourceReport) -> None:
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
    if report.kept == 0:
        first = report.examples[0] if report.examples else None
        reasons = ", ".join(f"{reason}: {n}" for reason, n in report.reasons.most_common())
        problem = f" First problem: {first['reason']} ({first['detail']})." if first else ""
        raise DataError(f"no usable rows: {report.rows_in} read, {report.dropped} dropped "
                        f"({reasons or 'none'}), {report.deduplicated} duplicates of earlier rows.{problem} "
                        "Fix the rows or the source's `format`, or remove this source from the recipe.",
                        path=spec.path, line=first["line"] if first else None)


# ------------------------------------------------------------------------------------------------ readers


def _records(spec: _Source) -> Iterator[tuple[int, Any]]:
    """(line or row number, parsed value or _Drop) for each row of a source; errors surface immediately."""
    path = Path(spec.path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _json_lines(path, spec.path)
        if suffix == ".json":
            return _json_file(path, spec.path)
        if suffix == ".parquet":
            return _parquet_rows(path, spec.path)
        raise DataError(f"unsupported file type {suffix or '(no extension)'!r}; convert it to .jsonl, .json "
                        "or .parquet.", path=spec.path)
    if path.exists():
        raise DataError("is a directory; point `path` at a .jsonl, .json or .parquet file.", path=spec.path)
    if _HUB_ID.match(spec.path) and path.suffix.lower() not in _FILE_SUFFIXES:
        return _hub_rows(spec)
    raise DataError(f"file not found (looked for {path.absolute()}; relative paths start from the current "
                    "directory). Fix `path` in the recipe's data sources.", path=spec.path)


def _json_lines(path: Path, display: str, *, first_line_must_parse: bool = False
                ) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        offset, line = 0, 0
        any_row = False
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            line += 1
            start, offset = offset, offset + len(raw)
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                offset += _skip_rest_of_line(handle)
                any_row = True
                yield line, _Drop("too_long", f"line is longer than {MAX_LINE_BYTES:,} bytes")
                continue
            if line == 1 and raw.startswith(_BOM):
                raw, start = raw[len(_BOM):], start + len(_BOM)
            text = _decode_utf8(raw, display, line, start)
            if not text.strip():
                continue
            try:
                value: Any = json.loads(text)
            except (ValueError, RecursionError) as exc:
                if first_line_must_parse and not any_row:
                    raise DataError(f"not valid JSON ({_json_error(exc)}). A .json file must hold one JSON "
                                    "array of objects, or one JSON object per line.",
                                    path=display, line=line) from None
                value = _Drop("invalid_json", _json_error(exc))
            any_row = True
            yield line, value


def _skip_rest_of_line(handle: BinaryIO) -> int:
    """Consume the rest of an over-long line in bounded chunks; returns the number of bytes skipped."""
    skipped = 0
    while chunk := handle.readline(1 << 20):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _json_file(path: Path, display: str) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        head = handle.read(1 << 16)
    if not head.removeprefix(_BOM).lstrip().startswith(b"["):
        yield from _json_lines(path, display, first_line_must_parse=True)
        return
    data = path.read_bytes()
    body = data.removeprefix(_BOM)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = body.count(b"\n", 0, exc.start) + 1
        raise _utf8_error(body, exc.start, display, line, exc.start + len(data) - len(body)) from None
    decoder = json.JSONDecoder()
    pos = _JSON_WS.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line, counted = line + text.count("\n", counted, pos), pos
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno}); the file must be one JSON "
                                "array of objects. Fix the syntax there.",
                                path=display, line=exc.lineno) from None
            except (ValueError, RecursionError) as exc:
                raise DataError(f"invalid JSON ({_json_error(exc)}); fix this array element.",
                                path=display, line=line) from None
            yield line, value
            pos = _JSON_WS.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _JSON_WS.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise DataError("invalid JSON (expected ',' or ']' after an array element); fix the syntax "
                                "there.", path=display, line=line + text.count("\n", counted, pos))
    extra = _JSON_WS.match(text, pos).end()
    if extra < len(text):
        raise DataError("invalid JSON (extra content after the closing ']'); remove it.",
                        path=display, line=text.count("\n", 0, extra) + 1)


def _parquet_rows(path: Path, display: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot be read as Parquet ({exc}); check the file is complete and really Parquet.",
                        path=display) from None
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=512):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except pa.ArrowException as exc:
        raise DataError(f"cannot decode Parquet data after row {row} ({exc}); re-export the file.",
                        path=display, line=row + 1) from None


def _hub_rows(spec: _Source) -> Iterator[tuple[int, Any]]:
    try:
        import datasets

        dataset = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except Exception as exc:  # network, auth, missing config/split: all need the same user decision
        offline = any(os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}
                      for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        if offline:
            raise DataError("is not a local file, and the Hub dataset isn't available offline "
                            "(HF_HUB_OFFLINE=1, not in the local cache). Download it once with network "
                            "access, or point `path` at a local .jsonl/.json/.parquet file.",
                            path=spec.path) from exc
        raise DataError(f"is not a local file, and loading it from the Hugging Face Hub failed ({exc}). "
                        "Check the dataset id, `subset` and `split`, or point `path` at a local file.",
                        path=spec.path) from exc
    yield from enumerate(dataset, start=1)


def _decode_utf8(raw: bytes, display: str, line: int, start: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _utf8_error(raw, exc.start, display, line, start + exc.start) from None


def _utf8_error(raw: bytes, index: int, display: str, line: int, offset: int) -> DataError:
    if offset <= 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return DataError("is UTF-16 encoded (it starts with a UTF-16 byte-order mark); re-save it as UTF-8.",
                         path=display, line=line)
    return DataError(f"not valid UTF-8: byte 0x{raw[index]:02x} at byte offset {offset} of the file. "
                     "Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`).",
                     path=display, line=line)


def _json_error(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return str(exc)[:200]


# ---------------------------------------------------------------------------------------------- normalise


def _detect_format(record: dict) -> str | None:
    return next((fmt for fmt in _SIGNATURES if _has_signature(record, fmt)), None)


def _has_signature(record: dict, fmt: str) -> bool:
    # Parquet and Hub rows carry every column, with None where a row has no value: None means absent.
    return any(record.get(key) is not None for key in _SIGNATURES[fmt])


def _normalise(record: Any, fmt_hint: str | None, kind: str) -> tuple[dict, str]:
    if not isinstance(record, dict):
        raise _Drop("not_an_object", f"expected a JSON object, got {_type_name(record)}")
    fmt = fmt_hint or _detect_format(record)
    if fmt is None:
        raise _Drop("missing_fields", f"no fields of a known format (keys: {_keys(record)}); expected "
                                      "messages, conversations, instruction/output or chosen/rejected")
    if not _has_signature(record, fmt):
        raise _Drop("missing_fields", f"none of the {fmt} fields {', '.join(_SIGNATURES[fmt])} "
                                      f"(keys: {_keys(record)})")
    if kind == "preference":
        if fmt != "preference":
            raise _Drop("not_preference", f"a {fmt} row has no chosen/rejected answers")
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
        raise _Drop("missing_fields", f"alpaca row without {' and '.join(missing)}")
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
        raise _Drop("missing_fields", "a completion without a prompt")
    messages = _as_messages(record["prompt"], "prompt", "user") + _as_messages(
        record["completion"], "completion", "assistant")
    return _with_system(record, messages)


_READERS: dict[str, Callable[[dict], list[dict]]] = {
    "alpaca": _alpaca_messages, "sharegpt": _sharegpt_messages, "messages": _openai_messages,
}


def _preference_row(record: dict) -> dict:
    missing = [key for key in ("chosen", "rejected") if record.get(key) is None]
    if missing:
        raise _Drop("missing_fields", f"preference row without {' and '.join(missing)}")
    prompt_raw = record.get("prompt")
    if prompt_raw is None:
        # Implicit prompt: chosen and rejected are whole conversations sharing their leading messages.
        if not (isinstance(record["chosen"], list) and isinstance(record["rejected"], list)):
            raise _Drop("missing_fields", "no prompt, and chosen/rejected are not message lists to take one "
                                          "from")
        chosen = _parse_messages(record["chosen"], "chosen")
        rejected = _parse_messages(record["rejected"], "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        if isinstance(prompt_raw, str) and not prompt_raw.strip():
            raise _Drop("empty_prompt", "prompt is empty")
        prompt = _with_system(record, _as_messages(prompt_raw, "prompt", "user"))
        # Some datasets (e.g. ultrafeedback_binarized) repeat the prompt at the start of chosen/rejected.
        chosen = _strip_prefix(_as_messages(record["chosen"], "chosen", "assistant"), prompt)
        rejected = _strip_prefix(_as_messages(record["rejected"], "rejected", "assistant"), prompt)
    _check_length(prompt + chosen + rejected)
    same = [(m["role"], m["content"].strip()) for m in chosen] == [
        (m["role"], m["content"].strip()) for m in rejected]
    if same and (chosen or prompt_raw is None):  # two empty explicit answers are a bad_completion instead
        raise _Drop("chosen_equals_rejected", "chosen and rejected are the same text: nothing to learn")
    if not prompt:
        raise _Drop("empty_prompt", "prompt has no messages (without a 'prompt' field, chosen and rejected "
                                    "must share their leading messages)")
    _check_turn_order(prompt, field="prompt", final="user")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if len(answer) != 1 or answer[0]["role"] != "assistant":
            roles = [m["role"] for m in answer]
            raise _Drop("bad_completion", f"{name} must be exactly one assistant message after the prompt, "
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
        raise _Drop("bad_constraints", "instruction_id_list must be a list of strings with one kwargs object each")
    return json.dumps({"instruction_id_list": ids, "kwargs": kwargs}, ensure_ascii=False)


def _parse_messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise _Drop("wrong_type", f"{where} must be a list of messages, got {_type_name(value)}")
    messages = []
    for index, message in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(message, dict):
            raise _Drop("wrong_type", f"{at} must be an object with role and content, "
                                      f"got {_type_name(message)}")
        role = message.get("role") if message.get("role") is not None else message.get("from")
        if role is None or ("content" not in message and "value" not in message):
            raise _Drop("missing_fields", f"{at} needs 'role' and 'content' (or 'from' and 'value')")
        content = message.get("content") if message.get("content") is not None else message.get("value")
        if not isinstance(role, str):
            raise _Drop("wrong_type", f"{at}.role is {_type_name(role)}, expected a string")
        normal = _ROLES.get(role.strip().lower())
        if normal is None:
            raise _Drop("unknown_role", f"{at} has role {role!r}; expected system, user/human or "
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
        raise _Drop("wrong_type", f"{where} is {_type_name(value)}, expected a string")
    bad = _BAD_CHARS.search(value)
    if bad is not None:
        if bad.group() == "\x00":
            raise _Drop("nul_byte", f"{where} contains a NUL character")
        raise _Drop("lone_surrogate", f"{where} contains an unpaired surrogate (U+{ord(bad.group()):04X})")
    if not allow_empty and not value.strip():
        raise _Drop("empty_content", f"{where} is empty")
    return value


def _check_length(messages: list[dict]) -> None:
    total = sum(len(m["content"]) for m in messages)
    if total > MAX_ROW_CHARS:
        raise _Drop("too_long", f"{total:,} characters of text; the limit is {MAX_ROW_CHARS:,}")


def _check_turn_order(messages: list[dict], *, field: str, final: str) -> None:
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise _Drop("misplaced_system", f"{field}: a system message may only come first")
    if not body:
        raise _Drop("no_assistant_turn" if final == "assistant" else "empty_prompt",
                    f"{field} has no user or assistant turns")
    if body[0]["role"] != "user":
        raise _Drop("starts_with_assistant", f"{field} must start with a user turn (after an optional "
                                             "system)")
    for index in range(1, len(body)):
        if body[index]["role"] == body[index - 1]["role"]:
            role = body[index]["role"]
            raise _Drop("non_alternating", f"{field}: two {role} turns in a row at turn {index + 1}")
    if final == "assistant" and len(body) == 1:
        raise _Drop("no_assistant_turn", f"{field} has no assistant turn to learn from")
    if body[-1]["role"] != final:
        reason = "ends_with_user" if final == "assistant" else "prompt_not_ending_on_user"
        raise _Drop(reason, f"{field} must end on a {final} turn")


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
