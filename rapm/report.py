"""The report of a run: one self-contained HTML page (images inlined) and a markdown twin.

It shows the metrics table (``RUN/evaluation.json`` from ``rapm evaluate --out``), the
sample grids side by side (one row per model, the same prompts and noise in every
column, each row labelled in the image with its model, steps and guidance), the teacher's
quality against its step count with the students as points on it, every training sample
grid in order, the validation and loss curves, the wall times and the fields of the run's configuration that
differ from the defaults. Grids are upscaled with nearest-neighbour so that one image is at least ``MIN_CELL``
pixels, with each column's prompt under it where the prompts are known; every figure is at most ``PAGE_PX`` wide, so
the page shows every image at its own size.

``browser_check`` opens a report in headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it) and returns
what a reader sees: every image's decoded size, the console's messages, the sections with nothing in them; with a
full-page screenshot. tests/test_report.py asserts on it, and docs/report.png is its screenshot of the quick demo's
report: ``rapm demo --quick --out demo-out``, then
``browser_check("demo-out/run/report.html", "docs/report.png", colors=96)``.
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

from rapm import config as cfg
from rapm.errors import RapmError
from rapm.evaluate import markdown_table
from rapm.families import BUILTIN_TEACHERS, read_teacher_info
from rapm.files import sha256_file
from rapm.folders import Staged, commit, discard, output_lock, refuse_link, stage
from rapm.images import MIN_CELL  # pixels on screen of one image of a grid: a 16x16 digit at 4x
from rapm.methods import build_method, resolve
from rapm.monitor import sample_indices
from rapm.plugins import plugin_for
from rapm.store import read_store_prompts


class ReportError(RapmError):
    pass


PAGE_PX = 1060  # the page's width for content (body 1100 px less its padding): no image is drawn wider
CAPTION_LINES = 3  # lines of a column's prompt under a grid; a longer prompt ends in an ellipsis


def grid_cell(height: int, rows: int, padding: int = 2) -> int:
    """The image size of a ``rapm.sample.save_grid`` grid of ``rows`` rows and ``height`` pixels."""
    return max(1, (height - padding) // max(rows, 1) - padding)


def grid_columns(width: int, cell: int, padding: int = 2) -> int:
    """The columns of a ``save_grid`` grid ``width`` pixels wide of ``cell``-pixel images."""
    return max(1, (width - padding) // (cell + padding))


def _wrap(text: str, width: float, font, measure, lines: int) -> list[str]:
    """``text`` broken at spaces into at most ``lines`` lines of at most ``width`` pixels, the last one cut with an
    ellipsis when the text goes on."""
    out, words = [], text.split()
    fits = lambda t: measure.textlength(t, font=font) <= width  # noqa: E731
    while words and len(out) < lines:
        line = words.pop(0)
        if not fits(line):  # a word wider than the column: cut, its rest on the next line
            cut = len(line) - 1
            while cut > 1 and not fits(line[:cut]):
                cut -= 1
            words.insert(0, line[cut:])
            line = line[:cut]
        while words and fits(f"{line} {words[0]}"):
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words and out:
        last = out[-1]
        while last and not fits(last + "…"):
            last = last[:-1]
        out[-1] = last + "…"
    return out


def labelled_grid(png: Path, labels: list[str], out: Path, title: str | None = None,
                  captions: list[str] | None = None) -> None:
    """``png`` (a save_grid grid, one row per label) upscaled with nearest-neighbour so an image is at least
    MIN_CELL pixels, each row's label drawn left of it (PIL's default font), ``title`` above and, with ``captions``
    (one a column: its prompt), each column's caption under it; written to ``out``."""
    from PIL import Image, ImageDraw, ImageFont

    with Image.open(png) as im:
        grid = im.convert("RGB")
    cell = grid_cell(grid.height, len(labels))
    columns = grid_columns(grid.width, cell)
    scale = max(1, math.ceil(MIN_CELL / cell))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=11)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max([measure.textbbox((0, 0), t, font=font)[2] for t in labels] + [0]) + 16
    top = 24 if title else 0
    column_width = (cell + 2) * scale
    wrapped = [_wrap(str(c), column_width - 4, small, measure, CAPTION_LINES) for c in (captions or [])[:columns]]
    bottom = (max(len(w) for w in wrapped) * 13 + 8) if any(wrapped) else 0
    page = Image.new("RGB", (label_width + grid.width, top + grid.height + bottom), "white")
    page.paste(grid, (label_width, top))
    draw = ImageDraw.Draw(page)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    row_height = grid.height / max(len(labels), 1)
    for k, text in enumerate(labels):
        box = measure.textbbox((0, 0), text, font=font)
        draw.text((8, top + row_height * (k + 0.5) - (box[1] + box[3]) / 2), text, fill="black", font=font)
    for c, lines in enumerate(wrapped):
        x = label_width + 2 * scale + c * column_width
        for k, line in enumerate(lines):
            draw.text((x, top + grid.height + 4 + 13 * k), line, fill="black", font=small)
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
    fig.savefig(out_png, dpi=min(110, PAGE_PX / fig.get_figwidth()))  # at most PAGE_PX wide: shown at its own size
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
               + ("" if _own_prompts(teacher) else "--prompts HELD_OUT_PROMPTS.txt ")
               + f"--model teacher:ddim:{steps} "
               + f"--model {shlex.quote(str(config.get('method', 'student')) + '=' + str(lora) + ':' + str(steps))} "
               + (f"--train-steps {steps * facts['substeps']} " if "substeps" in facts else "")
               + f"--out {shlex.quote(str(evaluation))}")
    return commands + [command]


