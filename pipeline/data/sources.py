"""Where rows come from: a local file, a local directory laid out like a Hub data set, or a Hub dataset id.

Where it sits: :mod:`pipeline.data.formats` turns the rows read here into the normalised schema. This module
only finds and reads rows, one at a time, and says where each came from (file and line or row number), so
nothing here needs a source's whole size in memory.

A source (one entry of ``data.sft`` / ``data.dpo``) is read as follows:
  file       ``.jsonl`` (one line at a time, at most MAX_LINE_BYTES each), ``.json`` (an array, parsed whole,
             or JSON lines), ``.parquet`` (one record batch at a time).
  directory  laid out like a Hub data set (``huggingface-cli download`` or a mirror). The files of ``split``
             are the ones ``datasets`` itself assigns to that split (``datasets.load_dataset_builder``: the
             README's ``configs`` block when there is one, else its file-name patterns such as
             ``data/train_sft-00000-of-00003-*.parquet``); when ``datasets`` names no such split, files named
             after it (``train_prefs-00000-of-00001.parquet``, ``train_prefs.jsonl``, ``train_prefs/*``). The
             shards are read in name order with the readers above, so a bad line in shard 2 is reported as
             that shard's line. ``subset`` picks a README config.
  Hub id     ``datasets.load_dataset(path, subset, split=split, revision=revision)`` (cached on disk by
             ``datasets``, memory-mapped), read in Arrow batches.

``columns`` renames columns before any reader sees them: ``{column in your data: name the pipeline reads}``
(the direction of ``datasets.Dataset.rename_columns``). ``limit`` reads only the first N rows of the source.
``fraction`` reads a seeded sample of ``int(fraction × rows)`` rows (at least one), kept in file order: the
share alignment-handbook's mixer takes (``ds.shuffle(seed=seed).select(range(int(len(ds) * weight)))``), drawn
without shuffling the data, so a set grouped by topic or origin (smol-smoltalk concatenates its sources) is
sampled evenly. The seed is the recipe's ``data.seed``: the same recipe reads the same rows. With ``limit``
too, the first ``limit`` of the sampled rows are read. Counting the rows for ``fraction`` reads Parquet
metadata, ``len()`` of a Hub split, or scans JSON lines once; the sample is a mask of one byte per row, and
the source is then read in one pass. For a directory
or a Hub id, ``split`` defaults to ``train``; for a single file it is ignored, as are ``subset`` and
``revision`` (``revision`` only means something on the Hub).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import DataError, PipelineError

SOURCE_KEYS = frozenset({"path", "format", "split", "subset", "revision", "columns", "limit", "fraction"})
MAX_ROW_CHARS = 200_000
# Every character of text costs at least one byte and at most six (a \uXXXX escape), so a line this long
# cannot hold a row we would keep unless it carries megabytes of unrelated fields.
MAX_LINE_BYTES = 8 * MAX_ROW_CHARS
# Column names the readers in formats.py look at: the only sensible targets of a `columns` mapping.
READER_COLUMNS = ("messages", "conversations", "instruction", "input", "output", "system", "prompt",
                  "completion", "chosen", "rejected", "instruction_id_list", "kwargs")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")

_JSON_WS = re.compile(r"[ \t\n\r]*")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".gz", ".zip", ".arrow", ".yaml"}
_SHARD_NAME = re.compile(r"^(?P<split>[\w.]+?)(?:-\d{5}-of-\d{5}.*)?$")
_BOM = b"\xef\xbb\xbf"
_ARROW_BATCH = 1000


class Drop(Exception):
    """A row-level problem: the row is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Source:
    """One validated data source of a recipe (see the module docstring for each key)."""

    path: str
    format: str | None = None
    split: str = "train"
    subset: str | None = None
    revision: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    limit: int | None = None
    fraction: float | None = None


@dataclass
class Row:
    """One raw row: the file it came from, its line (JSON) or row number (Parquet, Hub), the parsed value."""

    file: str
    line: int
    value: Any  # a parsed JSON value, a dict of columns, or a Drop for a line that could not be parsed


