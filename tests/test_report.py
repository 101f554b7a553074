"""The report: grids a reader can see (upscaled, rows labelled in the image), every training grid in order, the
teacher's quality-vs-steps curve with the students on it, wall times, and the command to run when nothing is
evaluated yet; a headless-browser screenshot where Chromium is installed."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rapm.evaluate import ModelSpec, evaluate
from rapm.images import save_grid
from rapm.report import MIN_CELL, PAGE_PX, browser_check, evaluate_command, find_browser, labelled_grid, report
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
    rows = len(fields.get("rows", ROWS))
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
    monkeypatch.setattr("rapm.sample.read_prompts", lambda p: ["a cat"])  # where read_prompt_file looks it up
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


def test_column_prompts_are_drawn_under_their_columns(tmp_path, monkeypatch):
    import PIL.ImageDraw

    drawn = []
    real = PIL.ImageDraw.ImageDraw.text
    monkeypatch.setattr(PIL.ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append((xy, text)) or real(
        self, xy, text, *a, **k))
    save_grid(torch.zeros(6, 3, 16, 16), tmp_path / "g.png", nrow=3)  # 2 rows of 3
    long = "a photograph of an astronaut riding a horse on the moon, highly detailed, 8k"
    labelled_grid(tmp_path / "g.png", ["student", "teacher"], tmp_path / "out.png", captions=["zero", "number 1", long])
    captions = [(xy, t) for xy, t in drawn if t not in ("student", "teacher")]
    assert captions[0][1] == "zero" and captions[1][1] == "number 1" and captions[-1][1].endswith("…")
    assert len([c for c in captions if c[0][0] == captions[-1][0][0]]) == 3  # a long prompt: 3 lines, then cut
    shown = Image.open(tmp_path / "out.png")
    assert all(shown.height - 3 * 13 - 8 <= y < shown.height for (_, y), _ in captions)  # under the grid
    xs = sorted({x for (x, _), _ in captions})
    assert len(xs) == 3 and xs[1] - xs[0] == xs[2] - xs[1] == (16 + 2) * 4  # one a column, at the 4x column pitch


DEMO_ROWS = [  # as the quick demo writes them: the reference is the training DDIM (N M = 4 x 3 = 12 steps)
    {"method": "teacher-ddim", "steps": 12, "guidance": 1.5, "fd": 729.2, "fd_teacher": 0.0, "prompt_accuracy": 1.0,
     "trajectory_error": 0.0, "trajectory_error_train": 0.0, "seconds": 1.1, "samples": 4},
    {"method": "teacher-ddim", "steps": 2, "guidance": 1.5, "fd": 650.4, "fd_teacher": 16.5, "prompt_accuracy": 1.0,
     "trajectory_error": 0.3, "trajectory_error_train": 0.3, "seconds": 0.6, "samples": 4},
    {"method": "rapm", "steps": 2, "guidance": 1.0, "fd": 688.4, "fd_teacher": 140.1, "prompt_accuracy": 0.95,
     "trajectory_error": 0.1, "trajectory_error_train": 0.1, "seconds": 0.8, "samples": 4, "lora": "lora"}]


def _demo_like(run, prompts=("a photo of a cat", "a red car", "a blue dog", "a photo of a dog")):
    curve = [{"steps": s, "trajectory_error": e, "fd_teacher": f, "seconds": 0.1}
             for s, e, f in [(1, 0.5, 900.0), (2, 0.3, 130.0), (4, 0.2, 16.5), (8, 0.1, 3.0), (12, 0.0, 0.0)]]
    _evaluation(run, reference_steps=12, train_steps=12, rows=DEMO_ROWS, real_floor_fd=1511.9, teacher_floor_fd=1151.3,
                prompts=list(prompts), teacher_curve=curve)


def test_identical_columns_are_shown_once_and_floors_above_every_model_are_explained(run_copy):
    _demo_like(run_copy)
    page = report(run_copy).read_text()
    md = (run_copy / "report.md").read_text()
    for text in (page, md):
        assert "trajectory error to DDIM-12" not in text and "the same column, shown once" in text
        assert "FD-to-teacher floor (1151.30) is above every model" in text and "from other noise" in text
        assert "real-vs-real FD floor (1511.90) is above every model" in text
    # a floor below some model's FD, a reference unlike the training DDIM: no such sentences, both columns
    rows = [dict(r, trajectory_error_train=r["trajectory_error"] + 0.01) for r in DEMO_ROWS]
    _evaluation(run_copy, reference_steps=100, train_steps=12, rows=rows, teacher_floor_fd=20.0)
    page = report(run_copy).read_text()
    assert "trajectory error to DDIM-12" in page and "shown once" not in page and "is above every model" not in page


def test_the_title_names_the_run_and_the_configuration_only_what_differs(run_copy):
    from rapm.report import config_changes

    page = report(run_copy).read_text()
    config = json.loads((run_copy / "config.json").read_text())
    title = f"rapm on the {Path(config['teacher']).name} teacher, N = 2"  # the store's N
    assert f"<title>rapm report: {title}</title>" in page and f"<h1>rapm report: {title}</h1>" in page
    changed, unused = config_changes(run_copy, config)
    names = [k for k, _, _ in changed]
    assert unused == [] and {"iterations", "lora_rank", "adv_weight", "disc_lr"} <= set(names)  # it has a discriminator
    assert not {"lr_schedule", "grad_clip", "adam_betas", "lora_targets", "ema_decay", "mixed_precision"} & set(names)
    shown = page.split("<h2>Configuration</h2>")[1].split("<details>")[0]
    assert "iterations" in shown and "grad_clip" not in shown and len(names) < len(config) / 3
    assert "grad_clip" in page.split("<details>")[1]  # every field, folded


def test_a_run_without_a_discriminator_has_no_adversarial_panel_nor_its_fields(plain_run):
    from rapm.report import config_changes

    page = report(plain_run).read_text()
    assert "trains no discriminator" in page
    with Image.open(plain_run / "report_files" / "losses.png") as im:
        assert im.width < 800  # one panel (two are 1,060 px)
    changed, unused = config_changes(plain_run, json.loads((plain_run / "config.json").read_text()))
    assert "disc_lr" in unused and not [k for k, _, _ in changed if k.startswith("disc_")]
    assert "disc_lr" not in page.split("<h2>Configuration</h2>")[1].split("<details>")[0]


@pytest.fixture(scope="module")
def plain_run(tiny_sd, sd_store, tmp_path_factory):
    """The default recipe's run (no discriminator), with training grids and validation."""
    folder = tmp_path_factory.mktemp("plain") / "run"
    train(_config(tiny_sd, sd_store, iterations=4, checkpoint_every=4, sample_every=2, num_samples=4, adv_weight=0.0,
                  relative_weight=0.0, val_fraction=0.25, eval_every=2), folder, progress=False)
    return folder


