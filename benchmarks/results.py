"""Each benchmark's latest figures, as JSON in benchmarks/results/NAME.json, with when, where and how they were
measured.

Every benchmark that produces figures calls :func:`write_result` at its end with a small dict: a one-line
``headline`` (what docs/benchmarks.md quotes) and its named figures. The file holds that dict plus a ``meta``
block: ``date`` (UTC, ISO 8601), ``cpu`` (lscpu's model name), ``cores``, ``commit`` (`git rev-parse --short
HEAD`, with ``+dirty`` when tracked files other than benchmarks/results/ differ from it) and ``command`` (the
benchmark's command line). A new run replaces the file; `make bench-docs` (scripts/bench_docs.py) renders the
folder into docs/benchmarks.md.

The benchmarks run as scripts (`python benchmarks/NAME.py`), so this module is imported as `results`.
"""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name  # noqa: E402

from embedforge.io import write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"  # tests point this elsewhere (monkeypatch, or results_dir=)


def git_commit(repo: Path = REPO) -> str:
    """`git rev-parse --short HEAD` of `repo`, plus "+dirty" when a tracked file differs from it (untracked files
    and the results folder itself do not count: a benchmark run rewrites its result). "unknown" without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        changes = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)benchmarks/results").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if changes else "")


def command_line(argv: list[str]) -> str:
    """`python benchmarks/SCRIPT ARGS` of a benchmark's sys.argv (argv[0]: the script, however it was named)."""
    return "python " + shlex.join([f"benchmarks/{Path(argv[0]).name}", *argv[1:]])


def meta(argv: list[str] | None = None) -> dict:
    """The `meta` block of a result written now by the command `argv` (default: sys.argv)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_name(), "cores": os.cpu_count(), "commit": git_commit(),
            "command": command_line(sys.argv if argv is None else argv)}


def write_result(name: str, data: dict, argv: list[str] | None = None, results_dir: Path | None = None) -> Path:
    """Write `data` plus its `meta` block to RESULTS_DIR/NAME.json (atomically: a killed run leaves the previous
    result) and return the path. `data` holds a one-line string ``headline`` and the benchmark's figures."""
    headline = data.get("headline")
    if not isinstance(headline, str) or not headline.strip() or "\n" in headline:
        raise ValueError(f"{name}: data needs a one-line string 'headline', got {headline!r}")
    if "meta" in data:
        raise ValueError(f"{name}: 'meta' is written by write_result, not given in data")
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"{name!r}: a result name is a plain file name without .json")
    path = (RESULTS_DIR if results_dir is None else Path(results_dir)) / f"{name}.json"
    return write_json_atomic(path, {**data, "meta": meta(argv)})
