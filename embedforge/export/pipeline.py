"""Export a checkpoint to an optimized, verified ONNX directory: trace -> optimize -> parity -> manifest.

The steps, in order (:func:`export_checkpoint`):

1. trace the model into one graph: token ids in, pooled + projected + L2-normalised ``embedding`` out, and
   ``unnormalized_embedding``, the same vector before the L2 norm (:mod:`embedforge.export.onnx`); the
   encoder alone is traced too, as the fusion baseline;
2. fuse attention, LayerNorm, embeddings and GELU with onnxruntime's transformer optimizer, and check that
   the pooling added to the graph kept every fusion the bare encoder gets (:mod:`embedforge.export.optimize`);
3. derive the requested lower precisions: int8 (CPU) from the optimized fp32 graph, fp16 (CUDA) from a graph
   optimized for CUDA;
4. embed the parity texts with PyTorch and with ONNX Runtime, and record min/mean cosine, max abs diff
   and the NDCG@10 / Spearman change per precision (:mod:`embedforge.export.parity`); every precision
   checked here must reach its min-cosine floor (:data:`MIN_COSINE`, recorded beside the measured figure)
   with finite outputs, or the export fails; a precision that cannot run here (fp16 without CUDA) is
   written but marked ``"checked": false``, and `serve` warns when it serves one;
5. copy the tokenizer files and write ``manifest.json`` (with the model's query and document ``prompts``, which
   a client of the graph prefixes to the text before tokenizing, and the ``calibration`` ranges of the parity
   texts' vectors that the int8 and uint8 output types use, :mod:`embedforge.quantize`).

Everything is written into a hidden temporary directory beside the output and renamed into place at
the end: a failure or an interruption leaves no half-written export, and an existing export stays as it
was until the new one is complete. This module imports torch only inside :func:`export_checkpoint`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from embedforge.checkpoints import EXPORT_DIR, EXPORT_MANIFEST
from embedforge.data import Pair, read_pairs
from embedforge.export.space import embedding_space
from embedforge.io import write_dir_atomic, write_json_atomic
from embedforge.quantize import Calibration

PRECISIONS = ("fp32", "fp16", "int8")
MODEL_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
UNPADDED_FILES = {"fp32": "model_unpadded.onnx", "int8": "model_int8_unpadded.onnx"}  # CPU, unpadded batches
MANIFEST_FILE = EXPORT_MANIFEST
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.95}
"""Default parity floors: the lowest min cosine (PyTorch vs ONNX Runtime, over the parity texts) each precision
may show. fp32 differs from PyTorch only by kernel rounding; fp16 (CUDA) by half-precision rounding; int8 by
per-channel weight quantization, for which the floor comes from measurement (docs/export.md)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt")


class ExportError(RuntimeError):
    """An export that cannot be made or that failed its parity check; nothing was written."""


def cuda_available() -> bool:
    """True when onnxruntime can run on CUDA here (the fp16 model is for CUDA only)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def default_precisions() -> tuple[str, ...]:
    """fp32 and int8, plus fp16 where CUDA is available."""
    return ("fp32", "fp16", "int8") if cuda_available() else ("fp32", "int8")


def default_parity_path(checkpoint_dir: str | Path) -> Path:
    """The validation file recorded in the checkpoint's trainer_state.json if it exists, else the sample valid set."""
    state_file = Path(checkpoint_dir) / "trainer_state.json"
    if state_file.is_file():
        val_path = json.loads(state_file.read_text()).get("val_path")
        if val_path and Path(val_path).is_file():
            return Path(val_path)
    from embedforge.sample_data import sample_path

    return Path(sample_path("valid"))


def default_output_dir(checkpoint_dir: str | Path, save_path: str | Path | None = None) -> Path:
    """<save_path>/export, or <checkpoint_dir>/../export."""
    return Path(save_path) / EXPORT_DIR if save_path is not None else Path(checkpoint_dir).parent / EXPORT_DIR


