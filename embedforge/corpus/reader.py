"""Corpus input: JSONL records or plain-text lines, checked line by line (no torch, no model).

A record is one text with an id. JSONL: the text is `text_field`, the id `id_field` (a string or an integer;
without an id field, `<file name>:<line>`). Plain text: one text a line, id `<file name>:<line>`. A line that is
not JSON, lacks a field, or holds an empty text is a Problem: it stops the job (BadInputError names file, line
and field) unless the job skips bad lines, which are then listed.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("auto", "jsonl", "text")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


class BadInputError(ValueError):
    """A corpus line that cannot be embedded (message: file, line, field, reason)."""


@dataclass(frozen=True)
class Record:
    id: str
    text: str
    source: str  # "file:line", for messages


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str | None
    reason: str

    def describe(self, location: str) -> str:
        field = f" field {self.field!r}:" if self.field else ""
        return f"{location}:{field} {self.reason}"

    def __str__(self) -> str:
        return self.describe(f"{self.file}:{self.line}")

    def to_json(self) -> dict:
        return {"file": self.file, "line": self.line, "field": self.field, "reason": self.reason}


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expand globs (`**` included); keep the given order, each file once. A pattern matching nothing is an error."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        paths = [Path(m) for m in matches if Path(m).is_file()]
        if not paths:
            raise BadInputError(f"{pattern}: no such file" if matches == [pattern] else f"{pattern}: matches no file")
        files.update(dict.fromkeys(paths))
    names = [p.name for p in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadInputError(f"several input files are named {', '.join(duplicates)}: default ids (<file name>:<line>) "
                            "would collide; rename them or give each record an id (--id-field)")
    return list(files)


def file_format(path: Path, fmt: str) -> str:
    """auto: jsonl for .jsonl/.ndjson/.json files, else text."""
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: Path) -> dict:
    """Path (absolute), size and sha256 of an input file, for the job's identity and the manifest."""
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": file_sha256(path)}


def parse_line(line: bytes, fmt: str, text_field: str, id_field: str | None,
               name: str, number: int) -> Record | Problem:
    """One input line -> a Record, or the Problem that keeps it from being embedded."""
    default_id = f"{name}:{number}"
    try:
        line = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Problem(name, number, None, f"not UTF-8 (byte {exc.start}: {exc.reason})")
    if fmt == "text":
        text = line.rstrip("\r\n")
        if not text.strip():
            return Problem(name, number, None, "empty text")
        return Record(default_id, text, default_id)
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return Problem(name, number, None, f"not JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(value, dict):
        return Problem(name, number, None, f"expected a JSON object, got {type(value).__name__}")
    text = value.get(text_field)
    if text is None:
        return Problem(name, number, text_field, "missing")
    if not isinstance(text, str):
        return Problem(name, number, text_field, f"expected a string, got {type(text).__name__}")
    if not text.strip():
        return Problem(name, number, text_field, "empty text")
    if id_field is None:
        return Record(default_id, text, default_id)
    record_id = value.get(id_field)
    if record_id is None:
        return Problem(name, number, id_field, "missing")
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        return Problem(name, number, id_field, f"expected a string or an integer, got {type(record_id).__name__}")
    return Record(str(record_id), text, default_id)


def read_file(path: Path, fmt: str, text_field: str, id_field: str | None, skip_bad: bool,
              problems: list[Problem], part: tuple[int, int, int] | None = None) -> Iterator[Record]:
    """The records of one file in order; bad lines raise BadInputError, or with skip_bad go to `problems`.

    part: (byte offset, its line number, line count) reads only those lines (see split_lines).
    Blank lines of a JSONL file are not records (nor problems); in a text file a blank line is an empty text.
    """
    fmt = file_format(path, fmt)
    offset, first_line, count = part or (0, 1, None)
    with path.open("rb") as f:
        f.seek(offset)
        for number, line in enumerate(itertools.islice(f, count), start=first_line):
            if fmt == "jsonl" and not line.strip():
                continue
            parsed = parse_line(line, fmt, text_field, id_field, path.name, number)
            if isinstance(parsed, Record):
                yield parsed
            elif skip_bad:
                problems.append(parsed)
            else:
                raise BadInputError(parsed.describe(f"{path}:{number}")
                                    + "; fix the line or pass --skip-bad to leave such lines out")


def split_lines(path: Path, lines_per_part: int) -> list[tuple[int, int, int]]:
    """Cut a file into parts of lines_per_part lines: [(byte offset, first line number, line count)]."""
    parts, offset, number = [], 0, 0
    with path.open("rb") as f:
        while lines := list(itertools.islice(f, lines_per_part)):
            parts.append((offset, number + 1, len(lines)))
            offset += sum(map(len, lines))
            number += len(lines)
    return parts


def read_records(files: list[Path], fmt: str, text_field: str, id_field: str | None, skip_bad: bool,
                 problems: list[Problem]) -> Iterator[Record]:
    """The records of all files, in file order."""
    for path in files:
        yield from read_file(path, fmt, text_field, id_field, skip_bad, problems)
