"""embed-corpus: input checks, batching, shards + manifest, parity with the server, restart after SIGKILL, Ray."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import free_port, make_texts

from embedforge.client import EmbedClient
from embedforge.corpus.command import embed_corpus_command
from embedforge.corpus.output import JOB_FILE, MANIFEST_FILE
from embedforge.corpus.reader import BadInputError, Problem, read_file, read_records, resolve_inputs, split_lines
from embedforge.corpus.vectors import CorpusEmbedder, plan_batches
from embedforge.server.runtime import OnnxEmbedder

ROOT = Path(__file__).resolve().parent.parent
def write_corpus(path: Path, texts: list[str], id_prefix: str = "doc") -> Path:
    path.write_text("".join(json.dumps({"doc_id": f"{id_prefix}-{i}", "document": t}) + "\n"
                            for i, t in enumerate(texts)))
    return path


def run_cli(*args: str, expect_ok: bool = True):
    result = CliRunner().invoke(embed_corpus_command, [*map(str, args), "--no-progress"])
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def read_output(output: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, int]]:
    """(manifest, id -> vector, id -> token count) of a finished job."""
    manifest = json.loads((output / MANIFEST_FILE).read_text())
    table = pq.read_table(output)  # the directory: Parquet readers skip the _*.json files
    ids = table.column("id").to_pylist()
    vectors = np.asarray(table.column("vector").combine_chunks().flatten()).reshape(len(ids), -1)
    return manifest, dict(zip(ids, vectors, strict=True)), dict(zip(ids, table.column("tokens").to_pylist(),
                                                                    strict=True))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---- reading and checking input ----

def test_reads_jsonl_with_ids_and_text_lines_with_default_ids(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"document": "boil an egg", "doc_id": 7}\n\n{"document": "bake bread", "doc_id": "x"}\n')
    text = tmp_path / "b.txt"
    text.write_text("first text\nsecond text\n")
    records = list(read_records([jsonl], "auto", "document", "doc_id", False, []))
    assert [(r.id, r.text, r.source) for r in records] == [("7", "boil an egg", "a.jsonl:1"),
                                                            ("x", "bake bread", "a.jsonl:3")]
    records = list(read_records([jsonl, text], "auto", "document", None, False, []))
    assert [r.id for r in records] == ["a.jsonl:1", "a.jsonl:3", "b.txt:1", "b.txt:2"]
    assert records[-1].text == "second text"


@pytest.mark.parametrize(("line", "field", "reason"), [
    ("{not json", None, "not JSON"),
    ('{"title": "x"}', "document", "missing"),
    ('{"document": "   "}', "document", "empty text"),
    ('{"document": 3}', "document", "expected a string"),
    ('["document"]', None, "expected a JSON object"),
    ('{"document": "ok", "doc_id": 1.5}', "doc_id", "expected a string or an integer"),
])
def test_bad_line_stops_with_file_line_and_field_or_is_skipped(tmp_path, line, field, reason):
    path = tmp_path / "c.jsonl"
    path.write_text('{"document": "fine", "doc_id": 1}\n' + line + "\n")
    with pytest.raises(BadInputError) as info:
        list(read_records([path], "auto", "document", "doc_id", False, []))
    message = str(info.value)
    assert f"{path}:2:" in message and reason in message
    assert (f"field {field!r}" in message) == (field is not None)
    problems: list[Problem] = []
    records = list(read_records([path], "auto", "document", "doc_id", True, problems))
    assert [r.id for r in records] == ["1"]
    assert [(p.file, p.line, p.field) for p in problems] == [("c.jsonl", 2, field)]
    assert reason in problems[0].reason


def test_text_file_blank_line_is_an_empty_text_and_bad_utf8_is_named(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"one\n\nthree\n\xff\xfe\n")
    problems: list[Problem] = []
    assert [r.id for r in read_records([path], "text", "document", None, True, problems)] == ["t.txt:1", "t.txt:3"]
    assert [(p.line, p.reason.split(" ")[0]) for p in problems] == [(2, "empty"), (4, "not")]


def test_parts_of_a_file_read_the_same_records_with_their_line_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"document": f"text {i} é"}) + "\n" if i % 7 else "\n" for i in range(50)))
    whole = list(read_file(path, "auto", "document", None, False, []))
    parts = split_lines(path, 8)
    assert [p[2] for p in parts] == [8] * 6 + [2]
    assert [r for part in parts for r in read_file(path, "auto", "document", None, False, [], part)] == whole


def test_resolve_inputs_globs_and_errors(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.jsonl", "a.jsonl", "d/c.jsonl"):
        (tmp_path / name).write_text("{}\n")
    assert [p.name for p in resolve_inputs([str(tmp_path / "*.jsonl")])] == ["a.jsonl", "b.jsonl"]
    assert [p.name for p in resolve_inputs([str(tmp_path / "**" / "*.jsonl")])] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    with pytest.raises(BadInputError, match="matches no file"):
        resolve_inputs([str(tmp_path / "*.txt")])
    with pytest.raises(BadInputError, match="no such file"):
        resolve_inputs([str(tmp_path / "missing.jsonl")])
    (tmp_path / "d" / "a.jsonl").write_text("{}\n")
    with pytest.raises(BadInputError, match="named a.jsonl"):
        resolve_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "d" / "a.jsonl")])


def test_plan_batches_sorted_within_budget_and_complete():
    lengths = np.random.default_rng(0).integers(3, 200, size=500)
    batches = plan_batches(lengths, max_batch_tokens=1024, max_batch_size=16)
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(500))
    assert np.all(np.diff(lengths[order]) >= 0)
    for batch in batches:
        assert len(batch) <= 16 and len(batch) * lengths[batch].max() <= 1024
    assert len(plan_batches([600, 700], max_batch_tokens=512, max_batch_size=8)) == 2  # longer than the budget


# ---- the job ----

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    texts = make_texts(300, seed=3) + ["egg " * 700]  # the last one is longer than max_length 512
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", texts), texts


@pytest.mark.slow
def test_vectors_equal_the_servers_embed(tiny_export_dir, corpus, tmp_path):
    path, texts = corpus
    output = tmp_path / "out"
    run_cli("--model-dir", tiny_export_dir, "--input", path, "--output", output, "--id-field", "doc_id",
            "--shard-size", "64", "--threads", "1")
    manifest, vectors, tokens = read_output(output)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "embedforge", "serve", "--model-dir", str(tiny_export_dir),
                               "--port", str(port), "--threads", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        with EmbedClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_serving(60)
            served = client.embed(texts)
    finally:
        server.terminate()
        server.wait(30)
    runtime = OnnxEmbedder(tiny_export_dir, threads=1)
    ours = np.stack([vectors[f"doc-{i}"] for i in range(len(texts))])
    assert cosine_rows(ours, served.vectors).min() >= 0.99999
    assert [tokens[f"doc-{i}"] for i in range(len(texts))] == runtime.tokenize(texts).lengths
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert manifest["count"] == len(texts) and manifest["truncated"] == 1 and manifest["dim"] == 32
    assert manifest["tokens"] == served.tokens
    assert [s["rows"] for s in manifest["shards"]] == [64, 64, 64, 64, 45]
    assert manifest["inputs"] == [{"path": str(path.resolve()), "size": path.stat().st_size,
                                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert manifest["skipped"] == {"count": 0, "lines": []} and manifest["seconds"] > 0
    assert pq.read_schema(output / "part-00000.parquet").field("vector").type.list_size == 32


def test_skip_bad_lists_lines_and_no_truncate_refuses_long_text(tiny_export_dir, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"document": "boil an egg"}\nnot json\n{"title": "x"}\n{"document": ""}\n'
                    '{"document": "bake bread"}\n')
    result = run_cli("--model-dir", tiny_export_dir, "--input", path, "--output", tmp_path / "a", expect_ok=False)
    assert result.exit_code == 1 and f"{path}:2: not JSON" in result.output and "--skip-bad" in result.output
    assert not list((tmp_path / "a").glob("*.parquet"))
    run_cli("--model-dir", tiny_export_dir, "--input", path, "--output", tmp_path / "b", "--skip-bad")
    manifest, vectors, _ = read_output(tmp_path / "b")
    assert sorted(vectors) == ["mixed.jsonl:1", "mixed.jsonl:5"]
    assert manifest["skipped"]["count"] == 3
    assert [(s["line"], s["field"]) for s in manifest["skipped"]["lines"]] == [(2, None), (3, "document"),
                                                                               (4, "document")]
    long = write_corpus(tmp_path / "long.jsonl", ["boil an egg", "egg " * 600])
    result = run_cli("--model-dir", tiny_export_dir, "--input", long, "--output", tmp_path / "c", "--no-truncate",
                     expect_ok=False)
    assert result.exit_code == 1 and "long.jsonl:2: text of more than 512 tokens" in result.output


@pytest.mark.parametrize("output_type", ["int8", "ubinary"])
def test_output_types_write_the_codes_of_the_float_vectors(tiny_export_dir, corpus, tmp_path, output_type):
    from embedforge.quantize import Calibration, quantize

    path, _ = corpus
    run_cli("--model-dir", tiny_export_dir, "--input", path, "--output", tmp_path / "float")
    run_cli("--model-dir", tiny_export_dir, "--input", path, "--output", tmp_path / "codes", "--output-type",
            output_type)
    _, floats, _ = read_output(tmp_path / "float")
    written, codes, _ = read_output(tmp_path / "codes")
    calibration = Calibration.from_manifest(json.loads((tiny_export_dir / "manifest.json").read_text())["calibration"])
    ids = sorted(floats)
    expected = quantize(np.stack([floats[i] for i in ids]), output_type, calibration)
    got = np.stack([codes[i] for i in ids])
    assert written["output_type"] == output_type and got.dtype == expected.dtype
    assert np.array_equal(got, expected)
    metadata = pq.read_schema(next((tmp_path / "codes").glob("*.parquet"))).metadata
    assert metadata[b"output_type"] == output_type.encode()


def test_int8_output_of_truncated_vectors_is_refused(tiny_export_dir, corpus, tmp_path):
    export = shutil.copytree(tiny_export_dir, tmp_path / "export")
    manifest = json.loads((export / "manifest.json").read_text())
    (export / "manifest.json").write_text(json.dumps({**manifest, "matryoshka_dims": [8, 16]}))
    result = run_cli("--model-dir", export, "--input", corpus[0], "--output", tmp_path / "a", "--dimensions", "16",
                     "--output-type", "int8", expect_ok=False)
    assert result.exit_code == 1 and "--output-type int8: int8 is calibrated for the full" in result.output


def reference_windows(export: Path, text: str, overlap: int) -> list[list[int]]:
    """The windows of a long text, cut here from its whole tokenization: max_length - 2 text tokens each, neighbours
    sharing `overlap`, each between the [CLS] and [SEP] of the whole text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
    tokenizer.no_truncation()
    ids = tokenizer.encode(text).ids
    size = json.loads((export / "manifest.json").read_text())["max_length"] - 2
    windows, start = [], 0
    while True:
        windows.append([ids[0], *ids[1:-1][start:start + size], ids[-1]])
        if start + size >= len(ids) - 2:
            return windows
        start += size - overlap