def export_checkpoint(checkpoint_dir: str | Path, output_dir: str | Path,
                      precisions: Sequence[str] = ("fp32", "int8"), parity_texts: Sequence[str] | None = None,
                      parity_path: str | Path | None = None, max_parity_texts: int = 512, opset: int = 17,
                      show_progress: bool = False, min_cosine: Mapping[str, float] | None = None) -> dict:
    """Export the saved model in `checkpoint_dir` to `output_dir`; returns the manifest (see the module docstring).

    fp32 is always written: it is the reference the others derive from, and it carries the parity gate.
    Parity uses `parity_texts` when given (cosine figures only), else the pairs of `parity_path` (default:
    :func:`default_parity_path`), at most `max_parity_texts` unique texts. `min_cosine` overrides the
    parity floor of some precisions (defaults: :data:`MIN_COSINE`).
    """
    from embedforge.export.parity import select_parity_pairs
    from embedforge.model import CONFIG_FILE

    checkpoint_dir = Path(checkpoint_dir)
    output_dir = Path(output_dir)
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise ExportError(f"unknown precision(s) {unknown}; choose from {PRECISIONS}")
    if not (checkpoint_dir / CONFIG_FILE).is_file():
        raise ExportError(f"{checkpoint_dir}: not a saved embedforge model ({CONFIG_FILE} is missing)")
    replaceable = not output_dir.exists() or (output_dir / MANIFEST_FILE).is_file() or (
        output_dir.is_dir() and not any(output_dir.iterdir()))
    if not replaceable:
        raise ExportError(f"{output_dir}: exists and is not an embedforge export (no {MANIFEST_FILE}); "
                          "refusing to replace it")
    precisions = [p for p in PRECISIONS if p in {"fp32", *precisions}]
    floors = parity_floors(min_cosine)
    if parity_texts is not None:
        pairs, texts = [], list(dict.fromkeys(parity_texts))[:max_parity_texts]
        parity_source = {"texts": len(texts)}
    else:
        parity_path = Path(parity_path) if parity_path is not None else default_parity_path(checkpoint_dir)
        pairs, texts = select_parity_pairs(read_pairs(parity_path), max_parity_texts)
        parity_source = {"path": str(parity_path), "pairs": len(pairs), "texts": len(texts)}
    if len(texts) < 1:
        raise ExportError("no parity texts")

    manifest: dict = {}

    def write(target: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="embedforge-export-") as scratch:
            manifest.update(_build(checkpoint_dir, target, Path(scratch), precisions, pairs, texts, opset,
                                   show_progress, floors))
        manifest["parity_data"] = parity_source
        write_json_atomic(target / MANIFEST_FILE, manifest)

    write_dir_atomic(output_dir, write)
    return manifest


def _build(checkpoint_dir: Path, target: Path, scratch: Path, precisions: list[str], pairs: Sequence[Pair],
           texts: list[str], opset: int, show_progress: bool, floors: Mapping[str, float]) -> dict:
    """Steps 1-5 of the module docstring into `target` (a temporary dir); returns the manifest."""
    from embedforge.export.onnx import load_for_export

    unpadded = [p for p in precisions if p in UNPADDED_FILES]
    steps = ["load", "trace", "optimize", *[f"convert {p}" for p in precisions if p != "fp32"],
             *[f"unpadded {p}" for p in unpadded], "reference vectors", *[f"parity {p}" for p in precisions],
             *[f"parity unpadded {p}" for p in unpadded]]
    progress = tqdm(total=len(steps), desc="export", unit="step", disable=not show_progress)

    progress.set_description("load")
    model = load_for_export(checkpoint_dir)
    progress.update()
    baseline = _trace(model, scratch, opset, progress)
    models = _optimize(model, target, scratch, precisions, progress)
    for name in TOKENIZER_FILES:
        if (checkpoint_dir / name).is_file():
            shutil.copy2(checkpoint_dir / name, target / name)
    reference = _measure_parity(model, target, models, pairs, texts, progress)
    progress.close()
    _check_parity(models, checkpoint_dir, floors)
    manifest = _manifest(model, models, baseline, opset, checkpoint_dir)
    # int8/uint8 output ranges, measured on the parity (validation) texts: one set for every replica
    calibration = Calibration.measure(reference) if len(reference) > 1 else None
    manifest["calibration"] = calibration.to_manifest() if calibration else None
    tokenizer_files = [target / name for name in TOKENIZER_FILES if (target / name).is_file()]
    settings = {"dim": model.dim, "max_length": model.max_length, "pooling": model.pooling, "normalized": True,
                "prompts": manifest["prompts"], "calibration": calibration.digest() if calibration else None}
    manifest["embedding_space"] = embedding_space(sorted(checkpoint_dir.glob("*.safetensors")), tokenizer_files,
                                                  settings)
    return manifest


