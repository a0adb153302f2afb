"""Load-test reports: text tables, JSON file, PNG plots, and side-by-side comparison of two JSON reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

from embedforge.io import new_figure, save_figure, write_json_atomic
from embedforge.loadtest.engine import PERCENTILES, REPORT_FORMAT_VERSION, LoadTestError, decode_histogram

_LATENCY_KEYS = ["min", *(f"p{p:g}" for p in PERCENTILES), "max", "mean"]


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _describe_config(config: dict) -> str:
    parts = [f"target {config.get('target')}", f"rpc {config.get('rpc')}", f"batch {config.get('batch')}"]
    parts.append(f"texts {config.get('texts')}")
    if config.get("deadline_ms"):
        parts.append(f"deadline {config['deadline_ms']:g} ms")
    return ", ".join(parts)


def _describe_load(run: dict) -> str:
    if run["mode"] == "open":
        load = f"open loop {run['rate']:g} calls/s (at most {run['concurrency']} in flight)"
    else:
        load = f"closed loop, concurrency {run['concurrency']}"
    bounds = []
    if run["duration_s"]:
        bounds.append(f"{run['duration_s']:g} s")
    if run["requests"]:
        bounds.append(f"{run['requests']} calls")
    return f"{load}, {' or '.join(bounds)} after {run['warmup_s']:g} s warmup"


def format_run(report: dict) -> str:
    """A one-run report as a text table."""
    lines = [f"embedforge loadtest: {_describe_config(report['config'])}", _describe_load(report), ""]
    errors = ", ".join(f"{code} {count}" for code, count in report["errors"].items()) or "none"
    lines.append(
        f"calls       sent {report['sent']}  ok {report['ok']}  errors {sum(report['errors'].values())} ({errors})"
    )
    if report["unsent"]:
        lines.append(f"            unsent {report['unsent']} (scheduled but never sent: the target could not keep up)")
    spaces = report.get("spaces") or {}
    if len(spaces) > 1:
        counts = ", ".join(f"{space or '(none)'} {count}" for space, count in spaces.items())
        lines.append(f"spaces      replies came from {len(spaces)} embedding spaces ({counts}): their vectors do "
                     "not compare")
    elif spaces:
        lines.append(f"space       {next(iter(spaces)) or '(none)'}")
    lines.append(
        f"throughput  {_fmt(report['requests_per_s'])} calls/s  {_fmt(report['texts_per_s'], 1)} texts/s  "
        f"{_fmt(report['tokens_per_s'], 0)} tokens/s  over {report['elapsed_s']:.2f} s"
    )
    lines.append("")
    lines.append("latency ms  " + "".join(f"{key:>10}" for key in _LATENCY_KEYS))
    rows = [("from schedule" if report["mode"] == "open" else "call", report["latency_ms"])]
    if report["mode"] == "open":
        rows.append(("from send", report["service_ms"]))
    for name, summary in rows:
        lines.append(f"{name:<12}" + "".join(f"{_fmt(summary[key]):>10}" for key in _LATENCY_KEYS))
    if report["server_ms"]:
        split = "  ".join(f"{key} {_fmt(value, 3)}" for key, value in report["server_ms"].items())
        lines.append(f"server ms   mean per call: {split}")
    cpu = report["client_cpu"]
    lines.append(f"client CPU  {cpu['cpu_s']:.2f} s in {cpu['wall_s']:.2f} s = {cpu['cores']:.2f} cores")
    for code, message in report.get("error_examples", {}).items():
        lines.append(f"first {code}: {message}")
    return "\n".join(lines)


def format_sweep(report: dict) -> str:
    """A sweep report as one row per concurrency level: the latency-throughput curve."""
    lines = [f"embedforge loadtest sweep: {_describe_config(report['config'])}"]
    if report["steps"]:
        first = report["steps"][0]
        bound = f"{first['duration_s']:g} s" if first["duration_s"] else f"{first['requests']} calls"
        lines.append(f"closed loop, each step {bound} after {first['warmup_s']:g} s warmup")
    header = ["conc", "calls/s", "texts/s", "tokens/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "cli cores"]
    lines.append("".join(f"{h:>11}" for h in header))
    for step in report["steps"]:
        lat = step["latency_ms"]
        cells = [
            str(step["concurrency"]), _fmt(step["requests_per_s"]), _fmt(step["texts_per_s"], 1),
            _fmt(step["tokens_per_s"], 0), _fmt(lat["p50"]), _fmt(lat["p90"]), _fmt(lat["p99"]), _fmt(lat["max"]),
            str(sum(step["errors"].values())), f"{step['client_cpu']['cores']:.2f}",
        ]
        lines.append("".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    return format_sweep(report) if report["kind"] == "sweep" else format_run(report)


# ---------------------------------------------------------------------------------------------- JSON


def write_json(report: dict, path: str | Path) -> None:
    """Write the report atomically (temp file in the same folder, then rename)."""
    write_json_atomic(path, report)


def read_json(path: str | Path) -> dict:
    """Read a report written by ``write_json``; a clear error if it is not one."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LoadTestError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadTestError(f"{path}: not a JSON load-test report ({exc})") from None
    if not isinstance(report, dict) or report.get("format_version") != REPORT_FORMAT_VERSION:
        raise LoadTestError(f"{path}: not a load-test report (format_version {REPORT_FORMAT_VERSION} expected)")
    if report.get("kind") not in ("run", "sweep"):
        raise LoadTestError(f"{path}: field 'kind' must be 'run' or 'sweep'")
    return report


