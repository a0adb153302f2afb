"""Read and validate query-document pair files.

A pair file is UTF-8 text in one of two forms, told apart by its first non-blank character:

* JSONL: one JSON object per line (blank lines are skipped);
* JSON: one array of objects (``[ {...}, {...} ]``).

Each record holds ``query`` and ``document`` (non-empty strings), ``rel`` (a number in [0, 1]: the
graded relevance, 1 = perfect match) and an optional ``weight`` (a number >= 0, default 1.0, the
record's share of the loss). Other fields are ignored. Files are streamed, never read whole; every
record is checked before anything trains, and the error lists the first problems by file, line (or
array index) and field.
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_REPORTED_PROBLEMS = 10
_CHUNK_BYTES = 1 << 20
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max; beyond it float32 is inf


class DataError(ValueError):
    """A pair file that cannot be used; the message names every problem found (up to a limit)."""


@dataclass(frozen=True)
class Pair:
    query: str
    document: str
    rel: float
    weight: float = 1.0


def read_pairs(path: str | Path) -> list[Pair]:
    """Read every pair of a JSON or JSONL file, or raise DataError listing the problems."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    pairs: list[Pair] = []
    problems: list[str] = []
    problem_count = 0
    for where, record in _records(path):
        try:
            pairs.append(_to_pair(record))
        except ValueError as error:
            problem_count += 1
            if len(problems) < MAX_REPORTED_PROBLEMS:
                problems.append(f"{path}:{where}: {error}")
    if problem_count:
        more = problem_count - len(problems)
        tail = f"\n  ... and {more} more" if more else ""
        raise DataError(f"{path}: {problem_count} invalid record(s):\n  " + "\n  ".join(problems) + tail)
    if not pairs:
        raise DataError(f"{path}: no records (the file is empty)")
    return pairs


class _InvalidJSON(ValueError):
    """A JSONL line that does not parse: reported with the other problems, not alone."""


def _to_pair(record: object) -> Pair:
    if isinstance(record, _InvalidJSON):
        raise record
    if not isinstance(record, dict):
        raise ValueError(f"record must be a JSON object, got {_json_type(record)}")
    errors = []
    for field in ("query", "document"):
        value = record.get(field)
        if field not in record:
            errors.append(f"field '{field}' is missing")
        elif not isinstance(value, str):
            errors.append(f"field '{field}' must be a string, got {_json_type(value)}")
        elif not value.strip():
            errors.append(f"field '{field}' is empty")
    rel = _number(record, "rel", errors, required=True)
    if rel is not None and not 0.0 <= rel <= 1.0:
        errors.append(f"field 'rel' must be in [0, 1], got {rel}")
    weight = _number(record, "weight", errors, required=False)
    if weight is not None and weight < 0:
        errors.append(f"field 'weight' must be >= 0, got {weight}")
    if errors:
        raise ValueError("; ".join(errors))
    return Pair(record["query"], record["document"], rel, 1.0 if weight is None else weight)


def _number(record: dict, field: str, errors: list[str], required: bool) -> float | None:
    if field not in record or (record[field] is None and not required):
        if required:
            errors.append(f"field '{field}' is missing")
        return None
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        errors.append(f"field '{field}' must be a number, got {_json_type(value)}")
        return None
    try:
        number = float(value)
    except OverflowError:
        errors.append(f"field '{field}' is too large for a number ({len(str(value))} digits)")
        return None
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        errors.append(f"field '{field}' must be a finite number within float32 range (training uses float32), "
                      f"got {value}")
        return None
    return number


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (location, parsed record): 'line N' for JSONL, 'index N (line M)' for a JSON array."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"["):
        yield from _json_array_records(path)
    else:
        yield from _jsonl_records(path)


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                reason = f"{error.reason} at byte {error.start}"
                raise DataError(f"{path}:line {number}: not UTF-8 text ({reason})") from None
            if not text.strip():
                continue
            try:
                yield f"line {number}", _decoder.decode(text)
            except ValueError as error:
                hint = ""
                if number == 1 and text.lstrip().startswith("{"):
                    hint = " (a JSON file must hold an array of objects; JSONL one object per line)"
                yield f"line {number}", _InvalidJSON(f"invalid JSON: {error}{hint}")


class _TextStream:
    """The UTF-8 text of a binary file, read a chunk at a time, with a cursor and its line number."""

    def __init__(self, path: Path, handle) -> None:
        self.path, self.handle = path, handle
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text, self.pos, self.lines_before, self.eof = "", 0, 1, False

    @property
    def line(self) -> int:
        return self.lines_before + self.text.count("\n", 0, self.pos)

    def more(self) -> bool:
        """Append the next chunk (dropping what was consumed); False at the end of the file."""
        if self.eof:
            return False
        chunk = self.handle.read(_CHUNK_BYTES)
        self.eof = not chunk
        try:
            decoded = self.decoder.decode(chunk, final=self.eof)
        except UnicodeDecodeError as error:
            line = self.lines_before + self.text.count("\n") + chunk[: error.start].count(b"\n")
            raise DataError(f"{self.path}:line {line}: not UTF-8 text ({error.reason})") from None
        self.lines_before = self.line
        self.text, self.pos = self.text[self.pos:] + decoded, 0
        return True

    def next_char(self) -> str | None:
        """Skip whitespace; return the next character (not consumed), or None at the end."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return None


def _json_array_records(path: Path) -> Iterator[tuple[str, object]]:
    """Stream the objects of a top-level JSON array without reading the file into one string."""
    with path.open("rb") as handle:
        stream = _TextStream(path, handle)
        stream.next_char()
        stream.pos += 1  # the opening '['
        index = 0
        while True:
            char = stream.next_char()
            if char is None:
                raise DataError(f"{path}:line {stream.line}: invalid JSON: the array is not closed with ']'")
            if char == "]":
                stream.pos += 1
                break
            if index > 0:
                if char != ",":
                    raise DataError(f"{path}:line {stream.line}: invalid JSON: expected ',' or ']' "
                                    f"after index {index - 1}")
                stream.pos += 1
                stream.next_char()
            where = f"index {index} (line {stream.line})"
            while True:
                try:
                    record, stream.pos = _decoder.raw_decode(stream.text, stream.pos)
                    break
                except ValueError as error:
                    if not stream.more():
                        raise DataError(f"{path}:{where}: invalid JSON: {error}") from None
            yield where, record
            index += 1
        if stream.next_char() is not None:
            raise DataError(f"{path}:line {stream.line}: invalid JSON: extra data after the array")
