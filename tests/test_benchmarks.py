"""The GPU benchmark's code path, run on the CPU at a tiny size (no timing is checked)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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
    assert [r["model"] for r in rows] == ["sd15", "sdxl", "sd3", "flux"] == [r["model"] for r in result["rows"]]
    assert all(r["gradient_checkpointing"] and r["seconds"]["mean"] > 0 and r["aim_met"] is None for r in rows)
    assert [r["latent_shape"] for r in rows[2:]] == [[16, 8, 8]] * 2  # the flow families' 16 latent channels
    text = (tmp_path / "gpu.md").read_text()
    assert "| sdxl (tiny) |" in text and "| sd3 (tiny) |" in text and "| flux (tiny) |" in text


def test_gpu_benchmark_configs_are_the_public_architectures():
    harness = _load("harness")
    # Parameter counts of the published UNets: SD 1.5 859.5M, SDXL base 2,567.5M.
    assert round(harness.unet_parameters(harness.SD15_UNET) / 1e6, 1) == 859.5
    assert round(harness.unet_parameters(harness.SDXL_UNET) / 1e6, 1) == 2567.5
    # SD3-medium's and FLUX.1-dev's transformers, as gpu.py builds them (before materializing): on the meta device,
    # within 1% of the published 2.03B and 11.9B.
    gpu = _load("gpu")
    from benchmarks.flow_configs import FLUX_DEV_PARAMS, SD3_MEDIUM_PARAMS, meta_transformer, parameter_count

    for family, published in (("sd3", SD3_MEDIUM_PARAMS), ("flux", FLUX_DEV_PARAMS)):
        net = meta_transformer(family)
        assert all(p.is_meta for p in net.parameters())
        assert abs(parameter_count(net) / published - 1) < 0.01, (family, parameter_count(net))
        assert gpu.TEXT_TOKENS[family] == {"sd3": 333, "flux": 512}[family]


def test_convergence_reads_the_validation_curve_and_charges_calibrated_seconds(tmp_path):
    conv = _load("convergence")
    run = tmp_path / "n4-rapm"
    run.mkdir()
    lines = [{"step": 0, "phase": "validation", "val_trajectory_error": 0.09, "val_fd_teacher": 100.0},
             {"step": 0, "phase": "student", "loss": 1.0, "seconds": 5.0},
             {"step": 1, "phase": "student", "loss": 0.9, "seconds": 7.0},
             {"step": 2, "phase": "validation", "val_trajectory_error": 0.08, "val_fd_teacher": 50.0},
             {"step": 2, "phase": "validation", "val_trajectory_error": 0.07, "val_fd_teacher": 40.0}]  # a resume's repeat
    (run / "logs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curve = conv.read_curve(run, "rapm", 4, 1)
    assert [(r["iteration"], r["trajectory_error"], r["wall_s"]) for r in curve] == [(0, 0.09, 0.0), (2, 0.07, 12.0)]
    (tmp_path / "calibration.json").write_text(json.dumps({"n4-rapm": 0.5}))
    curve = conv.read_curve(run, "rapm", 4, 1)
    assert [r["wall_s"] for r in curve] == [0.0, 1.0] and curve[-1]["run_wall_s"] == 12.0
    assert conv.at_budget(curve, 0.9)["iteration"] == 0 and conv.at_budget(curve, 1.0)["iteration"] == 2
    long = tmp_path / "n4-long-rapm"  # a long row is its base's computation: charged at the base's timing
    long.mkdir()
    (long / "logs.jsonl").write_text((run / "logs.jsonl").read_text())
    assert [r["wall_s"] for r in conv.read_curve(long, "long-rapm", 4, 1)] == [0.0, 1.0]
    # so is a seed row, and a long row of a seed row (through its seed row to the base), whatever its own timing
    for row in ("rapm-seed1", "long-rapm-seed1"):
        other = tmp_path / f"n4-{row}"
        other.mkdir()
        (other / "logs.jsonl").write_text((run / "logs.jsonl").read_text())
    (tmp_path / "calibration.json").write_text(json.dumps({"n4-rapm": 0.5, "n4-rapm-seed1": 0.6}))
    assert conv.timing_row("long-rapm-seed1") == conv.timing_row("rapm-seed1") == "rapm"
    assert [r["wall_s"] for r in conv.read_curve(tmp_path / "n4-rapm-seed1", "rapm-seed1", 4, 1)] == [0.0, 1.0]
    assert [r["wall_s"] for r in conv.read_curve(tmp_path / "n4-long-rapm-seed1", "long-rapm-seed1", 4, 1)] == [0.0, 1.0]
    (tmp_path / "calibration.json").write_text(json.dumps({"n4-rapm-seed1": 0.6}))  # no base timing: its own
    assert [r["wall_s"] for r in conv.read_curve(tmp_path / "n4-rapm-seed1", "rapm-seed1", 4, 1)] == [0.0, 1.2]


def test_convergence_rows_name_what_they_run_and_summarise_the_curve():
    from rapm.config import LEFT_TO_METHOD, TrainConfig, apply_overrides
    from rapm.methods import resolve

    def recipe_of(config):
        resolved = resolve(config)
        return {k: getattr(resolved, k) for k in LEFT_TO_METHOD}

    conv = _load("convergence")
    rows = {name: (method, sets) for name, method, _, sets in conv.MAIN_ROWS + conv.ABLATION_ROWS}
    base = {"ema_decay": 0}  # what the benchmark sets under every row

    def resolved(name):
        method, sets = rows[name]
        fields = {**base, **dict(s.split("=", 1) for s in sets), "method": method}
        return recipe_of(apply_overrides(TrainConfig(), fields, "test"))

    # The row named rapm is the default recipe a user gets from `rapm train` (the EMA included), sfd is SFD's own.
    assert resolved("rapm") == recipe_of(TrainConfig())
    assert resolved("sfd") == recipe_of(apply_overrides(TrainConfig(), {"method": "sfd"}, "test"))
    assert resolved("abl-no-ema")["ema_decay"] == 0 and resolved("abl-sfd-ema")["ema_decay"] == 0.99
    # The rows run while rapm's own relative weight was 0.25 pin it: a fresh run of one is the computation it names.
    assert resolved("rapm-rel0.25") == {**recipe_of(TrainConfig()), "relative_weight": 0.25}
    assert conv.OLD_DEFAULT == ["relative_weight=0.25"]
    assert all(resolved(name)["relative_weight"] == 0.25 for name in ("abl-no-ema", "abl-huber0.001", "abl-few-ema"))
    assert resolved("rapm")["relative_weight"] == 0 and resolved("abl-rel0.1")["relative_weight"] == 0.1
    curve = [{"iteration": i, "trajectory_error": e} for i, e in ((0, 0.2), (250, 0.1), (500, 0.12), (750, 0.08))]
    assert conv.worst_rise(curve) == 0.12 - 0.1 and conv.last_mean(curve) == (0.1 + 0.12 + 0.08) / 3
    assert conv.worst_rise(curve[:2]) is None and conv.last_mean(curve[:3]) is None


def test_convergence_seed_rows_differ_from_their_base_only_by_seed_and_validate_on_its_split():
    from rapm.config import TrainConfig, apply_overrides, split_seed

    conv = _load("convergence")
    rows = {name: (method, sets) for name, method, _, sets in conv.MAIN_ROWS + conv.ABLATION_ROWS}

    def config(name):
        method, sets = rows[name]
        return apply_overrides(TrainConfig(), {"ema_decay": 0, **dict(s.split("=", 1) for s in sets), "method": method},
                               "test")

    for row, base in conv.SEED_OF.items():
        seeded, own = config(row), config(base)
        assert seeded.seed > 0 and split_seed(seeded) == split_seed(own) == 0, row
        assert {**vars(seeded), "seed": 0, "val_seed": -1} == vars(own), row  # nothing else differs
    curve = lambda *errors: [{"iteration": 250 * (i + 1), "trajectory_error": e, "fd_teacher": 5.0}
                             for i, e in enumerate(errors)]
    done = {"rapm": curve(0.05, 0.04, 0.03), "rapm-seed1": curve(0.06, 0.05, 0.04), "sfd": curve(0.1, 0.1, 0.1)}
    table = conv.seeds_table(done)
    assert table[-1] == "| rapm | 2 | 0.0400 / 0.0500 | 0.0450 | 0.0100 | 5.0 / 5.0 |" and len(table) == 6
    assert conv.seeds_table({"sfd": done["sfd"]}) == []  # a base without its seeded runs gets no table


def test_convergence_long_rows_are_their_bases_and_start_from_a_finished_base_only(tmp_path, monkeypatch):
    conv = _load("convergence")
    # a run's finished iterations: its newest checkpoint folder's number (what a complete checkpoint is has its own tests)
    monkeypatch.setattr(conv, "finished_iterations", lambda run: max(
        [int(p.name.split("-")[-1]) for p in (run / "checkpoints").glob("step-*")], default=0))
    rows = {name: (method, batch, sets) for name, method, batch, sets in conv.MAIN_ROWS + conv.ABLATION_ROWS}
    assert set(conv.LONG_OF) == {row for row, *_ in conv.LONG_ROWS}
    for row, method, batch, sets in conv.LONG_ROWS:
        assert (method, batch, sets) == rows[conv.LONG_OF[row]], row  # the same run, only longer
    base = conv.run_dir(tmp_path, 2, "rapm")
    (base / "checkpoints" / "step-00000250").mkdir(parents=True)
    (base / "config.json").write_text("{}")
    (base / ".rapm-lock").write_text("123")
    (base / "logs.jsonl").write_text("{}\n")
    # The base has not reached its own end: nothing is copied and the long row trains from its start.
    assert conv.start_from_base(tmp_path, 2, "long-rapm", 500) == ""
    assert not conv.run_dir(tmp_path, 2, "long-rapm").exists()
    (base / "checkpoints" / "step-00000500").mkdir()
    assert conv.start_from_base(tmp_path, 2, "long-rapm", 500) == " (from n2-rapm at 500)"
    long = conv.run_dir(tmp_path, 2, "long-rapm")
    assert (long / "logs.jsonl").read_text() == "{}\n" and not (long / ".rapm-lock").exists()
    (long / "logs.jsonl").write_text("its own\n")
    assert conv.start_from_base(tmp_path, 2, "long-rapm", 500) == ""  # a long row that exists is its own
    assert (long / "logs.jsonl").read_text() == "its own\n"


def test_convergence_page_tables_are_the_json_and_a_change_to_either_is_caught(tmp_path):
    page_tables = _load("convergence_readme")
    assert page_tables.PAGE == page_tables.ROOT / "docs" / "results" / "convergence.md"
    assert page_tables.main(["--check"]) == 0  # the committed results page says what the committed JSON holds
    page, results = tmp_path / "convergence.md", tmp_path / "convergence.json"
    page.write_text(page_tables.PAGE.read_text())
    data = json.loads(page_tables.RESULTS.read_text())
    row = next(r for r in data["rows"] if r["method"] == "rapm" and r["steps"] == 4 and r["iteration"] == 3000)
    old = f"| 4 | 3000 | {row['trajectory_error']:.4f} |"
    assert old in page.read_text()
    row["trajectory_error"] += 0.01  # the JSON moves: the page no longer says what it holds
    results.write_text(json.dumps(data))
    args = ["--results", str(results), "--page", str(page)]
    assert page_tables.main([*args, "--check"]) == 1
    assert page_tables.main(args) == 0 and page_tables.main([*args, "--check"]) == 0
    text = page.read_text()
    assert old not in text and f"| 4 | 3000 | {row['trajectory_error']:.4f} |" in text
    page.write_text(text.replace("<!-- /convergence:few -->\n", ""))  # a block that lost its end is refused
    with pytest.raises(SystemExit, match="convergence blocks"):
        page_tables.main(args)


def test_readme_holds_no_generated_tables():
    """The README is the user's page: the generated convergence tables live in docs/results/convergence.md."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "<!-- convergence:" not in readme


