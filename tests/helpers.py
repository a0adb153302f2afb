"""What several test modules share: sample pairs, checkpoint and file builders, vector comparisons, a server
on a background event loop, free ports and a hooked embedder.

Fixtures live in conftest.py; plain helpers live here, and tests import them from here (never from
conftest or from another test module).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np

from embedforge.server.app import EmbeddingServer
from embedforge.server.config import ServeConfig

SAMPLE_PAIRS = [
    {"query": "how to boil an egg", "document": "boil the eggs in hot water for seven minutes", "rel": 1.0},
    {"query": "how to boil an egg", "document": "bake the bread in a hot oven", "rel": 0.0},
    {"query": "how to boil an egg", "document": "eggs are cooked in water", "rel": 0.6, "weight": 2.0},
    {"query": "how to cook rice", "document": "cook the rice in salt water for ten minutes", "rel": 0.9},
    {"query": "how to cook rice", "document": "fry the onion and garlic in butter", "rel": 0.1},
    {"query": "how to cook rice", "document": "rice and water in a pan", "rel": 0.7},
    {"query": "what is in a coffee", "document": "hot water and coffee in a cup", "rel": 0.8},
    {"query": "what is in a coffee", "document": "cheese and bread", "rel": 0.05},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def make_checkpoint(model_dir: Path, step: int = 1, val_loss: float | None = 0.5) -> Path:
    """Turn a saved model dir into a complete checkpoint by adding trainer_state.json."""
    state = {"step": step, "epoch": 0, "train_loss": 0.5, "val_loss": val_loss, "val_metrics": {}}
    (model_dir / "trainer_state.json").write_text(json.dumps(state))
    return model_dir


def pytorch_unnormalized(model, texts: list[str]) -> np.ndarray:
    """The model's vectors before their L2 norm, computed from its parts: encoder -> pooling -> projection."""
    import torch  # here, not above: the serving tests import this module and must stay free of torch

    from embedforge.model import pad_batch, pool

    input_ids, attention_mask = pad_batch(model.tokenize(texts), model.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        hidden = model.eval().encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        vectors = pool(hidden, attention_mask, model.pooling)
        if model.projection is not None:
            vectors = model.projection(vectors)
    vectors = vectors.numpy()
    # Anchored to the model itself: normalised, these are the vectors it encodes.
    normalised = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert np.einsum("ij,ij->i", normalised, model.encode(texts)).min() >= 0.9999
    return vectors


def assert_same_vectors(actual: np.ndarray, expected: np.ndarray) -> None:
    """Cosine >= 0.9999 row by row and norms within 0.1%."""
    norms = np.linalg.norm(actual, axis=1), np.linalg.norm(expected, axis=1)
    assert (np.einsum("ij,ij->i", actual, expected) / (norms[0] * norms[1])).min() >= 0.9999
    np.testing.assert_allclose(norms[0], norms[1], rtol=1e-3)


def leftovers(parent: Path) -> list[str]:
    return [child.name for child in parent.iterdir() if child.name.startswith((".tmp-", ".old-"))]




WORDS = ("the a is of to and in how what egg eggs boil water pasta salt minutes bread bake oven coffee tea cup "
         "hot cold cook rice pan fry soup recipe kitchen knife onion garlic sauce sugar flour butter milk").split()


def make_texts(count: int, seed: int, max_words: int = 40) -> list[str]:
    """`count` random texts of 1..max_words words from WORDS (all in the tiny model's vocabulary)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, max_words)))) for _ in range(count)]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """An EmbeddingServer on 127.0.0.1 (a free port) on its own event loop in a background thread; `with`
    starts it and always drains it.

    With `make_embedder` (and embedder None), `with` returns once the port is open and the model loads
    in the background (`self.loading`, a concurrent future).
    """

    def __init__(self, embedder, make_embedder=None, **config) -> None:
        # One batch at a time unless a test asks for more: hooked and gated embedders count on one worker.
        self.server = EmbeddingServer(embedder, ServeConfig(host="127.0.0.1", port=0, **({"workers": 1} | config)))
        self.make_embedder = make_embedder
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        try:
            if self.make_embedder is None:
                self.port = self.call(self.server.start(), timeout=60)
            else:
                self.port = self.call(self.server.listen())
                self.loading = asyncio.run_coroutine_threadsafe(self.server.load(self.make_embedder), self.loop)
        except BaseException:
            self.stop_loop()
            raise
        self.target = f"127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.call(self.server.drain(0))
        finally:
            self.stop_loop()

    def stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class HookedEmbedder:
    """Test hook around a real embedder: slows each batch (`delay_s`, plus `delay_per_text_s` per text) and
    each tokenization (`tokenize_delay_s`), records what was tokenized and computed, fails a batch that holds
    `fail_marker` (or every batch while `fail_all`), blocks every batch while `hang` is set until `release` is."""

    def __init__(self, inner, delay_s: float = 0.0, delay_per_text_s: float = 0.0,
                 fail_marker: str | None = None, tokenize_delay_s: float = 0.0) -> None:
        self.inner = inner
        self.info = inner.info
        self.delay_s = delay_s
        self.delay_per_text_s = delay_per_text_s
        self.tokenize_delay_s = tokenize_delay_s
        self.tokenized: list[str] = []
        self.computed: list[tuple[int, ...]] = []
        self.fail_ids = None if fail_marker is None else tuple(inner.tokenize([fail_marker]).ids[0])
        self.fail_all = False  # every batch raises while True
        self.hang = threading.Event()  # set: every batch blocks until `release` is set
        self.release = threading.Event()

    def tokenize(self, texts, truncation_direction="right"):
        time.sleep(self.tokenize_delay_s)
        self.tokenized.extend(texts)
        return self.inner.tokenize(texts, truncation_direction)

    def count_tokens(self, text):
        return self.inner.count_tokens(text)

    def token_windows(self, text, overlap):
        return self.inner.token_windows(text, overlap)

    def release_memory(self):
        self.inner.release_memory()

    def run_batch(self, batch, alone=True):
        time.sleep(self.delay_s + self.delay_per_text_s * len(batch))
        if self.hang.is_set():
            self.release.wait(60)
        keys = [tuple(ids) for ids in batch]
        if self.fail_all or self.fail_ids in keys:
            raise RuntimeError("injected failure")
        self.computed.extend(keys)
        return self.inner.run_batch(batch, alone)
