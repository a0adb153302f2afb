"""Atomic file and directory writes, and figures saved without pyplot's global state.

Every file the project writes for users (checkpoints, reports, exports, plots) goes through here, so
that a run killed at any moment leaves either the old file or the new one, never half of one, and a power
cut does not either: each file and its directory are fsynced before the rename (the data is on disk) and
the directory again after it (the rename is). A log that grows by records (`metrics.jsonl`) is appended with
:func:`append_line_durable`, each record on disk before the call returns.

File names read back from a record (a manifest, a checkpoint list) pass :func:`plain_file_name` before they
are joined to the record's directory, so that a record cannot point outside it.

Temporaries carry the writer's pid (`.tmp-NAME-PID-*`, `.old-NAME-PID`, `.NAME.PID.*`): the cleanup of
temporaries (:func:`recover_directory`) leaves alone those of a live process, and restores a `.old-` dir that
a writer killed between its two renames left in place of NAME.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

log = logging.getLogger("embedforge.io")
_TEMPORARY = re.compile(r"^\.(tmp|old)-(.+)-(\d+)(-[^-]*)?$")


class UnsafeFileNameError(ValueError):
    """A file name read from a record that is not a plain name inside the record's directory."""


def plain_file_name(value: object, record: str | Path, field: str) -> str:
    """`value` if it is a plain file name (to join to the directory of `record`), else UnsafeFileNameError.

    A plain name is a non-empty str without a path separator ("/" or "\\"), a NUL or a drive, that is not
    "." or ".." and not absolute. The error names the record file, the field and the value.
    """
    if (not isinstance(value, str) or value in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value
            or PurePosixPath(value).is_absolute() or PureWindowsPath(value).anchor):
        raise UnsafeFileNameError(f"{record}: field {field!r} must be a plain file name inside "
                                  f"{Path(record).parent} (no path separator, not '.' or '..', not absolute), "
                                  f"got {value!r}")
    return value


def relative_file_path(value: object, record: str | Path, field: str) -> str:
    """`value` if it is a relative path of plain names ("1_Pooling/config.json": a file in a subfolder of the
    record's directory), else UnsafeFileNameError naming the record, the field and the value."""
    parts = value.split("/") if isinstance(value, str) else [value]
    try:
        for part in parts:
            plain_file_name(part, record, field)
    except UnsafeFileNameError:
        raise UnsafeFileNameError(f"{record}: field {field!r} must be a relative path inside {Path(record).parent} "
                                  f"(plain names joined by '/', no '..', not absolute), got {value!r}") from None
    return value


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_file)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        fsync_file(Path(temporary))
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it owner-only
        fsync_dir(path.parent)
        os.replace(temporary, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def append_line_durable(path: str | Path, line: str) -> None:
    """Append one line (a newline is added) and fsync the file before returning."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_file_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Indented JSON with a final newline, written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_dir_atomic(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` in a hidden temporary dir beside `final`, then swap it into place.

    A crash inside `write` removes the temporary dir and leaves any existing `final` untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-{os.getpid()}-"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; the result should read like any new directory
    try:
        write(tmp)
        fsync_tree(tmp)
        fsync_dir(final.parent)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)  # a crash between these renames leaves `old`: recover_directory restores it
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (new names, renames) durable."""
    handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(directory) / name)
        fsync_dir(Path(directory))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def recover_directory(parent: Path, name: str | None = None) -> None:
    """Clean up after writers in `parent` (of `name` only, if given) that died: delete their temporaries,
    restore what they half-replaced.

    A `.old-NAME-PID` dir is the previous NAME, moved aside by a writer killed before its new NAME was in
    place: when NAME is missing it is renamed back, otherwise deleted. Anything a live process is writing
    (its pid in the name) is left alone; a temporary without a pid (older versions) counts as dead.
    """
    if not parent.is_dir():
        return
    for child in sorted(parent.iterdir()):
        if not child.is_dir() or not child.name.startswith((".tmp-", ".old-")):
            continue
        match = _TEMPORARY.match(child.name)
        target = match.group(2) if match else None
        if name is not None and target != name and not (target is None and child.name[5:].startswith(f"{name}-")):
            continue
        if match is not None and pid_alive(int(match.group(3))):
            continue
        if match is not None and match.group(1) == "old" and not (parent / target).exists():
            os.replace(child, parent / target)
            fsync_dir(parent)
            log.warning("restored %s from %s (its writer died between two renames)", parent / target, child.name)
        else:
            shutil.rmtree(child, ignore_errors=True)


def new_figure(nrows: int = 1, ncols: int = 1, **subplot_options: Any):
    """A matplotlib Figure with its axes (Agg canvas): no pyplot, no global backend switch."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=subplot_options.pop("figsize", None))
    axes = figure.subplots(nrows, ncols, **subplot_options)
    return figure, axes


def save_figure(figure, path: str | Path, dpi: int = 100) -> Path:
    """Save a Figure as PNG, atomically."""
    return write_file_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=dpi))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
