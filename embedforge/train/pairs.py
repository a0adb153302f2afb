"""Training data: the pair files read and checked, and their texts tokenized once, batched per epoch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from embedforge.data import DataError, Pair, read_pairs
from embedforge.model import BertVectorModel, pad_batch
from embedforge.train.batching import duplicate_free_batches, hard_negatives, pick_hard_negatives
from embedforge.train.config import TrainConfig, TrainError
from embedforge.train.losses import uses_in_batch

LENGTH_WINDOW_BATCHES = 50  # group_by_length sorts windows of this many batches by length


def load_pairs(path: str | None, what: str) -> list[Pair]:
    if path is None:
        from embedforge.sample_data import sample_path

        path = str(sample_path(what))
    return read_pairs(path)


def read_data(config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """Training and validation pairs. Read and checked before anything heavy loads: a bad file stops the run at once."""
    try:
        train_pairs = load_pairs(config.train_path, "train")
        val_pairs = load_pairs(config.val_path, "valid")
    except DataError as error:
        raise TrainError(str(error)) from error
    if sum(p.weight for p in train_pairs) == 0:
        raise TrainError(f"{config.train_path}: every record has weight 0; nothing to learn from")
    return train_pairs, val_pairs


class TokenizedPairs:
    """Pairs with both texts tokenized once up front (unique texts only); batches pad dynamically."""

    def __init__(self, pairs: Sequence[Pair], model: BertVectorModel, unique_texts: bool = False,
                 positive_threshold: float = TrainConfig.positive_threshold,
                 negative_threshold: float | None = None) -> None:
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

    @classmethod
    def for_config(cls, pairs: Sequence[Pair], model: BertVectorModel, config: TrainConfig) -> TokenizedPairs:
        """The training data a run's loss needs: duplicate-free batches with hard negatives for in-batch losses."""
        in_batch = uses_in_batch(config.loss)
        return cls(pairs, model, unique_texts=in_batch, positive_threshold=config.positive_threshold,
                   negative_threshold=config.negative_threshold if in_batch else None)

    def __len__(self) -> int:
        return len(self.rel)

    def batches(self, batch_size: int, seed: int, epoch: int, group_by_length: bool, rank: int = 0,
                world_size: int = 1) -> list[np.ndarray]:
        """This rank's batches of pair indices for one epoch; the same on every call with the same arguments.

        With group_by_length, each window of LENGTH_WINDOW_BATCHES batches is sorted by length before cutting, so a
        batch holds texts of similar length (less padding); batch order is then shuffled.
        """
        generator = np.random.default_rng(seed + epoch)
        order = generator.permutation(len(self))
        if self.unique_texts:
            return self._unique_batches(order, generator, batch_size, group_by_length, rank, world_size)
        per_rank = math.ceil(len(order) / world_size)
        order = np.resize(order, per_rank * world_size)[rank::world_size]  # pad by wrapping, like DistributedSampler
        if group_by_length:
            order = self._longest_first_in_windows(order, batch_size * LENGTH_WINDOW_BATCHES)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if group_by_length:
            batches = [batches[i] for i in generator.permutation(len(batches))]
        return batches

    def _unique_batches(self, order: np.ndarray, generator: np.random.Generator, batch_size: int,
                        group_by_length: bool, rank: int, world_size: int) -> list[np.ndarray]:
        """`batches` without a text twice in the global batch (all ranks' batches together)."""
        global_size = batch_size * world_size
        if group_by_length:
            order = self._longest_first_in_windows(order, global_size * LENGTH_WINDOW_BATCHES)
        batches = duplicate_free_batches(order, self.written, global_size)
        if group_by_length:
            batches = [batches[i] for i in generator.permutation(len(batches))]
        return [batch[rank::world_size] for batch in batches if len(batch) >= world_size]

    def _longest_first_in_windows(self, order: np.ndarray, window: int) -> np.ndarray:
        """`order` cut into windows of `window` pairs, each sorted longest first (stable)."""
        chunks = np.array_split(order, max(1, math.ceil(len(order) / window)))
        return np.concatenate([chunk[np.argsort(-self.length[chunk], kind="stable")] for chunk in chunks])

    def collate(self, batch: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Queries, documents, then any hard negatives as one padded [2B + H, T] batch, with rel and weight [B]."""
        text_ids = [*self.query[batch].tolist(), *self.document[batch].tolist()]
        if self.negatives is not None:
            text_ids += pick_hard_negatives(batch, self.negatives, set(text_ids))
        texts = [self.token_ids[i] for i in text_ids]
        input_ids, attention_mask = pad_batch(texts, self.pad_id, device)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "rel": self.rel[batch].to(device), "weight": self.weight[batch].to(device)}
