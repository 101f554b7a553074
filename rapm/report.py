"""The report of a run: one self-contained HTML page (images inlined) and a markdown twin.

It shows the metrics table (``RUN/evaluation.json`` from ``rapm evaluate --out``), the
sample grids side by side (one row per model, the same prompts and noise in every
column, each row labelled in the image with its model, steps and guidance), the teacher's
quality against its step count with the students as points on it, every training sample
grid in order, the validation and loss curves, the wall times and the run's configuration.
Grids are upscaled with nearest-neighbour so that one image is at least ``MIN_CELL`` pixels.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shlex
from collections import defaultdict
from pathlib import Path
from typing import Optional

import typer

from rapm.errors import RapmError
from rapm.evaluate import markdown_table
from rapm.folders import Staged, commit, discard, stage
from rapm.files import sha256_file


class ReportError(RapmError):
    pass


MIN_CELL = 64  # pixels on screen of one image of a grid: a 16x16 digit is drawn at 4x


def grid_cell(height: int, rows: int, padding: int = 2) -> int:
    """The image size of a ``rapm.sample.save_grid`` grid of ``rows`` rows and ``height`` pixels."""
    return max(1, (height - padding) // max(rows, 1) - padding)


def labelled_grid(png: Path, labels: list[str], out: Path, title: str | None = None) -> None:
    """``png`` (a save_grid grid, one row per label) upscaled with nearest-neighbour so an image is at least
    MIN_CELL pixels, each row's label drawn left of it (PIL's default font) and ``title`` above; written to ``out``."""
    from PIL import Image, ImageDraw, ImageFont

    with Image.open(png) as im:
        grid = im.convert("RGB")
    cell = grid_cell(grid.height, len(labels))
    scale = max(1, math.ceil(MIN_CELL / cell))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=14)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max([measure.textbbox((0, 0), t, font=font)[2] for t in labels] + [0]) + 16
    top = 24 if title else 0
    page = Image.new("RGB", (label_width + grid.width, top + grid.height), "white")
    page.paste(grid, (label_width, top))
    draw = ImageDraw.Draw(page)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    row_height = grid.height / max(len(labels), 1)
    for k, text in enumerate(labels):
        box = measure.textbbox((0, 0), text, font=font)
        draw.text((8, top + row_height * (k + 0.5) - (box[1] + box[3]) / 2), text, fill="black", font=font)
    page.save(out, format="PNG")


def teacher_curve(result: dict, out_png: Path) -> bool:
    """The teacher's DDIM quality against its steps (evaluate's ``teacher_curve``), the other rows as points on it."""
    curve = result.get("teacher_curve") or []
    if not curve:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("trajectory_error", "fd_teacher") if all(k in c for c in curve)]
    titles = {"trajectory_error": f"trajectory error to the teacher's DDIM-{result.get('reference_steps')}",
              "fd_teacher": "FD to the teacher's images"}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps = [c["steps"] for c in curve]
        ax.plot(steps, [c[key] for c in curve], marker="o", color="0.3", label="teacher DDIM")
        for row in result["rows"]:
            if row["method"] == "teacher-ddim" or key not in row:
                continue
            marker = "s" if row["method"].startswith("teacher-") else "*"
            ax.scatter([row["steps"]], [row[key]], marker=marker, s=90 if marker == "*" else 40, zorder=3,
                       label=f"{row['method']}-{row['steps']}")
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(x) for x in steps])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_title(titles[key], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save_figure(fig, out_png)


def _save_figure(fig, out_png: Path) -> bool:
    """A finished figure to ``out_png`` (its folder made), closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def training_wall_time(log_file: Path) -> tuple[float, int, float] | None:
    """(seconds of the training iterations, their count, seconds of validation) from logs.jsonl; None without one."""
    if not log_file.exists():
        return None
    train_s, count, val_s = 0.0, 0, 0.0
    for line in log_file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        seconds = entry.get("seconds") if isinstance(entry, dict) else None
        if not isinstance(seconds, (int, float)):
            continue
        if entry.get("phase") == "validation":
            val_s += seconds
        else:
            train_s, count = train_s + seconds, count + 1
    return train_s, count, val_s


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _store_facts(config: dict) -> dict:
    """N, M and the guidance of the run's store (its manifest), or {} when the store is not at hand."""
    try:
        manifest = json.loads((Path(str(config.get("store"))) / "manifest.json").read_text(encoding="utf-8"))
        return {k: manifest[k] for k in ("steps", "substeps", "guidance") if k in manifest}
    except (OSError, ValueError, TypeError):
        return {}


