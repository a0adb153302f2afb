"""The training loop: plain PyTorch, readable top to bottom.

One step = one batch of (query, document, rel, weight) pairs (and any hard negatives) -> embed them in one
pass -> the --loss (train/losses/: weighted MSE of cosine against rel, in-batch InfoNCE, or both) -> backward.
Every `grad_accum_steps` batches: clip gradients at 1.0, AdamW step, linear warmup/decay schedule step.
Every `save_steps` optimizer steps (and at the end): validation loss, validation NDCG@10 and an atomic checkpoint.

`_train` reads as the run: read the data, `load_model`, `build_learner` (AdamW, schedule, scaler), `restore`
a resumed state, then `run_loop`; its `Checkpointer` (train/checkpointer.py) validates and writes.

Multi-GPU / multi-node: run under `torchrun`; each rank trains on its shard (DistributedSampler-style
sharding of the same seeded permutation), DDP averages gradients, rank 0 alone writes files.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from embedforge import checkpoints
from embedforge.data import DataError, Pair, read_pairs
from embedforge.devices import resolve_amp, resolve_device, seed_everything, set_rng_state
from embedforge.io import write_json_atomic
from embedforge.model import BertVectorModel, pad_batch
from embedforge.model_card import write_model_card
from embedforge.train.batching import duplicate_free_batches, hard_negatives, pick_hard_negatives
from embedforge.train.checkpointer import Checkpointer, Learner
from embedforge.train.config import TrainConfig
from embedforge.train.dropout import replace_dropout
from embedforge.train.losses import LOSSES, loss_for, uses_in_batch
from embedforge.train.packing import choose_packing, packed_hidden_states


@dataclass
class TrainResult:
    save_path: Path
    checkpoints: list[Path] = field(default_factory=list)
    global_step: int = 0
    best_checkpoint: Path | None = None
    stopped_early: bool = False
    model: BertVectorModel | None = None


class TrainError(ValueError):
    """A training setup that cannot run; the message says which option or file is wrong."""


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


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Scale all gradients by max_norm / ||g|| when their global L2 norm ||g|| exceeds max_norm.

    The same as nn.utils.clip_grad_norm_, which also multiplies every gradient by 1.0 when the norm is
    within bounds: fine-tuning norms here sit around 0.1, so that pass over all gradients is skipped.
    """
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    norm = nn.utils.get_total_norm(gradients, foreach=True)
    if not norm <= max_norm:  # also true for a non-finite norm, which clipping turns into nan as torch does
        nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm, foreach=True)
    return float(norm)


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


# -- data ----------------------------------------------------------------------------------