def loss_curves(log_file: Path, out_png: Path) -> bool:
    """Plot the student's loss terms (summed over slots) and, in a second panel where the run has a discriminator,
    the adversarial terms and the discriminators' loss against the step."""
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
    adversarial = sorted(k for k in series if k.startswith(("disc", "gen", "discriminator")))
    # the second panel only where the run has adversarial terms (the default recipe trains no discriminator)
    fig, axes = plt.subplots(1, 2 if adversarial else 1, figsize=(11 if adversarial else 7, 3.6), squeeze=False)
    axes = axes[0]
    for key, points in sorted(series.items()):
        ax = axes[1] if key in adversarial else axes[0]
        steps, values = zip(*points)
        ax.plot(steps, _smooth(values), label=key, linewidth=1.2)
    axes[0].set_title("student: position-matching terms (sum over slots)")
    if adversarial:
        axes[1].set_title("adversarial terms")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend(fontsize=7)
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
    fig, axes = plt.subplots(1, len(panels), figsize=(min(5.0, 10.5 / len(panels)) * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            xs = [s for s in steps if key in points[s]]
            ax.plot(xs, [points[s][key] for s in xs], marker="o", markersize=3, label=key[4:])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
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
    """The PNG inlined, with its own width and height (what the browser is to decode; at most PAGE_PX wide)."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<img alt="{html.escape(alt)}" width="{width}" height="{height}" src="data:image/png;base64,{data}" '
            'style="image-rendering: pixelated; max-width: 100%; height: auto;">')


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
    for f in (out, out.with_suffix(".md"), assets):
        refuse_link(f, "report")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"--out {out}: its folder cannot be created ({e.strerror or e}); give a writable folder") from None
    with output_lock(out, "rapm report"):  # one writer of the page; rapm train may go on writing the run beside it
        return _write_report(run, config, evaluation, result, out, assets)


def _write_report(run: Path, config: dict, evaluation: Path, result: dict | None, out: Path, assets: Path) -> Path:
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
            prompts = _evaluation_prompts(result)
            plots["samples"] = stage(assets / "samples.png",
                                     lambda tmp: labelled_grid(grid, labels, tmp, captions=prompts))
            staged.append(plots["samples"])
        n = facts.get("steps", "N")
        labels = [f"student, {n} steps, guidance 1",
                  f"teacher end point, guidance {_number(facts.get('guidance', '?'))}"]
        training = []
        store_prompts = _store_prompts(config)
        for png in sorted((run / "samples").glob("step-*.png")) if (run / "samples").is_dir() else []:
            step = png.stem.split("-")[-1].lstrip("0") or "0"
            captions = _training_captions(store_prompts, png, len(labels))
            training.append((step, stage(assets / f"training-{png.stem}.png",
                                         lambda tmp, png=png, step=step, captions=captions: labelled_grid(
                                             png, labels, tmp, f"iteration {step}", captions))))
        staged += [t for _, t in training]
        own = sorted((run / "samples").glob("prompts-step-*.png")) if (run / "samples").is_dir() else []
        if own:  # the user's sample_prompts: the latest grid, each column's prompt under it (one row of up to 8)
            prompts = list(config.get("sample_prompts") or [])
            rows = max(1, -(-len(prompts) // 8))
            step = own[-1].stem.split("-")[-1].lstrip("0") or "0"
            plots["previews"] = stage(assets / "previews.png", lambda tmp: labelled_grid(
                own[-1], [f"student, {n} steps"] * rows, tmp, f"iteration {step}", prompts if rows == 1 else None))
            staged.append(plots["previews"])
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


def _evaluation_prompts(result: dict) -> list[str] | None:
    """The prompts of the evaluation grid's columns: the result's own ``prompts`` where it records them, else for the
    digits teacher its held-out prompts (what rapm evaluate and the demo use without --prompts); None: not known."""
    prompts = result.get("prompts")
    if isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
        return prompts
    own = _own_prompts(str(result.get("teacher")))
    if own is not None and isinstance(result.get("samples"), int) and result["samples"] > 0:
        return own.evaluation_prompts(result["samples"])
    return None


def _own_prompts(teacher: str):
    """The plug-in of a teacher with held-out prompts of its own (digits, scenes: what rapm evaluate uses without
    --prompts), or None (also for a teacher folder no longer there)."""
    try:
        return plugin_for(teacher)
    except Exception:  # noqa: BLE001 - a report of a run whose teacher moved still renders
        return None


def _store_prompts(config: dict) -> list[str] | None:
    """The run's store's prompts (trajectory i is line i), or None when the store is not at hand."""
    path = Path(str(config.get("store")))
    try:
        return read_store_prompts(path, json.loads((path / "manifest.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, RapmError):
        return None


def _training_captions(prompts: list[str] | None, png: Path, rows: int) -> list[str] | None:
    """The prompts of a training grid's columns: the trajectories ``rapm.monitor.sample_grid`` draws."""
    if not prompts:
        return None
    from PIL import Image

    with Image.open(png) as im:
        columns = grid_columns(im.width, grid_cell(im.height, rows))
    if columns > len(prompts):
        return None
    return [prompts[i] for i in sample_indices(prompts, columns)]


def run_title(run: Path, config: dict, facts: dict, result: dict | None) -> str:
    """What the run is, for the page's title: its method, its teacher and its N (the store's steps)."""
    method = str(config.get("method") or "student")
    teacher = str(config.get("teacher") or "")
    name = teacher if teacher in ("", *BUILTIN_TEACHERS) else (Path(teacher).name or teacher)
    steps = facts.get("steps")
    if steps is None and result:
        steps = next((r.get("steps") for r in result.get("rows", []) if r.get("lora")), None)
    title = f"{method} on the {name} teacher" if name else method
    return title + (f", N = {steps}" if steps is not None else "")


def _run_facts(run: Path, config: dict, facts: dict) -> str:
    parts = [f"run folder {run}"]
    if isinstance(config.get("iterations"), int):
        parts.append(f"{config['iterations']} iterations of batch {config.get('batch_size', '?')}")
    if facts:
        names = {"steps": "N = {}", "substeps": "M = {}", "guidance": "guidance {}"}
        parts.append("its store: " + ", ".join(names[k].format(_number(v)) for k, v in facts.items()))
    return "; ".join(parts) + "."


def _uses_discriminator(run: Path, config: dict) -> bool:
    """Whether the run trains a discriminator: its method as built from config.json, else its logs."""
    try:
        return bool(build_method(cfg.from_dict(config, "config.json"), 1).uses_discriminator)
    except (RapmError, TypeError, ValueError, KeyError):
        log = run / "logs.jsonl"
        return log.exists() and '"disc_loss"' in log.read_text()


DISCRIMINATOR_FIELDS = ("disc_", "gan_loss", "updates")


def config_changes(run: Path, config: dict) -> tuple[list[tuple[str, object, object]], list[str]]:
    """The fields of ``config`` that differ from the defaults (TrainConfig's, with the method's own recipe and the
    teacher family's LoRA targets), as (field, value, default); and the discriminator fields left out because the
    run trains none."""
    try:
        defaults = cfg.to_dict(resolve(cfg.TrainConfig(method=str(config.get("method", "rapm")))))
    except (RapmError, TypeError, ValueError):
        defaults = cfg.to_dict(cfg.TrainConfig())
    try:
        family = read_teacher_info(str(config.get("teacher"))).family
        defaults.update(lora_targets=list(family.lora_targets), disc_levels=family.disc_levels)
    except (RapmError, OSError, ValueError, KeyError, TypeError):
        pass
    changed = [(k, v, defaults.get(k)) for k, v in config.items() if k not in defaults or defaults[k] != v]
    if _uses_discriminator(run, config):
        return changed, []
    unused = [k for k, _, _ in changed if k.startswith(DISCRIMINATOR_FIELDS)]
    return [c for c in changed if c[0] not in unused], unused


def _table_result(result: dict) -> tuple[dict, str | None]:
    """The result as the table shows it: without the trajectory-error-to-the-training-DDIM column where it repeats
    the trajectory error (the reference is the training trajectories' DDIM), and the sentence that says so."""
    rows = result["rows"]
    if not rows or not all(isinstance(r.get("trajectory_error_train"), (int, float)) for r in rows):
        return result, None
    same = result.get("train_steps") == result.get("reference_steps") or all(
        abs(r["trajectory_error_train"] - r["trajectory_error"]) <= 1e-9 for r in rows)
    if not same:
        return result, None
    shown = dict(result, rows=[{k: v for k, v in r.items() if k != "trajectory_error_train"} for r in rows])
    return shown, (f"The reference, the teacher's DDIM-{result.get('reference_steps')}, is the DDIM of the training "
                   f"trajectories (N M = {result.get('train_steps')} steps): the trajectory error to the training "
                   "trajectories' DDIM is the same column, shown once.")


def floor_notes(result: dict) -> list[str]:
    """A sentence for each FD floor that sits above every model's FD: why it does."""
    n = result.get("samples")
    models = [r for r in result["rows"] if not (r.get("method") == "teacher-ddim"
                                                and r.get("steps") == result.get("reference_steps"))]

    def above_every_model(floor_key: str, fd_key: str) -> float | None:
        """The floor ``floor_key`` where it is above every model's ``fd_key``, else None."""
        floor, fds = result.get(floor_key), [r.get(fd_key) for r in models]
        if not isinstance(floor, (int, float)) or not fds:
            return None
        return floor if all(isinstance(f, (int, float)) and f < floor for f in fds) else None

    notes = []
    if (floor := above_every_model("teacher_floor_fd", "fd_teacher")) is not None:
        notes.append(f"The FD-to-teacher floor ({floor:.2f}) is above every model's FD to the teacher because the "
                     "floor is the teacher against itself from other noise, while every model here starts from the "
                     f"reference's own noise and so shares its images' randomness, which at only {n} samples is most "
                     "of the FD: compare the models with each other, not with the floor.")
    if (floor := above_every_model("real_floor_fd", "fd")) is not None:
        notes.append(f"The real-vs-real FD floor ({floor:.2f}) is above every model's FD because it is {n} real "
                     "training digits drawn at random, so unevenly over the ten digits, while the evaluation's prompts "
                     f"give every digit its share: at {n} samples that imbalance is most of the FD (a draw of real "
                     "digits with every digit's share scores far lower), so compare the models with each other.")
    return notes


def _pages(run: Path, config: dict, evaluation: Path, result: dict | None, out: Path,
           plots: dict[str, Staged | None], training: list[tuple[str, Staged]]) -> tuple[str, list[str]]:
    """The HTML page and the markdown lines; every value from a file is escaped in the HTML."""
    esc = lambda v: html.escape(str(v))  # noqa: E731
    rel = lambda s: os.path.relpath(s.final, out.parent)  # noqa: E731
    facts = _store_facts(config)
    title = run_title(run, config, facts, result)
    about = _run_facts(run, config, facts)

    md = [f"# rapm report: {title}", "", about, ""]
    body = [f"<h1>rapm report: {esc(title)}</h1>", f"<p>{esc(about)}</p>"]
    if result:
        shown, same_note = _table_result(result)
        text = (f"{result.get('samples')} samples, the same prompts and seeds for every model; trajectory error "
                f"against the teacher's {result.get('reference_steps')}-step DDIM ({result.get('date')}).")
        notes = ([same_note] if same_note else []) + floor_notes(result)
        md += ["## Metrics", "", text, "", markdown_table(shown), ""] + [x for n in notes for x in (n, "")]
        body += ["<h2>Metrics</h2>", f"<p>{esc(text)}</p>", _html_table(shown)] + [f"<p>{esc(n)}</p>" for n in notes]
        if plots.get("samples") is not None:
            text = ("One row per model, labelled with its steps and guidance; each column one prompt and one noise"
                    + (", its prompt under it" if _evaluation_prompts(result) else "") + ". Upscaled without smoothing.")
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
        text = ("Smoothed over 10 iterations. " + ("" if _uses_discriminator(run, config) else
                "This run trains no discriminator (adv_weight 0, the default recipe): no adversarial terms."))
        md += ["## Training losses", "", text, "", f"![losses]({rel(plots['losses'])})", ""]
        body += ["<h2>Training losses</h2>", f"<p>{esc(text)}</p>", _img_tag(plots["losses"].tmp, "losses")]
    if training:
        columns = "" if not _store_prompts(config) else " (each column's prompt under it)"
        text = (f"{len(training)} grid{'s' if len(training) != 1 else ''}, in training order (every sample_every = "
                f"{config.get('sample_every')} iterations): top row the student's N steps from the stored noise, "
                "bottom row the stored teacher end point; the same trajectories, spread over the store's prompts"
                f"{columns}, in every grid.")
        md += ["## During training", "", text, ""] + [f"![iteration {step}]({rel(t)})" for step, t in training] + [""]
        body += ["<h2>During training</h2>", f"<p>{esc(text)}</p>"] + [
            f"<figure>{_img_tag(t.tmp, f'iteration {step}')}</figure>" for step, t in training]
    if plots.get("previews") is not None:
        prompts = list(config.get("sample_prompts") or [])
        text = (f"The student's {len(prompts)} preview prompt{'s' if len(prompts) != 1 else ''} (config field "
                "sample_prompts), from the noise of seeds 0, 1, ..., at the last sample_every: " + "; ".join(prompts[:16])
                + (" ..." if len(prompts) > 16 else "") + ".")
        md += ["## Your preview prompts", "", text, "", f"![previews]({rel(plots['previews'])})", ""]
        body += ["<h2>Your preview prompts</h2>", f"<p>{esc(text)}</p>",
                 f"<figure>{_img_tag(plots['previews'].tmp, 'previews')}</figure>"]
    times = _wall_times(run, result)
    if times:
        md += ["## Wall time", ""] + [f"- {t}" for t in times] + [""]
        body += ["<h2>Wall time</h2>", "<ul>" + "".join(f"<li>{esc(t)}</li>" for t in times) + "</ul>"]
    changed, unused = config_changes(run, config)
    text = ("The fields that differ from the defaults (docs/defaults.md: TrainConfig's, with the method's own recipe "
            "and the teacher family's LoRA targets)"
            + (f"; the discriminator's {len(unused)} fields are left out, as this run trains none" if unused else "")
            + "; every field is in config.json.")
    rows = [(k, json.dumps(v), "—" if d is None else json.dumps(d)) for k, v, d in changed]
    md += ["## Configuration", "", text, "", "| field | value | default |", "| --- | --- | --- |"]
    md += [f"| {k} | `{v}` | `{d}` |" for k, v, d in rows] + [""]
    body += ["<h2>Configuration</h2>", f"<p>{esc(text)}</p>",
             "<table class='config'><tr><th>field</th><th>value</th><th>default</th></tr>"
             + "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td><td>{esc(d)}</td></tr>" for k, v, d in rows) + "</table>",
             f"<details><summary>every field (config.json)</summary><pre>{esc(json.dumps(config, indent=2))}</pre>"
             "</details>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>rapm report: {esc(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 20px;box-sizing:border-box}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
            "table.config td{text-align:left;font-family:monospace;overflow-wrap:anywhere}"
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



BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")

# Run first in the page's head: collects load errors (an image that does not decode fires one), then on load what a
# reader would see, as JSON in a <pre id="rapm-probe"> that --dump-dom prints.
_PROBE = """<script>(() => {
  const errors = [];
  window.addEventListener('error', e => errors.push(e.message || ('cannot load ' + ((e.target && (e.target.alt ||
    e.target.src || e.target.tagName)) || '?').slice(0, 80))), true);
  window.addEventListener('load', () => {
    const sections = [...document.querySelectorAll('h2')].map(h => {
      let items = 0;
      for (let n = h.nextElementSibling; n && n.tagName !== 'H2'; n = n.nextElementSibling)
        if (n.tagName === 'IMG' || n.querySelector('img') || n.textContent.trim()) items++;
      return {title: h.textContent, items};
    });
    const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth,
      naturalHeight: i.naturalHeight, width: +i.getAttribute('width'), height: +i.getAttribute('height'),
      shownWidth: i.clientWidth, shownHeight: i.clientHeight}));
    const tables = [...document.querySelectorAll('table')].map(t => ({className: t.className,
      rows: t.rows.length, cells: [...t.querySelectorAll('td')].filter(c => c.textContent.trim()).length}));
    const probe = document.createElement('pre');
    probe.id = 'rapm-probe';
    probe.textContent = JSON.stringify({title: document.title, h1: (document.querySelector('h1') || {}).textContent,
      sections, images, tables, errors, width: document.documentElement.scrollWidth,
      height: document.documentElement.scrollHeight});
    document.body.appendChild(probe);
  });
})();</script>"""


def find_browser() -> str | None:
    """A Chromium (or Chrome) on PATH, or None."""
    import shutil

    return next((shutil.which(n) for n in BROWSERS if shutil.which(n)), None)


def browser_check(page: Path, screenshot: Path | None = None, width: int = 1200, browser: str | None = None,
                  colors: int = 0, timeout: float = 60) -> dict:
    """Open ``page`` (a report: self-contained) in headless Chromium at ``width`` pixels and return what a reader sees:
    ``images`` (each one's alt, decoded naturalWidth/Height, its width/height attributes and its shown size),
    ``tables`` (rows, filled cells), ``sections`` (each h2 and the elements under it), ``errors`` (load errors) and
    ``console`` (every console message: the report has no script, so any is Chromium's about the page), ``title``,
    ``height``; with ``screenshot``, a full-page PNG there (of the page as it is, without the probe), reduced to
    ``colors`` colours when non-zero (a small file for docs/)."""
    import re
    import subprocess
    import tempfile

    browser = browser or find_browser()
    if browser is None:
        raise ReportError("no chromium on PATH: install it (Debian: apt-get install chromium)")
    page = Path(page).resolve()
    text = page.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="rapm-browser-") as tmp:
        probe_page = Path(tmp) / "probe.html"
        probe_page.write_text(text.replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8")

        def chromium(*args: str) -> subprocess.CompletedProcess:
            # a profile of its own: a chromium already running (another user's, another test's) is not joined
            command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                       f"--user-data-dir={Path(tmp) / 'profile'}", "--no-first-run", *args]
            try:
                return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
            except subprocess.CalledProcessError as e:
                raise ReportError(f"{browser} failed (exit {e.returncode}): {e.stderr.strip()[-500:]}") from None

        done = chromium("--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                        f"--window-size={width},2000", "--dump-dom", probe_page.as_uri())
        found = re.search(r'<pre id="rapm-probe">(.*?)</pre>', done.stdout, re.S)
        if found is None:
            raise ReportError(f"{browser} --dump-dom of {page} gave no probe: the page did not load")
        seen = json.loads(html.unescape(found.group(1)))
        seen["console"] = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
        if screenshot is not None:
            screenshot = Path(screenshot)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            chromium(f"--screenshot={screenshot.resolve()}", f"--window-size={width},{seen['height']}",
                     page.as_uri())
            if colors:
                from PIL import Image

                with Image.open(screenshot) as im:
                    small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
                small.save(screenshot, format="PNG", optimize=True)
    return seen


def cli(
    run_arg: Optional[Path] = typer.Argument(None, show_default=False,
                                             help="The run directory, as --run (either is required)."),
    run: Optional[Path] = typer.Option(None, "--run", help="The run directory (rapm train --out); RUN or --run is "
                                       "required, as in rapm export."),
    evaluation: Optional[Path] = typer.Option(None, help="Results of rapm evaluate (default RUN/evaluation.json)."),
    out: Optional[Path] = typer.Option(None, help="HTML file (default RUN/report.html; a .md twin beside it)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Accepted as by every verb; the report "
                                  "takes seconds and shows no bar."),
) -> None:
    """Write the HTML/markdown report of a run."""
    if run is not None and run_arg is not None and Path(run) != Path(run_arg):
        raise ReportError(f"two runs given: {run_arg} and --run {run}; give one")
    run = run if run is not None else run_arg
    if run is None:
        raise ReportError("rapm report needs the run directory: rapm report --run RUN (or rapm report RUN)")
    path = report(run, evaluation, out)
    typer.echo(f"report: {path} (and {path.with_suffix('.md')})")