def evaluate_command(run: Path, config: dict, evaluation: Path) -> list[str]:
    """The commands that make ``evaluation`` for this run: export (when RUN/lora is missing), then evaluate."""
    facts = _store_facts(config)
    steps = facts.get("steps", 4)
    teacher = str(config.get("teacher", "digits"))
    lora = run / "lora"
    commands = [] if (lora / "rapm_lora.json").exists() else [f"rapm export --run {shlex.quote(str(run))} --out "
                                                               f"{shlex.quote(str(lora))}"]
    command = (f"rapm evaluate --teacher {shlex.quote(teacher)} "
               + ("" if teacher == "digits" else "--prompts HELD_OUT_PROMPTS.txt ")
               + f"--model teacher:ddim:{steps} "
               + f"--model {shlex.quote(str(config.get('method', 'student')) + '=' + str(lora) + ':' + str(steps))} "
               + (f"--train-steps {steps * facts['substeps']} " if "substeps" in facts else "")
               + f"--out {shlex.quote(str(evaluation))}")
    return commands + [command]


def loss_curves(log_file: Path, out_png: Path) -> bool:
    """Plot the student's loss terms (summed over slots) and the discriminators' loss against the step."""
    if not log_file.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for line in log_file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" not in entry:  # validation lines: their own curves
            continue
        sums: dict[str, float] = defaultdict(float)
        for key, value in entry.items():
            if "/" in key and not key.startswith("disc_acc"):  # per-slot terms: huber_rel/3 ...
                sums[key.split("/")[0]] += value
        phase = entry["phase"]
        sums[f"{'student' if 'student' in phase else phase} loss"] = entry["loss"]
        if "disc_loss" in entry:
            sums["discriminator loss"] = entry["disc_loss"]
        for key, value in sums.items():
            if key != "loss":
                series[key].append((entry["step"], value))
    if not series:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for key, points in sorted(series.items()):
        ax = axes[1] if key.startswith(("disc", "gen", "discriminator")) else axes[0]
        steps, values = zip(*points)
        ax.plot(steps, _smooth(values), label=key, linewidth=1.2)
    axes[0].set_title("student: position-matching terms (sum over slots)")
    axes[1].set_title("adversarial terms")
    for ax in axes:
        ax.set_xlabel("iteration")
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # the default recipe trains no discriminator
            ax.text(0.5, 0.5, "no discriminator in this run", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    return _save_figure(fig, out_png)


def validation_curves(log_file: Path, out_png: Path) -> bool:
    """Plot the validation metrics (``rapm train``'s held-out trajectories) against the iteration: the paper's Fig. 5."""
    if not log_file.exists():
        return False
    points: dict[int, dict] = {}
    for line in log_file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("phase") == "validation":
            points[entry["step"]] = entry  # a resumed run may repeat one: the last counts
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(points)
    panels = [("trajectory error (held out)", [k for k in ("val_trajectory_error", "val_raw_trajectory_error",
                                                         "val_reference_error") if k in points[steps[0]]]),
              ("per slot: distance to the stored z~_n", sorted(k for k in points[steps[0]] if k.startswith("val_slot_error/"))),
              ("Fréchet distance (digits)", [k for k in ("val_fd_teacher", "val_fd_real") if k in points[steps[0]]])]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            xs = [s for s in steps if key in points[s]]
            ax.plot(xs, [points[s][key] for s in xs], marker="o", markersize=3, label=key[4:])
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save_figure(fig, out_png)


def _smooth(values, window: int = 10) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="image-rendering: pixelated; max-width: 100%;">'


def report(run: Path, evaluation: Path | None = None, out: Path | None = None) -> Path:
    """Write ``RUN/report.html`` and ``RUN/report.md`` (with their images in ``report_files/``); return the HTML path."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise ReportError(f"{run / 'config.json'} does not exist: {run} is not a rapm run directory (rapm train --out)")
    config = _read_json(run / "config.json", "restore it from the run's checkpoint folder or rerun rapm train")
    evaluation = Path(evaluation) if evaluation else run / "evaluation.json"
    result = _read_json(evaluation, "rerun rapm evaluate") if evaluation.exists() else None
    if result is not None and not (isinstance(result, dict) and isinstance(result.get("rows"), list)):
        raise ReportError(f"{evaluation}: field 'rows' is missing: not a rapm evaluate result; rerun rapm evaluate")
    out = Path(out) if out else run / "report.html"
    assets = out.parent / "report_files"
    facts = _store_facts(config)
    # the set: the images, report.md, then report.html (the commit point), each staged whole, renamed into place together
    staged = []
    try:
        plots = {"losses": _plot(assets / "losses.png", lambda tmp: loss_curves(run / "logs.jsonl", tmp)),
                 "validation": _plot(assets / "validation.png", lambda tmp: validation_curves(run / "logs.jsonl", tmp)),
                 "teacher_curve": _plot(assets / "teacher_curve.png",
                                        lambda tmp: result is not None and teacher_curve(result, tmp))}
        staged += [p for p in plots.values() if p is not None]
        grid = _evaluation_grid(evaluation, result)
        if grid is not None:
            labels = [f"{r['method']}, {r['steps']} steps, guidance {_number(r.get('guidance'))}" for r in result["rows"]]
            plots["samples"] = stage(assets / "samples.png", lambda tmp: labelled_grid(grid, labels, tmp))
            staged.append(plots["samples"])
        n = facts.get("steps", "N")
        labels = [f"student, {n} steps, guidance 1",
                  f"teacher end point, guidance {_number(facts.get('guidance', '?'))}"]
        training = []
        for png in sorted((run / "samples").glob("step-*.png")) if (run / "samples").is_dir() else []:
            step = png.stem.split("-")[-1].lstrip("0") or "0"
            training.append((step, stage(assets / f"training-{png.stem}.png",
                                         lambda tmp, png=png, step=step: labelled_grid(png, labels, tmp,
                                                                                       f"iteration {step}"))))
        staged += [t for _, t in training]
        page, md = _pages(run, config, evaluation, result, out, plots, training)
        staged.append(stage(out.with_suffix(".md"), "\n".join(md).encode()))
        staged.append(stage(out, page.encode()))
    except BaseException:
        discard(staged)
        raise
    commit(staged)
    return out


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _evaluation_grid(evaluation: Path, result: dict | None) -> Path | None:
    """The evaluation's own grid (.png beside its JSON), or None: missing, or another evaluation's (a kill between
    its files), as the JSON's recorded sha256 says."""
    grid = evaluation.with_suffix(".png")
    if result is None or not grid.exists():
        return None
    recorded = (result.get("files") or {}).get(grid.name)
    if recorded is not None and recorded != sha256_file(grid):
        return None
    return grid


def _plot(final: Path, draw) -> Staged | None:
    """``draw(path)`` staged for ``final``; None (nothing left behind) when it has nothing to plot."""
    drawn = [False]

    def write(tmp: Path) -> None:
        drawn[0] = draw(tmp)
        if not drawn[0]:
            tmp.write_bytes(b"")  # stage hashes the file it is given: an empty one, discarded below

    staged = stage(final, write)
    if drawn[0]:
        return staged
    discard([staged])
    return None


def _read_json(path: Path, fix: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot be read as JSON ({e}); {fix}") from None


def _pages(run: Path, config: dict, evaluation: Path, result: dict | None, out: Path,
           plots: dict[str, Staged | None], training: list[tuple[str, Staged]]) -> tuple[str, list[str]]:
    """The HTML page and the markdown lines; every value from a file is escaped in the HTML."""
    esc = lambda v: html.escape(str(v))  # noqa: E731
    rel = lambda s: os.path.relpath(s.final, out.parent)  # noqa: E731

    md = [f"# rapm report: {run.name}", ""]
    body = [f"<h1>rapm report: {esc(run.name)}</h1>"]
    if result:
        md += ["## Metrics", "", f"{result.get('samples')} samples, the same prompts and seeds for every model; "
               f"trajectory error against the teacher's {result.get('reference_steps')}-step DDIM ({result.get('date')}).", "",
               markdown_table(result), ""]
        body += ["<h2>Metrics</h2>", f"<p>{esc(result.get('samples'))} samples, the same prompts and seeds for every "
                 f"model; trajectory error against the teacher's {esc(result.get('reference_steps'))}-step DDIM "
                 f"({esc(result.get('date'))}).</p>", _html_table(result)]
        if plots.get("samples") is not None:
            text = ("One row per model, labelled with its steps and guidance; each column one prompt and one noise. "
                    "Upscaled without smoothing.")
            md += ["## Samples", "", text, "", f"![samples]({rel(plots['samples'])})", ""]
            body += ["<h2>Samples</h2>", f"<p>{esc(text)}</p>", _img_tag(plots["samples"].tmp, "samples")]
        if plots["teacher_curve"] is not None:
            text = ("The teacher's DDIM at " + ", ".join(str(c["steps"]) for c in result["teacher_curve"])
                    + " steps on the same prompts and noise (the line), the other rows as points: a student below the "
                    "line beats the teacher at its step count.")
            md += ["## Teacher quality against steps", "", text, "", f"![teacher curve]({rel(plots['teacher_curve'])})", ""]
            body += ["<h2>Teacher quality against steps</h2>", f"<p>{esc(text)}</p>",
                     _img_tag(plots["teacher_curve"].tmp, "teacher quality against steps")]
    else:
        commands = evaluate_command(run, config, evaluation)
        md += [f"No evaluation yet ({evaluation} is missing). Run:", "", "```", *commands, f"rapm report --run {run}",
               "```", ""]
        body += [f"<p>No evaluation yet ({esc(evaluation)} is missing). Run:</p>",
                 f"<pre>{esc(chr(10).join(commands + [f'rapm report --run {run}']))}</pre>"]
    if plots["validation"] is not None:
        text = ("The student's N steps from the noise of held-out trajectories (never trained on), every "
                f"eval_every = {config.get('eval_every')} iterations: image RMS to the stored teacher end point, per slot "
                "the distance to the stored position, and for the digits teacher the FD to the teacher's images and to "
                "real digits. A flat curve has converged; a rising one diverges.")
        md += ["## Validation during training", "", text, "", f"![validation]({rel(plots['validation'])})", ""]
        body += ["<h2>Validation during training</h2>", f"<p>{esc(text)}</p>", _img_tag(plots["validation"].tmp, "validation")]
    if plots["losses"] is not None:
        md += ["## Training losses", "", f"![losses]({rel(plots['losses'])})", ""]
        body += ["<h2>Training losses</h2>", _img_tag(plots["losses"].tmp, "losses")]
    if training:
        text = (f"{len(training)} grids, in training order (every sample_every = {config.get('sample_every')} "
                "iterations): top row the student's N steps from the stored noise, bottom row the stored teacher end "
                "point; the same trajectories, spread over the store's prompts, in every grid.")
        md += ["## During training", "", text, ""] + [f"![iteration {step}]({rel(t)})" for step, t in training] + [""]
        body += ["<h2>During training</h2>", f"<p>{esc(text)}</p>"] + [
            f"<figure>{_img_tag(t.tmp, f'iteration {step}')}</figure>" for step, t in training]
    times = _wall_times(run, result)
    if times:
        md += ["## Wall time", ""] + [f"- {t}" for t in times] + [""]
        body += ["<h2>Wall time</h2>", "<ul>" + "".join(f"<li>{esc(t)}</li>" for t in times) + "</ul>"]
    md += ["## Configuration", "", "```json", json.dumps(config, indent=2), "```", ""]
    body += ["<h2>Configuration</h2>", f"<pre>{esc(json.dumps(config, indent=2))}</pre>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>rapm report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
            "figure{margin:1em 0}pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    return page, md


def _wall_times(run: Path, result: dict | None) -> list[str]:
    lines = []
    trained = training_wall_time(run / "logs.jsonl")
    if trained and trained[1]:
        seconds, count, validation = trained
        lines.append(f"training: {_duration(seconds)} for {count} iterations ({seconds / count:.3g} s each)"
                     + (f", plus {_duration(validation)} of validation" if validation else "")
                     + " (logs.jsonl; a resumed run counts each kept iteration once)")
    if result:
        rows = [r for r in result["rows"] if isinstance(r.get("seconds"), (int, float))]
        if isinstance(result.get("seconds"), (int, float)):
            lines.append(f"evaluation: {_duration(result['seconds'])} in all, {result.get('samples')} samples")
        lines += [f"{r['method']}-{r['steps']}: {_duration(r['seconds'])} to generate {r.get('samples')} images"
                  for r in rows]
    return lines


def _html_table(result: dict) -> str:
    lines = markdown_table(result).splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    head, body = rows[0], rows[2:]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body]
    notes = [line for line in lines if not line.startswith("|") and line.strip()]
    return "\n".join(out) + "</table>" + "".join(f"<p>{html.escape(n)}</p>" for n in notes)


def cli(
    run_arg: Optional[Path] = typer.Argument(None, show_default=False,
                                             help="The run directory, as --run (either is required)."),
    run: Optional[Path] = typer.Option(None, "--run", help="The run directory (rapm train --out); RUN or --run is "
                                       "required, as in rapm export."),
    evaluation: Optional[Path] = typer.Option(None, help="Results of rapm evaluate (default RUN/evaluation.json)."),
    out: Optional[Path] = typer.Option(None, help="HTML file (default RUN/report.html; a .md twin beside it)."),
) -> None:
    """Write the HTML/markdown report of a run."""
    if run is not None and run_arg is not None and Path(run) != Path(run_arg):
        raise ReportError(f"two runs given: {run_arg} and --run {run}; give one")
    run = run if run is not None else run_arg
    if run is None:
        raise ReportError("rapm report needs the run directory: rapm report --run RUN (or rapm report RUN)")
    path = report(run, evaluation, out)
    typer.echo(f"report: {path} (and {path.with_suffix('.md')})")
