"""The training loop: plain PyTorch, readable top to bottom.

One step = one batch of (query, document, rel, weight) pairs (and any hard negatives) -> embed them in one
pass -> the --loss (train/losses/: weighted MSE of cosine against rel, in-batch InfoNCE, or both) -> backward.
Every `grad_accum_steps` batches: clip gradients at 1.0, AdamW step, linear warmup/decay schedule step.
Every `save_steps` optimizer steps (and at the end): validation loss, validation NDCG@10 and an atomic checkpoint.

`_train` reads as the run: read the data (train/pairs.py), `load_model`, `build_learner` (AdamW, schedule,
scaler), `restore` a resumed state (train/resume.py), then `run_loop`: `step_batches` yields what each optimizer
step consumes, `optimizer_step` clips and steps (one host sync per step), and the `Checkpointer`
(train/checkpointer.py) validates and writes.

Multi-GPU / multi-node: run under `torchrun`; each rank trains on its shard (DistributedSampler-style
sharding of the same seeded permutation), DDP averages gradients, rank 0 alone writes files.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from embedforge import checkpoints
from embedforge.data import DataError
from embedforge.devices import resolve_amp, resolve_device, seed_everything
from embedforge.model import BertVectorModel
from embedforge.model_card import write_model_card
from embedforge.train.checkpointer import Checkpointer, Learner
from embedforge.train.config import TrainConfig, TrainError
from embedforge.train.dropout import replace_dropout
from embedforge.train.losses import LOSSES, loss_for, uses_in_batch
from embedforge.train.packing import choose_packing, packed_hidden_states
from embedforge.train.pairs import TokenizedPairs, read_data
from embedforge.train.resume import (
    Position,
    check_resumed_config,
    find_resume_checkpoint,
    record_config,
    refuse_existing_run,
    restore,
)


@dataclass
class TrainResult:
    save_path: Path
    checkpoints: list[Path] = field(default_factory=list)
    global_step: int = 0
    best_checkpoint: Path | None = None
    stopped_early: bool = False
    model: BertVectorModel | None = None


# -- setup helpers -------------------------------------------------------------------------


def adamw(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and LayerNorm weights.

    The fused implementation updates each tensor in one pass. On CPU the optimizer step is bound by
    memory bandwidth (22M parameters, four tensors each), and the default per-tensor loop of ~10
    elementwise passes made it the slowest part of a MiniLM training step.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = parameter.ndim < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias")
        (no_decay if skip else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, fused=True)


def clip_gradients(model: nn.Module, max_norm: float, step_loss: torch.Tensor) -> tuple[float, float]:
    """Scale all gradients by max_norm / ||g|| when their global L2 norm ||g|| exceeds max_norm; returns the
    step's loss and ||g|| as host floats, read in one transfer.

    The same as nn.utils.clip_grad_norm_, which also multiplies every gradient by 1.0 when the norm is
    within bounds: fine-tuning norms here sit around 0.1, so that pass over all gradients is skipped.
    """
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    norm = nn.utils.get_total_norm(gradients, foreach=True)
    loss_value, norm_value = torch.stack([step_loss.to(norm.device, torch.float64), norm.double()]).tolist()
    if not norm_value <= max_norm:  # also true for a non-finite norm, which clipping turns into nan as torch does
        nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm, foreach=True)
    return loss_value, norm_value


def freeze_bottom_layers(model: BertVectorModel, count: int) -> None:
    """Freeze the embeddings and the lowest `count` transformer layers.

    Nothing below the first trainable layer needs a gradient, so backward stops there: each frozen layer
    saves its share of the backward pass (about 2/3 of a layer's training cost).
    """
    layers = model.encoder.encoder.layer
    if not 0 <= count < len(layers):
        raise TrainError(f"--frozen-layers must be between 0 and {len(layers) - 1} (the model has {len(layers)} "
                         f"layers), got {count}")
    for module in (model.encoder.embeddings, *layers[:count]):
        module.requires_grad_(False)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Learning rate factor: rises linearly from 0 over warmup_steps, then falls linearly to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class PairVectors(nn.Module):
    """The L2-normalised vectors of a collated batch: queries, documents, then any hard negatives.

    One encoder pass for all of them: larger matrix products, one embedding-gradient accumulation per step
    instead of two, and one forward per backward (what DistributedDataParallel needs). With `pack_tokens`
    (and a BERT-layout encoder) the pass skips the padding tokens (train/packing.py); other encoders
    (DeBERTa, ...) run their own transformers forward, and a log line says so once.
    """

    def __init__(self, model: BertVectorModel, pack_tokens: bool = True) -> None:
        super().__init__()
        self.model = model
        self.pack_tokens = choose_packing(model.encoder, pack_tokens)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pack_tokens:
            hidden = packed_hidden_states(self.model.encoder, input_ids, attention_mask)
            return F.normalize(self.model.pooled(hidden, attention_mask), p=2, dim=-1)
        return self.model(input_ids, attention_mask)


# -- the run -------------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune per `config`; returns where the checkpoints are."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world_size > 1
    device = resolve_device(config.device, local_rank)
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    is_main = rank == 0
    try:
        return _train(config, device, rank, world_size, is_main)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _check_config(config: TrainConfig) -> None:
    positive = {"batch_size": config.batch_size, "num_epochs": config.num_epochs, "save_steps": config.save_steps,
                "grad_accum_steps": config.grad_accum_steps, "max_bad_steps": config.max_bad_steps}
    if config.max_length is not None:
        positive["max_length"] = config.max_length
    for name, value in positive.items():
        if value < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if config.learning_rate <= 0:
        raise TrainError(f"--learning-rate must be > 0, got {config.learning_rate}")
    if config.warmup_steps < 0:
        raise TrainError(f"--warmup-steps must be >= 0, got {config.warmup_steps}")
    if config.max_steps is not None and config.max_steps < 1:
        raise TrainError(f"--max-steps must be >= 1, got {config.max_steps}")
    if config.loss not in LOSSES:
        raise TrainError(f"--loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    if config.scale <= 0:
        raise TrainError(f"--scale must be > 0, got {config.scale}")
    if config.in_batch_weight < 0:
        raise TrainError(f"--in-batch-weight must be >= 0, got {config.in_batch_weight}")
    if not 0 <= config.positive_threshold <= 1:
        raise TrainError(f"--positive-threshold must be in [0, 1], got {config.positive_threshold}")
    if config.rel_power < 0:
        raise TrainError(f"--rel-power must be >= 0, got {config.rel_power}")
    if config.negative_threshold is not None and not 0 <= config.negative_threshold < config.positive_threshold:
        raise TrainError(f"--negative-threshold must be in [0, --positive-threshold), got {config.negative_threshold}")
    if config.gather_across_ranks and not uses_in_batch(config.loss):
        raise TrainError("--gather-across-ranks needs an in-batch --loss (weighted-mse compares each pair alone)")
    if config.select_by not in checkpoints.SELECT_BY:
        raise TrainError(f"--select-by must be one of {', '.join(checkpoints.SELECT_BY)}, got {config.select_by!r}")
    if config.matryoshka_dims is not None and (not config.matryoshka_dims or min(config.matryoshka_dims) < 1):
        raise TrainError(f"--matryoshka-dims must list sizes >= 1, got {config.matryoshka_dims}")


def _train(config: TrainConfig, device: torch.device, rank: int, world_size: int, is_main: bool) -> TrainResult:
    save_path = Path(config.save_path)
    with _all_ranks_agree(device, world_size):  # every check that can stop the run, on every rank, before training
        _check_config(config)
        train_pairs, val_pairs = read_data(config)
        if is_main:  # a killed run's temporaries go, a checkpoint it moved aside comes back (before listing)
            checkpoints.remove_stale_temporaries(save_path)
    with _all_ranks_agree(device, world_size):
        if config.resume is None:
            refuse_existing_run(save_path)
        else:
            check_resumed_config(config, save_path if config.resume == "latest" else Path(config.resume).parent)
        resume_from = find_resume_checkpoint(config, save_path)
    seed_everything(config.seed)
    model = load_model(config, device, resume_from)
    data = TokenizedPairs.for_config(train_pairs, model, config)
    batches_per_epoch = len(data.batches(config.batch_size, config.seed, 0, config.group_by_length, rank, world_size))
    total_steps = _count_steps(config, batches_per_epoch)
    learner = build_learner(config, model, device, total_steps)
    start = Position() if resume_from is None else restore(learner, resume_from, total_steps)
    if is_main:
        record_config(config, save_path)
    checkpointer = Checkpointer(config, learner, val_pairs, start.history,
                                last_saved_step=-1 if resume_from is None else start.global_step,
                                device=device, world_size=world_size, is_main=is_main, total_steps=total_steps,
                                train_pairs=len(train_pairs))
    global_step, stopped_early = run_loop(config, learner, data, start, total_steps, checkpointer, device, rank,
                                          world_size)
    result = TrainResult(save_path, checkpointer.saved, global_step, stopped_early=stopped_early, model=model)
    if is_main:
        best = checkpoints.select_best(save_path, config.select_by)
        checkpoints.copy_best_model(save_path, best)  # the save path itself loads as the best model
        write_model_card(save_path)
        result.best_checkpoint = best.path
    return result


@contextmanager
def _all_ranks_agree(device: torch.device, world_size: int) -> Iterator[None]:
    """Run the checks inside on every rank, then agree: if any rank failed, every rank raises (the failed one
    its own error), so no rank goes on to wait in a collective for one that has stopped."""
    failure = None
    try:
        yield
    except (TrainError, DataError, checkpoints.CheckpointError) as error:
        failure = error
    if world_size > 1:
        flag = torch.tensor([int(failure is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and failure is None:
            raise TrainError("another rank refused to start (its log says why); this rank stops too")
    if failure is not None:
        raise failure


def load_model(config: TrainConfig, device: torch.device,
               resume_from: checkpoints.CheckpointInfo | None) -> BertVectorModel:
    """The base model (or the checkpoint resumed from) on `device`, with the frozen parts and dropout asked for."""
    if resume_from is not None:
        model = BertVectorModel.from_pretrained(resume_from.path)
    else:
        model = BertVectorModel.from_base(config.model_name, config.pooling, config.projection_dim,
                                          config.max_length, attention_dropout=config.attention_dropout,
                                          prompts={"query": config.query_prompt, "document": config.document_prompt})
    if config.freeze_word_embeddings:
        # The vocabulary matrix is half of MiniLM's weights; its dense gradient and AdamW update cost more
        # than they bring when fine-tuning on a few thousand pairs.
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    if config.frozen_layers:
        freeze_bottom_layers(model, config.frozen_layers)
    if config.matryoshka_dims is not None:
        if max(config.matryoshka_dims) > model.dim:
            raise TrainError(f"--matryoshka-dims {max(config.matryoshka_dims)} exceeds the model's {model.dim} "
                             "dimensions")
        model.matryoshka_dims = sorted(set(config.matryoshka_dims), reverse=True)
    if config.fast_cpu_dropout and device.type == "cpu":
        replace_dropout(model)  # same dropout, cheaper random masks (train/dropout.py); CUDA keeps its fused kernel
    return model.to(device)


def _count_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps in the whole run, given the batches of this rank's first epoch."""
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum_steps)
    total_steps = steps_per_epoch * config.num_epochs
    return total_steps if config.max_steps is None else min(total_steps, config.max_steps)


