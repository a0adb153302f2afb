"""Benchmark results as files, the docs generated from them (issue 29): benchmarks/results.py writes each
benchmark's latest figures with date, CPU, commit and command; scripts/bench_docs.py renders the folder into
docs/benchmarks.md between its markers; the page in the repository is up to date with the folder."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
# every benchmark that prints figures, and the result name it writes
FIGURE_BENCHMARKS = ["admission", "batch_memory", "embed_corpus", "export_speed", "hostile_load", "loss_overhead",
                     "quality", "scale_out", "serve_throughput", "soak", "train_speed"]


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


results = load("results", BENCHMARKS / "results.py")
bench_docs = load("bench_docs", ROOT / "scripts" / "bench_docs.py")

PAGE = """# Benchmarks

Intro text | with a pipe, kept as it is.

<!-- results:start -->
stale text that the renderer replaces
<!-- results:end -->

The rest of the page, kept as it is.
"""


@pytest.fixture
def fake_host(monkeypatch):
    monkeypatch.setattr(results, "cpu_name", lambda: "Fake CPU 9000")
    monkeypatch.setattr(results, "git_commit", lambda repo=results.REPO: "abc1234+dirty")


def test_write_result_writes_the_data_and_the_meta_block(tmp_path, monkeypatch, fake_host):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "results")
    path = results.write_result("speed", {"headline": "fast: 2.00x", "figures": {"ratio": 2.0}},
                                argv=["/somewhere/benchmarks/speed.py", "--rounds", "3", "--name", "a b"])
    assert path == tmp_path / "results" / "speed.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["speed.json"]  # no temporaries left
    written = json.loads(path.read_text())
    assert written["headline"] == "fast: 2.00x" and written["figures"] == {"ratio": 2.0}
    meta = written["meta"]
    assert set(meta) == {"date", "cpu", "cores", "commit", "command"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", meta["date"])  # UTC, ISO 8601
    assert meta["cpu"] == "Fake CPU 9000" and meta["commit"] == "abc1234+dirty"
    assert isinstance(meta["cores"], int) and meta["cores"] >= 1
    assert meta["command"] == "python benchmarks/speed.py --rounds 3 --name 'a b'"


def test_write_result_takes_a_folder_and_replaces_the_previous_result(tmp_path, fake_host):
    results.write_result("speed", {"headline": "first"}, argv=["speed.py"], results_dir=tmp_path)
    results.write_result("speed", {"headline": "second"}, argv=["speed.py"], results_dir=tmp_path)
    assert json.loads((tmp_path / "speed.json").read_text())["headline"] == "second"
    assert json.loads((tmp_path / "speed.json").read_text())["meta"]["command"] == "python benchmarks/speed.py"


@pytest.mark.parametrize("data", [{}, {"headline": ""}, {"headline": "two\nlines"}, {"headline": 3},
                                  {"headline": "ok", "meta": {}}])
def test_write_result_refuses_data_without_a_one_line_headline_or_with_meta(tmp_path, data, fake_host):
    with pytest.raises(ValueError):
        results.write_result("speed", data, argv=["speed.py"], results_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_real_meta_names_this_host_and_commit():
    meta = results.meta(["benchmarks/soak.py", "--minutes", "2"])
    assert meta["cpu"] and meta["command"] == "python benchmarks/soak.py --minutes 2"
    assert meta["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{7,40}(\+dirty)?", meta["commit"])


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_is_dirty_only_for_tracked_changes_outside_the_results(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert results.git_commit(tmp_path) == head
    (tmp_path / "untracked.py").write_text("b = 2\n")
    (tmp_path / "benchmarks" / "results" / "x.json").write_text('{"new": 1}\n')  # a benchmark rewrote its result
    assert results.git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert results.git_commit(tmp_path) == f"{head}+dirty"
    assert results.git_commit(tmp_path / "not-a-repo") == "unknown"


def fake_results(folder: Path) -> Path:
    """Two result files: one as write_result writes it, one from before the meta block (no command, no headline)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zeta.json").write_text(json.dumps({
        "headline": "2.50x | the anchor", "figures": {"ratio": 2.5},
        "meta": {"date": "2026-12-06T09:30:00+00:00", "cpu": "Fake CPU", "cores": 4, "commit": "abc1234+dirty",
                 "command": "python benchmarks/zeta.py --rounds 2"}}))
    (folder / "alpha.json").write_text(json.dumps({"cpu": "Old CPU", "cores": 2, "date": "2026-12-05",
                                                   "rounds": 1, "loads": {}}))
    return folder