def test_overflow_chunk_writes_a_row_per_window_with_its_span(tiny_export_dir, tmp_path):
    from tokenizers import Tokenizer

    long = " ".join(f"word{i % 50} egg" for i in range(900))  # about 2,700 tokens: 6 windows
    texts = ["rice and coffee", long, "hot water"]
    path = write_corpus(tmp_path / "docs.jsonl", texts)
    run_cli("--model-dir", tiny_export_dir, "--input", path, "--output", tmp_path / "out", "--overflow", "chunk",
            "--chunk-overlap", "32", "--shard-size", "2")
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    table = pq.read_table(tmp_path / "out")
    windows = reference_windows(tiny_export_dir, long, 32)
    assert manifest["count"] == 3 and manifest["rows"] == 2 + len(windows) and manifest["truncated"] == 0
    assert table.column("id").to_pylist() == ["docs.jsonl:1", *["docs.jsonl:2"] * len(windows), "docs.jsonl:3"]
    assert table.column("chunk_index").to_pylist() == [0, *range(len(windows)), 0]
    starts, ends = table.column("char_start").to_pylist(), table.column("char_end").to_pylist()
    assert (starts[0], ends[0]) == (0, len(texts[0])) and starts[1] == 0 and ends[len(windows)] == len(long)
    tokenizer = Tokenizer.from_file(str(tiny_export_dir / "tokenizer.json"))
    for row, window in enumerate(windows, start=1):  # each span holds exactly its window's tokens
        assert tokenizer.encode(long[starts[row]:ends[row]], add_special_tokens=False).ids == window[1:-1]
    runtime = OnnxEmbedder(tiny_export_dir, threads=1)
    expected = runtime.run_batch([np.array(w, dtype=np.int32) for w in windows])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    vectors = np.asarray(table.column("vector").combine_chunks().flatten()).reshape(table.num_rows, -1)
    assert cosine_rows(vectors[1:-1], expected).min() >= 0.99999
    assert table.column("tokens").to_pylist()[1:-1] == [len(w) for w in windows]


