"""ONNX Runtime model + tokenizer for serving (no torch).

Reads an export directory: manifest.json, the .onnx file of the chosen precision and the tokenizer files.
Implements the Embedder interface used by the servicer: `tokenize` (Rust tokenizer, batch) and
`run_batch` (pad to the batch's longest text, run the session; the graph pools and projects). `run_batch`
fetches the graph's unnormalised output (manifest "unnormalized_output"), so that the servicer's L2 norm
applies only when a request asks for it; an export made before that output existed yields its normalised
`embedding` instead, and says so in `ModelInfo.unnormalized`. On CPU, a batch without padding of texts of
at least UNPADDED_MIN_TOKENS runs through the export's unpadded graph (flash attention) when it has one.

Adaptive intra-op threads (CPU, `workers` > 1): a batch that runs alone (the batcher's hint: nothing else
running or queued) uses `threads` threads (low latency); under load every batch uses a second session with
threads // workers threads, so that concurrent batches share the cores instead of fighting over them. (A
wide batch that a narrow one joins runs three threads on two cores; keeping every batch narrow under load
gave 2% more texts/s in 8 of 10 interleaved rounds of the throughput benchmark's load.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from embedforge.io import UnsafeFileNameError, plain_file_name
from embedforge.onnxrt import PROVIDERS, create_session, pad_token_ids, shrinking_run
from embedforge.quantize import Calibration, QuantizeError
from embedforge.server.embedder import ModelInfo, Tokenized
from embedforge.st_layout import PROMPT_NAMES
from embedforge.tokenization import encode_truncated, load_tokenizer

log = logging.getLogger("embedforge.server.runtime")

PRECISIONS = ("fp32", "fp16", "int8")
UNPADDED_MIN_TOKENS = 256
"""Shortest text length for which an unpadded batch uses the unpadded graph: its flash attention pays off
at long lengths only (bundled model: faster at 8 x 512 tokens, slower at 32 x 128)."""

class RuntimeConfigError(Exception):
    """The export directory or the requested precision/provider cannot be served."""


def read_manifest(model_dir: Path) -> dict:
    """Load and check manifest.json of an export directory."""
    path = model_dir / "manifest.json"
    if not path.is_file():
        raise RuntimeConfigError(f"{path}: not found; is {model_dir} an export directory (embedforge export)?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RuntimeConfigError(f"{path}: invalid JSON: {exc}") from exc
    for field in ("dim", "max_length", "inputs", "output", "models"):
        if field not in manifest:
            raise RuntimeConfigError(f"{path}: missing field {field!r}")
    if not isinstance(manifest["models"], dict) or not manifest["models"]:
        raise RuntimeConfigError(f"{path}: field 'models' lists no model file")
    for precision, entry in manifest["models"].items():
        model_file_name(manifest, path, precision)
        if isinstance(entry, dict) and entry.get("unpadded") is not None:
            model_file_name(manifest, path, precision, unpadded=True)
    if not manifest.get("embedding_space"):  # an export written before the id existed: one of its own
        manifest["embedding_space"] = "legacy-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return manifest


def model_file_name(manifest: dict, path: Path, precision: str, unpadded: bool = False) -> str:
    """The file name of `precision`'s graph (or of its unpadded graph) in the manifest at `path`: a plain name
    inside the export directory, else RuntimeConfigError naming the manifest, the field and the value."""
    entry = manifest["models"][precision]
    field = f"models.{precision}.file"
    if unpadded:
        entry = entry.get("unpadded") if isinstance(entry, dict) else None
        field = f"models.{precision}.unpadded.file"
    try:
        return plain_file_name(entry.get("file") if isinstance(entry, dict) else None, path, field)
    except UnsafeFileNameError as exc:
        raise RuntimeConfigError(str(exc)) from exc


def read_matryoshka_dims(manifest: dict, model_dir: Path) -> tuple[int, ...]:
    """The manifest's optional `matryoshka_dims` (vector sizes the model was trained for), checked: 1..dim."""
    sizes = manifest.get("matryoshka_dims") or []
    dim = int(manifest["dim"])
    if not isinstance(sizes, list) or not all(type(d) is int and 1 <= d <= dim for d in sizes):
        raise RuntimeConfigError(f"{model_dir / 'manifest.json'}: matryoshka_dims must be a list of integers "
                                 f"from 1 to dim={dim}, got {sizes!r}")
    return tuple(sorted(set(sizes)))


