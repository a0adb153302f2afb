"""Resuming a run: which checkpoint, whether its options allow it, and the state it restores.

A resumed run must share the data and model options recorded in the save path's train_config.json
(RESUME_MUST_MATCH): with them, it continues with the same data order, optimizer, schedule and RNG state, and
ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from embedforge import checkpoints
from embedforge.devices import set_rng_state
from embedforge.io import write_json_atomic
from embedforge.train.checkpointer import Learner
from embedforge.train.config import TrainConfig, TrainError


def find_resume_checkpoint(config: TrainConfig, save_path: Path) -> checkpoints.CheckpointInfo | None:
    if config.resume is None:
        return None
    if config.resume != "latest":
        return checkpoints.read_checkpoint(config.resume)
    found = checkpoints.list_checkpoints(save_path)
    if not found:
        raise TrainError(f"--resume: {save_path} holds no complete checkpoint to resume from")
    return found[-1]


@dataclass
class Position:
    """Where training starts: the beginning, or where the resumed checkpoint was written."""

    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` trained on before the checkpoint; a resumed run skips them
    history: list[dict] = field(default_factory=list)  # the metrics record of every checkpoint so far

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far for a non-finite loss or gradient norm."""
        return self.history[-1].get("skipped_steps", 0) if self.history else 0


def restore(learner: Learner, checkpoint: checkpoints.CheckpointInfo, total_steps: int) -> Position:
    """Load the optimizer, schedule, scaler and RNG states saved with `checkpoint`; returns where it stopped.

    The file is read with `weights_only=True`: tensors, numbers, strings and containers only, so from torch 2.6
    on (which embedforge requires) a checkpoint from elsewhere cannot run code; before 2.6, `weights_only=True`
    could be bypassed to run code (CVE-2025-32434). A run extended past its recorded length (a larger --max-steps or
    --num-epochs) follows the schedule of the new length from the step it stopped at: no second warmup, the
    learning rate continues on the linear decay that now ends at the new last step.
    """
    path = checkpoint.path / checkpoints.TRAINING_STATE_FILE
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise checkpoints.CheckpointError(f"{path}: refused to load: it holds more than tensors and plain values "
                                          f"(was it written by this version of embedforge?): {error}") from error
    learner.load_state_dict(state)
    for group, base_lr, factor in zip(learner.optimizer.param_groups, learner.scheduler.base_lrs,
                                      learner.scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * factor(learner.scheduler.last_epoch)  # this run's schedule (total_steps), not the saved
    set_rng_state(state["rng"])
    if state.get("total_steps", total_steps) != total_steps:
        tqdm.write(f"resuming at step {state['global_step']} of a run now {total_steps} steps long "
                   f"(was {state['total_steps']}): the learning rate decays to 0 at step {total_steps}")
    return Position(state["global_step"], state["epoch"], state["batches_done_in_epoch"], state.get("history", []))


RESUME_MUST_MATCH = ("train_path", "val_path", "batch_size", "seed", "group_by_length", "grad_accum_steps",
                     "max_length", "model_name", "pooling", "projection_dim", "freeze_word_embeddings",
                     "frozen_layers", "attention_dropout", "query_prompt", "document_prompt")
"""Data and model options a resumed run must share with the run it continues (the data order and the model)."""
FROM_THE_MODEL_WHEN_UNSET = ("max_length", "query_prompt", "document_prompt")
"""Options that, left unset (None) on --resume, are the resumed checkpoint's own: no conflict to report."""


def refuse_existing_run(save_path: Path) -> None:
    if save_path.is_dir() and checkpoints.list_checkpoints(save_path):
        raise TrainError(f"{save_path} already holds checkpoints: pass --resume to continue that run, "
                         "or choose another --save-path")


def check_resumed_config(config: TrainConfig, run_path: Path) -> None:
    """Refuse to resume with other data or model options than the run recorded in its train_config.json."""
    record = run_path / checkpoints.CONFIG_RECORD
    if not record.is_file():
        return
    try:
        recorded = json.loads(record.read_text())
    except ValueError as error:
        raise TrainError(f"{record}: not valid JSON ({error}); cannot check the resumed options") from error
    current = asdict(config)
    changed = [f"--{name.replace('_', '-')} {recorded[name]!r} -> {current[name]!r}"
               for name in RESUME_MUST_MATCH if name in recorded and recorded[name] != current[name]
               and not (name in FROM_THE_MODEL_WHEN_UNSET and current[name] is None)]
    if changed:
        raise TrainError(f"--resume: {', '.join(changed)}: these data/model options differ from the run in "
                         f"{run_path} ({record}); resume with the same ones, or start a new --save-path")


def record_config(config: TrainConfig, save_path: Path) -> None:
    """Create the save path; record the config (what a resumed run is checked against)."""
    save_path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(save_path / checkpoints.CONFIG_RECORD, asdict(config))
