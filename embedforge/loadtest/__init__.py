"""`embedforge loadtest`: a protocol-neutral load engine, its reports, and the command that drives a server.

``engine`` schedules calls and records latency, ``report`` formats, stores, plots and compares reports,
``command`` is the click command (imported lazily by ``embedforge.cli``).
"""

from embedforge.loadtest.engine import (
    PERCENTILES,
    REPORT_FORMAT_VERSION,
    Call,
    CallResult,
    LoadSpec,
    LoadTestError,
    RunResult,
    Workload,
    build_report,
    decode_histogram,
    latency_summary,
    load_texts,
    new_histogram,
    parse_batch,
    parse_sweep,
    run_load,
    run_report,
    run_sweep,
    synthetic_texts,
)
from embedforge.loadtest.report import (
    compare_rows,
    format_compare,
    format_report,
    format_run,
    format_sweep,
    read_json,
    report_metrics,
    write_json,
    write_plot,
)

__all__ = [
    "PERCENTILES", "REPORT_FORMAT_VERSION", "Call", "CallResult", "LoadSpec", "LoadTestError", "RunResult",
    "Workload", "build_report", "compare_rows", "decode_histogram", "format_compare", "format_report",
    "format_run", "format_sweep", "latency_summary", "load_texts", "new_histogram", "parse_batch", "parse_sweep",
    "read_json", "report_metrics", "run_load", "run_report", "run_sweep", "synthetic_texts", "write_json",
    "write_plot",
]
