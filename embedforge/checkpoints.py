"""Checkpoints on disk: saving, listing, and the choice of the best one.

Layout under a save path::

    <save_path>/checkpoint-step-N/      model files, embedforge.json, the sentence-transformers modules
                                        (modules.json, 1_Pooling/, ...), trainer_state.json, training_state.pt
    <save_path>/best_checkpoint.json    {"checkpoint", "step", "val_loss", "selected_by"} (written by evaluate)
    <save_path>/config.json, model.safetensors, tokenizer files, embedforge.json, ...
                                        the best checkpoint's model, copied by train and evaluate --select-best
    <save_path>/best_model.json         {"checkpoint", "step", "val_loss", "files"}: which checkpoint that is
    <save_path>/train_config.json       the run's options; eval_report.json: evaluate's; README.md: the model card
    <save_path>/export/manifest.json    the default export (embedforge export --save-path)

A checkpoint is built in a hidden temporary directory, fsynced, and renamed into place once complete, so a
run killed at any moment (or a power cut) leaves either the whole checkpoint or none. Its last file,
`checkpoint_files.json`, lists every other file with its size: a checkpoint is complete only when each is
present with that size (checkpoints written before the list existed need REQUIRED_FILES). A checkpoint
that cannot be read is skipped by listings with a warning, never fatal to them. The model files at the root
make the save path itself loadable (`BertVectorModel.from_pretrained(save_path)`, transformers' `AutoModel`
and `AutoTokenizer`); they are not a checkpoint and listing never sees them. Only saving the training state
imports torch; listing and selection are plain file reads, used by train, evaluate, export and the benchmarks.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from embedforge.io import (
    UnsafeFileNameError,
    plain_file_name,
    recover_directory,
    relative_file_path,
    write_dir_atomic,
    write_file_atomic,
    write_json_atomic,
)

log = logging.getLogger("embedforge.checkpoints")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-step-(\d+)$")
STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.pt"
BEST_RECORD = "best_checkpoint.json"
BEST_MODEL_RECORD = "best_model.json"
CONFIG_RECORD = "train_config.json"  # the run's TrainConfig, written by train
EVAL_REPORT = "eval_report.json"  # evaluate --save-path's default report
MODEL_CARD = "README.md"  # embedforge/model_card.py
EXPORT_DIR = "export"  # the default export of a save path (or of a checkpoint's parent)
EXPORT_MANIFEST = "manifest.json"  # an export's description (embedforge/export/pipeline.py)
# The files transformers finds a model's weights by: at the root they are removed first and written last,
# so the root loads as a model only while every other file beside them is from the same checkpoint.
WEIGHT_ENTRY_FILES = ("model.safetensors", "model.safetensors.index.json")
# Checkpoint files that are no part of the model, and the save path's own records: never copied to the root.
REQUIRED_FILES = ("embedforge.json", "config.json", "model.safetensors", "tokenizer.json", STATE_FILE)
FILE_LIST = "checkpoint_files.json"
_NOT_MODEL_FILES = (STATE_FILE, TRAINING_STATE_FILE, BEST_RECORD, BEST_MODEL_RECORD, FILE_LIST, MODEL_CARD)


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for; the message says what is missing and where."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    val_loss: float | None
    state: dict = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return self.path.name


def checkpoint_name(step: int) -> str:
    return f"checkpoint-step-{step}"


def missing_files(path: Path) -> list[str]:
    """Files the checkpoint lacks (or holds at another size than recorded), by name; empty when complete."""
    listed = path / FILE_LIST
    if not listed.is_file():
        return [name for name in REQUIRED_FILES if not (path / name).is_file()]
    try:
        sizes = json.loads(listed.read_text())
    except ValueError:
        return [f"{FILE_LIST} (not valid JSON)"]
    if not isinstance(sizes, dict):
        return [f"{FILE_LIST} (not a JSON object of file sizes)"]
    try:
        for name in sizes:
            relative_file_path(name, listed, "file name")
    except UnsafeFileNameError as error:
        return [f"{FILE_LIST} (unusable: {error})"]
    return [f"{name} (size {(path / name).stat().st_size}, recorded {size})" if (path / name).is_file() else name
            for name, size in sizes.items()
            if not (path / name).is_file() or (path / name).stat().st_size != size]


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read one checkpoint directory, or raise CheckpointError naming the missing files."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except ValueError as error:
        raise CheckpointError(f"{path / STATE_FILE}: not valid JSON ({error})") from error
    val_loss = state.get("val_loss")
    return CheckpointInfo(path, int(state.get("step", 0)), None if val_loss is None else float(val_loss), state)


def list_checkpoints(save_path: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints under `save_path`, by step. Temporary and incomplete directories are skipped."""
    save_path = Path(save_path)
    if not save_path.is_dir():
        return []
    found = []
    for child in save_path.iterdir():
        if child.is_dir() and CHECKPOINT_PATTERN.match(child.name) and not missing_files(child):
            try:
                found.append(read_checkpoint(child))
            except CheckpointError as error:
                log.warning("skipping %s: %s", child, error)
    return sorted(found, key=lambda info: info.step)