# ---------------------------------------------------------------------------------------------- compare


def _run_metrics(run: dict, prefix: str = "", brief: bool = False) -> dict[str, float | None]:
    metrics = {
        f"{prefix}calls/s": run["requests_per_s"],
        f"{prefix}texts/s": run["texts_per_s"],
        f"{prefix}tokens/s": run["tokens_per_s"],
    }
    keys = ["p50", "p99"] if brief else _LATENCY_KEYS
    metrics.update({f"{prefix}latency {key} ms": run["latency_ms"][key] for key in keys})
    if brief:
        metrics[f"{prefix}errors"] = sum(run["errors"].values())
        return metrics
    metrics.update({f"{prefix}server {key} ms": value for key, value in run["server_ms"].items()})
    metrics[f"{prefix}errors"] = sum(run["errors"].values())
    metrics[f"{prefix}client cores"] = run["client_cpu"]["cores"]
    return metrics


def report_metrics(report: dict) -> dict[str, float | None]:
    """The comparable numbers of a report, in display order; sweep steps (fewer numbers) are prefixed ``c=N``."""
    if report["kind"] == "run":
        return _run_metrics(report)
    metrics: dict[str, float | None] = {}
    for step in report["steps"]:
        metrics.update(_run_metrics(step, prefix=f"c={step['concurrency']} ", brief=True))
    return metrics


