"""`train --preset`: each preset a full set of loss options, explicit options win, the choice recorded."""

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import embedforge.train.trainer as trainer
from embedforge.train.cli import train_command
from embedforge.train.config import TrainError
from embedforge.train.losses import InBatchLoss, SumLoss, WeightedMSELoss, loss_for
from embedforge.train.presets import LOSS_OPTIONS, PRESETS, describe, preset_config
from embedforge.train.trainer import _check_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_fixes_every_loss_option_and_is_a_valid_config(name):
    assert set(PRESETS[name]) == set(LOSS_OPTIONS)
    config = preset_config(name)
    _check_config(config)
    assert config.preset == name and all(getattr(config, key) == value for key, value in PRESETS[name].items())


def test_similarity_is_the_seed_weighted_mse_and_balanced_builds_its_masked_in_batch_term():
    assert isinstance(loss_for(preset_config("similarity")), WeightedMSELoss)
    balanced = loss_for(preset_config("balanced"))
    assert isinstance(balanced, SumLoss) and isinstance(balanced.second, InBatchLoss)
    assert balanced.weight == PRESETS["balanced"]["in_batch_weight"]
    assert balanced.second.false_negative_margin == PRESETS["balanced"]["false_negative_margin"]
    assert describe("similarity") == "--loss weighted-mse"
    assert "--symmetric" in describe("balanced") and "--false-negative-margin 0" in describe("balanced")


def test_explicit_options_override_a_preset_and_an_unknown_preset_is_refused():
    config = preset_config("balanced", in_batch_weight=0.5, seed=7)
    assert (config.in_batch_weight, config.seed, config.rel_power) == (0.5, 7, PRESETS["balanced"]["rel_power"])
    with pytest.raises(TrainError, match="unknown --preset 'fast'; choose one of similarity, balanced"):
        preset_config("fast")


def test_the_command_line_applies_the_preset_then_the_options_given(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(trainer, "train", lambda config: seen.append(config) or SimpleNamespace(best_checkpoint=None))

    def run(*args: str):
        result = CliRunner().invoke(train_command, [*args, "--save-path", str(tmp_path)])
        assert result.exit_code == 0, result.output
        return seen.pop()

    config = run("--preset", "balanced", "--scale", "10", "--in-batch-weight", "1.0", "--learning-rate", "5e-5")
    assert (config.preset, config.loss, config.scale, config.in_batch_weight, config.learning_rate) == (
        "balanced", "weighted-mse+in-batch", 10.0, 1.0, 5e-5)
    assert config.false_negative_margin == PRESETS["balanced"]["false_negative_margin"]
    plain = run("--loss", "in-batch")
    assert (plain.preset, plain.loss, plain.false_negative_margin) == (None, "in-batch", None)
    assert "balanced: --loss weighted-mse+in-batch" in CliRunner().invoke(train_command, ["--help"]).output


def test_a_preset_run_records_its_name_in_train_config(tiny_model_dir, pairs_file, tmp_path):
    result = CliRunner().invoke(train_command, [
        "--preset", "balanced", "--train-path", str(pairs_file), "--val-path", str(pairs_file), "--model-name",
        str(tiny_model_dir), "--max-steps", "1", "--batch-size", "4", "--save-path", str(tmp_path / "run"),
        "--device", "cpu"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert recorded["preset"] == "balanced"
    assert {key: recorded[key] for key in LOSS_OPTIONS} == PRESETS["balanced"]
