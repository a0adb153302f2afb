"""scripts/gpu_check.py: the dry run (CPU, tiny model) walks every section the GPU run walks."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dry_run_writes_a_passing_report_of_every_section(tmp_path):
    out = tmp_path / "out"
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    environment.pop("OUT", None)
    completed = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                               text=True, timeout=840, env=environment, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["dry_run"]
    assert list(report["sections"]) == ["environment", "inputs", "training", "ddp", "export", "serving"]
    assert report["environment"]["device_used"] == "cpu" and report["environment"]["libraries"]["torch"]
    runs = report["training"]["runs"]
    for name in ("fp32", "bf16"):
        assert runs[name]["steps"] == 3 and runs[name]["finite_losses"] and runs[name]["samples_per_s"] > 0
    assert "CUDA only" in runs["fp16"]["skipped"]
    probe = report["ddp"]["probe"]
    assert probe["world_size"] == 2 and probe["backend"] == "gloo"
    assert probe["gradients_match"] and probe["all_reduce_ok"] and probe["finite_losses"]
    assert report["ddp"]["trainer"]["steps"] == 3 and report["ddp"]["trainer"]["finite_losses"]
    assert report["export"]["fusion"]["complete"]
    assert report["export"]["models"]["fp16"]["fused_ops"]["SkipLayerNormalization"] == 4  # 2 layers x 2
    serving = report["serving"]
    assert serving["shape"] == [2, 512] and serving["provider"] == "CPUExecutionProvider"
    assert min(serving["min_cosine_vs_pytorch_fp32"].values()) > 0.9999
    assert serving["throughput"]["serving_runtime"]["median_tokens_per_s"] > 0
    assert report["unverified"] == ["every CUDA path: this run used the CPU (dry run)"]
    log = (out / "gpu_check.log").read_text()
    assert "-m embedforge train" in log and "== serving: ok" in log


def test_a_failing_section_is_reported_and_the_next_one_still_runs(tmp_path):
    gpu_check = load_script()
    args = argparse.Namespace(dry_run=True, out=str(tmp_path), budget_s=60)
    check = gpu_check.Check(args)
    try:
        check.section("first", lambda: 1 / 0)
        check.section("second", lambda: {"value": 2})
        check.section("third", lambda: {"errors": ["fp16: a loss is not finite"]})
    finally:
        check.work.rmdir()
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["first"]["ok"] is False
    assert report["sections"]["first"]["error"] == "ZeroDivisionError: division by zero"
    assert report["second"] == {"value": 2} and report["sections"]["second"]["ok"]
    assert report["sections"]["third"] == {"ok": False, "error": "fp16: a loss is not finite",
                                           "seconds": report["sections"]["third"]["seconds"]}
    assert "ZeroDivisionError" in (tmp_path / "gpu_check.log").read_text()
