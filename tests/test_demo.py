"""The whole flow on the built-in digits teacher, at --quick size; the metric and report code on known cases."""

import json
import math

import pytest
import torch

from rapm.evaluate import EvaluateError, ModelSpec, markdown_table, trajectory_error

pytestmark = []


def test_trajectory_error_is_the_mean_per_sample_rms():
    ref = torch.zeros(2, 1, 4, 4)
    images = torch.stack([torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), -1.5)])
    assert trajectory_error(images, ref) == pytest.approx(1.0)
    assert trajectory_error(ref, ref) == 0.0


def test_model_specs_parse():
    assert ModelSpec.parse("teacher:dpmsolver:4") == ModelSpec("teacher-dpmsolver", 4, "dpmsolver")
    assert ModelSpec.parse("rapm=runs/x/lora:2") == ModelSpec("rapm", 2, "ddim", lora="runs/x/lora")
    with pytest.raises(EvaluateError, match="teacher:ddim:STEPS"):
        ModelSpec.parse("teacher:ddim")


def test_markdown_table_lists_every_row():
    result = {"samples": 3, "rows": [
        {"method": "teacher-ddim", "steps": 100, "guidance": 2.0, "fd": 1.0, "prompt_accuracy": 0.9, "trajectory_error": 0.0},
        {"method": "rapm", "steps": 4, "guidance": 1.0, "fd": 2.5, "prompt_accuracy": 0.95, "trajectory_error": 0.1}],
        "real_floor_fd": 0.5}
    table = markdown_table(result)
    assert "| rapm | 4 | 1 | 2.50 | 95.0% | 0.1000 |" in table and "floor at 3 samples: 0.50" in table


def test_markdown_table_shows_fd_to_the_teacher_and_the_training_trajectories():
    result = {"samples": 3, "reference_steps": 100, "train_steps": 40, "teacher_floor_fd": 0.25, "rows": [
        {"method": "rapm", "steps": 4, "guidance": 1.0, "fd": 2.5, "fd_teacher": 1.5, "prompt_accuracy": 0.95,
         "trajectory_error": 0.1, "trajectory_error_train": 0.05}]}
    table = markdown_table(result)
    assert "FD to teacher" in table and "to DDIM-40" in table and "| rapm | 4 | 1 | 2.50 | 1.50 | 95.0% | 0.1000 | 0.0500 |" in table
    assert "FD-to-teacher floor at 3 samples (the teacher's DDIM-100 from other noise): 0.25" in table


def test_quick_demo_runs_the_whole_flow(tmp_path):
    from rapm.demo.flow import run_demo

    result = run_demo(tmp_path / "demo", quick=True, progress=False)
    methods = [(r["method"], r["steps"]) for r in result["rows"]]
    assert methods[0][0] == "teacher-ddim" and ("rapm", 4) in methods and ("teacher-dpmsolver", 4) in methods
    for row in result["rows"]:
        assert all(math.isfinite(row[k]) for k in ("fd", "prompt_accuracy", "trajectory_error"))
    assert result["rows"][0]["trajectory_error"] == 0.0  # the reference against itself
    assert result["rows"][0]["fd_teacher"] == pytest.approx(0.0, abs=1e-6)  # the teacher's images against themselves
    assert all(r["fd_teacher"] > 0 for r in result["rows"][1:]) and result["teacher_floor_fd"] > 0
    # the distribution metrics against the teacher from other noise; the reference row is the floor's pair
    reference = result["rows"][0]
    assert reference["fd_teacher_other"] == pytest.approx(result["teacher_floor_fd"], rel=1e-6)
    assert all(0 <= r[k] <= 1 for r in result["rows"] for k in ("precision", "recall", "coverage"))
    assert all(r["sharpness"] > 0 for r in result["rows"])
    run = tmp_path / "demo" / "run"
    saved = json.loads((run / "evaluation.json").read_text())
    assert saved["rows"] == result["rows"]
    page = (run / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page and "Training losses" in page
    assert (run / "report.md").exists() and (tmp_path / "demo" / "lora" / "pytorch_lora_weights.safetensors").exists()
    # Rerunning resumes: the store and the run are complete, nothing is recomputed or refused.
    again = run_demo(tmp_path / "demo", quick=True, progress=False)
    assert [r["method"] for r in again["rows"]] == [r["method"] for r in result["rows"]]
