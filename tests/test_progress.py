"""Feedback (issue 31, point 5): every verb takes --no-progress, which silences rapm's bars and the libraries'
(transformers' "Loading weights", diffusers' "Loading pipeline components"); sample and evaluate count images."""

import os
import subprocess
import sys

import pytest

from rapm.cli import VERBS

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _rapm(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rapm", *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_takes_no_progress(verb):
    from typer.testing import CliRunner

    from rapm.cli import app

    result = CliRunner().invoke(app, [verb, "--help"])
    assert result.exit_code == 0 and "--no-progress" in result.output


def test_sample_counts_images_and_no_progress_prints_no_bar_of_anyone(tmp_path):
    shown = _rapm("sample", "--teacher", "digits", "--prompt", "a handwritten 3", "--num-per-prompt", "3",
                  "--batch-size", "2", "--steps", "2", "--out", tmp_path / "a", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "sample: 100%" in shown.stderr and "3/3" in shown.stderr and "image" in shown.stderr
    quiet = _rapm("sample", "--teacher", "digits", "--prompt", "a handwritten 3", "--num-per-prompt", "3",
                  "--batch-size", "2", "--steps", "2", "--out", tmp_path / "b", "--no-progress", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" in shown.stderr  # transformers' bar, which --no-progress must silence (can fail)
    assert "%|" not in quiet.stderr and "Loading" not in quiet.stderr, quiet.stderr
    assert quiet.stdout.strip() == f"wrote 3 images and samples.jsonl to {tmp_path / 'b'}"


def test_evaluate_counts_every_image_it_generates(tmp_path):
    result = _rapm("evaluate", "--num", "4", "--reference-steps", "4", "--teacher-curve", "2", "--model",
                   "teacher:ddim:2", "--out", tmp_path / "e.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # the reference (4 images), teacher:ddim:2 (4) and the floor (4), in one bar; the curve's 2 steps are the row's
    last = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("evaluate:")][-1]
    assert "12/12" in last and "image" in last, last
    again = _rapm("evaluate", "--num", "4", "--reference-steps", "4", "--teacher-curve", "1,2", "--model",
                  "teacher:ddim:2", "--out", tmp_path / "f.json", cwd=tmp_path)
    last = [line for line in again.stderr.replace("\r", "\n").splitlines() if line.startswith("evaluate:")][-1]
    assert "16/16" in last, last  # a curve point of its own: 4 more
    quiet = _rapm("evaluate", "--num", "4", "--reference-steps", "4", "--teacher-curve", "", "--out",
                  tmp_path / "q.json", "--no-progress", cwd=tmp_path)
    assert quiet.returncode == 0 and "%|" not in quiet.stderr and "Loading" not in quiet.stderr, quiet.stderr