def test_chunk_tokens_cuts_smaller_windows_and_leaves_short_texts_whole(tiny_export_dir, tmp_path):
    from tokenizers import Tokenizer

    medium = " ".join(f"word{i % 50} egg" for i in range(40))  # about 120 tokens: under max_length, over 32
    path = write_corpus(tmp_path / "docs.jsonl", ["rice", medium])
    run_cli("--model-dir", tiny_export_dir, "--input", path, "--output", tmp_path / "out", "--overflow", "chunk",
            "--chunk-tokens", "32", "--chunk-overlap", "4")
    table = pq.read_table(tmp_path / "out")
    tokens, index = table.column("tokens").to_pylist(), table.column("chunk_index").to_pylist()
    assert index[:2] == [0, 0] and index[1:] == list(range(len(index) - 1)) and len(index) >= 3
    assert tokens[0] == 3 and max(tokens[1:]) == 32
    tokenizer = Tokenizer.from_file(str(tiny_export_dir / "tokenizer.json"))
    starts, ends = table.column("char_start").to_pylist(), table.column("char_end").to_pylist()
    for row in range(1, len(index)):
        assert len(tokenizer.encode(medium[starts[row]:ends[row]], add_special_tokens=False).ids) == tokens[row] - 2
    refused = run_cli("--model-dir", tiny_export_dir, "--input", path, "--output", tmp_path / "bad", "--overflow",
                      "chunk", "--chunk-tokens", "32", "--chunk-overlap", "16", expect_ok=False)
    assert refused.exit_code == 1 and "--chunk-overlap must be from 0 to 15 tokens" in refused.output


