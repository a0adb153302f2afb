"""Export: graph contents, fusions, parity with PyTorch, manifest, CLI, failures leave nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import assert_same_vectors, leftovers, make_checkpoint, pytorch_unnormalized

from embedforge.data import Pair, read_pairs
from embedforge.evaluate.runner import evaluate_pairs
from embedforge.export import MANIFEST_FILE, MIN_COSINE, ExportError, export_checkpoint
from embedforge.export.cli import export_command
from embedforge.export.optimize import fusion_complete
from embedforge.export.parity import compare, onnx_embed, onnx_session, select_parity_pairs
from embedforge.model import BertVectorModel
from embedforge.onnxrt import pad_token_ids
from embedforge.testing import build_tiny_model
from embedforge.tokenization import load_tokenizer

LONG_TEXT = " ".join(["boil the eggs in hot water with salt for seven minutes"] * 30)
TEXTS = ["how to boil an egg", "rice", "bake the bread in a hot oven for ten minutes", LONG_TEXT]


def tiny_checkpoint(root: Path, pooling: str = "mean", projection_dim: int | None = None) -> Path:
    path = root / "run" / "checkpoint-step-1"
    build_tiny_model(path, pooling=pooling, projection_dim=projection_dim)
    return make_checkpoint(path)


@pytest.fixture(scope="module")
def exported(tiny_model_dir, pairs_file, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("export") / "export"
    manifest = export_checkpoint(tiny_model_dir, output, parity_path=pairs_file)
    return output, manifest


def test_manifest_and_files(exported, tiny_model_dir, pairs_file):
    output, manifest = exported
    assert json.loads((output / MANIFEST_FILE).read_text()) == manifest
    settings = json.loads((tiny_model_dir / "embedforge.json").read_text())
    assert manifest["format_version"] == 1
    assert (manifest["dim"], manifest["max_length"], manifest["pooling"]) == (
        settings["dim"], settings["max_length"], "mean")
    assert manifest["inputs"] == ["input_ids", "attention_mask"] and manifest["output"] == "embedding"
    assert manifest["unnormalized_output"] == "unnormalized_embedding"
    assert manifest["source_checkpoint"] == str(tiny_model_dir.resolve())
    assert manifest["opset"] == 17
    assert set(manifest["models"]) == {"fp32", "int8"}
    assert manifest["parity_data"] == {"path": str(pairs_file), "pairs": 8, "texts": 11}
    for entry in manifest["models"].values():
        assert (output / entry["file"]).is_file()
    assert (output / "tokenizer.json").is_file()
    assert not leftovers(output.parent)


def test_graph_io_and_fusions(exported):
    output, manifest = exported
    graph = onnx.load(str(output / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["embedding", "unnormalized_embedding"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    layers = 2  # the tiny model's num_hidden_layers
    fusion = manifest["fusion"]
    assert fusion["num_layers"] == layers
    assert fusion["with_pooling"] == fusion["encoder_only"]
    assert fusion["complete"] and fusion["kept_by_pooling"]
    fused = manifest["models"]["fp32"]["fused_ops"]
    assert fused["Attention"] == layers and fused["EmbedLayerNormalization"] == 1
    # CPU graphs keep residual adds out of LayerNorm (onnxruntime's fused CPU kernel is the slower one).
    assert fused["LayerNormalization"] == 2 * layers and "SkipLayerNormalization" not in fused
    int8_ops = manifest["models"]["int8"]["fused_ops"]
    assert int8_ops["QAttention"] == layers and int8_ops["MatMulInteger"] > 0
    int8_graph = onnx.load(str(output / "model_int8.onnx")).graph
    assert [o.name for o in int8_graph.output] == ["embedding", "unnormalized_embedding"]


def test_parity_recorded(exported, tiny_model_dir, pairs_file):
    output, manifest = exported
    fp32 = manifest["models"]["fp32"]["parity"]
    assert fp32["min_cosine"] >= 0.9999 and fp32["max_abs_diff"] < 1e-4
    int8 = manifest["models"]["int8"]["parity"]
    assert 0.9 < int8["min_cosine"] <= int8["mean_cosine"] <= 1.0 + 1e-9
    assert int8["max_abs_diff"] > fp32["max_abs_diff"]
    # Each checked graph records the floor it passed beside the figure.
    for entry in manifest["models"].values():
        for parity in (entry["parity"], entry["unpadded"]["parity"]):
            assert parity["checked"] is True and parity["min_cosine"] >= parity["min_cosine_floor"]
    assert fp32["min_cosine_floor"] == 0.9999 and int8["min_cosine_floor"] == MIN_COSINE["int8"]
    # The metric figures, computed here from each side's own vectors: PyTorch, and the int8 graph.
    pairs = read_pairs(pairs_file)
    tokenizer = load_tokenizer(output, manifest["max_length"])
    int8_session = onnx_session(output / manifest["models"]["int8"]["file"])
    sides = {"pytorch": BertVectorModel.from_pretrained(tiny_model_dir).encode,
             "onnx": lambda texts: onnx_embed(int8_session, tokenizer, texts)}
    for side, embed in sides.items():
        report = evaluate_pairs(pairs, embed, ks=(10,), mode="retrieval", show_progress=False)
        assert int8["ndcg@10"][side] == pytest.approx(report["retrieval"]["ndcg@10"], abs=1e-6)
        assert int8["spearman"][side] == pytest.approx(report["spearman"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("pooling", "projection_dim"), [("cls", None), ("mean", 16), ("cls", 8)])
def test_pooling_and_projection_match_pytorch(tmp_path, pooling, projection_dim):
    checkpoint = tiny_checkpoint(tmp_path, pooling, projection_dim)
    manifest = export_checkpoint(checkpoint, tmp_path / "export", precisions=("fp32",), parity_texts=TEXTS)
    dim = projection_dim or 32
    assert (manifest["pooling"], manifest["dim"], manifest["projection_dim"]) == (pooling, dim, projection_dim)
    assert set(manifest["models"]) == {"fp32"}
    # Independently of the recorded figures: the graph, fed by the serving tokenizer, matches PyTorch
    # on a batch of mixed lengths, one text far longer than the traced example.
    model = BertVectorModel.from_pretrained(checkpoint)
    session = onnx_session(tmp_path / "export" / "model.onnx")
    vectors = onnx_embed(session, load_tokenizer(tmp_path / "export", manifest["max_length"]), TEXTS)
    reference = model.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), dim)
    assert np.einsum("ij,ij->i", vectors, reference).min() >= 0.9999
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The second output is the same vector before the L2 norm.
    tokenizer = load_tokenizer(tmp_path / "export", manifest["max_length"])
    input_ids, attention_mask = pad_token_ids([e.ids for e in tokenizer.encode_batch(TEXTS)])
    normalised, unnormalized = session.run(["embedding", manifest["unnormalized_output"]],
                                           {"input_ids": input_ids, "attention_mask": attention_mask})
    assert_same_vectors(unnormalized, pytorch_unnormalized(model, TEXTS))
    assert not np.allclose(np.linalg.norm(unnormalized, axis=1), 1.0, atol=1e-2)
    np.testing.assert_allclose(normalised, unnormalized / np.linalg.norm(unnormalized, axis=1, keepdims=True),
                               atol=1e-6)


@pytest.mark.slow
def test_fp16_on_cpu_is_written_with_fp32_io_and_parity_skipped(tmp_path, tiny_model_dir):
    manifest = export_checkpoint(tiny_model_dir, tmp_path / "export", precisions=("fp16",), parity_texts=TEXTS)
    assert set(manifest["models"]) == {"fp32", "fp16"}
    fp16 = manifest["models"]["fp16"]["parity"]
    assert "skipped" in fp16 and fp16["checked"] is False and fp16["min_cosine_floor"] == 0.999
    model = onnx.load(str(tmp_path / "export" / "model_fp16.onnx"))
    elem = onnx.TensorProto
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [elem.INT64, elem.INT64]
    assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == [
        ("embedding", elem.FLOAT), ("unnormalized_embedding", elem.FLOAT)]
    assert any(init.data_type == elem.FLOAT16 for init in model.graph.initializer)
    # LayerNorm-family fused ops stay fused; the pooling reductions stay float32.
    assert manifest["models"]["fp16"]["fused_ops"]["SkipLayerNormalization"] == 4
    types = {output: node.op_type for node in model.graph.node for output in node.output}
    reduce_inputs = [node.input[0] for node in model.graph.node if node.op_type in ("ReduceSum", "ReduceL2")]
    assert reduce_inputs and all(types.get(name) == "Cast" for name in reduce_inputs)


@pytest.mark.slow
def test_export_loads_without_torch(exported, tmp_path):
    output, manifest = exported
    model = BertVectorModel.from_pretrained(manifest["source_checkpoint"])
    np.save(tmp_path / "reference.npy", model.encode(TEXTS))
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import onnxruntime as ort
        from embedforge.tokenization import load_tokenizer
        export = {str(output)!r}
        manifest = json.load(open(export + "/manifest.json"))
        tokenizer = load_tokenizer(export, manifest["max_length"])
        texts = {TEXTS!r}
        encodings = tokenizer.encode_batch(texts)
        longest = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), longest), np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        reference = np.load({str(tmp_path / "reference.npy")!r})
        for entry in manifest["models"].values():
            session = ort.InferenceSession(export + "/" + entry["file"], providers=["CPUExecutionProvider"])
            (vectors,) = session.run([manifest["output"]], {{"input_ids": ids, "attention_mask": mask}})
            assert (vectors * reference).sum(axis=1).min() > 0.99, entry["file"]
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.slow
def test_cli_default_output_and_table(tmp_path, pairs_file):
    checkpoint = tiny_checkpoint(tmp_path)
    result = CliRunner().invoke(export_command, ["--checkpoint_dir", str(checkpoint), "--parity-path",
                                                 str(pairs_file), "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    output = checkpoint.parent / "export"
    assert (output / "model.onnx").is_file() and not (output / "model_int8.onnx").exists()
    assert "min cos" in result.output and "fp32" in result.output
    assert json.loads((output / MANIFEST_FILE).read_text())["source_checkpoint"] == str(checkpoint.resolve())


@pytest.mark.slow
def test_cli_save_path_uses_best_record(tmp_path, pairs_file):
    from embedforge.checkpoints import read_checkpoint, write_best_record

    first = tiny_checkpoint(tmp_path)
    second = make_checkpoint(shutil.copytree(first, first.parent / "checkpoint-step-2"), step=2, val_loss=0.9)
    write_best_record(first.parent, read_checkpoint(second))
    result = CliRunner().invoke(export_command, ["--save-path", str(first.parent), "--parity-path",
                                                 str(pairs_file), "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((first.parent / "export" / MANIFEST_FILE).read_text())
    assert manifest["source_checkpoint"] == str(second.resolve())


def test_cli_missing_and_incomplete_checkpoint(tmp_path, tiny_model_dir):
    runner = CliRunner()
    missing = runner.invoke(export_command, ["--checkpoint-dir", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "no such checkpoint directory" in missing.output
    incomplete = shutil.copytree(tiny_model_dir, tmp_path / "checkpoint-step-1")
    (incomplete / "model.safetensors").unlink()
    result = runner.invoke(export_command, ["--checkpoint-dir", str(incomplete)])
    assert result.exit_code != 0 and "missing model.safetensors" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "export").exists()
    empty = runner.invoke(export_command, ["--save-path", str(tmp_path / "empty_run")])
    assert empty.exit_code != 0 and "no complete checkpoint" in empty.output
    both = runner.invoke(export_command, [])
    assert both.exit_code == 2 and "exactly one of" in both.output


@pytest.mark.slow
def test_failed_parity_gate_leaves_nothing(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    import embedforge.export.parity as parity

    def poor_parity(reference, candidate, pairs=(), texts=()):
        return {**compare(reference, candidate, pairs, texts), "min_cosine": 0.99}

    monkeypatch.setattr(parity, "compare", poor_parity)
    result = CliRunner().invoke(export_command, ["--checkpoint-dir", str(tiny_model_dir), "--parity-path",
                                                 str(pairs_file), "--output", str(tmp_path / "export")])
    assert result.exit_code == 1 and "fp32 parity check failed" in result.output
    assert not (tmp_path / "export").exists() and not leftovers(tmp_path)


@pytest.mark.slow
def test_failure_keeps_previous_export(tmp_path, tiny_model_dir, monkeypatch):
    import embedforge.export.optimize as optimize

    output = tmp_path / "export"
    first = export_checkpoint(tiny_model_dir, output, precisions=("fp32",), parity_texts=TEXTS)

    def crash(source, target):
        Path(target).write_bytes(b"partial")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(optimize, "quantize_int8", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_checkpoint(tiny_model_dir, output, precisions=("fp32", "int8"), parity_texts=TEXTS)
    assert json.loads((output / MANIFEST_FILE).read_text()) == first
    assert not (output / "model_int8.onnx").exists() and not leftovers(tmp_path)


def test_refuses_to_replace_a_foreign_directory(tmp_path, tiny_model_dir):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an embedforge export"):
        export_checkpoint(tiny_model_dir, foreign, parity_texts=TEXTS)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="embedforge.json is missing"):
        export_checkpoint(tmp_path, tmp_path / "export", parity_texts=TEXTS)


def test_select_parity_pairs_respects_the_text_limit():
    pairs = [Pair("q1", "d1", 1.0), Pair("q1", "d2", 0.0), Pair("q2", "d1", 0.5), Pair("q3", "d3", 0.2)]
    chosen, texts = select_parity_pairs(pairs, 4)
    assert chosen == pairs[:3] and texts == ["q1", "d1", "d2", "q2"]
    assert select_parity_pairs(pairs, 100)[0] == pairs


def test_compare_figures():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(6, 8))
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    same = compare(reference, reference.copy())
    assert same["min_cosine"] == pytest.approx(1.0) and same["max_abs_diff"] == 0.0
    moved = reference.copy()
    moved[2] = -moved[2]
    figures = compare(reference, moved)
    assert figures["min_cosine"] == pytest.approx(-1.0)
    assert figures["mean_cosine"] == pytest.approx(4 / 6)
    assert figures["max_abs_diff"] == pytest.approx(2 * np.abs(reference[2]).max())


def test_compare_metric_deltas_on_a_reversed_ranking():
    """One query, three documents of rel 1, 0.5, 0: the reference ranks them right, the candidate reversed."""
    pairs = [Pair("q", "d1", 1.0), Pair("q", "d2", 0.5), Pair("q", "d3", 0.0)]

    def unit_vectors(cosines):
        return np.array([[1.0, 0.0], *[[c, np.sqrt(1 - c * c)] for c in cosines]])

    reference, candidate = unit_vectors([0.9, 0.5, 0.1]), unit_vectors([0.1, 0.5, 0.9])
    figures = compare(reference, candidate, pairs, ["q", "d1", "d2", "d3"])
    assert figures["spearman"] == pytest.approx({"pytorch": 100.0, "onnx": -100.0, "delta": -200.0})
    reversed_ndcg = 100 * (0.5 / np.log2(3) + 1 / np.log2(4)) / (1 + 0.5 / np.log2(3))  # gains 0, 0.5, 1
    assert figures["ndcg@10"] == pytest.approx({"pytorch": 100.0, "onnx": reversed_ndcg,
                                                "delta": reversed_ndcg - 100.0})


def test_fusion_complete_counts():
    full = {"Attention": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4, "BiasGelu": 2}
    assert fusion_complete(full, 2)
    assert not fusion_complete({**full, "Attention": 1}, 2)
    assert not fusion_complete({key: value for key, value in full.items() if key != "BiasGelu"}, 2)
    # A layer's two LayerNorms count with or without their residual add fused in; a missing one does not.
    assert fusion_complete({**full, "SkipLayerNormalization": 0, "LayerNormalization": 4}, 2)
    assert not fusion_complete({**full, "SkipLayerNormalization": 1, "LayerNormalization": 2}, 2)


def test_unpadded_graphs_drop_the_attention_mask_and_match_pytorch(exported):
    output, manifest = exported
    layers = 2
    for precision in ("fp32", "int8"):
        entry = manifest["models"][precision]["unpadded"]
        assert entry["fused_ops"]["MultiHeadAttention"] == layers
        graph = onnx.load(str(output / entry["file"])).graph
        padded = onnx.load(str(output / manifest["models"][precision]["file"])).graph
        assert [i.name for i in graph.input] == [i.name for i in padded.input]
        attention = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
        assert all(len(node.input) == 4 for node in attention)  # query, key, value, bias: no padding mask
    assert manifest["models"]["fp32"]["unpadded"]["parity"]["min_cosine"] >= 0.9999
    assert manifest["models"]["int8"]["unpadded"]["parity"]["mean_cosine"] > 0.9


def test_onnx_embed_equal_lengths_batches_never_pad(exported):
    output, manifest = exported
    tokenizer = load_tokenizer(output, manifest["max_length"])
    seen: list[np.ndarray] = []

    class Recording:
        def run(self, names, feeds):
            seen.append(feeds["attention_mask"])
            return [np.ones((len(feeds["input_ids"]), 4), dtype=np.float32)]

    onnx_embed(Recording(), tokenizer, TEXTS, batch_size=2, equal_lengths=True)
    assert seen and all(mask.all() and len(mask) <= 2 for mask in seen)
    assert sum(len(mask) for mask in seen) == len(TEXTS)


@pytest.mark.slow
def test_non_finite_onnx_outputs_fail_the_parity_gate(tmp_path, tiny_model_dir, monkeypatch):
    import embedforge.export.parity as parity

    real_embed = parity.onnx_embed

    def nan_embed(*args, **kwargs):
        vectors = real_embed(*args, **kwargs)
        vectors[1] = np.nan  # one text comes out as NaN: its cosine is NaN, and `nan < floor` is False
        return vectors

    monkeypatch.setattr(parity, "onnx_embed", nan_embed)
    with pytest.raises(ExportError, match="fp32: the ONNX outputs are not finite"):
        export_checkpoint(tiny_model_dir, tmp_path / "export", precisions=("fp32",), parity_texts=TEXTS)
    assert not (tmp_path / "export").exists() and not leftovers(tmp_path)


@pytest.mark.slow
def test_int8_floor_fails_the_export_and_min_cosine_overrides_it(tmp_path, tiny_model_dir, pairs_file):
    arguments = ["--checkpoint-dir", str(tiny_model_dir), "--parity-path", str(pairs_file), "--output",
                 str(tmp_path / "export"), "--precision", "int8"]
    result = CliRunner().invoke(export_command, [*arguments, "--min-cosine", "int8=1.0"])
    assert result.exit_code == 1
    assert "int8 parity check failed" in result.output and "is below 1.0" in result.output
    assert "fp32 parity" not in result.output and not (tmp_path / "export").exists()
    result = CliRunner().invoke(export_command, [*arguments, "--min_cosine", "int8=0.5"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "export" / MANIFEST_FILE).read_text())
    assert manifest["models"]["int8"]["parity"]["min_cosine_floor"] == 0.5
    assert manifest["models"]["fp32"]["parity"]["min_cosine_floor"] == MIN_COSINE["fp32"]


def test_min_cosine_values_are_checked(tmp_path, tiny_model_dir):
    arguments = ["--checkpoint-dir", str(tiny_model_dir), "--output", str(tmp_path / "export")]
    result = CliRunner().invoke(export_command, [*arguments, "--min-cosine", "int8"])
    assert result.exit_code == 2 and "expected PRECISION=VALUE" in result.output
    result = CliRunner().invoke(export_command, [*arguments, "--min-cosine", "int9=0.9"])
    assert result.exit_code == 1 and "unknown precision 'int9'" in result.output
    result = CliRunner().invoke(export_command, [*arguments, "--min-cosine", "fp32=1.5"])
    assert result.exit_code == 1 and "must be in (0, 1]" in result.output
    assert not (tmp_path / "export").exists()