def read_prompts(manifest: dict, model_dir: Path) -> dict[str, str]:
    """The manifest's optional `prompts` ({"query": "query: ", "document": "passage: "}), checked; empty ones
    dropped (a model trained without prompts has none)."""
    prompts = manifest.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(k in PROMPT_NAMES and isinstance(v, str) for k, v in prompts.items()):
        raise RuntimeConfigError(f"{model_dir / 'manifest.json'}: prompts must map query and document to strings, "
                                 f"got {prompts!r}")
    return {kind: text for kind, text in prompts.items() if text}


def read_calibration(manifest: dict, model_dir: Path) -> Calibration | None:
    """The manifest's optional int8/uint8 `calibration` ranges (embedforge/quantize.py), checked; None: an export
    written before output types, which serves float32 and binary only."""
    record = manifest.get("calibration")
    if record is None:
        return None
    try:
        calibration = Calibration.from_manifest(record)
    except (QuantizeError, KeyError, TypeError, ValueError) as error:
        raise RuntimeConfigError(f"{model_dir / 'manifest.json'}: calibration: {error}") from error
    if len(calibration.low) != int(manifest["dim"]):
        raise RuntimeConfigError(f"{model_dir / 'manifest.json'}: calibration has {len(calibration.low)} ranges "
                                 f"for dim={manifest['dim']}")
    return calibration


def choose_provider(requested: str) -> str:
    """auto: CUDA when onnxruntime offers it, else CPU; cuda: error if it is not available."""
    available = ort.get_available_providers()
    if requested == "auto":
        return PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]
    if requested not in PROVIDERS:
        raise RuntimeConfigError(f"provider {requested!r}: choose auto, cpu or cuda")
    if PROVIDERS[requested] not in available:
        raise RuntimeConfigError(f"provider {requested!r}: {PROVIDERS[requested]} is not available in this "
                                 f"onnxruntime (available: {', '.join(available)}); install onnxruntime-gpu for cuda")
    return PROVIDERS[requested]


def choose_precision(requested: str, exported: list[str], provider: str) -> str:
    """auto: fp16 on CUDA when exported, else fp32 (else whatever was exported)."""
    if requested == "auto":
        preferred = ("fp16", "fp32") if provider == PROVIDERS["cuda"] else ("fp32",)
        for precision in (*preferred, *exported):
            if precision in exported:
                return precision
    if requested not in exported:
        raise RuntimeConfigError(f"precision {requested!r} was not exported (available: {', '.join(exported)}); "
                                 f"run `embedforge export --precision {requested}`")
    return requested