def _trace(model, scratch: Path, opset: int, progress: tqdm) -> dict[str, int]:
    """Step 1: `scratch/raw.onnx` (the whole model); returns the fused ops of the bare encoder, the baseline."""
    from embedforge.export import optimize
    from embedforge.export.onnx import export_onnx

    config = model.encoder.config
    progress.set_description("trace")
    export_onnx(model, scratch / "raw.onnx", opset)
    export_onnx(model, scratch / "encoder.onnx", opset, encoder_only=True)
    baseline = optimize.optimize_fp32(scratch / "encoder.onnx", scratch / "encoder_opt.onnx",
                                      config.num_attention_heads, config.hidden_size)
    progress.update()
    return baseline


def _optimize(model, target: Path, scratch: Path, precisions: list[str], progress: tqdm) -> dict[str, dict]:
    """Steps 2-3: the optimized fp32 graph, the lower precisions and the unpadded CPU graphs, into `target`."""
    from embedforge.export import optimize

    heads, hidden = model.encoder.config.num_attention_heads, model.encoder.config.hidden_size
    progress.set_description("optimize")
    fused = optimize.optimize_fp32(scratch / "raw.onnx", target / MODEL_FILES["fp32"], heads, hidden)
    progress.update()
    models: dict[str, dict] = {"fp32": {"file": MODEL_FILES["fp32"], "precision": "fp32", "fused_ops": fused}}
    for precision in [p for p in precisions if p != "fp32"]:
        progress.set_description(f"convert {precision}")
        if precision == "int8":
            ops = optimize.quantize_int8(target / MODEL_FILES["fp32"], target / MODEL_FILES[precision])
        else:  # fp16 runs on CUDA, whose graph keeps the residual adds fused into LayerNorm
            optimize.optimize_fp32(scratch / "raw.onnx", scratch / "cuda_opt.onnx", heads, hidden, "cuda")
            ops = optimize.convert_fp16(scratch / "cuda_opt.onnx", target / MODEL_FILES[precision])
        models[precision] = {"file": MODEL_FILES[precision], "precision": precision, "fused_ops": ops}
        progress.update()
    for precision in [p for p in precisions if p in UNPADDED_FILES]:
        progress.set_description(f"unpadded {precision}")
        if precision == "fp32":
            ops = optimize.optimize_unpadded(scratch / "raw.onnx", target / UNPADDED_FILES["fp32"], heads, hidden)
        else:
            ops = optimize.quantize_int8(target / UNPADDED_FILES["fp32"], target / UNPADDED_FILES[precision])
        models[precision]["unpadded"] = {"file": UNPADDED_FILES[precision], "fused_ops": ops}
        progress.update()
    return models


def _measure_parity(model, target: Path, models: dict[str, dict], pairs: Sequence[Pair], texts: list[str],
                    progress: tqdm) -> np.ndarray:
    """Step 4: each graph's vectors against PyTorch's, recorded as `parity` in its manifest entry; returns
    PyTorch's (L2-normalised) vectors of `texts`."""
    from embedforge.export.parity import compare, onnx_embed, onnx_session
    from embedforge.tokenization import load_tokenizer

    tokenizer = load_tokenizer(target, model.max_length)
    progress.set_description("reference vectors")
    reference = model.encode(texts, batch_size=32, convert_to_numpy=True)
    progress.update()
    for precision, entry in models.items():
        progress.set_description(f"parity {precision}")
        if precision == "fp16" and not cuda_available():
            entry["parity"] = {"skipped": "fp16 runs on CUDA only and no CUDA execution provider is available",
                               "checked": False}
        else:
            providers = ["CUDAExecutionProvider"] if precision == "fp16" else ["CPUExecutionProvider"]
            session = onnx_session(target / entry["file"], providers)
            entry["parity"] = compare(reference, onnx_embed(session, tokenizer, texts), pairs, texts)
        progress.update()
    for precision, entry in models.items():
        if "unpadded" in entry:
            progress.set_description(f"parity unpadded {precision}")
            session = onnx_session(target / entry["unpadded"]["file"])
            vectors = onnx_embed(session, tokenizer, texts, equal_lengths=True)
            entry["unpadded"]["parity"] = compare(reference, vectors, pairs, texts)
            progress.update()
    return reference