def test_the_table_has_a_row_per_result_sorted_by_name(tmp_path):
    page = bench_docs.render(PAGE, bench_docs.load_results(fake_results(tmp_path / "results")))
    block = page.split(bench_docs.START)[1].split(bench_docs.END)[0]
    rows = [line for line in block.splitlines() if line.startswith("| [")]
    assert rows == [
        "| [alpha](../benchmarks/alpha.py) | not recorded | 2026-12-05 | Old CPU, 2 cores | not recorded "
        "| not recorded |",
        "| [zeta](../benchmarks/zeta.py) | 2.50x \\| the anchor | 2026-12-06 09:30 UTC | Fake CPU, 4 cores "
        "| abc1234+dirty | `python benchmarks/zeta.py --rounds 2` |",
    ]
    assert "| benchmark | headline | date | CPU | commit | command |" in block
    assert "stale text" not in page


def test_the_text_outside_the_markers_is_kept_and_a_second_run_changes_nothing(tmp_path):
    found = bench_docs.load_results(fake_results(tmp_path / "results"))
    once = bench_docs.render(PAGE, found)
    before, after = PAGE.split(bench_docs.START)[0], PAGE.split(bench_docs.END)[1]
    assert once.startswith(before + bench_docs.START + "\n") and once.endswith(bench_docs.END + after)
    assert bench_docs.render(once, found) == once


def test_the_script_rewrites_the_page_once_and_check_reports_a_stale_page(tmp_path, capsys):
    folder, page = fake_results(tmp_path / "results"), tmp_path / "benchmarks.md"
    page.write_text(PAGE)
    arguments = ["--results-dir", str(folder), "--page", str(page)]
    assert bench_docs.main([*arguments, "--check"]) == 1 and page.read_text() == PAGE  # --check writes nothing
    assert bench_docs.main(arguments) == 0
    written = page.read_text()
    assert "[zeta](../benchmarks/zeta.py)" in written and written != PAGE
    assert bench_docs.main(arguments) == 0 and page.read_text() == written
    assert bench_docs.main([*arguments, "--check"]) == 0
    (folder / "beta.json").write_text(json.dumps({"headline": "new", "meta": {}}))  # a result added since
    assert bench_docs.main([*arguments, "--check"]) == 1
    assert "make bench-docs" in capsys.readouterr().out


def test_a_result_without_meta_reads_not_recorded_everywhere(tmp_path):
    (tmp_path / "bare.json").write_text("{}")
    row = bench_docs.row("bare", json.loads((tmp_path / "bare.json").read_text()))
    assert row == ("| [bare](../benchmarks/bare.py) | not recorded | not recorded | not recorded | not recorded "
                   "| not recorded |")


@pytest.mark.parametrize("page", ["no markers", f"{bench_docs.END}\n{bench_docs.START}",
                                  f"{bench_docs.START}\n{bench_docs.START}\n{bench_docs.END}"])
def test_a_page_without_one_pair_of_markers_is_refused(page):
    with pytest.raises(SystemExit):
        bench_docs.render(page, [])


def test_a_broken_result_file_is_named(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit, match="broken.json"):
        bench_docs.load_results(tmp_path)


def test_docs_benchmarks_md_is_up_to_date_with_the_results_folder():
    page = bench_docs.PAGE.read_text(encoding="utf-8")
    assert bench_docs.render(page, bench_docs.load_results(bench_docs.RESULTS_DIR)) == page, (
        "docs/benchmarks.md is out of date with benchmarks/results/: run `make bench-docs`")


