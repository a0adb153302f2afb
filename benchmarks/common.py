"""What the benchmarks share: the STS-B files, the bundled model exported to ONNX, and the sentence-transformers
anchor (the bundled model trained with sentence-transformers' own `fit` on the published STS-B recipe).

The benchmarks run as scripts (`python benchmarks/NAME.py`), so this module is imported as `common`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from collections.abc import Sequence
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data: stsb/, snli/, mrpc/
STSB_DIR = SHARED_DATA / "stsb"

# The recipe sentence-transformers publishes for all-MiniLM-L6-v2 on STS-B (CosineSimilarityLoss): both sides use it.
BATCH_SIZE, LEARNING_RATE, WARMUP_STEPS, EPOCHS = 16, 2e-5, 100, 1
RECIPE_OPTIONS = ["--num-epochs", str(EPOCHS), "--batch-size", str(BATCH_SIZE), "--learning-rate", str(LEARNING_RATE),
                  "--warmup-steps", str(WARMUP_STEPS)]


def stsb_file(split: str, data_dir: Path = STSB_DIR) -> Path:
    """data_dir/stsb_{split}.jsonl (split: train, valid or test)."""
    return data_dir / f"stsb_{split}.jsonl"


def export_bundled(workdir: Path, precisions: Sequence[str] = ("fp32", "int8"), **parity) -> Path:
    """Save the bundled model as a checkpoint in `workdir`, export it to `workdir/export` and print the parity
    table; `parity` goes to export_checkpoint (parity_texts or parity_path, max_parity_texts)."""
    from embedforge.export import export_checkpoint
    from embedforge.export.parity import format_parity_table
    from embedforge.model import BertVectorModel

    checkpoint = workdir / "bundled" / "checkpoint-step-0"
    BertVectorModel.from_base(None).save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 0, "val_loss": None}))
    print(f"exporting the bundled model ({', '.join(precisions)}) ...", flush=True)
    start = time.perf_counter()
    manifest = export_checkpoint(checkpoint, workdir / "export", precisions=precisions, show_progress=True, **parity)
    print(f"export took {time.perf_counter() - start:.1f} s; fused ops: {manifest['fusion']['with_pooling']}")
    print(f"parity vs PyTorch on {manifest['parity_data']['texts']} texts:")
    print(format_parity_table(manifest["models"]), flush=True)
    return workdir / "export"


@contextlib.contextmanager
def _default_trainer_callback(callback):
    """Add `callback` to every transformers Trainer built inside the block (`fit` takes no TrainerCallback)."""
    import transformers.trainer

    transformers.trainer.DEFAULT_CALLBACKS.append(callback)
    try:
        yield
    finally:
        transformers.trainer.DEFAULT_CALLBACKS.remove(callback)


def train_sentence_transformers(pairs: Sequence, work_dir: Path, max_steps: int | None = None, device: str = "cpu",
                                callback=None, loss: str = "cosine", *, model_path: str | Path | None = None,
                                model_kwargs: dict | None = None, batch_size: int = BATCH_SIZE, use_amp: bool = False,
                                show_progress: bool = True):
    """The bundled model trained by sentence-transformers on `pairs` with the recipe above; returns the model.

    loss: "cosine" (CosineSimilarityLoss on every pair, label = rel) or "mnrl" (MultipleNegativesRankingLoss on
    the pairs with rel >= 0.5, its positives; the other documents of the batch are the negatives).

    Uses ``fit`` (the v3+ path through SentenceTransformerTrainer, needs the packages datasets and accelerate)
    when those are installed, else ``old_fit`` (the pre-v3 loop that produced the published figure).
    `callback`, a transformers TrainerCallback (see loop_timer), sees every step (it needs ``fit``). Files go to
    `work_dir`. max_steps: optimizer steps (default: one epoch, as ``fit`` counts it).

    The keywords change the recipe for scripts/gpu_check.py: `model_path` (default: the bundled model) and
    `model_kwargs` for SentenceTransformer, `batch_size`, `use_amp` (fp16 autocast, CUDA) and `show_progress`
    (False: no progress bar and no closing timing line).
    """
    try:
        from sentence_transformers import InputExample, SentenceTransformer, losses
        from torch.utils.data import DataLoader
    except ImportError as error:
        raise SystemExit(f"sentence-transformers is needed (pip install -e '.[bench]'): {error}") from None
    from embedforge.model import default_model_path

    has_trainer = all(importlib.util.find_spec(name) for name in ("datasets", "accelerate"))
    if callback is not None and not has_trainer:
        raise SystemExit("timing sentence-transformers needs datasets and accelerate (pip install -e '.[bench]')")
    model = SentenceTransformer(str(model_path or default_model_path()), device=device, model_kwargs=model_kwargs)
    if loss == "cosine":
        examples = [InputExample(texts=[p.query, p.document], label=p.rel) for p in pairs]
        objective = losses.CosineSimilarityLoss(model)
    else:
        examples = [InputExample(texts=[p.query, p.document]) for p in pairs if p.rel >= 0.5]
        objective = losses.MultipleNegativesRankingLoss(model)
    loader = DataLoader(examples, shuffle=True, batch_size=batch_size)
    fit = model.fit if has_trainer else model.old_fit
    work_dir.mkdir(parents=True, exist_ok=True)
    hooked = _default_trainer_callback(callback) if callback is not None else contextlib.nullcontext()
    start = time.perf_counter()
    with hooked, contextlib.chdir(work_dir):  # fit names a checkpoint dir relative to the working directory
        fit(train_objectives=[(loader, objective)], epochs=EPOCHS, warmup_steps=WARMUP_STEPS,
            optimizer_params={"lr": LEARNING_RATE}, steps_per_epoch=max_steps, show_progress_bar=show_progress,
            use_amp=use_amp)
    if show_progress:
        print(f"sentence-transformers ({fit.__name__}) trained in {time.perf_counter() - start:.0f} s", flush=True)
    return model


def loop_timer():
    """A transformers TrainerCallback for train_sentence_transformers(callback=...) that times the training loop:
    `began` at on_train_begin; `ended` and `steps` (the global step) at every on_step_end; seconds() between."""
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        began = ended = None
        steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ended, self.steps = time.perf_counter(), state.global_step

        def seconds(self) -> float:
            return self.ended - self.began

    return LoopTimer()


def sentence_transformers_embed(model):
    """An embed_fn for embedforge.evaluate.runner.evaluate_pairs: normalised vectors, one batch per call."""
    return lambda texts: model.encode(texts, batch_size=len(texts), normalize_embeddings=True)


def cpu_name() -> str:
    """The processor's model name as lscpu gives it: printed beside every figure (hosts differ up to 2x)."""
    import subprocess

    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "?")


def stop_process(process) -> None:
    """SIGTERM a benchmark's server, then SIGKILL it if it has not exited within 30 s."""
    import subprocess

    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
