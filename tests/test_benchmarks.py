"""The GPU benchmark's code path, run on the CPU at a tiny size (no timing is checked)."""

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_runs_its_tiny_cpu_path(tmp_path):
    gpu = _load("gpu")
    result = gpu.main(["--tiny", "--device", "cpu", "--warmup", "0", "--iterations", "1", "--rank", "2",
                       "--checkpointing", "yes", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["sd15", "sdxl"] == [r["model"] for r in result["rows"]]
    assert all(r["gradient_checkpointing"] and r["seconds"]["mean"] > 0 and r["aim_met"] is None for r in rows)
    assert "| sdxl (tiny) |" in (tmp_path / "gpu.md").read_text()


def test_gpu_benchmark_configs_are_the_public_architectures():
    harness = _load("harness")
    # Parameter counts of the published UNets: SD 1.5 859.5M, SDXL base 2,567.5M.
    assert round(harness.unet_parameters(harness.SD15_UNET) / 1e6, 1) == 859.5
    assert round(harness.unet_parameters(harness.SDXL_UNET) / 1e6, 1) == 2567.5
