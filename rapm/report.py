"""The report of a run: one self-contained HTML page (images inlined) and a markdown twin.

It shows the metrics table (``RUN/evaluation.json`` from ``rapm evaluate --out``), the
sample grids side by side (one row per model, the same prompts and noise in every
column), the training loss curves and the run's configuration.
"""

from __future__ import annotations

import base64
import html
import json
import os
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
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


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
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


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
    """Write ``RUN/report.html`` and ``RUN/report.md``; return the HTML path."""
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
    curves = assets / "losses.png"
    # the set: the plots, report.md, then report.html (the commit point), each staged whole, renamed into place together
    staged = []
    try:
        plots = {"losses": _plot(curves, lambda tmp: loss_curves(run / "logs.jsonl", tmp)),
                 "validation": _plot(assets / "validation.png", lambda tmp: validation_curves(run / "logs.jsonl", tmp))}
        staged += [p for p in plots.values() if p is not None]
        page, md = _pages(run, config, evaluation, result, out, plots)
        staged.append(stage(out.with_suffix(".md"), "\n".join(md).encode()))
        staged.append(stage(out, page.encode()))
    except BaseException:
        discard(staged)
        raise
    commit(staged)
    return out


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
           plots: dict[str, Staged | None]) -> tuple[str, list[str]]:
    """The HTML page and the markdown lines; every value from a file is escaped in the HTML."""
    esc = lambda v: html.escape(str(v))  # noqa: E731
    curves, has_curves = plots["losses"] and plots["losses"].final, plots["losses"] is not None
    val_png, has_validation = plots["validation"] and plots["validation"].final, plots["validation"] is not None
    grid = evaluation.with_suffix(".png")
    if result is not None and grid.exists():
        recorded = (result.get("files") or {}).get(grid.name)
        if recorded is not None and recorded != sha256_file(grid):
            grid = None  # the grid of another evaluation (a kill between its files): leave it out
    samples = sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []

    md = [f"# rapm report: {run.name}", ""]
    body = [f"<h1>rapm report: {html.escape(run.name)}</h1>"]
    if result:
        table = markdown_table(result)
        rows = [r["method"] + f"-{r['steps']}" for r in result["rows"]]
        md += ["## Metrics", "", f"{result.get('samples')} samples, the same prompts and seeds for every model; "
               f"trajectory error against the teacher's {result.get('reference_steps')}-step DDIM ({result.get('date')}).", "",
               table, ""]
        body += ["<h2>Metrics</h2>", f"<p>{esc(result.get('samples'))} samples, the same prompts and seeds for every "
                 f"model; trajectory error against the teacher's {esc(result.get('reference_steps'))}-step DDIM "
                 f"({esc(result.get('date'))}).</p>", _html_table(result)]
        if grid is not None and grid.exists():
            md += ["## Samples", "", "Rows, top to bottom: " + ", ".join(rows) + ".", "",
                   f"![samples]({os.path.relpath(grid, out.parent)})", ""]
            body += ["<h2>Samples</h2>", f"<p>Rows, top to bottom: {html.escape(', '.join(rows))}. "
                     "Each column: one prompt and one noise.</p>", _img_tag(grid, "samples")]
    else:
        md += [f"No evaluation yet ({evaluation} is missing): run `rapm evaluate --out {evaluation}`.", ""]
        body += [f"<p>No evaluation yet ({html.escape(str(evaluation))} is missing).</p>"]
    if has_validation:
        text = ("The student's N steps from the noise of held-out trajectories (never trained on), every "
                f"eval_every = {config.get('eval_every')} iterations: image RMS to the stored teacher end point, per slot "
                "the distance to the stored position, and for the digits teacher the FD to the teacher's images and to "
                "real digits. A flat curve has converged; a rising one diverges.")
        md += ["## Validation during training", "", text, "", f"![validation]({os.path.relpath(val_png, out.parent)})", ""]
        body += ["<h2>Validation during training</h2>", f"<p>{html.escape(text)}</p>",
                 _img_tag(plots["validation"].tmp, "validation")]
    if has_curves:
        md += ["## Training losses", "", f"![losses]({os.path.relpath(curves, out.parent)})", ""]
        body += ["<h2>Training losses</h2>", _img_tag(plots["losses"].tmp, "losses")]
    if samples:
        md += ["## During training", "", f"Top row: student, {len(samples)} grids; bottom row: the stored teacher end point.",
               "", f"![last training grid]({os.path.relpath(samples[-1], out.parent)})", ""]
        body += ["<h2>During training</h2>", "<p>Top row: the student's N steps from the stored noise; bottom row: "
                 f"the stored teacher end point ({html.escape(samples[-1].name)}).</p>", _img_tag(samples[-1], "training grid")]
    md += ["## Configuration", "", "```json", json.dumps(config, indent=2), "```", ""]
    body += ["<h2>Configuration</h2>", f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>rapm report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
            "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>" + "\n".join(body) + "</body></html>")
    return page, md


def _html_table(result: dict) -> str:
    lines = markdown_table(result).splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    head, body = rows[0], rows[2:]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body]
    notes = [line for line in lines if not line.startswith("|") and line.strip()]
    return "\n".join(out) + "</table>" + "".join(f"<p>{html.escape(n)}</p>" for n in notes)


def cli(
    run: Path = typer.Argument(..., help="The run directory (rapm train --out)."),
    evaluation: Optional[Path] = typer.Option(None, help="Results of rapm evaluate (default RUN/evaluation.json)."),
    out: Optional[Path] = typer.Option(None, help="HTML file (default RUN/report.html; a .md twin beside it)."),
) -> None:
    """Write the HTML/markdown report of a run."""
    path = report(run, evaluation, out)
    typer.echo(f"report: {path} (and {path.with_suffix('.md')})")