def test_a_restarted_chunked_job_counts_records_not_rows(tiny_export_dir, tmp_path):
    long = " ".join(f"word{i % 50} egg" for i in range(400))
    path = write_corpus(tmp_path / "docs.jsonl", ["rice", long, "egg", long + " tail", "coffee"])
    args = ["--model-dir", tiny_export_dir, "--input", path, "--overflow", "chunk", "--shard-size", "2"]
    run_cli(*args, "--output", tmp_path / "whole")
    partial = shutil.copytree(tmp_path / "whole", tmp_path / "partial")
    (partial / MANIFEST_FILE).unlink()
    (partial / "part-00002.parquet").unlink()
    (partial / "part-00001.parquet").unlink()
    run_cli(*args, "--output", partial)  # resumes after the first shard's 2 records (and their 1 + 2+ rows)
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert (partial / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert json.loads((partial / MANIFEST_FILE).read_text())["count"] == 5
    result = run_cli(*args, "--output", tmp_path / "x", "--no-truncate", expect_ok=False)
    assert result.exit_code == 2 and "--no-truncate contradicts --overflow chunk" in result.output


def test_dimensions_need_matryoshka_sizes_and_cut_and_renormalise(tiny_export_dir, corpus, tmp_path):
    path, texts = corpus
    result = run_cli("--model-dir", tiny_export_dir, "--input", path, "--output", tmp_path / "a", "--dimensions",
                     "16", expect_ok=False)
    assert result.exit_code == 1 and "no matryoshka_dims" in result.output
    export = shutil.copytree(tiny_export_dir, tmp_path / "export")
    manifest = json.loads((export / "manifest.json").read_text())
    (export / "manifest.json").write_text(json.dumps({**manifest, "matryoshka_dims": [8, 16]}))
    result = run_cli("--model-dir", export, "--input", path, "--output", tmp_path / "b", "--dimensions", "12",
                     expect_ok=False)
    assert result.exit_code == 1 and "Matryoshka sizes are 8, 16" in result.output
    run_cli("--model-dir", export, "--input", path, "--output", tmp_path / "c", "--dimensions", "16")
    written, vectors, _ = read_output(tmp_path / "c")
    full = CorpusEmbedder(tiny_export_dir, threads=1).runtime
    raw = full.run_batch(full.tokenize(texts[:5]).ids)[:, :16]
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    got = np.stack([vectors[f"docs.jsonl:{i + 1}"] for i in range(5)])
    assert written["dim"] == 16 and cosine_rows(got, expected).min() >= 0.99999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_restart_after_sigkill_continues_and_matches_an_uninterrupted_run(tiny_export_dir, tmp_path):
    path = write_corpus(tmp_path / "big.jsonl", make_texts(12000, seed=5, max_words=60))
    args = ["--model-dir", str(tiny_export_dir), "--input", str(path), "--shard-size", "300", "--threads", "1",
            "--no-progress"]
    command = [sys.executable, "-m", "embedforge", "embed-corpus", *args]
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--output", str(killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "part-00002.parquet").exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no shard within 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (killed / MANIFEST_FILE).exists(), "the run finished before it was killed: nothing was tested"
    before = sorted(p.name for p in killed.glob("part-*.parquet"))
    first_shard = (killed / "part-00000.parquet").read_bytes()
    assert 3 <= len(before) < 40

    changed = run_cli(*args[:-1], "--output", killed, "--text-field", "title", expect_ok=False)
    assert changed.exit_code == 1 and "holds another job" in changed.output and "text_field" in changed.output
    restarted = subprocess.run([*command, "--output", str(killed)], capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr
    assert "continuing a killed run" in restarted.stderr
    assert (killed / "part-00000.parquet").read_bytes() == first_shard  # kept, not redone
    full = tmp_path / "full"
    run_cli(*args[:-1], "--output", full)
    resumed, resumed_vectors, _ = read_output(killed)
    uninterrupted, full_vectors, _ = read_output(full)
    assert resumed["resumed_after_rows"] == 300 * len(before) and resumed["count"] == 12000
    assert list(resumed_vectors) == list(full_vectors)
    for key, vector in full_vectors.items():
        assert vector.tobytes() == resumed_vectors[key].tobytes()
    assert sorted(p.name for p in killed.iterdir() if not p.name.startswith("part-")) == [JOB_FILE, MANIFEST_FILE]

    path.write_text(path.read_text() + json.dumps({"document": "one more"}) + "\n")
    changed = run_cli(*args[:-1], "--output", killed, expect_ok=False)
    assert changed.exit_code == 1 and "changed (size or sha256)" in changed.output


@pytest.mark.parametrize("value", ["../x.onnx", "ABSOLUTE"])
def test_a_model_manifest_naming_a_file_outside_the_export_is_refused(tiny_export_dir, tmp_path, value):
    from embedforge.corpus.job import CorpusJob
    from embedforge.server.runtime import RuntimeConfigError

    export = shutil.copytree(tiny_export_dir, tmp_path / "export")
    manifest = json.loads((export / "manifest.json").read_text())
    shutil.copyfile(export / manifest["models"]["fp32"]["file"], tmp_path / "x.onnx")  # a real graph outside
    value = str(tmp_path / "x.onnx") if value == "ABSOLUTE" else value
    manifest["models"]["fp32"]["file"] = value
    (export / "manifest.json").write_text(json.dumps(manifest))
    path = write_corpus(tmp_path / "docs.jsonl", ["boil an egg", "bake bread"])
    expected = f"{export / 'manifest.json'}: field 'models.fp32.file' must be a plain file name"
    with pytest.raises(RuntimeConfigError) as info:
        CorpusJob(export, [path], tmp_path / "direct", provider="cpu", precision="fp32").identity("local")
    assert str(info.value).startswith(expected) and repr(value) in str(info.value)
    result = run_cli("--model-dir", export, "--input", path, "--output", tmp_path / "out", "--provider", "cpu",
                     expect_ok=False)
    assert result.exit_code == 1 and expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / JOB_FILE).exists()


def test_output_dir_with_other_files_is_refused(tiny_export_dir, corpus, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("--model-dir", tiny_export_dir, "--input", corpus[0], "--output", tmp_path, expect_ok=False)
    assert result.exit_code == 1 and "not an embed-corpus output" in result.output


# ---- Ray ----

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_run_matches_the_local_run(tiny_export_dir, corpus, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'embedforge[cluster]')")
    pytest.importorskip("ray.data", reason="ray[data] is not installed")
    path, texts = corpus
    second = write_corpus(tmp_path / "more.jsonl", make_texts(150, seed=9), id_prefix="more")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    common = ["--model-dir", tiny_export_dir, "--input", path, "--input", second, "--id-field", "doc_id",
              "--shard-size", "128"]
    run_cli(*common, "--output", local, "--threads", "1")
    run_cli(*common, "--output", tmp_path / "local-chunks", "--threads", "1", "--overflow", "chunk")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        run_cli(*common, "--output", on_ray, "--ray", "auto", "--ray-actors", "2")
        run_cli(*common, "--output", tmp_path / "ray-chunks", "--ray", "auto", "--overflow", "chunk")
    finally:
        ray.shutdown()
    chunks = [pq.read_table(tmp_path / name).sort_by([("id", "ascending"), ("chunk_index", "ascending")])
              for name in ("local-chunks", "ray-chunks")]
    for column in ("id", "chunk_index", "char_start", "char_end", "tokens"):
        assert chunks[0].column(column).to_pylist() == chunks[1].column(column).to_pylist()
    assert max(chunks[1].column("chunk_index").to_pylist()) >= 1  # the long text became windows on Ray too
    chunk_vectors = [np.asarray(t.column("vector").combine_chunks().flatten()).reshape(t.num_rows, -1) for t in chunks]
    assert cosine_rows(*chunk_vectors).min() >= 0.99999
    local_manifest, local_vectors, local_tokens = read_output(local)
    ray_manifest, ray_vectors, ray_tokens = read_output(on_ray)
    assert sorted(ray_vectors) == sorted(local_vectors) and len(ray_vectors) == len(texts) + 150
    keys = sorted(local_vectors)
    similarity = cosine_rows(np.stack([local_vectors[k] for k in keys]), np.stack([ray_vectors[k] for k in keys]))
    assert similarity.min() >= 0.99999
    assert ray_tokens == local_tokens
    assert ray_manifest["runner"] == "ray" and ray_manifest["ray_actors"] == 2
    assert (ray_manifest["count"], ray_manifest["truncated"]) == (local_manifest["count"], 1)
    assert not list(on_ray.glob(".ray-*"))


@pytest.mark.slow
def test_embed_corpus_never_imports_torch(tiny_export_dir, corpus, tmp_path):
    script = (f"import sys\nfrom embedforge.cli import cli\n"
              f"try:\n    cli(['embed-corpus', '--model-dir', {str(tiny_export_dir)!r}, '--input', "
              f"{str(corpus[0])!r}, '--output', {str(tmp_path / 'out')!r}, '--no-progress'])\n"
              f"except SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
              f"assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / MANIFEST_FILE).is_file()