class SourceReader:
    """The rows of one source, in order, with ``columns`` applied; cheap to create (nothing is read yet)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.rename = dict(source.columns)
        self.files = _resolve(source)  # [] for a Hub id
        self.seen_columns: set[str] = set()  # columns of the rows read so far (before renaming)
        self._dataset: Any = None  # the Hub split, loaded once
        self.rows_available: int | None = None  # rows in the whole source, once `fraction` needed the count

    def count(self) -> int:
        """Rows in the whole source (what ``fraction`` is a share of); reads metadata or scans lines."""
        if not self.files:
            return len(self._hub())
        return sum(_count_rows(Path(file)) for file in self.files)

    def selected_rows(self, seed: int) -> Iterator[Row]:
        """The rows ``fraction`` (a sample seeded by ``seed``) and ``limit`` (the first N of those) select."""
        rows = self.rows()
        if self.source.fraction is not None and self.source.fraction < 1:
            self.rows_available = self.count()
            chosen = _sample(self.rows_available, max(1, int(self.source.fraction * self.rows_available)), seed)
            rows = (row for index, row in enumerate(rows) if index < len(chosen) and chosen[index])
        return itertools.islice(rows, self.source.limit)

    def rows(self) -> Iterator[Row]:
        """Every row of the source, in file order, with columns renamed."""
        if not self.files:
            dataset = self._hub()
            self._check_schema(dataset.column_names, self.source.path)
            yield from self._renamed(_hub_rows(dataset, self.source.path))
            return
        for file in self.files:
            yield from self._renamed(_file_rows(Path(file), file, self._check_schema))

    def _hub(self) -> Any:
        if self._dataset is None:
            self._dataset = _hub_dataset(self.source)
        return self._dataset

    def check_columns_found(self) -> None:
        """After reading: a mapped column that no row had is a mistake in the recipe, not in the data."""
        missing = [old for old in self.rename if old not in self.seen_columns]
        if missing and self.seen_columns:
            raise _column_error(self.rename, missing, self.seen_columns, self.source.path)

    def _check_schema(self, names: list[str], display: str) -> None:
        """Files with a schema (Parquet, Hub) are checked before their first row."""
        missing = [old for old in self.rename if old not in names]
        if missing:
            raise _column_error(self.rename, missing, set(names), display)
        clash = [new for old, new in self.rename.items() if new in names and new not in self.rename]
        if clash:
            raise DataError(f"`columns` renames a column to {clash[0]!r}, but the data already has a column "
                            f"{clash[0]!r}. Rename that one too (e.g. {{{clash[0]}: unused_{clash[0]}}}) or "
                            "drop the mapping.", path=display)

    def _renamed(self, rows: Iterator[Row]) -> Iterator[Row]:
        for row in rows:
            if isinstance(row.value, dict):
                self.seen_columns.update(row.value)
                if self.rename:
                    row.value = self._rename_row(row)
            yield row

    def _rename_row(self, row: Row) -> dict:
        record = row.value
        out = {key: value for key, value in record.items() if key not in self.rename}
        for old, new in self.rename.items():
            if old in record:
                if out.get(new) is not None and record[old] is not None:
                    raise DataError(f"`columns` renames {old!r} to {new!r}, but this row has both. Rename "
                                    f"{new!r} too or drop the mapping.", path=row.file, line=row.line)
                if record[old] is not None or new not in out:
                    out[new] = record[old]
        return out


def _sample(n: int, k: int, seed: int) -> Any:
    """A boolean mask over ``n`` rows with ``k`` set, drawn without replacement (n bytes, not n rows)."""
    import numpy as np

    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return mask


def parse_columns(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """Validate a source's ``columns`` mapping: ``{column in your data: name the pipeline reads}``."""
    if value is None:
        return ()
    if not isinstance(value, dict) or not value or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise PipelineError(f"{where}: columns must map column names in your data to the names the pipeline "
                            f"reads, e.g. {{question: instruction, answer: output}}; got {value!r}.")
    for old, new in value.items():
        if new not in READER_COLUMNS:
            hint = (f" It looks reversed: write {{{new}: {old}}} (your column first, then the pipeline's name)."
                    if old in READER_COLUMNS else "")
            raise PipelineError(f"{where}: columns maps {old!r} to {new!r}, which no reader uses.{hint} "
                                f"The pipeline reads: {', '.join(READER_COLUMNS)}.")
    targets = list(value.values())
    if len(set(targets)) != len(targets):
        raise PipelineError(f"{where}: columns maps two columns to the same name ({value!r}).")
    return tuple(value.items())


