"""benchmarks/flow_memory.py: the exact parts, the linear fit and its extrapolation, and the --quick run end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import flow_memory as fm  # noqa: E402

from benchmarks.flow_configs import FLUX_DEV_PARAMS, SD3_MEDIUM_PARAMS, meta_transformer, parameter_count  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow_memory")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flow_memory.py"), "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "flow_memory.json").read_text()), (out / "flow_memory.md").read_text()


def test_image_tokens_are_those_of_the_pipelines():
    # docs/flow-matching.md: FLUX's L at 512 px is 1024 tokens, at 1024 px 4096 (8x VAE, 2x2 packing).
    assert fm.image_tokens(512) == 1024 and fm.image_tokens(1024) == 4096 and fm.image_tokens(256) == 256


@pytest.mark.parametrize("family,published", [("flux", FLUX_DEV_PARAMS), ("sd3", SD3_MEDIUM_PARAMS)])
def test_exact_counts(family, published):
    counts = fm.exact_counts(family)
    assert counts["parameters"] == parameter_count(meta_transformer(family))
    assert abs(counts["parameters"] / published - 1) < 0.02
    assert 0.95 * counts["parameters"] < counts["linear_weight_parameters"] < counts["parameters"]
    lora = counts["lora_parameters"]
    assert lora["16"] == 16 * lora["1"] and lora["32"] == 32 * lora["1"]  # rank x (in + out) per target
    assert fm.weight_bytes(counts["parameters"]) == 2 * counts["parameters"]
    assert fm.lora_bytes(lora["32"]) == 16 * lora["32"]


def test_checkpointed_fit_recovers_a_linear_model_and_extrapolates_linearly():
    truth = {"c": 3.0e6, "w": 41000.0, "b": 12500.0}
    points = [{"blocks": n, "tokens": t, "bytes": fm.activation_bytes(truth, n, t)} for n in (2, 4) for t in (768, 1536)]
    coef = fm.fit_checkpointed(points)
    for k in truth:
        assert coef[k] == pytest.approx(truth[k], rel=1e-6)
    assert max(abs(r) for r in coef["residuals"]) < 1e-6
    # linear in blocks at fixed tokens and in tokens at fixed blocks
    f = [fm.activation_bytes(coef, n, 4608) for n in (0, 19, 38, 57)]
    assert f[1] - f[0] == pytest.approx(f[3] - f[2]) == pytest.approx(19 * truth["b"] * 4608)
    g = [fm.activation_bytes(coef, 57, t) for t in (0, 1536, 3072)]
    assert g[2] - g[1] == pytest.approx(g[1] - g[0])
    assert [s["b_bytes_per_block_token"] for s in fm.slopes(points)] == pytest.approx([truth["b"]] * 2, rel=1e-3)
    # a curved (T^2) point shows up in the residuals
    bent = [dict(p, bytes=p["bytes"] + 30.0 * p["tokens"] ** 2 * (p["blocks"] == 4)) for p in points]
    assert max(abs(r) for r in fm.fit_checkpointed(bent)["residuals"]) > 1e-3


def test_no_checkpoint_fit_separates_joint_and_single_blocks():
    truth = {"u": 9000.0, "k_joint": 300000.0, "k_single": 120000.0}
    points = [{"joint": j, "single": s, "tokens": 768, "bytes": fm.no_checkpoint_bytes(truth, j, s, 768)}
              for j, s in ((1, 1), (2, 1), (2, 2))]
    coef = fm.fit_no_checkpoint(points)
    for k in truth:
        assert coef[k] == pytest.approx(truth[k], rel=1e-6)


def test_estimate_adds_the_parts_in_bf16():
    counts = fm.exact_counts("flux")
    ckpt = {"c": 1.0e7, "w": 60000.0, "b": 13000.0}
    nockpt = {"u": 10000.0, "k_joint": 400000.0, "k_single": 150000.0}
    row = fm.estimate("flux", counts, ckpt, nockpt, 1024)
    tokens = 4096 + 512
    assert row["tokens"] == tokens
    assert row["weights_gib"] * fm.GiB == 2 * counts["parameters"]
    assert row["activations_gib"] * fm.GiB == pytest.approx(fm.activation_bytes(ckpt, 57, tokens) / 2)
    assert row["activations_no_checkpointing_gib"] * fm.GiB == pytest.approx(tokens * (10000 + 19 * 400000 + 38 * 150000) / 2)
    assert row["total_gib"] == pytest.approx(row["weights_gib"] + row["lora_adam_gib"] + row["activations_gib"])
    assert row["fits_24"] == (row["total_gib"] + fm.CARD_RESERVE_GIB <= 24)
    assert not row["fits_24"] and row["fits_80"]  # FLUX's bf16 weights alone are over 22 GiB
    options = fm.quantized_options(counts, row["activations_gib"], row["lora_adam_gib"])
    assert options[0]["total_gib"] == pytest.approx(row["total_gib"])  # bf16: the same sum
    assert options[1]["weights_gib"] < 0.55 * options[0]["weights_gib"] and options[1]["fits_24"]
    assert options[2]["weights_gib"] < options[1]["weights_gib"]


def test_quick_run_measures_a_student_backward_with_checkpointing(quick):
    result, md = quick
    fam = result["families"]["flux"]
    runs = fam["runs"]["checkpointed"]
    assert len(runs) == 4 and all(r["gradient_checkpointing"] for r in runs)
    for r in runs:
        assert r["lora_grad_bytes"] == 4 * r["lora_parameters"] > 0  # the student's LoRA got its gradients
        assert r["peak_increase_bytes"] >= 0 and r["seconds"] > 0  # tiny width: RSS may not grow at all
    # the table is the fit's extrapolation, and the weights column the exact count
    counts = fam["counts"]
    for row in result["summary"]["rows"]:
        assert row["weights_gib"] * fm.GiB == 2 * counts["parameters"]
        assert row["activations_gib"] == pytest.approx(
            fm.activation_bytes(fam["extrapolation"], 57, row["tokens"]) / 2 / fm.GiB)
    assert fam["runs"]["attention"][0]["default_backend"] in ("flash", "math", "efficient")
    assert "NOT an estimate" in md and "| FLUX.1-dev | 1024 px | 4608 |" in md


def test_extrapolation_keeps_at_least_each_block_input():
    # checkpointing keeps every block's input (T x width): the slope used is never below 4 x width bytes per token
    low = fm.conservative({"c": 0.0, "w": 1.0, "b": 10.0}, width=3072)
    assert low["b"] == 4 * 3072 and low["b_fit"] == 10.0
    high = fm.conservative({"c": 0.0, "w": 1.0, "b": 50000.0}, width=3072)
    assert high["b"] == 50000.0


def test_from_json_redoes_the_arithmetic(quick, tmp_path):
    result, _ = quick
    src = tmp_path / "in.json"
    src.write_text(json.dumps(result))
    assert fm.main(["--from-json", str(src), "--out", str(tmp_path / "out")]) == 0
    again = json.loads((tmp_path / "out" / "flow_memory.json").read_text())
    assert again["quick"] and again["families"]["flux"]["runs"] == result["families"]["flux"]["runs"]
    for a, b in zip(again["summary"]["rows"], result["summary"]["rows"]):
        assert a["total_gib"] == pytest.approx(b["total_gib"])