@pytest.mark.parametrize("relative_weight", [1.0, 0.25, 0.0])
def test_the_per_slot_loop_computes_the_methods_student_loss(relative_weight):
    """The speed benchmark's straightforward loop (harness.per_slot_losses) is the method's own loss, slot by slot."""
    import dataclasses

    import torch

    gpu = _load("gpu")
    harness = sys.modules["harness"]  # the module gpu.py imports its Loop from
    loop, batch, _, _, _ = gpu.build("sd15", True, torch.device("cpu"), False, 2)
    with torch.no_grad():  # the student's LoRA moved off zero, so its step differs from the teacher's
        for name, p in loop.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    loop.method = dataclasses.replace(loop.method, adv_weight=0.0, relative_weight=relative_weight,
                                      relative=relative_weight > 0, slot_weights=[1.0, 0.5, 2.0, 1.5])
    batch = dataclasses.replace(batch, delta_latents=None)  # both compute the teacher's Δ-step
    with torch.no_grad():
        ours = sum(float(loss) for loss, _ in loop.method.generator_losses(loop.context(batch, [0]), batch))
        slots = sum(float(loss) for loss, _ in harness.per_slot_losses(loop, batch, "student", [0]))
    assert ours > 0 and abs(slots - ours) <= 1e-5 * ours