def read_json_lines(path: Path, display: str, *, first_line_must_parse: bool = False) -> Iterator[Row]:
    """Every non-blank line of a JSON-lines file as a :class:`Row`; a bad line's value is a :class:`Drop`.

    Lines longer than MAX_LINE_BYTES are skipped without being held in memory. Bytes that are not UTF-8 are
    a :class:`DataError` naming the line and byte offset (the file is probably in another encoding).
    """
    with path.open("rb") as handle:
        offset, line = 0, 0
        any_row = False
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            line += 1
            start, offset = offset, offset + len(raw)
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                offset += _skip_rest_of_line(handle)
                any_row = True
                yield Row(display, line, Drop("too_long", f"line is longer than {MAX_LINE_BYTES:,} bytes"))
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
                value = Drop("invalid_json", _json_error(exc))
            any_row = True
            yield Row(display, line, value)


# ----------------------------------------------------------------------------------------- finding files


def _resolve(source: Source) -> list[str]:
    """The files to read, in order; [] for a Hub id. Errors the user can fix are raised here, before reading."""
    path = Path(source.path)
    if path.is_file():
        _check_suffix(path, source.path)
        return [source.path]
    if path.is_dir():
        return _split_files(path, source)
    if _HUB_ID.match(source.path) and path.suffix.lower() not in _FILE_SUFFIXES:
        return []
    raise DataError(f"file not found (looked for {path.absolute()}; relative paths start from the current "
                    "directory). Fix `path` in the recipe's data sources.", path=source.path)


def _check_suffix(path: Path, display: str) -> None:
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"unsupported file type {suffix or '(no extension)'!r}; convert it to .jsonl, .json "
                        "or .parquet.", path=display)


def _split_files(directory: Path, source: Source) -> list[str]:
    splits = _datasets_splits(directory, source)
    files = splits.get(source.split) or _files_named_after(directory, source.split)
    if not files:
        found = sorted(set(splits) | _split_names_in(directory))
        listing = ", ".join(found) if found else "none (no .parquet, .jsonl or .json files in it)"
        raise DataError(f"is a directory with no data files for split {source.split!r}. Splits found: "
                        f"{listing}. Set `split` to one of them, or point `path` at a single file.",
                        path=source.path)
    for file in files:
        _check_suffix(Path(file), file)
    return files


