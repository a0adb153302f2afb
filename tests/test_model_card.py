"""The model card (README.md at the save path): written by train, refreshed by evaluate and export; and a run
trained with prompts keeps them in every place they are saved."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import SAMPLE_PAIRS, write_jsonl

from embedforge.model_card import front_matter, gather, render, write_model_card
from embedforge.testing import build_tiny_model

PROMPTS = {"query": "query: ", "document": "passage: "}


def card(save_path: Path) -> tuple[dict, str]:
    text = (save_path / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


@pytest.fixture(scope="module")
def prompted_run(tmp_path_factory) -> Path:
    """`embedforge train` with query and document prompts: a tiny model, two steps, a checkpoint after each."""
    from embedforge.train.cli import train_command

    root = tmp_path_factory.mktemp("card")
    build_tiny_model(root / "base", pooling="mean", max_length=48)
    pairs = write_jsonl(root / "pairs.jsonl", SAMPLE_PAIRS)
    result = CliRunner().invoke(train_command, [
        "--train-path", str(pairs), "--val-path", str(pairs), "--model-name", str(root / "base"), "--batch-size", "4",
        "--learning-rate", "1e-3", "--warmup-steps", "0", "--save-steps", "1", "--max-steps", "2", "--loss",
        "weighted-mse+in-batch", "--save-path", str(root / "run"), "--query-prompt", "query: ",
        "--document-prompt", "passage: "])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.mark.slow  # trains a tiny model for two steps, then evaluates and exports it
def test_train_writes_the_card_and_evaluate_and_export_refresh_it(prompted_run):
    from embedforge.evaluate.cli import evaluate_command
    from embedforge.export.cli import export_command

    header, body = card(prompted_run)
    assert header["library_name"] == "sentence-transformers" and header["pipeline_tag"] == "sentence-similarity"
    assert {"sentence-transformers", "loss:weighted-mse+in-batch"} <= set(header["tags"])
    assert header["datasets"] == ["pairs.jsonl"] and "base_model" not in header  # a local base model has no hub id
    assert "`pairs.jsonl`" not in body and f"`{prompted_run.parent / 'pairs.jsonl'}`, 8 pairs" in body
    assert 'query `"query: "`, document `"passage: "`' in body and "max length | 48 tokens" in body
    assert "scale 20.0" in body and "## Validation" in body and "## Test" not in body and "## Export" not in body
    assert 'input=["query: how to boil an egg"]' in body  # the OpenAI client sends the prompted text

    pairs = str(prompted_run.parent / "pairs.jsonl")
    result = CliRunner().invoke(evaluate_command, ["--test-path", pairs, "--save-path", str(prompted_run)])
    assert result.exit_code == 0, result.output
    _, body = card(prompted_run)
    assert "## Test" in body and "8 pairs, 3 queries" in body and "## Export" not in body

    result = CliRunner().invoke(export_command, ["--save-path", str(prompted_run), "--precision", "fp32",
                                                 "--parity-path", pairs])
    assert result.exit_code == 0, result.output
    _, body = card(prompted_run)
    assert "## Test" in body and re.search(r"\| fp32 \| `model.onnx` \| (1\.000000|0\.99999\d) \| .* \| yes \|", body)


@pytest.mark.slow
def test_a_prompted_run_saves_its_prompts_everywhere(prompted_run):
    from embedforge import checkpoints
    from embedforge.model import BertVectorModel

    best = checkpoints.read_best_record(prompted_run) or checkpoints.select_best(prompted_run)
    for folder in (prompted_run, best.path):
        assert json.loads((folder / "embedforge.json").read_text())["prompts"] == PROMPTS
        assert json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"] == PROMPTS
        assert BertVectorModel.from_pretrained(folder).prompts == PROMPTS
    recorded = json.loads((prompted_run / "train_config.json").read_text())
    assert (recorded["query_prompt"], recorded["document_prompt"]) == ("query: ", "passage: ")
    # Resuming with another prompt is refused by name: the data the model saw would change.
    from embedforge.train.cli import train_command

    result = CliRunner().invoke(train_command, [
        "--train-path", recorded["train_path"], "--val-path", recorded["val_path"], "--model-name",
        recorded["model_name"], "--save-path", str(prompted_run), "--resume", "--query-prompt", "q: ",
        "--document-prompt", "passage: ", "--batch-size", "4"])
    assert result.exit_code == 1 and "--query-prompt 'query: ' -> 'q: '" in result.output


def test_a_card_from_the_model_alone_and_a_root_without_a_model(tmp_path):
    assert write_model_card(tmp_path) is None and not (tmp_path / "README.md").exists()
    build_tiny_model(tmp_path, pooling="cls", projection_dim=8)
    write_model_card(tmp_path)
    header, body = card(tmp_path)
    assert header["tags"][0] == "sentence-transformers" and "metrics" not in header
    assert "| pooling | cls |" in body and "8 (linear projection)" in body and "| prompts | none |" in body
    assert f"SentenceTransformer({json.dumps(str(tmp_path))})" in body
    assert 'input=["how to boil an egg"]' in body


def test_the_bundled_default_is_named_by_its_hub_id(tmp_path):
    build_tiny_model(tmp_path)
    facts = gather(tmp_path)
    facts["model"]["base_model"] = "all-MiniLM-L6-v2"
    assert yaml.safe_load(front_matter(facts).strip("-\n"))["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert render(facts).startswith("---\nlibrary_name: sentence-transformers\n")
