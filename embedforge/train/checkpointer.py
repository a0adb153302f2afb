"""The checkpointer: at each checkpoint, validate, write `checkpoint-step-N/`, log, prune, and judge early stopping.

Files under the save path: `checkpoint-step-N/` (embedforge/checkpoints.py), `metrics.jsonl` (one record per
checkpoint, appended once its checkpoint is on disk; a resumed run rewrites it from the checkpoint's own
history, so it never holds a record without a checkpoint or the same step twice) and `loss.png` (train and
validation loss so far). Rank 0 alone validates and writes; every
rank learns whether to stop, and whether rank 0 failed (then every rank raises instead of waiting). A
checkpoint is never written with non-finite weights or a non-finite validation loss.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from embedforge import checkpoints
from embedforge.data import Pair
from embedforge.devices import rng_state
from embedforge.io import append_line_durable, new_figure, save_figure, write_text_atomic
from embedforge.model import BertVectorModel
from embedforge.train.batching import duplicate_free_batches
from embedforge.train.config import TrainConfig
from embedforge.train.losses import loss_for, uses_in_batch

METRICS_LOG = "metrics.jsonl"
FAILED = 2  # broadcast by rank 0 in place of the stop flag when validating or saving failed
LOSS_PLOT = "loss.png"


class NonFiniteError(ValueError):
    """Training produced non-finite weights or validation figures; nothing was written."""


class CheckpointFailed(RuntimeError):
    """Rank 0 failed while validating or saving; raised on the other ranks."""


@dataclass
class Learner:
    """The model and what updates it. A checkpoint saves all of it but the autocast dtype."""

    model: BertVectorModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # autocast dtype; None trains in fp32

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


class Checkpointer:
    """Validates and saves; owns the best validation loss so far, the count of checkpoints since it last
    improved (early stopping) and the last step saved.

    `history` holds the records of the checkpoints before this one (those of the resumed run, if any);
    the early-stopping count picks up from them.
    """

    def __init__(self, config: TrainConfig, learner: Learner, val_pairs: Sequence[Pair], history: list[dict],
                 last_saved_step: int, device: torch.device, world_size: int, is_main: bool,
                 total_steps: int, train_pairs: int | None = None) -> None:
        self.config, self.learner, self.val_pairs, self.history = config, learner, val_pairs, history
        self.train_pairs = train_pairs  # recorded with each checkpoint (the model card's data sizes)
        self.save_path = Path(config.save_path)
        self.last_saved_step = last_saved_step
        self.device, self.world_size, self.is_main = device, world_size, is_main
        self.total_steps = total_steps  # the schedule's length, recorded with each checkpoint
        self.saved: list[Path] = []
        self.best_val_loss, self.bad_evals = math.inf, 0
        for record in history:
            if record.get("val_loss") is not None:
                self._score(record["val_loss"])
        if is_main and history:  # resumed: the log says what the checkpoint it resumes from says
            write_text_atomic(self.save_path / METRICS_LOG, "".join(json.dumps(r) + "\n" for r in history))

    def save(self, step: int, epoch: int, batches_done: int, train_loss: float | None, samples: int,
             train_seconds: float, skipped_steps: int) -> bool:
        """Validate and checkpoint at `step`. Returns True, on every rank, when early stopping says stop.

        `batches_done` counts the batches of `epoch` already trained on: a resumed run skips them; `skipped_steps`
        counts the steps skipped so far for a non-finite loss or gradient norm. A failure on
        rank 0 is broadcast before it is raised, so that the other ranks raise too instead of waiting.
        """
        stop, failure = False, None
        if self.is_main:
            try:
                stop = self._save(step, epoch, batches_done, train_loss, samples, train_seconds, skipped_steps)
            except BaseException as error:
                failure = error
        self.last_saved_step = step
        if self.world_size > 1:
            flag = torch.tensor([FAILED if failure is not None else int(stop)], device=self.device)
            dist.broadcast(flag, src=0)
            if flag.item() == FAILED and failure is None:
                raise CheckpointFailed(f"step {step}: rank 0 failed while validating or saving (its log says why); "
                                       "this rank stops too")
            stop = bool(flag.item())
        if failure is not None:
            raise failure
        return stop

    def _save(self, step: int, epoch: int, batches_done: int, train_loss: float | None, samples: int,
              train_seconds: float, skipped_steps: int) -> bool:
        model, config = self.learner.model, self.config
        # rank 0 alone validates: the loss gathers nothing from the other ranks
        loss_fn = loss_for(config, gather_across_ranks=False)
        val = validate(model, self.val_pairs, config.eval_batch_size, loss_fn, uses_in_batch(config.loss),
                       config.batch_size)
        model.train()
        _check_finite(model, val, step)
        record = {"step": step, "epoch": epoch, "train_loss": train_loss, **val,
                  "learning_rate": self.learner.learning_rate, "time": time.time(), "train_samples": samples,
                  "train_seconds": round(train_seconds, 3), "skipped_steps": skipped_steps}
        self.history.append(record)  # the checkpoint carries the history, this record included
        info = self._write_checkpoint(step, epoch, batches_done, train_loss, val)
        append_line_durable(self.save_path / METRICS_LOG, json.dumps(record))
        self.saved.append(info.path)
        self._score(val["val_loss"])
        if config.save_total_limit:
            best = checkpoints.select_best(self.save_path, config.select_by)
            checkpoints.prune_checkpoints(self.save_path, config.save_total_limit, protect=best.path)
        plot_losses(self.history, self.save_path / LOSS_PLOT)
        tqdm.write(f"step {step}: val_loss {val['val_loss']:.4f}  val_ndcg@10 {val['val_ndcg@10']:.4f}  -> {info.path}")
        return bool(config.early_stopping_patience and self.bad_evals >= config.early_stopping_patience)

    def _write_checkpoint(self, step: int, epoch: int, batches_done: int, train_loss: float | None,
                          val: dict[str, float]) -> checkpoints.CheckpointInfo:
        """checkpoint-step-N: the model, trainer_state.json (what evaluate reads) and what --resume needs."""
        config, model = self.config, self.learner.model
        state = {"step": step, "epoch": epoch, "train_loss": train_loss, "val_loss": val["val_loss"],
                 "val_metrics": val, "train_path": config.train_path, "val_path": config.val_path,
                 "train_pairs": self.train_pairs, "val_pairs": len(self.val_pairs), "base_model": model.base_model}
        training_state = {**self.learner.state_dict(), "rng": rng_state(), "global_step": step, "epoch": epoch,
                          "batches_done_in_epoch": batches_done, "total_steps": self.total_steps,
                          "history": self.history}
        return checkpoints.save_checkpoint(self.save_path, step, model, state, training_state)

    def _score(self, val_loss: float) -> None:
        """Count one checkpoint towards early stopping: a new lowest validation loss resets the count."""
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1


def _check_finite(model: BertVectorModel, val: dict[str, float], step: int) -> None:
    """Refuse to checkpoint a model with non-finite weights or validation figures."""
    bad = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if bad:
        raise NonFiniteError(f"step {step}: {len(bad)} weight tensor(s) are not finite (first: {bad[0]}); "
                             "no checkpoint written. Lower --learning-rate or check the training data")
    if not all(math.isfinite(value) for value in val.values()):
        raise NonFiniteError(f"step {step}: the validation figures are not finite ({val}); no checkpoint written. "
                             "Lower --learning-rate or check the validation data")


def validate(model: BertVectorModel, pairs: Sequence[Pair], batch_size: int, loss_fn: nn.Module,
             in_batch: bool = False, loss_batch_size: int = 16) -> dict[str, float]:
    """Validation loss (the training loss) and ranking metrics, texts embedded once each.

    The loss of weighted MSE is taken over all pairs at once; an in-batch loss depends on the batch, so it
    is the mean over duplicate-free batches of `loss_batch_size` pairs in file order (without hard negatives).
    """
    from embedforge.evaluate.runner import evaluate_pairs

    queries = model.with_prompt([p.query for p in pairs], "query")  # the model's prompts, as in training
    documents = model.with_prompt([p.document for p in pairs], "document")
    texts = list(dict.fromkeys([*queries, *documents]))
    vectors = dict(zip(texts, model.encode(texts, batch_size=batch_size, convert_to_numpy=True), strict=True))
    if in_batch:
        ids = {text: i for i, text in enumerate(dict.fromkeys(t for p in pairs for t in (p.query, p.document)))}
        batches = duplicate_free_batches(range(len(pairs)), [(ids[p.query], ids[p.document]) for p in pairs],
                                         loss_batch_size)
    else:
        batches = [np.arange(len(pairs))]
    losses = []
    with torch.no_grad():
        for batch in batches:
            rows = np.stack([vectors[queries[i]] for i in batch] + [vectors[documents[i]] for i in batch])
            losses.append(float(loss_fn(torch.from_numpy(rows), torch.tensor([pairs[i].rel for i in batch]),
                                        torch.tensor([pairs[i].weight for i in batch]))))
    result = {"val_loss": float(np.mean(losses))}
    report = evaluate_pairs(pairs, lambda batch: np.stack([vectors[t] for t in batch]), ks=(10,), mode="retrieval",
                            show_progress=False, prompts=model.prompts)
    result["val_ndcg@10"] = report["retrieval"]["ndcg@10"]
    result["val_spearman"] = report["spearman"]
    return result


def plot_losses(history: list[dict], path: Path) -> None:
    """Train and validation loss over steps, as a PNG."""
    steps = [r["step"] for r in history]
    figure, axis = new_figure(figsize=(7, 4))
    for key, marker, label in (("train_loss", "o", "train loss (since last checkpoint)"),
                               ("val_loss", "s", "validation loss")):
        values = [math.nan if r.get(key) is None else r[key] for r in history]
        axis.plot(steps, values, marker=marker, label=label)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title("embedforge training")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=110)