def parity_floors(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """MIN_COSINE with `overrides` applied; an unknown precision or a floor outside (0, 1] is an ExportError."""
    floors = dict(MIN_COSINE)
    for precision, floor in (overrides or {}).items():
        if precision not in MIN_COSINE:
            raise ExportError(f"--min-cosine: unknown precision {precision!r}; choose from {PRECISIONS}")
        if not 0.0 < floor <= 1.0:
            raise ExportError(f"--min-cosine: the floor for {precision} must be in (0, 1], got {floor}")
        floors[precision] = float(floor)
    return floors


def _check_parity(models: dict[str, dict], checkpoint_dir: Path, floors: Mapping[str, float]) -> None:
    """The gate: every checked graph needs finite outputs and a min cosine at or above its precision's floor.

    The floor is recorded beside the measured figure (`parity.min_cosine_floor`) and the graph marked
    `parity.checked`; a graph whose parity could not run here keeps `checked: false`.
    """
    failures = []
    for precision, entry in models.items():
        graphs = [(precision, entry["parity"])]
        if "unpadded" in entry:
            graphs.append((f"{precision} unpadded", entry["unpadded"]["parity"]))
        for name, parity in graphs:
            parity["min_cosine_floor"] = floors[precision]
            if "skipped" in parity:
                continue
            parity["checked"] = True
            figures = (parity["min_cosine"], parity["mean_cosine"], parity["max_abs_diff"])
            if not all(math.isfinite(value) for value in figures):
                failures.append(f"{name}: the ONNX outputs are not finite (min cosine {parity['min_cosine']}, "
                                f"max abs diff {parity['max_abs_diff']})")
            elif parity["min_cosine"] < floors[precision]:
                failures.append(f"{name} parity check failed: min cosine {parity['min_cosine']:.6f} between PyTorch "
                                f"and ONNX Runtime is below {floors[precision]}")
    if failures:
        raise ExportError("; ".join(failures) + f" ({checkpoint_dir}); nothing was written "
                          "(--min-cosine PRECISION=VALUE sets another floor)")


def _manifest(model, models: dict[str, dict], baseline: dict[str, int], opset: int, checkpoint_dir: Path) -> dict:
    """Step 5: what the server and a reader need to know about the export."""
    import onnx
    import onnxruntime
    import torch
    import transformers

    from embedforge.export import optimize
    from embedforge.export.onnx import INPUT_NAMES, OUTPUT_NAME, UNNORMALIZED_OUTPUT_NAME
    from embedforge.model import PROMPT_NAMES

    fused = models["fp32"]["fused_ops"]
    num_layers = model.encoder.config.num_hidden_layers
    return {
        "format_version": 1,
        "dim": model.dim,
        "max_length": model.max_length,
        "pooling": model.pooling,
        "projection_dim": model.projection.out_features if model.projection is not None else None,
        "matryoshka_dims": model.matryoshka_dims,  # prefixes trained as embeddings (the server's `dimensions`)
        # prefixed to a query's or a document's text before tokenizing ("" for none): the graph takes token ids
        "prompts": {name: model.prompts.get(name, "") for name in PROMPT_NAMES},
        "opset": opset,
        "source_checkpoint": str(checkpoint_dir.resolve()),
        "base_model": model.base_model,
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "unnormalized_output": UNNORMALIZED_OUTPUT_NAME,
        "models": models,
        "fusion": {"encoder_only": baseline, "with_pooling": fused, "num_layers": num_layers,
                   "kept_by_pooling": all(fused.get(op, 0) >= count for op, count in baseline.items()),
                   "complete": optimize.fusion_complete(fused, num_layers)},
        "exported_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
