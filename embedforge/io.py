"""Atomic file and directory writes, and figures saved without pyplot's global state.

Every file the project writes for users (checkpoints, reports, exports, plots) goes through here, so
that a run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_file)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it owner-only
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


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
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; the result should read like any new directory
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


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
