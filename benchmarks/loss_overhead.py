"""What the balanced preset adds to a training step: all-MiniLM-L6-v2 on batches of 16 pairs.

Times whole training steps (collate -> forward -> loss -> backward -> AdamW step) of `--preset similarity`
(weighted MSE on plain batches) and `--preset balanced` (its duplicate-free batches, hard negatives and
false-negative mask included), each on its own batches as `train` builds them, interleaved on the same model so
that load on a shared machine hits both alike; prints the median step of each, their ratio, and the loss call
alone. Target: balanced within 10% of similarity (the hard negatives it adds are real encoder work: on data
whose queries bring labelled negatives, such as SNLI, the ratio grows with them).

    python benchmarks/loss_overhead.py --steps 20
    python benchmarks/loss_overhead.py --train-path ../shared/data/snli/snli_train.jsonl
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from results import write_result

from embedforge.data import read_pairs
from embedforge.model import BertVectorModel
from embedforge.train.losses import loss_for
from embedforge.train.presets import preset_config
from embedforge.train.trainer import PairVectors, TokenizedPairs, adamw

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "stsb_train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-path", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loss (after 2 warm-up steps)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = BertVectorModel.from_base(None, attention_dropout=0.0)
    model.encoder.get_input_embeddings().weight.requires_grad_(False)
    pairs = read_pairs(args.train_path)
    device = torch.device("cpu")
    names = ("similarity", "balanced")
    configs = {name: preset_config(name) for name in names}
    setups = {name: (TokenizedPairs.for_config(pairs, model, configs[name]), loss_for(configs[name]))
              for name in names}
    batches = {name: setups[name][0].batches(16, seed=0, epoch=0, group_by_length=True) for name in names}
    forward, optimizer = PairVectors(model), adamw(model, 2e-5, 0.01)
    times: dict[str, list[float]] = {name: [] for name in setups}
    loss_times: dict[str, list[float]] = {name: [] for name in setups}
    model.train()
    for step in range(args.steps + 2):
        for name, (data, loss_fn) in setups.items():
            start = time.perf_counter()
            inputs = data.collate(batches[name][step], device)
            vectors = forward(inputs["input_ids"], inputs["attention_mask"])
            loss_start = time.perf_counter()
            loss = loss_fn(vectors, inputs["rel"], inputs["weight"])
            loss_seconds = time.perf_counter() - loss_start
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:
                times[name].append(time.perf_counter() - start)
                loss_times[name].append(loss_seconds)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"{cpu}, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}; "
          f"{args.steps} interleaved steps each, batch 16")
    for name in setups:
        print(f"{name:<24} median step {statistics.median(times[name]) * 1000:8.1f} ms   "
              f"loss forward {statistics.median(loss_times[name]) * 1e6:7.0f} us")
    ratio = statistics.median(times["balanced"]) / statistics.median(times["similarity"])
    print(f"step time ratio (balanced / similarity): {ratio:.3f}")
    steps_ms = {name: statistics.median(times[name]) * 1000 for name in setups}
    write_result("loss_overhead", {
        "headline": f"balanced preset step {ratio:.3f}x similarity's ({steps_ms['balanced']:.0f} vs "
                    f"{steps_ms['similarity']:.0f} ms, {args.train_path.name}, batch 16, "
                    f"{torch.get_num_threads()} torch threads)",
        "step_ratio": ratio, "median_step_ms": steps_ms,
        "loss_forward_us": {name: statistics.median(loss_times[name]) * 1e6 for name in setups},
        "steps": args.steps, "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