def build_learner(config: TrainConfig, model: BertVectorModel, device: torch.device, total_steps: int) -> Learner:
    """AdamW, the warmup/decay schedule over `total_steps`, and the fp16 gradient scaler (a no-op otherwise)."""
    optimizer = adamw(model, config.learning_rate, config.weight_decay)
    scheduler = linear_schedule(optimizer, config.warmup_steps, total_steps)
    amp_dtype = resolve_amp(config.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Learner(model, optimizer, scheduler, scaler, amp_dtype)


# -- the loop ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepBatches:
    """What one optimizer step consumes: grad_accum_steps batches (fewer at an epoch's end), and where the
    data stands after them (the epoch, and the batches of it trained on)."""

    batches: list[np.ndarray]
    epoch: int
    batches_done: int


def step_batches(config: TrainConfig, data: TokenizedPairs, start: Position, rank: int,
                 world_size: int) -> Iterator[StepBatches]:
    """Every optimizer step's batches from `start` on, epoch after epoch (a resumed run skips those done)."""
    skip = start.batches_done
    for epoch in range(start.epoch, config.num_epochs):
        batches = data.batches(config.batch_size, config.seed, epoch, config.group_by_length, rank, world_size)
        for first in range(skip, len(batches), config.grad_accum_steps):
            end = min(first + config.grad_accum_steps, len(batches))
            after = (epoch, end) if end < len(batches) else (epoch + 1, 0)
            yield StepBatches(batches[first:end], *after)
        skip = 0


def run_loop(config: TrainConfig, learner: Learner, data: TokenizedPairs, start: Position, total_steps: int,
             checkpointer: Checkpointer, device: torch.device, rank: int, world_size: int) -> tuple[int, bool]:
    """Train from `start` to the last step or an early stop; returns the last step and whether it stopped early.

    A step whose loss or gradient norm is not finite is skipped (see BadSteps).
    """
    pair_vectors, loss_fn = _pair_vectors(learner.model, config.pack_tokens, device, world_size), loss_for(config)
    steps = step_batches(config, data, start, rank, world_size)
    step, position, stopped_early = start.global_step, (start.epoch, start.batches_done), False
    bad_steps, window = BadSteps(config.max_bad_steps, skipped=start.skipped_steps), LossWindow()
    progress = tqdm(total=total_steps, initial=step, desc="training", unit="step",
                    disable=not (rank == 0 and config.show_progress), dynamic_ncols=True)
    clock = Stopwatch()  # throughput counts training only, not validating and checkpointing
    samples = 0
    learner.model.train()
    while step < total_steps and not stopped_early:
        planned = next(steps, None)
        if planned is None:
            break
        step_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed over the step's batches
        for batch in planned.batches:
            inputs = data.collate(batch, device)
            # forward: queries and documents in one encoder pass
            with torch.autocast(device.type, dtype=learner.amp_dtype or torch.float32,
                                enabled=learner.amp_dtype is not None):
                vectors = pair_vectors(inputs["input_ids"], inputs["attention_mask"])
            loss = loss_fn(vectors, inputs["rel"], inputs["weight"])
            # backward: gradients add up over the step's batches
            learner.scaler.scale(loss / config.grad_accum_steps).backward()
            step_loss += loss.detach().double()
            samples += len(batch) * world_size
        taken, loss_value, norm = optimizer_step(learner, step_loss, device, world_size)
        step += 1
        position = (planned.epoch, planned.batches_done)
        bad_steps.record(step, taken, loss_value, norm)
        if taken:
            window.add(loss_value, len(planned.batches))
        _show_progress(progress, window.mean, learner.learning_rate, samples / clock.seconds(), bad_steps.skipped)
        if step % config.save_steps == 0:  # validate and checkpoint every save_steps steps
            with clock.paused():
                stopped_early = checkpointer.save(step, *position, window.mean, samples, clock.seconds(),
                                                  bad_steps.skipped)
            window = LossWindow()
    progress.close()
    if checkpointer.last_saved_step != step:  # the last step, unless it was just saved
        checkpointer.save(step, *position, window.mean, samples, clock.seconds(), bad_steps.skipped)
    return step, stopped_early


def optimizer_step(learner: Learner, step_loss: torch.Tensor, device: torch.device,
                   world_size: int) -> tuple[bool, float, float]:
    """Clip the gradients at 1.0 and step AdamW, unless the loss or the gradient norm is not finite on some rank;
    then zero the gradients and move the schedule on either way.

    Returns (whether the step was taken, the step's loss, the gradient norm); reading the last two is the step's
    one host sync (two more with several ranks: agreeing to step).
    """
    learner.scaler.unscale_(learner.optimizer)
    loss, norm = clip_gradients(learner.model, max_norm=1.0, step_loss=step_loss)
    # fp16's scaler skips steps of non-finite gradients itself (lowering its scale): only the loss counts there
    taken = _finite_on_every_rank(loss, norm if not learner.scaler.is_enabled() else 0.0, device, world_size)
    if taken:
        learner.scaler.step(learner.optimizer)
        learner.scaler.update()
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scheduler.step()
    return taken, loss, norm


class LossWindow:
    """The mean training loss per batch over the steps taken since the last checkpoint (None before any)."""

    def __init__(self) -> None:
        self.total, self.batches = 0.0, 0

    def add(self, step_loss: float, batches: int) -> None:
        self.total, self.batches = self.total + step_loss, self.batches + batches

    @property
    def mean(self) -> float | None:
        return self.total / self.batches if self.batches else None


class BadSteps:
    """Counts optimizer steps skipped for a non-finite loss or gradient norm (in all, and in a row); stops the
    run when `limit` come in a row.

    A skipped step's batches count as trained and the schedule moves on, but the optimizer does not step.
    """

    def __init__(self, limit: int, skipped: int = 0) -> None:
        self.limit, self.skipped, self.in_a_row = limit, skipped, 0

    def record(self, step: int, taken: bool, loss: float, norm: float) -> None:
        if taken:
            self.in_a_row = 0
            return
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        if self.in_a_row >= self.limit:
            raise TrainError(
                f"step {step}: the loss or the gradient norm was not finite in {self.in_a_row} "
                f"steps in a row (--max-bad-steps {self.limit}; last loss {loss:.4g}, "
                f"gradient norm {norm:.4g}); the usual causes: a learning rate too high (try a lower "
                "--learning-rate or more --warmup-steps), fp16 overflow (try --amp bf16 or off), or "
                "extreme rel/weight values in the training data")


def _show_progress(progress: tqdm, window_loss: float | None, learning_rate: float, samples_s: float,
                   skipped: int) -> None:
    progress.update(1)
    progress.set_postfix(loss="-" if window_loss is None else f"{window_loss:.4f}", lr=f"{learning_rate:.2e}",
                         samples_s=f"{samples_s:.1f}", skipped=skipped)


def _finite_on_every_rank(loss: float, norm: float, device: torch.device, world_size: int) -> bool:
    """Whether this step's loss and gradient norm are finite on every rank (ranks must agree to step)."""
    finite = math.isfinite(loss) and math.isfinite(norm)
    if world_size > 1:
        flag = torch.tensor([float(finite)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite


def _pair_vectors(model: BertVectorModel, pack_tokens: bool, device: torch.device, world_size: int) -> nn.Module:
    """The training forward; wrapped in DistributedDataParallel, which averages gradients, across ranks."""
    pair_vectors = PairVectors(model, pack_tokens)
    if world_size == 1:
        return pair_vectors
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(pair_vectors, device_ids=device_ids)


class Stopwatch:
    """Seconds since it started, less the time spent inside `paused()`."""

    def __init__(self) -> None:
        self.started, self.paused_for = time.perf_counter(), 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.paused_for

    @contextmanager
    def paused(self) -> Iterator[None]:
        paused_at = time.perf_counter()
        try:
            yield
        finally:
            self.paused_for += time.perf_counter() - paused_at