SELECT_BY = ("val_loss", "val_spearman", "val_ndcg@10", "val_spearman+val_ndcg@10")
"""How the best checkpoint is chosen, on the validation split: the lowest loss, the highest Spearman, the highest
NDCG@10, or the highest mean of the two."""


def selection_score(info: CheckpointInfo, select_by: str) -> float | None:
    """Higher is better: -val_loss, or the (mean of the) validation metrics named by `select_by`; None when the
    checkpoint did not record them."""
    if select_by not in SELECT_BY:
        raise CheckpointError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
    if select_by == "val_loss":
        return None if info.val_loss is None else -info.val_loss
    metrics = info.state.get("val_metrics") or {}
    values = [metrics.get(name) for name in select_by.split("+")]
    return None if any(value is None for value in values) else float(sum(values) / len(values))


def select_best(save_path: str | Path, select_by: str = "val_loss") -> CheckpointInfo:
    """The complete checkpoint with the best finite validation figure named by `select_by` (SELECT_BY; ties: the
    later step); the latest one when none recorded it. A non-finite figure never wins; when every recorded one
    is non-finite, that is an error.
    """
    checkpoints = list_checkpoints(save_path)
    if not checkpoints:
        raise CheckpointError(f"{save_path}: no complete checkpoint (run `embedforge train --save-path {save_path}`)")
    recorded = [(selection_score(info, select_by), info) for info in checkpoints]
    recorded = [(score, info) for score, info in recorded if score is not None]
    if not recorded:
        return checkpoints[-1]
    scored = [(score, info) for score, info in recorded if math.isfinite(score)]
    if not scored:
        sign = -1 if select_by == "val_loss" else 1
        figures = ", ".join(f"{info.name}: {sign * score}" for score, info in recorded)
        raise CheckpointError(f"{save_path}: no checkpoint has a finite {select_by} ({figures}); the run diverged")
    return max(scored, key=lambda pair: (pair[0], pair[1].step))[1]


def write_best_record(save_path: str | Path, info: CheckpointInfo, selected_by: str = "val_loss") -> Path:
    record = {"checkpoint": info.name, "step": info.step, "val_loss": info.val_loss, "selected_by": selected_by}
    return write_json_atomic(Path(save_path) / BEST_RECORD, record)


def read_best_record(save_path: str | Path) -> CheckpointInfo | None:
    """The checkpoint recorded as best in `save_path`, or None when nothing is recorded."""
    record_path = Path(save_path) / BEST_RECORD
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{record_path}: not valid JSON ({error})") from error
    try:  # a checkpoint directory beside the record, never a path elsewhere
        name = plain_file_name(record.get("checkpoint") if isinstance(record, dict) else None, record_path,
                               "checkpoint")
    except UnsafeFileNameError as error:
        raise CheckpointError(str(error)) from error
    try:
        return read_checkpoint(Path(save_path) / name)
    except CheckpointError as error:
        raise CheckpointError(f"{record_path} names a checkpoint that cannot be used: {error}") from error


def resolve_checkpoint(save_path: str | Path | None = None, checkpoint_dir: str | Path | None = None) -> CheckpointInfo:
    """An explicit checkpoint dir; else the recorded best of save_path; else its best by the run's --select-by."""
    if checkpoint_dir is not None:
        return read_checkpoint(checkpoint_dir)
    if save_path is None:
        raise CheckpointError("give a save path or a checkpoint directory")
    return read_best_record(save_path) or select_best(save_path, recorded_select_by(save_path))


def recorded_select_by(save_path: str | Path | None) -> str:
    """The --select-by the run in `save_path` was trained with (its train_config.json), else val_loss."""
    record = None if save_path is None else Path(save_path) / CONFIG_RECORD
    try:
        recorded = json.loads(record.read_text()).get("select_by") if record and record.is_file() else None
    except (OSError, ValueError, AttributeError):
        recorded = None
    return recorded if recorded in SELECT_BY else "val_loss"