class TokenizedPairs:
    """Pairs with both texts tokenized once up front (unique texts only); batches pad dynamically."""

    def __init__(self, pairs: Sequence[Pair], model: BertVectorModel, unique_texts: bool = False,
                 positive_threshold: float = 0.5, negative_threshold: float | None = None) -> None:
        """unique_texts: no text twice in a batch (for in-batch losses). negative_threshold: each positive
        pair brings one document of its query with a lower rel as a hard negative (train/batching.py)."""
        queries = model.with_prompt([p.query for p in pairs], "query")
        documents = model.with_prompt([p.document for p in pairs], "document")
        texts = list(dict.fromkeys(text for pair in zip(queries, documents, strict=True) for text in pair))
        index = {text: i for i, text in enumerate(texts)}
        self.token_ids = model.tokenize(texts)  # prompted texts: the prompt counts towards max_length
        self.query = np.array([index[text] for text in queries])
        self.document = np.array([index[text] for text in documents])
        # The texts as written, without prompts: a sentence that is one pair's query and another's document is
        # one text for the duplicate check of in-batch batches, whatever prompt each side gets.
        written = {text: i for i, text in enumerate(dict.fromkeys(t for p in pairs for t in (p.query, p.document)))}
        self.written = [(written[p.query], written[p.document]) for p in pairs]
        self.rel = torch.tensor([p.rel for p in pairs], dtype=torch.float32)
        self.weight = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
        self.length = np.array([max(len(self.token_ids[q]), len(self.token_ids[d]))
                                for q, d in zip(self.query, self.document, strict=True)])
        self.pad_id = model.tokenizer.pad_token_id or 0
        self.unique_texts = unique_texts
        self.negatives = None if negative_threshold is None else hard_negatives(
            self.query, self.document, self.rel.tolist(), positive_threshold, negative_threshold)

    def __len__(self) -> int:
        return len(self.rel)

    def batches(self, batch_size: int, seed: int, epoch: int, group_by_length: bool, rank: int = 0,
                world_size: int = 1) -> list[np.ndarray]:
        """This rank's batches of pair indices for one epoch; the same on every call with the same arguments.

        With group_by_length, each window of 50 batches is sorted by length before cutting, so a
        batch holds texts of similar length (less padding); batch order is then shuffled.
        """
        generator = np.random.default_rng(seed + epoch)
        order = generator.permutation(len(self))
        if self.unique_texts:
            return self._unique_batches(order, generator, batch_size, group_by_length, rank, world_size)
        per_rank = math.ceil(len(order) / world_size)
        order = np.resize(order, per_rank * world_size)[rank::world_size]  # pad by wrapping, like DistributedSampler
        if group_by_length:
            window = batch_size * 50
            order = np.concatenate([chunk[np.argsort(-self.length[chunk], kind="stable")]
                                    for chunk in np.array_split(order, max(1, math.ceil(len(order) / window)))])
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if group_by_length:
            batches = [batches[i] for i in generator.permutation(len(batches))]
        return batches

    def _unique_batches(self, order: np.ndarray, generator: np.random.Generator, batch_size: int,
                        group_by_length: bool, rank: int, world_size: int) -> list[np.ndarray]:
        """`batches` without a text twice in the global batch (all ranks' batches together)."""
        global_size = batch_size * world_size
        if group_by_length:
            window = global_size * 50
            order = np.concatenate([chunk[np.argsort(-self.length[chunk], kind="stable")]
                                    for chunk in np.array_split(order, max(1, math.ceil(len(order) / window)))])
        batches = duplicate_free_batches(order, self.written, global_size)
        if group_by_length:
            batches = [batches[i] for i in generator.permutation(len(batches))]
        return [batch[rank::world_size] for batch in batches if len(batch) >= world_size]

    def collate(self, batch: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Queries, documents, then any hard negatives as one padded [2B + H, T] batch, with rel and weight [B]."""
        text_ids = [*self.query[batch].tolist(), *self.document[batch].tolist()]
        if self.negatives is not None:
            text_ids += pick_hard_negatives(batch, self.negatives, set(text_ids))
        texts = [self.token_ids[i] for i in text_ids]
        input_ids, attention_mask = pad_batch(texts, self.pad_id, device)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "rel": self.rel[batch].to(device), "weight": self.weight[batch].to(device)}


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


def load_pairs(path: str | None, what: str) -> list[Pair]:
    if path is None:
        from embedforge.sample_data import sample_path

        path = str(sample_path(what))
    return read_pairs(path)


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
    if config.matryoshka_dims is not None and (not config.matryoshka_dims or min(config.matryoshka_dims) < 1):
        raise TrainError(f"--matryoshka-dims must list sizes >= 1, got {config.matryoshka_dims}")


def _train(config: TrainConfig, device: torch.device, rank: int, world_size: int, is_main: bool) -> TrainResult:
    save_path = Path(config.save_path)
    with _all_ranks_agree(device, world_size):  # every check that can stop the run, on every rank, before training
        _check_config(config)
        train_pairs, val_pairs = _read_data(config)
        if is_main:  # a killed run's temporaries go, a checkpoint it moved aside comes back (before listing)
            checkpoints.remove_stale_temporaries(save_path)
    with _all_ranks_agree(device, world_size):
        if config.resume is None:
            _refuse_existing_run(save_path)
        else:
            _check_resumed_config(config, save_path if config.resume == "latest" else Path(config.resume).parent)
        resume_from = _find_resume_checkpoint(config, save_path)
    seed_everything(config.seed)
    model = load_model(config, device, resume_from)
    in_batch = uses_in_batch(config.loss)
    data = TokenizedPairs(train_pairs, model, unique_texts=in_batch, positive_threshold=config.positive_threshold,
                          negative_threshold=config.negative_threshold if in_batch else None)
    batches_per_epoch = len(data.batches(config.batch_size, config.seed, 0, config.group_by_length, rank, world_size))
    total_steps = _count_steps(config, batches_per_epoch)
    learner = build_learner(config, model, device, total_steps)
    start = Position() if resume_from is None else restore(learner, resume_from, total_steps)
    if is_main:
        _prepare_save_path(config, save_path)
    checkpointer = Checkpointer(config, learner, val_pairs, start.history,
                                last_saved_step=-1 if resume_from is None else start.global_step,
                                device=device, world_size=world_size, is_main=is_main, total_steps=total_steps,
                                train_pairs=len(train_pairs))
    global_step, stopped_early = run_loop(config, learner, data, start, total_steps, checkpointer, device, rank,
                                          world_size)
    result = TrainResult(save_path, checkpointer.saved, global_step, stopped_early=stopped_early, model=model)
    if is_main:
        best = checkpoints.select_best(save_path)
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


def _read_data(config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """Training and validation pairs. Read and checked before anything heavy loads: a bad file stops the run at once."""
    try:
        train_pairs = load_pairs(config.train_path, "train")
        val_pairs = load_pairs(config.val_path, "valid")
    except DataError as error:
        raise TrainError(str(error)) from error
    if sum(p.weight for p in train_pairs) == 0:
        raise TrainError(f"{config.train_path}: every record has weight 0; nothing to learn from")
    return train_pairs, val_pairs


def _find_resume_checkpoint(config: TrainConfig, save_path: Path) -> checkpoints.CheckpointInfo | None:
    if config.resume is None:
        return None
    if config.resume != "latest":
        return checkpoints.read_checkpoint(config.resume)
    found = checkpoints.list_checkpoints(save_path)
    if not found:
        raise TrainError(f"--resume: {save_path} holds no complete checkpoint to resume from")
    return found[-1]


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


@dataclass
class Position:
    """Where training starts: the beginning, or where the resumed checkpoint was written."""

    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` trained on before the checkpoint; a resumed run skips them
    history: list[dict] = field(default_factory=list)  # the metrics record of every checkpoint so far


def restore(learner: Learner, checkpoint: checkpoints.CheckpointInfo, total_steps: int) -> Position:
    """Load the optimizer, schedule, scaler and RNG states saved with `checkpoint`; returns where it stopped.

    The file is read with `weights_only=True`: tensors, numbers, strings and containers only, so a checkpoint
    from elsewhere cannot run code. A run extended past its recorded length (a larger --max-steps or
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
    learner.scheduler._last_lr = [group["lr"] for group in learner.optimizer.param_groups]
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


def _refuse_existing_run(save_path: Path) -> None:
    if save_path.is_dir() and checkpoints.list_checkpoints(save_path):
        raise TrainError(f"{save_path} already holds checkpoints: pass --resume to continue that run, "
                         "or choose another --save-path")


def _check_resumed_config(config: TrainConfig, run_path: Path) -> None:
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


def _prepare_save_path(config: TrainConfig, save_path: Path) -> None:
    """Create the save path; record the config."""
    save_path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(save_path / checkpoints.CONFIG_RECORD, asdict(config))


# -- the loop ------------------------------------------------------------------------------


def run_loop(config: TrainConfig, learner: Learner, data: TokenizedPairs, start: Position, total_steps: int,
             checkpointer: Checkpointer, device: torch.device, rank: int, world_size: int) -> tuple[int, bool]:
    """Train from `start` to the last step or an early stop; returns the last step and whether it stopped early.

    A step whose loss or gradient norm is not finite is skipped (see BadSteps).
    """
    model, optimizer, scheduler, scaler, amp_dtype = (learner.model, learner.optimizer, learner.scheduler,
                                                      learner.scaler, learner.amp_dtype)
    pair_vectors, loss_fn = _pair_vectors(model, config.pack_tokens, device, world_size), loss_for(config)
    global_step, epoch, skip_batches = start.global_step, start.epoch, start.batches_done
    position = (epoch, skip_batches)  # (epoch, batches of it trained on) after the last step
    progress = tqdm(total=total_steps, initial=global_step, desc="training", unit="step",
                    disable=not (rank == 0 and config.show_progress), dynamic_ncols=True)
    clock = Stopwatch()  # throughput counts training only, not validating and checkpointing
    running_loss, running_count, samples, window_loss = 0.0, 0, 0, None
    step_loss, step_count = 0.0, 0
    bad_steps = BadSteps(config.max_bad_steps)
    model.train()
    stopped_early, done = False, global_step >= total_steps
    while not done and epoch < config.num_epochs:
        batches = data.batches(config.batch_size, config.seed, epoch, config.group_by_length, rank, world_size)
        for batch_index, batch in enumerate(batches[skip_batches:], start=skip_batches):
            inputs = data.collate(batch, device)
            # forward: queries and documents in one encoder pass
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                vectors = pair_vectors(inputs["input_ids"], inputs["attention_mask"])
            # loss
            loss = loss_fn(vectors, inputs["rel"], inputs["weight"])
            # backward: gradients add up over grad_accum_steps batches (or to the end of the epoch)
            scaler.scale(loss / config.grad_accum_steps).backward()
            step_loss, step_count = step_loss + loss.item(), step_count + 1
            samples += len(batch) * world_size
            if (batch_index + 1) % config.grad_accum_steps and batch_index < len(batches) - 1:
                continue
            # clip
            scaler.unscale_(optimizer)
            norm = clip_gradients(model, max_norm=1.0)
            # step, unless the loss or the gradients are not finite (on any rank)
            if _finite_step(step_loss, norm if not scaler.is_enabled() else 0.0, device, world_size):
                scaler.step(optimizer)
                scaler.update()
                running_loss, running_count = running_loss + step_loss, running_count + step_count
                bad_steps.in_a_row = 0
            else:
                checkpointer.skipped_steps += 1
                bad_steps.count(global_step + 1, step_loss, norm)
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_count = 0.0, 0
            # schedule
            scheduler.step()
            global_step += 1
            position = (epoch, batch_index + 1) if batch_index + 1 < len(batches) else (epoch + 1, 0)
            window_loss = running_loss / running_count if running_count else None
            _show_progress(progress, window_loss, learner.learning_rate, samples / clock.seconds(),
                           checkpointer.skipped_steps)
            # save: validate and checkpoint every save_steps steps
            if global_step % config.save_steps == 0:
                running_loss, running_count = 0.0, 0
                with clock.paused():
                    stopped_early = checkpointer.save(global_step, *position, window_loss, samples, clock.seconds())
            done = stopped_early or global_step >= total_steps
            if done:
                break
        skip_batches = 0
        if not done:
            epoch += 1
    progress.close()
    if checkpointer.last_saved_step != global_step:  # the last step, unless it was just saved
        checkpointer.save(global_step, *position, window_loss, samples, clock.seconds())
    return global_step, stopped_early


class BadSteps:
    """Counts optimizer steps skipped in a row for a non-finite loss or gradient norm; stops the run at the limit.

    A skipped step's batches count as trained and the schedule moves on, but the optimizer does not step. fp16's
    gradient scaler skips steps of non-finite gradients itself (lowering its scale), so there only a non-finite
    loss counts as bad.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def count(self, step: int, loss: float, norm: float) -> None:
        self.in_a_row += 1
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


def _finite_step(loss: float, norm: float, device: torch.device, world_size: int) -> bool:
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