@pytest.mark.parametrize("name", FIGURE_BENCHMARKS)
def test_each_figure_benchmark_writes_its_result(name):
    source = (BENCHMARKS / f"{name}.py").read_text()
    assert "from results import write_result" in source and f'write_result("{name}", ' in source


def test_the_stored_results_headlines_come_from_their_benchmarks(monkeypatch):
    """The headline functions of admission.py and hostile_load.py read the data fields of their stored files."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    admission = importlib.import_module("admission")
    hostile_load = importlib.import_module("hostile_load")
    stored = json.loads((BENCHMARKS / "results" / "admission.json").read_text())
    line = admission.headline(stored["loads"])
    assert re.match(r"this tree: docs 4x4 [\d.]+, stsb 16x8 [\d.]+ texts/s; ", line) and "\n" not in line
    assert line == stored.get("headline", line)  # a file written since: its headline is the same function's
    stored = json.loads((BENCHMARKS / "results" / "hostile_load.json").read_text())
    line = hostile_load.headline(stored["phases"], stored["batch_s"])
    assert re.match(r"bystander p99 alone [\d.]+ ms; slow clients ", line) and "\n" not in line
    assert line == stored.get("headline", line)


def test_headlines_of_fake_figures_are_one_line(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    lines = []
    quality = importlib.import_module("quality")
    row = {"val spearman": 80.0, "val ndcg@10": 70.0, "spearman": 84.0, "ndcg@10": 70.0, "seeds": 1}
    lines.append(quality.headline({"base": {"stsb": row, "mrpc": row},
                                   "balanced": {"stsb": {**row, "spearman": 86.0, "seeds": 3}}}))
    assert lines[-1] == ("balanced preset, test Spearman/NDCG@10 x100, mean of 3 seed(s): stsb 86.00/70.00 "
                         "(base 84.00/70.00); mrpc - (base 84.00/70.00)")
    train = importlib.import_module("train_speed")
    side = {"samples_per_s": 90.0, "test_spearman": 85.0}
    result = {"runs": [{"embedforge": side, "sentence_transformers": {**side, "samples_per_s": 30.0}}],
              "speed_ratio": 3.0, "spearman_delta": 0.0, "base_test_spearman": 82.0, "threads": 2,
              "recipe": {"max_steps": None}}
    lines.append(train.headline(train.headline_figures(result)))
    assert lines[-1].startswith("embedforge 90.0 samples/s = 3.00x sentence-transformers' fit (30.0)")
    serve = importlib.import_module("serve_throughput")
    figures = serve.result_figures(["fp32"], {"server-fp32": 600.0, "http-fp32": 540.0, "raw-fp32": 600.0,
                                              "st": 400.0}, {"server-fp32": [600.0], "http-fp32": [540.0]},
                                   {"fp32": {"grpc": (3.9, 8.0), "http": (4.5, 9.0)}})
    lines.append(serve.headline(figures))
    assert lines[-1] == ("fp32 600 texts/s = 1.00x raw ORT, 1.50x sentence-transformers, HTTP/gRPC 0.90, "
                         "single-text p50 3.9 ms")
    corpus = importlib.import_module("embed_corpus")
    rates = {"embed-corpus": 300.0, "embed-corpus (embedding)": 320.0, "raw ORT": 310.0}
    lines.append(corpus.headline(corpus.result_figures({"sentences": rates}), "fp32"))
    assert lines[-1] == "embed-corpus fp32: sentences 300.0 texts/s end to end = 0.97x raw ORT"
    memory = importlib.import_module("batch_memory")
    lines.append(memory.headline({"8x512": {"mb": 100.0, "ms_per_text": 5.0},
                                  "32x512": {"mb": 400.0, "ms_per_text": 5.5}}, 1))
    soak = importlib.import_module("soak")
    lines.append(soak.headline({"minutes": 2, "soak_calls_per_s": 40.0, "calls_ok": 4800, "errors": {},
                                "rss_growth_pct": 1.0, "p99_last_vs_first": 1.1}))
    assert all(line and "\n" not in line for line in lines)
