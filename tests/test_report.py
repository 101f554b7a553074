"""The report: grids a reader can see (upscaled, rows labelled in the image), every training grid in order, the
teacher's quality-vs-steps curve with the students on it, wall times, and the command to run when nothing is
evaluated yet; a headless-browser screenshot where Chromium is installed."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from rapm.evaluate import ModelSpec, evaluate
from rapm.report import MIN_CELL, evaluate_command, labelled_grid, report
from rapm.sample import save_grid
from rapm.train import train
from test_train import _config


@pytest.fixture(scope="module")
def run(tiny_sd, sd_store, tmp_path_factory):
    """A 4-iteration run with a training grid at 2 and 4 and validation."""
    folder = tmp_path_factory.mktemp("run") / "run"
    train(_config(tiny_sd, sd_store, iterations=4, checkpoint_every=2, sample_every=2, num_samples=3,
                  val_fraction=0.25, eval_every=2), folder, progress=False)
    return folder


@pytest.fixture
def run_copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


ROWS = [{"method": "teacher-ddim", "steps": 100, "guidance": 3.0, "trajectory_error": 0.0, "seconds": 2.0, "samples": 4},
        {"method": "teacher-ddim", "steps": 2, "guidance": 3.0, "trajectory_error": 0.3, "seconds": 0.1, "samples": 4},
        {"method": "rapm", "steps": 2, "guidance": 1.0, "trajectory_error": 0.1, "seconds": 0.1, "samples": 4}]
CURVE = [{"steps": s, "trajectory_error": e, "seconds": 0.1} for s, e in [(1, 0.5), (2, 0.3), (4, 0.2), (8, 0.1),
                                                                           (25, 0.05), (100, 0.0)]]


def _evaluation(run, cell: int = 8, **fields):
    """An evaluation.json with its 3-row grid of ``cell``-pixel images, as rapm evaluate writes them."""
    rows = len(ROWS)
    # each row one shade, so the test can find the rows in the upscaled grid
    images = torch.cat([torch.full((4, 3, cell, cell), -0.5 + 0.5 * k) for k in range(rows)])
    save_grid(images, run / "evaluation.png", nrow=4)
    result = {"samples": 4, "reference_steps": 100, "date": "2026-12-01", "rows": ROWS, "teacher_curve": CURVE,
              "seconds": 12.5, **fields}
    (run / "evaluation.json").write_text(json.dumps(result))


def _dark_rows(png, x0, x1):
    """The rows of pixels that hold text (dark pixels) between columns x0 and x1."""
    arr = np.asarray(Image.open(png).convert("L"))[:, x0:x1]
    return np.nonzero((arr < 100).any(axis=1))[0]


def test_sample_grids_are_upscaled_so_an_image_is_64_pixels_and_rows_are_labelled_in_the_image(run_copy):
    _evaluation(run_copy, cell=8)
    report(run_copy)
    png = run_copy / "report_files" / "samples.png"
    grid = Image.open(run_copy / "evaluation.png")
    shown = Image.open(png)
    scale = (shown.height) / grid.height
    assert scale >= MIN_CELL / 8 and scale == int(scale)  # nearest-neighbour, a whole factor: 8 px -> 64 px
    label_width = shown.width - grid.width * int(scale)
    assert label_width > 50  # the labels' strip, left of the grid
    text = _dark_rows(png, 0, label_width - 4)
    band = shown.height / 3
    assert {int(y // band) for y in text} == {0, 1, 2}  # one label in each model's row
    # nearest-neighbour: the upscaled grid holds only the grid's own pixel values (no smoothing)
    assert set(np.unique(np.asarray(shown.convert("L"))[:, label_width:])) <= set(np.unique(np.asarray(grid.convert("L"))))
    page = (run_copy / "report.html").read_text()
    assert "<h2>Samples</h2>" in page and "labelled with its steps and guidance" in page


def test_labels_say_model_steps_and_guidance(tmp_path, monkeypatch):
    import PIL.ImageDraw

    drawn = []
    real = PIL.ImageDraw.ImageDraw.text
    monkeypatch.setattr(PIL.ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append(text) or real(
        self, xy, text, *a, **k))
    save_grid(torch.zeros(4, 3, 16, 16), tmp_path / "g.png", nrow=2)
    labelled_grid(tmp_path / "g.png", ["rapm, 4 steps, guidance 1", "teacher-ddim, 4 steps, guidance 2"],
                  tmp_path / "out.png", "iteration 7")
    assert drawn == ["iteration 7", "rapm, 4 steps, guidance 1", "teacher-ddim, 4 steps, guidance 2"]
    assert Image.open(tmp_path / "out.png").height >= 2 * MIN_CELL


def test_every_training_grid_is_shown_in_order_with_labelled_rows(run_copy):
    report(run_copy)
    page = (run_copy / "report.html").read_text()
    md = (run_copy / "report.md").read_text()
    assert sorted(p.name for p in (run_copy / "samples").glob("*.png")) == ["step-00000002.png", "step-00000004.png"]
    assert page.index('alt="iteration 2"') < page.index('alt="iteration 4"')
    assert md.index("training-step-00000002.png") < md.index("training-step-00000004.png")
    for name in ("training-step-00000002.png", "training-step-00000004.png"):
        shown = Image.open(run_copy / "report_files" / name)
        assert shown.height >= 2 * MIN_CELL  # two rows (student, teacher) of 64 px or more


def test_teacher_curve_with_the_students_as_points_and_wall_times(run_copy):
    _evaluation(run_copy)
    report(run_copy)
    page = (run_copy / "report.html").read_text()
    assert "<h2>Teacher quality against steps</h2>" in page and (run_copy / "report_files" / "teacher_curve.png").exists()
    assert "The teacher&#x27;s DDIM at 1, 2, 4, 8, 25, 100 steps" in page
    assert "<h2>Validation during training</h2>" in page and "<h2>Training losses</h2>" in page
    wall = page.split("<h2>Wall time</h2>")[1]
    assert "training: " in wall and "for 4 iterations" in wall and "of validation" in wall
    assert "evaluation: 12.5 s in all" in wall and "rapm-2: 0.1 s to generate 4 images" in wall


def test_a_report_without_evaluation_gives_the_commands_to_run(run_copy):
    page = report(run_copy).read_text()
    config = json.loads((run_copy / "config.json").read_text())
    commands = evaluate_command(run_copy, config, run_copy / "evaluation.json")
    assert commands[0] == f"rapm export --run {run_copy} --out {run_copy}/lora"
    assert commands[1] == (f"rapm evaluate --teacher {config['teacher']} --prompts HELD_OUT_PROMPTS.txt "
                           f"--model teacher:ddim:2 --model rapm={run_copy}/lora:2 --train-steps 6 "
                           f"--out {run_copy}/evaluation.json")
    for command in commands:
        assert command.replace("'", "&#x27;") in page
    assert "rapm evaluate" in (run_copy / "report.md").read_text()


def test_the_suggested_commands_parse_as_the_verbs_options(run_copy, monkeypatch):
    """The export and evaluate lines are what the verbs accept (their bodies stubbed: only the parsing is checked)."""
    import shlex

    import rapm.evaluate
    import rapm.export
    from typer.testing import CliRunner

    from rapm.cli import app

    config = json.loads((run_copy / "config.json").read_text())
    seen = []
    monkeypatch.setattr(rapm.evaluate, "evaluate", lambda *a, **k: seen.append((a, k)) or {"rows": []})
    monkeypatch.setattr("rapm.trajectories.read_prompts", lambda p: ["a cat"])
    export_line, evaluate_line = evaluate_command(run_copy, config, run_copy / "evaluation.json")
    result = CliRunner().invoke(app, shlex.split(evaluate_line)[1:])
    assert result.exit_code == 0, result.output
    (_, models, *_), kwargs = seen[0]
    assert [(m.method, m.steps, m.lora) for m in models] == [("teacher-ddim", 2, None), ("rapm", 2, f"{run_copy}/lora")]
    assert kwargs["train_steps"] == 6 and kwargs["teacher_curve"] == [1, 2, 4, 8, 25, 100]
    assert shlex.split(export_line)[:2] == ["rapm", "export"]


def test_evaluate_measures_the_teachers_curve_on_the_same_prompts_reusing_its_rows(tiny_sd):
    result = evaluate(str(tiny_sd), [ModelSpec("teacher-ddim", 2)], ["a cat", "a dog"], [1, 2], reference_steps=8,
                      progress=False, teacher_curve=(1, 2, 8))
    curve = {c["steps"]: c for c in result["teacher_curve"]}
    assert sorted(curve) == [1, 2, 8] and curve[8]["trajectory_error"] == 0.0  # the reference itself
    row2 = next(r for r in result["rows"] if r["steps"] == 2)
    assert curve[2]["trajectory_error"] == row2["trajectory_error"]  # the same model on the same noise: reused
    assert curve[1]["trajectory_error"] > curve[2]["trajectory_error"] > 0
    assert result["seconds"] > 0


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium/chrome binary on PATH: the report's screenshot needs one")
def test_the_report_renders_in_headless_chromium(run_copy, tmp_path):
    _evaluation(run_copy)
    page = report(run_copy)
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,3000", page.resolve().as_uri()], check=True, timeout=120, capture_output=True)
    arr = np.asarray(Image.open(shot).convert("L"))
    assert arr.shape[0] >= 3000 * 0.9 and (arr < 100).mean() > 0.01  # rendered: text and images, not a blank page
