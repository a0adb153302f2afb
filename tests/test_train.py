"""The trainer end to end on a tiny random BERT: checkpoints, logs, resume, atomic writes, errors, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import SAMPLE_PAIRS, free_port, make_checkpoint, write_jsonl
from safetensors.torch import load_file
from torch import nn

from embedforge import checkpoints
from embedforge.io import write_dir_atomic
from embedforge.model import BertVectorModel
from embedforge.testing import build_tiny_model
from embedforge.train.cli import train_command
from embedforge.train.dropout import Dropout16
from embedforge.train.trainer import TrainConfig, TrainError, linear_schedule, train


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny"
    build_tiny_model(path, pooling="mean", max_length=64)
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", SAMPLE_PAIRS * 3)


def config(base_model, pairs, save_path, **overrides) -> TrainConfig:
    settings = dict(train_path=str(pairs), val_path=str(pairs), model_name=str(base_model), max_length=64,
                    batch_size=4, learning_rate=1e-3, num_epochs=2, warmup_steps=2, save_steps=4,
                    save_path=str(save_path), pooling="mean", show_progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.slow
def test_training_writes_complete_checkpoints_logs_and_a_plot(base_model, pairs, tmp_path):
    result = train(config(base_model, pairs, tmp_path / "run"))
    # 24 pairs / batch 4 = 6 steps per epoch, 2 epochs = 12 steps: checkpoints at 4, 8, 12.
    assert result.global_step == 12
    found = checkpoints.list_checkpoints(tmp_path / "run")
    assert [info.step for info in found] == [4, 8, 12]
    for info in found:
        assert set(info.state) >= {"step", "epoch", "train_loss", "val_loss", "val_metrics"}
        assert info.val_loss is not None and "val_ndcg@10" in info.state["val_metrics"]
        assert (info.path / "training_state.pt").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [4, 8, 12]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert result.best_checkpoint == checkpoints.select_best(tmp_path / "run").path
    # Training moved the weights, and the loss on the training data went down.
    assert not torch.equal(weights(found[-1].path)["encoder.layer.0.attention.self.query.weight"],
                           weights(base_model)["encoder.layer.0.attention.self.query.weight"])
    assert log[-1]["val_loss"] < log[0]["val_loss"]


def logged_steps(save_path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (save_path / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_rewrites_its_log_from_the_checkpoint(base_model, pairs, tmp_path):
    """Killed after a checkpoint was written but before its record was appended (or with a stray record of a
    checkpoint that never landed), the resumed run's log matches its checkpoints."""
    run = tmp_path / "run"
    train(config(base_model, pairs, run, max_steps=3, save_steps=3))
    (run / "metrics.jsonl").write_text('{"step": 6, "stray": true}\n')
    train(config(base_model, pairs, run, max_steps=6, save_steps=3, resume="latest"))
    assert logged_steps(run) == [3, 6]
    assert all("stray" not in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_resume_after_a_crash_ends_with_the_same_weights(base_model, pairs, tmp_path, monkeypatch):
    reference = train(config(base_model, pairs, tmp_path / "reference", save_steps=3))

    real_save = checkpoints.save_checkpoint
    calls = []

    def crash_on_second_save(save_path, step, *args):
        calls.append(step)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing")  # dies in the middle of the second checkpoint
        return real_save(save_path, step, *args)

    monkeypatch.setattr(checkpoints, "save_checkpoint", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(config(base_model, pairs, tmp_path / "crashed", save_steps=3))
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    assert [info.step for info in checkpoints.list_checkpoints(tmp_path / "crashed")] == [3]
    assert logged_steps(tmp_path / "crashed") == [3]  # no record of the checkpoint that was never written

    resumed = train(config(base_model, pairs, tmp_path / "crashed", save_steps=3, resume="latest"))
    assert resumed.global_step == reference.global_step == 12
    assert logged_steps(tmp_path / "crashed") == logged_steps(tmp_path / "reference") == [3, 6, 9, 12]
    final_reference, final_resumed = weights(reference.best_checkpoint.parent / "checkpoint-step-12"), \
        weights(tmp_path / "crashed" / "checkpoint-step-12")
    for name, tensor in final_reference.items():
        torch.testing.assert_close(final_resumed[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_crash_while_writing_leaves_no_partial_checkpoint(base_model, tmp_path, monkeypatch):
    from embedforge.model import BertVectorModel

    model = BertVectorModel.from_pretrained(base_model)

    def broken_save(self, path):
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(BertVectorModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint(tmp_path, 5, model, {"step": 5}, {})
    assert list(tmp_path.iterdir()) == []


def test_bad_training_data_stops_before_the_model_loads(base_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "document": "d", "rel": 1.7}\n')
    with pytest.raises(TrainError, match=r"bad.jsonl:line 1: field 'rel' must be in \[0, 1\]"):
        train(config("/nonexistent-model", bad, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_existing_run_is_not_overwritten_without_resume(base_model, pairs, tmp_path):
    train(config(base_model, pairs, tmp_path / "run", num_epochs=1, save_steps=100))
    with pytest.raises(TrainError, match="already holds checkpoints: pass --resume"):
        train(config(base_model, pairs, tmp_path / "run", num_epochs=1))


@pytest.mark.slow
def test_save_total_limit_keeps_the_newest_and_the_best(base_model, pairs, tmp_path):
    train(config(base_model, pairs, tmp_path / "run", save_steps=2, save_total_limit=2))
    kept = checkpoints.list_checkpoints(tmp_path / "run")
    best = checkpoints.select_best(tmp_path / "run")
    assert [info.step for info in kept][-2:] == [10, 12]
    assert len(kept) <= 3 and best.path in [info.path for info in kept]


@pytest.mark.slow
def test_early_stopping_stops_when_validation_stops_improving(base_model, pairs, tmp_path):
    result = train(config(base_model, pairs, tmp_path / "run", learning_rate=1e-9, warmup_steps=0, save_steps=1,
                          num_epochs=5, early_stopping_patience=2))
    assert result.stopped_early and result.global_step < 30


def test_linear_warmup_then_decay():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = linear_schedule(optimizer, warmup_steps=4, total_steps=12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4:] == pytest.approx([1.0 - i / 8 for i in range(8)])


def test_cli_accepts_both_option_spellings_and_reports_errors_cleanly(base_model, pairs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(train_command, ["--train_path", str(pairs), "--val-path", str(pairs), "--model-name",
                                           str(base_model), "--max-length", "64", "--num_epochs", "1",
                                           "--save-path", str(tmp_path / "run"), "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    result = runner.invoke(train_command, ["--train-path", str(pairs), "--model-name", str(base_model),
                                           "--max-length", "512", "--save-path", str(tmp_path / "other")])
    assert result.exit_code == 1
    assert "Error: max_length 512 is outside 1..64" in result.output


DDP_SCRIPT = """
import sys, torch
from embedforge.train.trainer import TrainConfig, train
cfg = TrainConfig(train_path=sys.argv[1], val_path=sys.argv[1], model_name=sys.argv[2], max_length=64, batch_size=2,
                  learning_rate=1e-3, num_epochs=1, warmup_steps=1, save_steps=100, save_path=sys.argv[3],
                  pooling="mean", show_progress=False, device="cpu")
result = train(cfg)
rank = int(__import__("os").environ["RANK"])
torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()}, f"{sys.argv[3]}/rank{rank}.pt")
"""


@pytest.mark.slow
def test_two_process_ddp_on_cpu_ends_with_identical_weights(base_model, pairs, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(port),
                          str(script), str(pairs), str(base_model), str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "run" / "rank0.pt"), torch.load(tmp_path / "run" / "rank1.pt")
    for name, tensor in rank0.items():
        torch.testing.assert_close(rank1[name], tensor, rtol=0, atol=0)
    # 24 pairs over 2 ranks with batch 2: 6 steps; only rank 0 wrote the checkpoint.
    assert [info.step for info in checkpoints.list_checkpoints(tmp_path / "run")] == [6]
    assert not torch.equal(rank0["encoder.encoder.layer.0.attention.self.query.weight"],
                           weights(base_model)["encoder.layer.0.attention.self.query.weight"])


def test_checkpoint_listing_skips_temporaries_and_names_broken_state(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "checkpoint-step-3")
    shutil.copytree(tiny_model_dir, tmp_path / ".tmp-checkpoint-step-6-abc")
    (tmp_path / "checkpoint-step-9").mkdir()  # incomplete: no files
    assert [info.step for info in checkpoints.list_checkpoints(tmp_path)] == [1]  # step read from its state
    (tmp_path / "checkpoint-step-3" / "trainer_state.json").write_text("{broken")
    with pytest.raises(checkpoints.CheckpointError, match="trainer_state.json: not valid JSON"):
        checkpoints.read_checkpoint(tmp_path / "checkpoint-step-3")
    with pytest.raises(checkpoints.CheckpointError, match="incomplete checkpoint, missing embedforge.json"):
        checkpoints.read_checkpoint(tmp_path / "checkpoint-step-9")


def test_atomic_directories_get_ordinary_permissions(tmp_path):
    final = write_dir_atomic(tmp_path / "out", lambda tmp: (tmp / "f").write_text("x"))
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask


def test_one_pass_pair_cosine_equals_separate_passes(base_model, pairs):
    from embedforge.data import read_pairs
    from embedforge.model import BertVectorModel
    from embedforge.train.trainer import PairVectors, TokenizedPairs

    model = BertVectorModel.from_pretrained(base_model).eval()
    data = TokenizedPairs(read_pairs(pairs), model)
    batch = np.arange(6)
    inputs = data.collate(batch, torch.device("cpu"))
    with torch.no_grad():
        queries, documents = PairVectors(model)(inputs["input_ids"], inputs["attention_mask"]).chunk(2)
        joint = (queries * documents).sum(dim=-1)
    queries = model.encode([read_pairs(pairs)[i].query for i in batch])
    documents = model.encode([read_pairs(pairs)[i].document for i in batch])
    np.testing.assert_allclose(joint.numpy(), (queries * documents).sum(axis=1), atol=1e-5)


def test_frozen_word_embeddings_and_attention_dropout(base_model, pairs, tmp_path):
    result = train(config(base_model, pairs, tmp_path / "run", num_epochs=1, attention_dropout=0.0))
    trained = weights(tmp_path / "run" / f"checkpoint-step-{result.global_step}")
    before = weights(base_model)
    word_embeddings = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(trained[word_embeddings], before[word_embeddings])
    assert not torch.equal(trained["embeddings.position_embeddings.weight"],
                           before["embeddings.position_embeddings.weight"])
    assert result.model.encoder.config.attention_probs_dropout_prob == 0.0
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["train_samples"] == 24 and log[-1]["train_seconds"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("fast_cpu_dropout", [True, False])
def test_cpu_dropout_choice(base_model, pairs, tmp_path, fast_cpu_dropout):
    result = train(config(base_model, pairs, tmp_path / "run", max_steps=2, fast_cpu_dropout=fast_cpu_dropout))
    kinds = {type(m) for m in result.model.modules() if isinstance(m, (nn.Dropout, Dropout16))}
    assert kinds == ({Dropout16} if fast_cpu_dropout else {nn.Dropout})
    # Either way the checkpoint loads as a plain model: the swap changes no weight or config.
    reloaded = BertVectorModel.from_pretrained(tmp_path / "run" / f"checkpoint-step-{result.global_step}")
    assert not any(isinstance(m, Dropout16) for m in reloaded.modules())


def test_frozen_layers_keep_embeddings_and_bottom_layers_fixed(base_model, pairs, tmp_path):
    result = train(config(base_model, pairs, tmp_path / "run", max_steps=3, frozen_layers=1))
    trained = weights(tmp_path / "run" / f"checkpoint-step-{result.global_step}")
    before = weights(base_model)
    frozen = [k for k in before if k.startswith(("embeddings.", "encoder.layer.0."))]
    trainable = [k for k in before if k.startswith("encoder.layer.1.")]
    assert frozen and trainable
    assert all(torch.equal(trained[k], before[k]) for k in frozen)
    assert all(not torch.equal(trained[k], before[k]) for k in trainable if k.endswith(".weight"))
    with pytest.raises(TrainError, match="--frozen-layers must be between 0 and 1"):
        train(config(base_model, pairs, tmp_path / "bad", frozen_layers=2))


@pytest.mark.parametrize(("option", "message"), [({"rel_power": -1.0}, "--rel-power must be >= 0"),
                                                 ({"scale": 0.0}, "--scale must be > 0"),
                                                 ({"in_batch_weight": -0.5}, "--in-batch-weight must be >= 0")])
def test_bad_loss_options_are_refused_before_training(base_model, pairs, tmp_path, option, message):
    with pytest.raises(TrainError, match=message):
        train(config(base_model, pairs, tmp_path / "bad", loss="weighted-mse+in-batch", **option))
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").glob("checkpoint-*"))


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_clip_gradients_matches_torch_clip_grad_norm(scale):
    from embedforge.train.trainer import clip_gradients

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(4, 8)
    for model in models:
        (model(x).sum() * scale).backward()
    before = [p.grad.clone() for p in models[0].parameters()]
    clip_gradients(models[0], max_norm=1.0, step_loss=torch.zeros((), dtype=torch.float64))
    torch.nn.utils.clip_grad_norm_(models[1].parameters(), max_norm=1.0)
    for ours, theirs in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in models[0].parameters()]))
    if scale > 1:
        assert norm.item() == pytest.approx(1.0, rel=1e-4)
    else:
        assert norm.item() < 1
        assert all(torch.equal(p.grad, g) for p, g in zip(models[0].parameters(), before, strict=True))


# -- integrity (issue 14) ------------------------------------------------------------------


def nan_on_calls(monkeypatch, calls: set[int] | None) -> None:
    """PairVectors returns NaN on the given forward calls (1-based; None: from the 2nd call on)."""
    from embedforge.train.trainer import PairVectors

    real_forward, count = PairVectors.forward, [0]

    def forward(self, input_ids, attention_mask):
        count[0] += 1
        vectors = real_forward(self, input_ids, attention_mask)
        poisoned = count[0] in calls if calls is not None else count[0] >= 2
        return vectors * float("nan") if poisoned else vectors

    monkeypatch.setattr(PairVectors, "forward", forward)


def test_a_non_finite_step_is_skipped_and_counted(base_model, pairs, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, {3})
    result = train(config(base_model, pairs, tmp_path / "run", num_epochs=1, save_steps=3))
    assert result.global_step == 6
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(record["step"], record["skipped_steps"]) for record in log] == [(3, 1), (6, 1)]
    for info in checkpoints.list_checkpoints(tmp_path / "run"):
        assert all(torch.isfinite(tensor).all() for tensor in weights(info.path).values())
        assert np.isfinite(info.val_loss)


def test_the_run_stops_after_max_bad_steps_in_a_row(base_model, pairs, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, None)
    with pytest.raises(TrainError, match=r"step 4: the loss or the gradient norm was not finite in 3 steps in a "
                                         r"row \(--max-bad-steps 3.*--learning-rate"):
        train(config(base_model, pairs, tmp_path / "run", num_epochs=1, save_steps=1, max_bad_steps=3))
    for info in checkpoints.list_checkpoints(tmp_path / "run"):  # step 1 (good) and the skipped 2, 3: all finite
        assert all(torch.isfinite(tensor).all() for tensor in weights(info.path).values())


def test_no_checkpoint_with_a_non_finite_validation_loss(base_model, pairs, tmp_path, monkeypatch):
    import embedforge.train.checkpointer as checkpointer

    real_validate = checkpointer.validate
    monkeypatch.setattr(checkpointer, "validate", lambda *a: {**real_validate(*a), "val_loss": float("nan")})
    with pytest.raises(ValueError, match="step 2: the validation figures are not finite"):
        train(config(base_model, pairs, tmp_path / "run", num_epochs=1, save_steps=2))
    assert checkpoints.list_checkpoints(tmp_path / "run") == []


def test_best_checkpoint_ignores_non_finite_validation_losses(tiny_model_dir, tmp_path):
    import shutil

    for step, val_loss in ((1, float("nan")), (2, 0.7), (3, float("inf"))):
        make_checkpoint(shutil.copytree(tiny_model_dir, tmp_path / f"checkpoint-step-{step}"), step, val_loss)
    assert checkpoints.select_best(tmp_path).step == 2
    make_checkpoint(tmp_path / "checkpoint-step-2", 2, float("-inf"))
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint has a finite val_loss"):
        checkpoints.select_best(tmp_path)


def test_one_unreadable_trainer_state_skips_only_that_checkpoint(tiny_model_dir, tmp_path, caplog):
    import shutil

    for step in (1, 2):
        make_checkpoint(shutil.copytree(tiny_model_dir, tmp_path / f"checkpoint-step-{step}"), step, 0.5 - step / 10)
    (tmp_path / "checkpoint-step-2" / "trainer_state.json").write_text("{broken")
    assert [info.step for info in checkpoints.list_checkpoints(tmp_path)] == [1]
    assert "skipping" in caplog.text and "checkpoint-step-2" in caplog.text
    assert checkpoints.select_best(tmp_path).step == 1
    checkpoints.prune_checkpoints(tmp_path, keep=1)
    assert (tmp_path / "checkpoint-step-1").is_dir()


def test_a_checkpoint_is_complete_only_with_every_listed_file_at_its_size(base_model, tmp_path):
    model = BertVectorModel.from_pretrained(base_model)
    info = checkpoints.save_checkpoint(tmp_path, 5, model, {"step": 5, "val_loss": 0.5}, {"global_step": 5})
    listed = json.loads((info.path / checkpoints.FILE_LIST).read_text())
    assert {"model.safetensors", "training_state.pt", "trainer_state.json"} <= set(listed)
    assert [i.step for i in checkpoints.list_checkpoints(tmp_path)] == [5]
    (info.path / "model.safetensors").write_bytes(b"")  # what a power cut without fsync can leave
    assert checkpoints.list_checkpoints(tmp_path) == []
    with pytest.raises(checkpoints.CheckpointError, match=r"model.safetensors \(size 0, recorded \d+\)"):
        checkpoints.read_checkpoint(info.path)


def test_atomic_writes_fsync_files_and_directory_around_the_rename(tmp_path, monkeypatch):
    from embedforge import io

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    io.write_text_atomic(tmp_path / "a.txt", "x")
    assert [kind for kind, _ in events] == ["fsync", "fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".a.txt.")) and events[1][1] == events[3][1] == str(tmp_path)
    events.clear()
    io.write_dir_atomic(tmp_path / "d", lambda tmp: (tmp / "f").write_text("y"))
    replace = events.index(("replace", str(tmp_path / "d")))
    synced_before = [path for kind, path in events[:replace] if kind == "fsync"]
    assert any(path.endswith("/f") for path in synced_before) and str(tmp_path) in synced_before
    assert ("fsync", str(tmp_path)) in events[replace:]


def test_an_orphaned_old_dir_is_restored_and_live_temporaries_are_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    old = tmp_path / f".old-checkpoint-step-4-{dead_pid}"  # killed between moving step 4 aside and renaming the new
    old.mkdir()
    (old / "model.safetensors").write_text("weights")
    stale = tmp_path / f".tmp-checkpoint-step-6-{dead_pid}-abcd1234"
    live = tmp_path / f".tmp-checkpoint-step-8-{os.getpid()}-abcd1234"  # a write in progress (this process)
    stale.mkdir()
    live.mkdir()
    checkpoints.remove_stale_temporaries(tmp_path)
    assert (tmp_path / "checkpoint-step-4" / "model.safetensors").read_text() == "weights"
    assert not old.exists() and not stale.exists() and live.is_dir()


def test_resume_loads_no_pickled_code(base_model, pairs, tmp_path):
    from embedforge.train.trainer import build_learner, load_model, restore

    train(config(base_model, pairs, tmp_path / "run", max_steps=1))
    info = checkpoints.list_checkpoints(tmp_path / "run")[-1]
    state = torch.load(info.path / "training_state.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    state["payload"] = RunsCode(str(marker))
    torch.save(state, info.path / "training_state.pt")
    cfg = config(base_model, pairs, tmp_path / "run")
    learner = build_learner(cfg, load_model(cfg, torch.device("cpu"), info), torch.device("cpu"), 6)
    with pytest.raises(checkpoints.CheckpointError, match="refused to load"):
        restore(learner, info, 6)
    assert not marker.exists()


class RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def record_batches(monkeypatch) -> list[list[int]]:
    from embedforge.train.trainer import TokenizedPairs

    seen, real_collate = [], TokenizedPairs.collate
    monkeypatch.setattr(TokenizedPairs, "collate", lambda self, batch, device: seen.append(batch.tolist())
                        or real_collate(self, batch, device))
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("first, extended", [({"max_steps": 4}, {"max_steps": 9}),
                                             ({"num_epochs": 1}, {"num_epochs": 2})])
def test_a_finished_run_extended_continues_the_data_order(base_model, pairs, tmp_path, monkeypatch, first, extended):
    seen = record_batches(monkeypatch)
    straight = config(base_model, pairs, tmp_path / "straight", save_steps=100, **extended)
    train(straight)
    straight_batches = list(seen)
    seen.clear()
    train(config(base_model, pairs, tmp_path / "run", save_steps=100, **first))
    final = checkpoints.list_checkpoints(tmp_path / "run")[-1]
    state = torch.load(final.path / "training_state.pt", weights_only=True)
    steps = first.get("max_steps", 6)
    assert (state["epoch"], state["batches_done_in_epoch"], state["total_steps"]) == (steps // 6, steps % 6, steps)
    result = train(config(base_model, pairs, tmp_path / "run", save_steps=100, resume="latest", **extended))
    assert result.global_step == len(straight_batches)
    assert seen == straight_batches  # the same batches in the same order: none trained twice, none left out


def test_an_extended_schedule_continues_its_decay_to_the_new_last_step(base_model, pairs, tmp_path):
    from embedforge.train.trainer import build_learner, linear_schedule, load_model, restore

    cfg = config(base_model, pairs, tmp_path / "run", save_steps=100, max_steps=4, warmup_steps=2)
    train(cfg)
    info = checkpoints.list_checkpoints(tmp_path / "run")[-1]
    learner = build_learner(cfg, load_model(cfg, torch.device("cpu"), info), torch.device("cpu"), total_steps=10)
    restore(learner, info, total_steps=10)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    reference = linear_schedule(optimizer, 2, 10)
    for _ in range(4):
        optimizer.step()
        reference.step()
    assert learner.learning_rate == pytest.approx(reference.get_last_lr()[0])  # step 4 of 10: 0.75 * lr
    assert [group["lr"] for group in learner.optimizer.param_groups] == pytest.approx([0.75 * cfg.learning_rate] * 2)


def test_resuming_with_other_data_or_model_options_is_refused(base_model, pairs, tmp_path):
    train(config(base_model, pairs, tmp_path / "run", max_steps=2, save_steps=100))
    with pytest.raises(TrainError, match=r"--resume: --batch-size 4 -> 2, --pooling 'mean' -> 'cls': these "
                                         r"data/model options differ"):
        train(config(base_model, pairs, tmp_path / "run", resume="latest", batch_size=2, pooling="cls"))
    # Left unset, max_length and the prompts are the resumed checkpoint's own: nothing differs.
    resumed = train(config(base_model, pairs, tmp_path / "run", resume="latest", max_length=None, max_steps=2))
    assert resumed.global_step == 2


CHECKPOINT_WRITER = """
import os, sys, json, torch
from pathlib import Path
from embedforge import checkpoints
from embedforge.model import BertVectorModel
torch.set_num_threads(1)
save_path, source = Path(sys.argv[1]), Path(sys.argv[2])
model = BertVectorModel.from_pretrained(source)
trainer_state = json.loads((source / "trainer_state.json").read_text())
training_state = torch.load(source / "training_state.pt", weights_only=True)
for line in sys.stdin:  # "write": fork a writer that rewrites checkpoints until killed; "reap": wait for it
    if line.strip() == "write":
        pid = os.fork()
        if pid == 0:
            step = 0
            while True:
                step = step % 3 + 1  # steps 1 and 2 exist: replacing them passes through .old-; 3 is new
                checkpoints.save_checkpoint(save_path, step, model, {**trainer_state, "step": step}, training_state)
        print(pid, flush=True)
    else:
        os.waitpid(pid, 0)
        print("reaped", flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_always_leaves_a_resumable_run(base_model, pairs, tmp_path):
    import random
    import signal
    import time

    from embedforge.train.resume import find_resume_checkpoint

    run = tmp_path / "run"
    cfg = config(base_model, pairs, run, max_steps=2, save_steps=1)
    train(cfg)  # checkpoints 1 and 2, what the writer rewrites
    script = tmp_path / "writer.py"
    script.write_text(CHECKPOINT_WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(run), str(run / "checkpoint-step-2")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    rng, deadline, trials = random.Random(14), time.monotonic() + 60, 0
    try:
        while trials < 20 and time.monotonic() < deadline:
            writer.stdin.write("write\n")
            writer.stdin.flush()
            pid = int(writer.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.4))  # one checkpoint write takes about 0.05-0.2 s here
            os.kill(pid, signal.SIGKILL)
            writer.stdin.write("reap\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() == "reaped"
            trials += 1
            # What `train --resume latest` does first: clean up, then pick the latest complete checkpoint.
            checkpoints.remove_stale_temporaries(run)
            assert not [child.name for child in run.iterdir() if child.name.startswith((".tmp-", ".old-"))]
            latest = find_resume_checkpoint(TrainConfig(save_path=str(run), resume="latest"), run)
            assert latest.step in (1, 2, 3) and not checkpoints.missing_files(latest.path)
            assert weights(latest.path) and torch.load(latest.path / "training_state.pt", weights_only=True)
            assert {info.step for info in checkpoints.list_checkpoints(run)} >= {1, 2}
    finally:
        writer.kill()
        writer.wait(timeout=10)
    assert trials >= 20
    resumed = train(config(base_model, pairs, run, max_steps=3, save_steps=1, resume="latest"))
    assert resumed.global_step == 3


FAILING_RANK_SCRIPT = """
import os, sys, time
import embedforge.train.checkpointer as checkpointer
from embedforge.train.trainer import TrainConfig, train
rank, mode = int(os.environ["RANK"]), sys.argv[4]
train_path, failing = sys.argv[1], (mode == "validate" and rank == 0) or (mode == "data" and rank == 1)
if mode == "validate" and rank == 0:
    def broken_validate(*args):
        raise RuntimeError("injected failure while validating")
    checkpointer.validate = broken_validate
if mode == "data" and rank == 1:
    train_path = sys.argv[1] + ".missing"  # this rank alone cannot start
cfg = TrainConfig(train_path=train_path, val_path=sys.argv[1], model_name=sys.argv[2], max_length=64, batch_size=2,
                  learning_rate=1e-3, num_epochs=1, warmup_steps=1, save_steps=2, save_path=sys.argv[3],
                  pooling="mean", show_progress=False, device="cpu")
try:
    train(cfg)
except Exception:
    if failing:  # the failing rank stays alive a while (a slow teardown): the others must not wait for it to die
        open(sys.argv[5], "w").write(str(time.time()))
        time.sleep(20)
    raise
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["validate", "data"])
def test_a_failure_on_one_rank_stops_every_rank_quickly(base_model, pairs, tmp_path, mode):
    import time

    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK_SCRIPT)
    failed_at = tmp_path / "failed_at"
    port = free_port()
    processes = [subprocess.Popen([sys.executable, str(script), str(pairs), str(base_model), str(tmp_path / "run"),
                                   mode, str(failed_at)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                       "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                 for rank in (0, 1)]
    other = processes[1] if mode == "validate" else processes[0]
    try:
        other.wait(timeout=240)
        other_ended = time.time()
        for process in processes:
            process.wait(timeout=120)
    finally:
        for process in processes:
            process.kill()
        outputs = [process.communicate(timeout=10)[0] for process in processes]
    assert other_ended - float(failed_at.read_text()) < 15, outputs  # not waiting for the failed rank to die (20 s)
    assert [process.returncode for process in processes] == [1, 1], outputs
    if mode == "validate":
        assert "injected failure while validating" in outputs[0]
        assert "rank 0 failed while validating or saving" in outputs[1]
    else:
        assert "another rank refused to start" in outputs[0] and "no such file" in outputs[1]
    assert checkpoints.list_checkpoints(tmp_path / "run") == []