def copy_best_model(save_path: str | Path, info: CheckpointInfo) -> Path:
    """Copy checkpoint `info`'s model and tokenizer files to the root of `save_path`; returns the record.

    Every file but the checkpoint's training state is copied, those in subfolders too (the sentence-transformers
    modules: 1_Pooling/config.json, ...). The swap is ordered so that a crash at any point never leaves files of
    two checkpoints that load as one model: the record goes first, then the weights and the other files of the
    previous copy; the new files are written atomically, the weights last, and `best_model.json` (which
    checkpoint, which files) once all are in place. A crash before the weights are in leaves a root without
    weights, which no loader takes for a model, until the next copy; a crash after them leaves the whole new
    model without its record. A lock file keeps two processes (train finishing, evaluate --select-best) from
    interleaving their copies.
    """
    from filelock import FileLock

    save_path = Path(save_path)
    names = sorted(child.relative_to(info.path).as_posix() for child in info.path.rglob("*") if child.is_file()
                   and not any(part.startswith(".") for part in child.relative_to(info.path).parts)
                   and child.relative_to(info.path).as_posix() not in _NOT_MODEL_FILES)
    names.sort(key=lambda name: name in WEIGHT_ENTRY_FILES)  # stable: the weights' entry files go last
    record_path = save_path / BEST_MODEL_RECORD
    with FileLock(save_path / ".best_model.lock"):
        previous = _recorded_files(record_path)
        record_path.unlink(missing_ok=True)
        for name in sorted(set(previous) | set(names), key=lambda name: name not in WEIGHT_ENTRY_FILES):
            (save_path / name).unlink(missing_ok=True)
        for name in {*previous, *names, BEST_MODEL_RECORD}:
            target = save_path / name
            if target.parent.is_dir():
                for leftover in target.parent.glob(f".{glob.escape(target.name)}.*"):  # a killed copy's temporaries
                    leftover.unlink(missing_ok=True)
        _remove_empty_folders(save_path, previous)
        for name in names:
            write_file_atomic(save_path / name, lambda temporary, source=info.path / name:
                              shutil.copyfile(source, temporary))
        record = {"checkpoint": info.name, "step": info.step, "val_loss": info.val_loss, "files": names}
        return write_json_atomic(record_path, record)


def _recorded_files(record_path: Path) -> list[str]:
    """The files a previous `best_model.json` lists (none when it is missing or unreadable): relative paths inside
    the save path only, never the save path's own records."""
    try:
        files = json.loads(record_path.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(files, list):
        return []
    names = []
    for name in files:
        try:
            relative_file_path(name, record_path, "files")
        except UnsafeFileNameError as error:
            log.warning("not removing %r: %s", name, error)
            continue
        if name not in _NOT_MODEL_FILES and not any(part.startswith(".") for part in name.split("/")):
            names.append(name)
    return names


def _remove_empty_folders(save_path: Path, names: list[str]) -> None:
    """Remove the subfolders of `names` (files removed from the save path) that are left empty."""
    for folder in sorted({(save_path / name).parent for name in names if "/" in name}, key=lambda p: -len(p.parts)):
        while folder != save_path and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def remove_stale_temporaries(save_path: Path) -> None:
    """Delete temporary dirs a killed run left behind (they never count as checkpoints) and restore a checkpoint
    it moved aside; a live writer's temporaries stay (embedforge.io.recover_directory)."""
    recover_directory(Path(save_path))


def save_checkpoint(save_path: Path, step: int, model, trainer_state: dict, training_state: dict) -> CheckpointInfo:
    """Atomically write `checkpoint-step-N`: model, trainer_state.json and what --resume needs."""
    import torch

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        torch.save(training_state, tmp / TRAINING_STATE_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        sizes = {str(file.relative_to(tmp)): file.stat().st_size for file in sorted(tmp.rglob("*")) if file.is_file()}
        (tmp / FILE_LIST).write_text(json.dumps(sizes, indent=2) + "\n")  # last: the checkpoint's own completeness

    return read_checkpoint(write_dir_atomic(Path(save_path) / checkpoint_name(step), write))


def prune_checkpoints(save_path: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints (and `protect`, the best so far); delete the rest."""
    if keep <= 0:
        return
    checkpoints = list_checkpoints(save_path)
    for info in checkpoints[:-keep]:
        if protect is None or info.path.resolve() != Path(protect).resolve():
            shutil.rmtree(info.path, ignore_errors=True)
