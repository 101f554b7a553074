"""The user's own preview prompts during training (`--set sample_prompts=FILE`, kohya's --sample_prompts), and the
sample grids saved at the report's upscale (issue 31, point 4)."""

import json

import numpy as np
import pytest
from PIL import Image

from rapm.config import ConfigError, TrainConfig, apply_overrides
from rapm.images import MIN_CELL
from rapm.train import train
from rapm.trajectories import write_trajectories

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7", "the digit 0"]
OWN = ["the number one", "a handwritten 8"]


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("previews")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return write_trajectories("digits", root / "prompts.txt", root / "store", steps=2, substeps=2, progress=False)


def _config(store, **kw) -> TrainConfig:
    return apply_overrides(TrainConfig(), {"teacher": "digits", "store": str(store.path), "preset": "digits",
                                           "iterations": 2, "checkpoint_every": 2, "sample_every": 2, "num_samples": 2,
                                           "eval_every": 0, "val_fraction": 0, **kw}, "test")


def test_sample_prompts_from_a_file_are_kept_in_the_run_config(digits_store, tmp_path):
    (tmp_path / "mine.txt").write_text("\r\n".join(OWN) + "\r\n\r\n")  # Windows line ends, a blank line
    config = _config(digits_store, sample_prompts=str(tmp_path / "mine.txt"))
    assert config.sample_prompts == OWN
    run = tmp_path / "run"
    train(config, run, progress=False)
    assert json.loads((run / "config.json").read_text())["sample_prompts"] == OWN  # a resume needs no file


def test_a_missing_or_empty_prompts_file_is_one_error_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="field 'sample_prompts'.*does not exist"):
        apply_overrides(TrainConfig(), {"sample_prompts": str(tmp_path / "none.txt")}, "--set")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="field 'sample_prompts'.*no prompts"):
        apply_overrides(TrainConfig(), {"sample_prompts": str(tmp_path / "blank.txt")}, "--set")
    with pytest.raises(ConfigError, match="field 'sample_prompts' must be a list of prompts"):
        apply_overrides(TrainConfig(), {"sample_prompts": 3}, "cfg.toml")


def test_the_preview_grid_is_the_students_own_samples_at_screen_size(digits_store, tmp_path):
    """The grid's cells are what `rapm sample` draws with the run's student from seeds 0, 1 (the EMA where the run
    keeps one), each prompt its own; enlarged 4x (16 px digits to MIN_CELL 64) on disk, as the report shows them."""
    from rapm.images import to_pil
    from rapm.run import load_student
    from rapm.sample import generate

    run = tmp_path / "run"
    train(_config(digits_store, sample_prompts=OWN), run, progress=False)
    png = run / "samples" / "prompts-step-00000002.png"
    grid = np.asarray(Image.open(png).convert("L"))
    cell = MIN_CELL  # 16 px x 4
    assert grid.shape == (cell + 4, 2 * (cell + 2) + 2)
    store_grid = Image.open(run / "samples" / "step-00000002.png")
    assert store_grid.size == (2 * (cell + 2) + 2, 2 * (cell + 2) + 2)  # num_samples 2: student over teacher, at 4x

    teacher, _, _ = load_student(run, text_encoders=True)
    latents = generate(teacher, OWN, [0, 1], 2, guidance=1.0, role="student")
    images = teacher.decode(latents).float()
    cells = []
    for k in range(2):
        x = 2 + k * (cell + 2)
        got = grid[2:2 + cell, x:x + cell][::4, ::4].astype(int)  # nearest-neighbour: every 4th pixel is the image
        want = np.asarray(to_pil(images[k]).convert("L")).astype(int)
        assert np.abs(got - want).max() <= 1, k
        assert (grid[2:2 + cell, x:x + cell] == np.kron(want, np.ones((4, 4), int))).mean() > 0.95
        cells.append(got)
    assert np.abs(cells[0] - cells[1]).max() > 20  # two prompts, two images: the comparison above can fail


def test_the_report_shows_the_preview_prompts(digits_store, tmp_path):
    from rapm.report import report

    run = tmp_path / "run"
    train(_config(digits_store, sample_prompts=OWN), run, progress=False)
    out = report(run)
    md = out.with_suffix(".md").read_text()
    assert "## Your preview prompts" in md and "the number one; a handwritten 8" in md
    assert (out.parent / "report_files" / "previews.png").is_file() and "previews.png" in md