def _datasets_splits(directory: Path, source: Source) -> dict[str, list[str]]:
    """The split → files assignment ``datasets.load_dataset(directory)`` would use (README configs or patterns)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(directory), source.subset)
    except ValueError as exc:  # e.g. an unknown config name: the user chose it, so say so
        if source.subset is not None:
            raise DataError(f"cannot use subset {source.subset!r} of this directory ({exc}).",
                            path=source.path) from None
        return {}
    except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError):
        return {}  # no files datasets recognises: our own name matching may still find the split
    data_files = builder.config.data_files or {}
    return {str(split): sorted(str(f) for f in files) for split, files in data_files.items()}


def _files_named_after(directory: Path, split: str) -> list[str]:
    found = set()
    for suffix in DATA_SUFFIXES:
        found.update(directory.glob(f"**/{split}{suffix}"))
        found.update(directory.glob(f"**/{split}-*{suffix}"))
        found.update(directory.glob(f"**/{split}/**/*{suffix}"))
    return sorted(str(p) for p in found if p.is_file() and not any(part.startswith(".") for part in p.parts))


def _split_names_in(directory: Path) -> set[str]:
    names = set()
    for suffix in DATA_SUFFIXES:
        for file in directory.glob(f"**/*{suffix}"):
            match = _SHARD_NAME.match(file.name[:-len(suffix)])
            if match and not any(part.startswith(".") for part in file.relative_to(directory).parts):
                names.add(match["split"])
    return names


# ------------------------------------------------------------------------------------------- reading files


def _file_rows(path: Path, display: str, check_schema: Any) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_json_lines(path, display)
    if suffix == ".json":
        return _json_file(path, display)
    return _parquet_rows(path, display, check_schema)


def _count_rows(path: Path) -> int:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_file(path, str(path)).metadata.num_rows
    if suffix == ".json":
        return sum(1 for _ in _json_file(path, str(path)))
    count = 0  # JSON lines: every non-blank line is a row, parsed or not (as read_json_lines counts them)
    with path.open("rb") as handle:
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                _skip_rest_of_line(handle)
                count += 1
            elif raw.strip() and raw.removeprefix(_BOM).decode("utf-8", "replace").strip():
                count += 1
    return count


def _skip_rest_of_line(handle: BinaryIO) -> int:
    """Consume the rest of an over-long line in bounded chunks; returns the number of bytes skipped."""
    skipped = 0
    while chunk := handle.readline(1 << 20):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _json_file(path: Path, display: str) -> Iterator[Row]:
    with path.open("rb") as handle:
        head = handle.read(1 << 16)
    if not head.removeprefix(_BOM).lstrip().startswith(b"["):
        yield from read_json_lines(path, display, first_line_must_parse=True)
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
            yield Row(display, line, value)
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


def _parquet_file(path: Path, display: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot be read as Parquet ({exc}); check the file is complete and really Parquet.",
                        path=display) from None


def _parquet_rows(path: Path, display: str, check_schema: Any) -> Iterator[Row]:
    import pyarrow as pa

    parquet = _parquet_file(path, display)
    check_schema(parquet.schema_arrow.names, display)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_ARROW_BATCH):
            for record in batch.to_pylist():
                row += 1
                yield Row(display, row, record)
    except pa.ArrowException as exc:
        raise DataError(f"cannot decode Parquet data after row {row} ({exc}); re-export the file.",
                        path=display, line=row + 1) from None


def _hub_dataset(source: Source) -> Any:
    try:
        import datasets

        return datasets.load_dataset(source.path, source.subset, split=source.split, revision=source.revision)
    except Exception as exc:  # network, auth, missing config/split: all need the same user decision
        offline = any(os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}
                      for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        if offline:
            raise DataError("is not a local file, and the Hub dataset isn't available offline "
                            "(HF_HUB_OFFLINE=1, not in the local cache). Download it once with network "
                            "access, or point `path` at a local .jsonl/.json/.parquet file or a downloaded "
                            "copy of the data set (a directory).", path=source.path) from exc
        raise DataError(f"is not a local file, and loading it from the Hugging Face Hub failed ({exc}). "
                        "Check the dataset id, `subset`, `split` and `revision`, or point `path` at a local "
                        "file or directory.", path=source.path) from exc


def _hub_rows(dataset: Any, display: str) -> Iterator[Row]:
    row = 0
    for table in dataset.with_format("arrow").iter(batch_size=_ARROW_BATCH):  # memory-mapped, batch by batch
        for record in table.to_pylist():
            row += 1
            yield Row(display, row, record)


def _column_error(rename: dict[str, str], missing: list[str], names: set[str], display: str) -> DataError:
    old = missing[0]
    reversed_hint = ""
    if rename[old] in names:
        reversed_hint = (f" The data does have {rename[old]!r}: the mapping reads {{column in your data: name "
                         f"the pipeline reads}}, so write {{{rename[old]}: {old}}}?")
    shown = ", ".join(sorted(names)[:12]) + (", ..." if len(names) > 12 else "")
    return DataError(f"`columns` renames {old!r}, but the data has no column {old!r} (its columns: {shown})."
                     f"{reversed_hint}", path=display)


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