def compare_rows(a: dict, b: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, A, B, B/A) for every metric in either report; the ratio is None where undefined."""
    ma, mb = report_metrics(a), report_metrics(b)
    rows = []
    for key in list(ma) + [k for k in mb if k not in ma]:
        va, vb = ma.get(key), mb.get(key)
        ratio = vb / va if va and vb is not None else None
        rows.append((key, va, vb, ratio))
    return rows


def format_compare(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Two reports side by side with the ratio B/A (above 1: B is higher; good for throughput, bad for latency)."""
    rows = compare_rows(a, b)
    width = max(len(row[0]) for row in rows) + 2
    lines = [f"A = {name_a}", f"B = {name_b}", f"{'metric':<{width}}{'A':>14}{'B':>14}{'B/A':>9}"]
    for key, va, vb, ratio in rows:
        lines.append(f"{key:<{width}}{_fmt(va):>14}{_fmt(vb):>14}{_fmt(ratio, 3):>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots


def _percentile_curve(encoded: str) -> tuple[list[float], list[float]]:
    """(x = 1 / (1 - percentile/100), latency ms) points of an HDR histogram, for a log-x percentile plot."""
    hist = decode_histogram(encoded)
    xs, ys = [], []
    if hist.get_total_count() == 0:
        return xs, ys
    for item in hist.get_percentile_iterator(5):
        if item.percentile_level_iterated_to >= 100.0:
            break
        xs.append(1.0 / (1.0 - item.percentile_level_iterated_to / 100.0))
        ys.append(item.value_iterated_to / 1000.0)
    xs.append(xs[-1] * 10 if xs else 1.0)
    ys.append(hist.get_max_value() / 1000.0)
    return xs, ys


def _plot_percentiles(ax, curves: list[tuple[str, str]]) -> None:
    for label, encoded in curves:
        xs, ys = _percentile_curve(encoded)
        if xs:
            ax.plot(xs, ys, label=label)
    ax.set_xscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000]
    ax.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%", "99.99%"])
    ax.set_xlim(1, 10000)
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def _plot_histogram(ax, encoded: str, label: str) -> None:
    import numpy as np

    hist = decode_histogram(encoded)
    values, counts = [], []
    for item in hist.get_recorded_iterator():
        values.append(item.value_iterated_to / 1000.0)
        counts.append(item.count_added_in_this_iter_step)
    if values:
        low, high = min(values), max(values)
        bins = np.geomspace(low, high * 1.0001, 40) if high > low else [low * 0.99, low * 1.01]
        ax.hist(values, bins=bins, weights=counts, label=label)
        ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("calls")
    ax.set_title(f"latency histogram ({label})", fontsize="medium")


def _plot_timeline(ax, line: dict) -> None:
    step = line["step_s"]
    times = [step * (i + 0.5) for i in range(len(line["ok_per_s"]))]
    ax.plot(times, line["ok_per_s"], marker=".", label="OK calls/s")
    if any(line["errors_per_s"]):
        ax.plot(times, line["errors_per_s"], marker="x", color="tab:red", label="failed calls/s")
    ax.set_xlabel(f"seconds since the end of warmup ({step:g} s steps)")
    ax.set_ylabel("calls/s")
    ax.set_ylim(bottom=0)
    ax.set_title("throughput over time", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def write_plot(report: dict, path: str | Path) -> None:
    """Draw the report as a PNG (written atomically).

    A run: latency histogram, percentile plot and throughput over time (dips show lost replicas).
    A sweep: throughput vs p50/p99 latency and one percentile line per concurrency level.
    """
    over_time = report["kind"] == "run" and "timeline" in report  # reports written before it have none
    fig, (left, right, *rest) = new_figure(1, 3 if over_time else 2, figsize=(18 if over_time else 12, 4.5))
    fig.set_layout_engine("constrained")
    if over_time:
        _plot_timeline(rest[0], report["timeline"])
    if report["kind"] == "run":
        open_loop = report["mode"] == "open"
        label = "from schedule" if open_loop else "call"
        _plot_histogram(left, report["latency_hdr"], label)
        curves = [(label, report["latency_hdr"])]
        if open_loop:
            curves.append(("from send", report["service_hdr"]))
        _plot_percentiles(right, curves)
        right.set_title("latency by percentile", fontsize="medium")
    else:
        steps = report["steps"]
        throughput = [s["requests_per_s"] for s in steps]
        for key, marker in (("p50", "o"), ("p99", "s")):
            latencies = [s["latency_ms"][key] if s["latency_ms"][key] is not None else math.nan for s in steps]
            left.plot(throughput, latencies, marker=marker, label=key)
        for step, x, y in zip(steps, throughput, (s["latency_ms"]["p99"] for s in steps), strict=True):
            if y is not None:
                left.annotate(f"c={step['concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4),
                              fontsize="x-small")
        left.set_xlabel("throughput (calls/s)")
        left.set_ylabel("latency (ms)")
        left.set_title("latency vs throughput", fontsize="medium")
        left.grid(True, alpha=0.3)
        left.legend(fontsize="small")
        _plot_percentiles(right, [(f"c={s['concurrency']}", s["latency_hdr"]) for s in steps])
        right.set_title("latency by percentile", fontsize="medium")
    fig.suptitle(f"embedforge loadtest: {_describe_config(report['config'])}", fontsize="medium")
    save_figure(fig, path)