class OnnxEmbedder:
    """An exported model behind ONNX Runtime, with its tokenizer."""

    def __init__(self, model_dir: str | Path, precision: str = "auto", provider: str = "auto",
                 threads: int | None = None, workers: int = 1, unpadded_min_tokens: int = UNPADDED_MIN_TOKENS) -> None:
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        self.max_length = int(manifest["max_length"])
        self.dim = int(manifest["dim"])
        self._input_names = list(manifest["inputs"])
        self._output_name = manifest.get("unnormalized_output") or manifest["output"]
        self._shrinking_run = shrinking_run()  # for release_memory
        self._used_sessions: dict[int, ort.InferenceSession] = {}  # run since the last release_memory
        provider_name = choose_provider(provider)
        precision = choose_precision(precision, list(manifest["models"]), provider_name)
        manifest_path = model_dir / "manifest.json"
        model_path = model_dir / model_file_name(manifest, manifest_path, precision)

        providers = [provider_name] if provider_name == PROVIDERS["cpu"] else [provider_name, PROVIDERS["cpu"]]
        self.threads = threads or os.cpu_count() or 1
        self.session, self._shared_session = self._session_pair(model_path, workers, providers)
        unpadded = manifest["models"][precision].get("unpadded")
        self._unpadded = None
        if unpadded is not None and provider_name == PROVIDERS["cpu"]:
            self._unpadded = self._session_pair(model_dir / model_file_name(manifest, manifest_path, precision,
                                                                            unpadded=True), workers, providers)
        self.unpadded_min_tokens = unpadded_min_tokens
        self._running = 0
        self._lock = threading.Lock()
        active = self.session.get_providers()[0]
        if active != provider_name:
            if provider == "cuda":
                raise RuntimeConfigError(f"{provider_name} failed to initialise (onnxruntime fell back to {active})")
            log.warning("event=provider_fallback requested=%s active=%s", provider_name, active)
        self._int_type = {i.name: (np.int32 if i.type == "tensor(int32)" else np.int64)
                          for i in self.session.get_inputs()}
        missing = set(self._input_names) - set(self._int_type)
        if missing:
            raise RuntimeConfigError(f"{model_path}: graph lacks inputs {sorted(missing)} named in manifest.json")
        if self._output_name not in {o.name for o in self.session.get_outputs()}:
            raise RuntimeConfigError(f"{model_path}: graph lacks the output {self._output_name!r} named in "
                                     "manifest.json")
        parity = manifest["models"][precision].get("parity", {})
        if parity.get("checked") is False or "skipped" in parity:
            log.warning("event=unchecked_precision precision=%s reason=%r: its parity with PyTorch was not "
                        "measured at export; check it on this machine before relying on it", precision,
                        parity.get("skipped", "not recorded"))
        self.tokenizer = load_tokenizer(model_dir, self.max_length)
        self._model_dir = model_dir
        self.info = ModelInfo(model_name=str(manifest.get("base_model") or model_dir.name), dim=self.dim,
                              max_length=self.max_length, pooling=str(manifest.get("pooling", "")),
                              precision=precision, provider=active,
                              unnormalized=self._output_name != manifest["output"],
                              matryoshka_dims=read_matryoshka_dims(manifest, model_dir),
                              embedding_space=manifest["embedding_space"],
                              prompts=read_prompts(manifest, model_dir),
                              calibration=read_calibration(manifest, model_dir))

    def tokenize(self, texts: list[str], truncation_direction: str = "right") -> Tokenized:
        """Tokenize with the Rust tokenizer; texts over max_length are truncated and listed: cut at the right
        (their tail never tokenized) or, with truncation_direction "left", at the left (whole texts tokenized)."""
        if truncation_direction == "left":
            encodings = self._left_tokenizer.encode_batch_fast(texts)
        else:
            encodings = encode_truncated(self.tokenizer, texts, self.max_length)
        ids = [np.array(e.ids, dtype=np.int32) for e in encodings]  # int32: half the memory while queued
        truncated = [i for i, e in enumerate(encodings) if e.overflowing]
        return Tokenized(ids=ids, lengths=[len(x) for x in ids], truncated=truncated)

    @functools.cached_property
    def _left_tokenizer(self) -> Tokenizer:
        """Truncating at the left: loaded on first use (few calls ask for it)."""
        return load_tokenizer(self._model_dir, self.max_length, direction="left")

    @functools.cached_property
    def _whole_tokenizer(self) -> Tokenizer:
        """Not truncating (token counts of refused texts, chunk windows): loaded on first use."""
        return load_tokenizer(self._model_dir, None)

    def count_tokens(self, text: str) -> int:
        return len(self._whole_tokenizer.encode(text).ids)

    def token_windows(self, text: str, overlap: int) -> list[np.ndarray]:
        return self.token_windows_with_spans(text, overlap)[0]

    def token_windows_with_spans(self, text: str, overlap: int, window: int | None = None
                                 ) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """`token_windows` (of `window` tokens, special ones included; default max_length), and each window's
        characters [start, end) in `text` (from the tokenizer's offsets)."""
        encoding = self._whole_tokenizer.encode(text)
        ids, offsets = encoding.ids, encoding.offsets
        first, body, last = ids[:1], ids[1:-1], ids[-1:]
        size = (window or self.max_length) - 2  # the window's text tokens, between the special ones
        starts = range(0, max(len(body) - overlap, 1), size - overlap)
        windows = [np.array(first + body[start:start + size] + last, dtype=np.int32) for start in starts]
        # body token j is ids[1 + j]: a window's first token is offsets[1 + start], its last offsets[end]
        spans = [(offsets[1 + start][0], offsets[min(start + size, len(body))][1]) for start in starts]
        return windows, spans

    def _session_pair(self, model_path: Path, workers: int,
                      providers: list[str]) -> tuple[ort.InferenceSession, ort.InferenceSession]:
        """(session with all threads, session with threads // workers) for one graph; one session if equal."""
        if not model_path.is_file():
            raise RuntimeConfigError(f"{model_path}: listed in manifest.json but missing")
        wide = create_session(model_path, self.threads, providers)
        narrow = max(1, self.threads // workers)
        return wide, (wide if narrow == self.threads else create_session(model_path, narrow, providers))

    def run_batch(self, batch: list[np.ndarray], alone: bool = True) -> np.ndarray:
        """Pad token id arrays to the longest one and run the model: float32 [len(batch), dim].

        alone: nothing else runs or waits, so the batch may take every thread (when no other run_batch is
        running either); False: the threads // workers session.

        A batch without padding, of texts at least unpadded_min_tokens long, runs through the export's
        unpadded graph when there is one (flash attention; see embedforge/export/optimize.py).
        """
        feeds = self._feeds(batch)
        pair = (self.session, self._shared_session)
        length = len(batch[0])
        if self._unpadded is not None and length >= self.unpadded_min_tokens and all(len(x) == length for x in batch):
            pair = self._unpadded
        with self._lock:
            session = pair[0] if alone and self._running == 0 else pair[1]
            self._running += 1
            self._used_sessions[id(session)] = session
        try:
            (vectors,) = session.run([self._output_name], feeds)
        finally:
            with self._lock:
                self._running -= 1
        return np.asarray(vectors, dtype=np.float32)

    def release_memory(self) -> None:
        """Give the memory arenas' unused blocks back to the system (the batcher calls this once it is idle).
        ONNX Runtime shrinks an arena only as a run ends, so each session used since the last release runs
        one empty text with arena shrinkage; shrinking after every batch instead cost 5-15% of throughput."""
        with self._lock:
            sessions, self._used_sessions = list(self._used_sessions.values()), {}
        feeds = self._feeds(self.tokenize([""]).ids)
        for session in sessions:
            session.run([self._output_name], feeds, self._shrinking_run)

    def _feeds(self, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
        input_ids, mask = pad_token_ids(batch)
        arrays = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return {name: arrays[name].astype(self._int_type[name], copy=False) for name in self._input_names}

    def warmup(self) -> tuple[int, float]:
        """Run a few shapes once so that the first real call does not pay for allocation; returns the tokens and
        seconds of one more batch of the largest shape (8 texts of 32 words), as a batch runs alone: the
        batcher's first measure of throughput."""
        for count, words in ((1, 4), (8, 32)):
            tokenized = self.tokenize([" ".join(["warmup"] * words)] * count)
            sessions = (self.session, self._shared_session, *(self._unpadded or ()))
            for session in {id(s): s for s in sessions}.values():
                session.run([self._output_name], self._feeds(tokenized.ids))
                self._used_sessions[id(session)] = session
        started = time.perf_counter()
        self.session.run([self._output_name], self._feeds(tokenized.ids))
        return int(sum(tokenized.lengths)), time.perf_counter() - started
