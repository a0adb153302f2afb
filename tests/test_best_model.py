"""The save path holds the best model: the seed script's snippet runs on a finished run, copies are atomic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import SAMPLE_PAIRS, make_checkpoint, write_jsonl
from transformers import AutoModel, AutoTokenizer, BertTokenizer

from embedforge import checkpoints
from embedforge.io import UnsafeFileNameError, plain_file_name
from embedforge.model import BertVectorModel, ModelError
from embedforge.testing import build_tiny_model
from embedforge.train.config import TrainConfig
from embedforge.train.trainer import train

# The README snippet of the script embedforge replaces, character for character.
SEED_SNIPPET = """\
tokenizer = BertTokenizer.from_pretrained('./output/vector_model')
model = BertVectorModel.from_pretrained('./output/vector_model')
query_vector = model.encode("What is machine learning?")
doc_vector = model.encode("Machine learning is a subset of AI...")
similarity = torch.cosine_similarity(query_vector, doc_vector)
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny model trained for two steps, validated and checkpointed after each."""
    root = tmp_path_factory.mktemp("run")
    build_tiny_model(root / "base", pooling="mean", max_length=64)
    pairs = write_jsonl(root / "pairs.jsonl", SAMPLE_PAIRS)
    train(TrainConfig(train_path=str(pairs), val_path=str(pairs), model_name=str(root / "base"), max_length=64,
                      batch_size=4, learning_rate=1e-3, warmup_steps=0, save_steps=1, max_steps=2,
                      save_path=str(root / "vector_model"), show_progress=False))
    return root / "vector_model"


@pytest.mark.slow  # trains a tiny model (about 9 s) once for the module
def test_the_seed_snippet_runs_unchanged_on_a_finished_run(finished_run):
    namespace = {"torch": torch, "BertTokenizer": BertTokenizer, "BertVectorModel": BertVectorModel}
    exec(SEED_SNIPPET.replace("./output/vector_model", str(finished_run)), namespace)

    similarity = namespace["similarity"]
    assert isinstance(similarity, torch.Tensor) and similarity.shape == (1,)
    best = BertVectorModel.from_pretrained(checkpoints.select_best(finished_run).path)
    query, document = best.encode(["What is machine learning?", "Machine learning is a subset of AI..."])
    assert similarity.item() == pytest.approx(float(query @ document), abs=1e-5)
    text = "how to boil an egg"
    assert namespace["tokenizer"](text)["input_ids"] == best.tokenizer(text)["input_ids"]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert SEED_SNIPPET in readme, "the README's 'Using the trained model in Python' shows the snippet"


@pytest.mark.slow
def test_the_root_holds_the_best_checkpoints_model_and_names_it(finished_run):
    best = checkpoints.select_best(finished_run)
    record = json.loads((finished_run / checkpoints.BEST_MODEL_RECORD).read_text())
    assert (record["checkpoint"], record["step"], record["val_loss"]) == (best.name, best.step, best.val_loss)
    # vocab.txt too on transformers 4.x; 5.x saves tokenizer.json alone, and its BertTokenizer reads that (below).
    assert {"config.json", "model.safetensors", "tokenizer.json", "embedforge.json"} <= set(record["files"])
    assert checkpoints.STATE_FILE not in record["files"] and checkpoints.TRAINING_STATE_FILE not in record["files"]
    for name in record["files"]:
        assert (finished_run / name).read_bytes() == (best.path / name).read_bytes(), name
    # transformers' own loaders take the save path as a model directory.
    assert AutoTokenizer.from_pretrained(finished_run)("egg")["input_ids"] == BertTokenizer.from_pretrained(
        finished_run)("egg")["input_ids"]
    encoder = AutoModel.from_pretrained(finished_run)
    torch.testing.assert_close(encoder.state_dict()["encoder.layer.0.attention.self.query.weight"],
                               BertVectorModel.from_pretrained(best.path).encoder.state_dict()[
                                   "encoder.layer.0.attention.self.query.weight"])


@pytest.mark.slow
def test_root_files_leave_checkpoint_listing_and_export_alone(finished_run):
    from embedforge.export import MANIFEST_FILE
    from embedforge.export.cli import export_command

    best = checkpoints.select_best(finished_run)
    assert [info.name for info in checkpoints.list_checkpoints(finished_run)] == ["checkpoint-step-1",
                                                                                   "checkpoint-step-2"]
    assert checkpoints.resolve_checkpoint(save_path=finished_run).path == best.path
    result = CliRunner().invoke(export_command, ["--save-path", str(finished_run), "--precision", "fp32",
                                                 "--parity-path", str(finished_run.parent / "pairs.jsonl")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((finished_run / "export" / MANIFEST_FILE).read_text())
    assert manifest["source_checkpoint"] == str(best.path.resolve())


def two_checkpoints(tmp_path: Path) -> tuple[checkpoints.CheckpointInfo, checkpoints.CheckpointInfo]:
    """A run with a projected checkpoint and a different, unprojected one (distinct weights and files)."""
    first = build_tiny_model(tmp_path / "run" / "checkpoint-step-1", projection_dim=8, seed=1)
    second = build_tiny_model(tmp_path / "run" / "checkpoint-step-2", seed=2)
    assert first.dim != second.dim
    return (checkpoints.read_checkpoint(make_checkpoint(tmp_path / "run" / "checkpoint-step-1", step=1)),
            checkpoints.read_checkpoint(make_checkpoint(tmp_path / "run" / "checkpoint-step-2", step=2)))


def root_model_files(root: Path) -> set[str]:
    """Every file under the save path but those of its checkpoints, by relative path (1_Pooling/config.json)."""
    return {child.relative_to(root).as_posix() for child in root.rglob("*") if child.is_file()
            and not child.relative_to(root).parts[0].startswith("checkpoint-step-")}


def test_a_new_best_replaces_every_file_of_the_previous_one(tmp_path):
    first, second = two_checkpoints(tmp_path)
    root = tmp_path / "run"
    checkpoints.copy_best_model(root, first)
    assert BertVectorModel.from_pretrained(root).dim == 8
    checkpoints.copy_best_model(root, second)
    assert not (root / "projection.safetensors").exists()
    assert json.loads((root / checkpoints.BEST_MODEL_RECORD).read_text())["checkpoint"] == "checkpoint-step-2"
    np.testing.assert_allclose(BertVectorModel.from_pretrained(root).encode(["egg"]),
                               BertVectorModel.from_pretrained(second.path).encode(["egg"]), atol=1e-6)
    assert root_model_files(root) == {*json.loads((root / checkpoints.BEST_MODEL_RECORD).read_text())["files"],
                                      checkpoints.BEST_MODEL_RECORD, ".best_model.lock"}
    # The first one's Dense module went with its projection, and no module folder is left empty.
    assert not (root / "2_Dense").exists() and not (root / "3_Normalize").exists()
    assert {"modules.json", "1_Pooling/config.json", "2_Normalize/config.json"} <= root_model_files(root)


@pytest.mark.parametrize("crash_at", ["tokenizer.json", "model.safetensors"])
def test_a_crash_while_copying_never_leaves_a_mix_that_loads(tmp_path, monkeypatch, crash_at):
    first, second = two_checkpoints(tmp_path)
    root = tmp_path / "run"
    checkpoints.copy_best_model(root, first)
    real_copy = shutil.copyfile

    def copy_then_die(source, target):
        if Path(source).name == crash_at:
            Path(target).write_bytes(b"half")
            raise KeyboardInterrupt("killed while copying")
        return real_copy(source, target)

    monkeypatch.setattr(checkpoints.shutil, "copyfile", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.copy_best_model(root, second)
    # Nothing of the first checkpoint is left, every file present is the second's, and without the weights
    # and the record nothing loads it as a model.
    left = root_model_files(root) - {".best_model.lock"}
    assert not (root / "model.safetensors").exists() and not (root / checkpoints.BEST_MODEL_RECORD).exists()
    assert left and all((root / name).read_bytes() == (second.path / name).read_bytes() for name in left)
    with pytest.raises(ModelError):
        BertVectorModel.from_pretrained(root)
    with pytest.raises((OSError, ValueError)):
        AutoModel.from_pretrained(root)

    # The next copy completes it, and clears what a killed copy's temporary files would leave.
    (root / ".model.safetensors.killed.safetensors").write_bytes(b"half")
    monkeypatch.setattr(checkpoints.shutil, "copyfile", real_copy)
    checkpoints.copy_best_model(root, second)
    assert BertVectorModel.from_pretrained(root).dim == 32
    assert not (root / ".model.safetensors.killed.safetensors").exists()


# ---- file names read from records stay inside their directory ----

@pytest.mark.parametrize("value", ["model.onnx", "checkpoint-step-3", "model_int8_unpadded.onnx", ".hidden", "a b",
                                   "..x", "x.."])
def test_plain_file_name_accepts_plain_names(value):
    assert plain_file_name(value, Path("/run/manifest.json"), "models.fp32.file") == value


@pytest.mark.parametrize("value", ["", ".", "..", "../x.onnx", "../elsewhere", "/etc/passwd", "a/b", "a/", "a\\b",
                                   "..\\x.onnx", "C:x.onnx", "C:\\x.onnx", "x\0y", None, 3, ["x.onnx"]])
def test_plain_file_name_refuses_paths_naming_record_field_and_value(value):
    with pytest.raises(UnsafeFileNameError) as info:
        plain_file_name(value, Path("/run/manifest.json"), "models.fp32.file")
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("/run/manifest.json: field 'models.fp32.file' must be a plain file name")
    assert str(info.value).endswith(f"got {value!r}")


@pytest.mark.parametrize("value", ["../elsewhere", "ABSOLUTE"])
def test_a_best_checkpoint_record_naming_a_directory_outside_the_save_path_is_refused(tmp_path, value):
    save_path = tmp_path / "run"
    build_tiny_model(save_path / "checkpoint-step-1")
    make_checkpoint(save_path / "checkpoint-step-1", step=1)
    build_tiny_model(tmp_path / "elsewhere", seed=3)
    make_checkpoint(tmp_path / "elsewhere", step=9, val_loss=0.1)  # complete: only its place is wrong
    value = str(tmp_path / "elsewhere") if value == "ABSOLUTE" else value
    record = save_path / checkpoints.BEST_RECORD
    record.write_text(json.dumps({"checkpoint": value, "step": 9, "val_loss": 0.1, "selected_by": "val_loss"}))
    for read in (checkpoints.read_best_record, lambda path: checkpoints.resolve_checkpoint(save_path=path)):
        with pytest.raises(checkpoints.CheckpointError) as info:
            read(save_path)
        assert str(info.value).startswith(f"{record}: field 'checkpoint' must be a plain file name")
        assert repr(value) in str(info.value)


def test_a_checkpoint_file_list_naming_a_file_outside_the_checkpoint_makes_it_unusable(tmp_path):
    save_path = tmp_path / "run"
    build_tiny_model(save_path / "checkpoint-step-1")
    checkpoint = make_checkpoint(save_path / "checkpoint-step-1")
    (tmp_path / "outside.bin").write_bytes(b"1234")
    (checkpoint / checkpoints.FILE_LIST).write_text(json.dumps({"../../outside.bin": 4}))
    with pytest.raises(checkpoints.CheckpointError, match=r"field 'file name' must be a relative path inside.*"
                                                          r"'\.\./\.\./outside\.bin'"):
        checkpoints.read_checkpoint(checkpoint)
    assert checkpoints.list_checkpoints(save_path) == []


# ---- --select-by: the best checkpoint by a validation figure ----

def run_with_three_checkpoints(root: Path, tiny_model_dir: Path) -> Path:
    """Checkpoints 1, 2, 3 whose validation figures disagree: loss prefers 1, Spearman 2, NDCG@10 3."""
    figures = {1: (0.10, 70.0, 60.0), 2: (0.20, 90.0, 61.0), 3: (0.30, 71.0, 80.0)}
    for step, (loss, spearman, ndcg) in figures.items():
        path = root / f"checkpoint-step-{step}"
        shutil.copytree(tiny_model_dir, path)
        make_checkpoint(path, step=step, val_loss=loss)
        state = json.loads((path / "trainer_state.json").read_text())
        state["val_metrics"] = {"val_loss": loss, "val_spearman": spearman, "val_ndcg@10": ndcg}
        (path / "trainer_state.json").write_text(json.dumps(state))
        (path / checkpoints.FILE_LIST).unlink(missing_ok=True)
    return root


@pytest.mark.parametrize(("select_by", "step"), [("val_loss", 1), ("val_spearman", 2), ("val_ndcg@10", 3),
                                                 ("val_spearman+val_ndcg@10", 3)])
def test_select_best_by_each_validation_figure(tmp_path, tiny_model_dir, select_by, step):
    run = run_with_three_checkpoints(tmp_path / "run", tiny_model_dir)
    assert checkpoints.select_best(run, select_by).step == step
    with pytest.raises(checkpoints.CheckpointError, match="select_by must be one of"):
        checkpoints.select_best(run, "test_spearman")


def test_evaluate_follows_the_runs_select_by(tmp_path, tiny_model_dir, pairs_file):
    from embedforge.evaluate.cli import evaluate_command

    run = run_with_three_checkpoints(tmp_path / "run", tiny_model_dir)
    (run / checkpoints.CONFIG_RECORD).write_text(json.dumps({"select_by": "val_spearman"}))
    result = CliRunner().invoke(evaluate_command, ["--test-path", str(pairs_file), "--save-path", str(run),
                                                   "--select-best", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    record = json.loads((run / checkpoints.BEST_RECORD).read_text())
    assert (record["checkpoint"], record["selected_by"]) == ("checkpoint-step-2", "val_spearman")
    result = CliRunner().invoke(evaluate_command, ["--test-path", str(pairs_file), "--save-path", str(run),
                                                   "--select-best", "--select-by", "val_ndcg@10"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / checkpoints.BEST_RECORD).read_text())["checkpoint"] == "checkpoint-step-3"


def test_train_keeps_the_checkpoint_its_select_by_names(base_for_select, pairs_file, tmp_path):
    run = tmp_path / "run"
    result = train(TrainConfig(train_path=str(pairs_file), val_path=str(pairs_file), model_name=str(base_for_select),
                               max_length=32, batch_size=4, num_epochs=2, save_steps=2, learning_rate=1e-3,
                               save_path=str(run), show_progress=False, select_by="val_spearman"))
    infos = checkpoints.list_checkpoints(run)
    best = max(infos, key=lambda info: (info.state["val_metrics"]["val_spearman"], info.step))
    assert result.best_checkpoint == best.path
    with pytest.raises(ValueError, match="--select-by must be one of"):
        train(TrainConfig(train_path=str(pairs_file), val_path=str(pairs_file), model_name=str(base_for_select),
                          save_path=str(tmp_path / "bad"), select_by="test_spearman", show_progress=False))


@pytest.fixture(scope="module")
def base_for_select(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("select_base") / "tiny"
    build_tiny_model(path, pooling="mean", max_length=32)
    return path


def test_export_resolves_the_best_by_the_runs_select_by(tmp_path, tiny_model_dir):
    run = run_with_three_checkpoints(tmp_path / "run", tiny_model_dir)
    assert checkpoints.resolve_checkpoint(run).step == 1  # no record: the lowest validation loss
    (run / checkpoints.CONFIG_RECORD).write_text(json.dumps({"select_by": "val_ndcg@10"}))
    assert checkpoints.resolve_checkpoint(run).step == 3