CHROMIUM = find_browser()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (make test installs Debian's chromium with apt-get where it runs as root; "
                                              "without apt-get it cannot be had here): the browser check needs one")
def test_the_report_as_a_reader_sees_it_in_headless_chromium(plain_run, tmp_path):
    """A full-page screenshot of a demo-like run's report, and what a reader needs of it: the table, every image
    decoded at its own size and shown at it, no console message nor load error, no empty section."""
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    _demo_like(run)
    page = report(run)
    shot = tmp_path / "report.png"
    seen = browser_check(page, shot)
    assert seen["console"] == [] and seen["errors"] == []
    assert seen["title"].startswith("rapm report: rapm on the ") and seen["title"].endswith(", N = 2")
    metrics, config_table = seen["tables"]
    assert metrics["rows"] == 1 + len(DEMO_ROWS) and metrics["cells"] == len(DEMO_ROWS) * 7  # every cell filled
    assert config_table["className"] == "config" and config_table["rows"] > 2
    files = {"samples": "samples.png", "teacher quality against steps": "teacher_curve.png",
             "validation": "validation.png", "losses": "losses.png",
             "iteration 2": "training-step-00000002.png", "iteration 4": "training-step-00000004.png"}
    assert sorted(i["alt"] for i in seen["images"]) == sorted(files)
    for image in seen["images"]:
        with Image.open(run / "report_files" / files[image["alt"]]) as im:
            size = im.size
        assert image["complete"] and (image["naturalWidth"], image["naturalHeight"]) == size, image  # decoded whole
        assert (image["width"], image["height"]) == size and size[0] <= PAGE_PX, image  # as the page says
        assert (image["shownWidth"], image["shownHeight"]) == size, image  # shown 1:1, not squeezed
    assert [s["title"] for s in seen["sections"]] == ["Metrics", "Samples", "Teacher quality against steps",
                                                       "Validation during training", "Training losses",
                                                       "During training", "Wall time", "Configuration"]
    assert all(s["items"] >= 1 for s in seen["sections"]), seen["sections"]
    assert all(s["items"] >= 2 for s in seen["sections"] if s["title"] != "Wall time"), seen["sections"]
    arr = np.asarray(Image.open(shot).convert("L"))
    assert arr.shape == (seen["height"], 1200) and seen["width"] == 1200  # the full page, no sideways scroll
    assert (arr < 100).mean() > 0.01  # rendered: text and images, not a blank page
