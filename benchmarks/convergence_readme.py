"""The convergence results page's tables, written from benchmarks/results/convergence.json (no number typed by hand).

Each table sits in docs/results/convergence.md between ``<!-- convergence:NAME -->`` and
``<!-- /convergence:NAME -->``; this script rewrites what is between them from the JSON, and ``--check`` says
(exit 1) where the page differs from it:

    python benchmarks/convergence_readme.py            # rewrite the tables in docs/results/convergence.md
    python benchmarks/convergence_readme.py --check    # exit 1 if a table differs from the JSON

The tables' rows (a label, the benchmark's row name, N, and for the ablations the iteration they are read at) are
listed here; a row the JSON does not hold is printed as "not run". The prose around the tables is the page's own.
(The tables were in README.md until 2026-12-06; the script keeps its name.)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import fmt, last_mean, worst_rise  # noqa: E402  (the benchmark's own summaries of a curve)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "convergence.json"
PAGE = ROOT / "docs" / "results" / "convergence.md"

DEFAULT = "**rapm** (default)"
SFD_EMA = "sfd with the EMA (0.99, no warm-up)"
OLD = "rapm, relative weight 0.25, with the EMA (the default until 2026-12-02)"

# (label, row, N): the rows at the main budget (the last validation of each run)
MAIN = [
    ("**rapm** (default: relative weight 0, no discriminator, EMA 0.99 with warm-up)", "rapm", 4),
    (OLD, "rapm-rel0.25", 4),
    ("rapm, relative weight 0.25, no EMA (the default before the EMA)", "abl-no-ema", 4),
    ("sfd", "sfd", 4),
    (SFD_EMA, "abl-sfd-ema", 4),
    ("rapm, relative weight 0.1 (no EMA)", "abl-rel0.1", 4),
    ("rapm, relative weight 0: the absolute terms alone (no EMA)", "abl-rel0", 4),
    ("rapm-nogan: both Huber terms at weight 1 (no EMA)", "rapm-nogan", 4),
    ("rapm-paired: + paired D1, D2, both updates every iteration, weight 1", "rapm-paired", 4),
    ("rapm-paper: Alg. 2 as written (hinge, alternating, weights 1)", "rapm-paper", 4),
    ("rapm-relative: the relative terms alone, with D1", "rapm-relative", 4),
    ("pcm, batch 1", "pcm-b1", 4),
    ("pcm, batch 4", "pcm-b4", 4),
    ("progressive-rdd", "progressive-rdd", 4),
    ("rapm, relative weight 0.25, with the EMA and the step LR schedule (LR / 10 from 1,500 on)", "abl-step-3k", 4),
    ("sfd with the EMA and the step LR schedule", "abl-sfd-ema-step-3k", 4),
    (DEFAULT, "rapm", 2),
    (OLD, "rapm-rel0.25", 2),
    ("rapm, relative weight 0.25, no EMA", "abl-no-ema", 2),
    ("sfd", "sfd", 2),
    (SFD_EMA, "abl-sfd-ema", 2),
    ("rapm, relative weight 0.1 (no EMA)", "abl-rel0.1", 2),
    ("rapm, relative weight 0 (no EMA)", "abl-rel0", 2),
    ("rapm-nogan", "rapm-nogan", 2),
    ("rapm-paired", "rapm-paired", 2),
    ("rapm-paper", "rapm-paper", 2),
    ("rapm-relative", "rapm-relative", 2),
    ("pcm, batch 1", "pcm-b1", 2),
    ("pcm, batch 4", "pcm-b4", 2),
    ("progressive-rdd", "progressive-rdd", 2),
    ("rapm, relative weight 0.25, with the EMA and the step LR schedule (LR / 10 from 1,500 on)", "abl-step-3k", 2),
    ("sfd with the EMA and the step LR schedule", "abl-sfd-ema-step-3k", 2),
    ("sfd with the step LR schedule (SFD's code recipe)", "abl-sfd-step-3k", 2),
]

# (label, rows: seed 0 first): the seeds table, at each N where every seed has run as far as seed 0
SEEDS = [
    (DEFAULT, ["rapm", "rapm-seed1", "rapm-seed2"]),
    (SFD_EMA, ["abl-sfd-ema", "sfd-ema-seed1", "sfd-ema-seed2"]),
    ("sfd", ["sfd", "sfd-seed1"]),
    (OLD, ["rapm-rel0.25", "rapm-rel0.25-seed1", "rapm-rel0.25-seed2"]),
    ("50 trajectories: rapm without its EMA (relative weight 0.25)", ["abl-few-rapm", "few-rapm-seed1"]),
    ("50 trajectories: relative weight 0 (no EMA)", ["abl-few-rel0", "few-rel0-seed1"]),
    ("50 trajectories: relative weight 0.25 with the EMA (the previous default)", ["abl-few-ema", "few-ema-seed1"]),
    ("50 trajectories: **rapm** (the default: relative weight 0, the EMA)", ["abl-few-rel0-ema", "few-rel0-ema-seed1"]),
    (f"50 trajectories: {SFD_EMA}", ["abl-few-sfd-ema", "few-sfd-ema-seed1"]),
    ("150 trajectories: relative weight 0.25 with the EMA (the previous default)", ["abl-t150-ema", "t150-ema-seed1"]),
    ("150 trajectories: **rapm** (the default: relative weight 0, the EMA)", ["abl-t150-rel0-ema", "t150-rel0-ema-seed1"]),
    (f"150 trajectories: {SFD_EMA}", ["abl-t150-sfd-ema", "t150-sfd-ema-seed1"]),
]

# (label, row, N, iteration): the ablations, read at 500 iterations
_ABL4 = [
    ("relative weight 0.25, no EMA (the previous default's base; the base of every row below)", "abl-no-ema"),
    ("relative weight 0", "abl-rel0"),
    ("relative weight 0.1", "abl-rel0.1"),
    ("relative weight 0.5", "abl-nogan-rel0.5"),
    ("relative weight 1 (rapm-nogan)", "rapm-nogan"),
    ("EMA 0.99 without the warm-up", "abl-ema"),
    ("EMA 0.99 with the warm-up (rapm-rel0.25, the previous default)", "rapm-rel0.25"),
    ("relative weight 0 and the EMA with the warm-up (**rapm**, the default)", "rapm"),
    ("the default with SFD's L1", "abl-l1-ema"),
    ("the default with pseudo-Huber c 0.001", "abl-huber0.001-ema"),
    ("SFD with that EMA", "abl-sfd-ema"),
    ("SFD", "sfd"),
    ("w_0 = 2", "abl-wn"),
    ("Δ of two fine steps", "abl-delta2"),
    ("rapm-paired (paired D1 + D2, both updates, weight 1)", "rapm-paired"),
    ("rapm-paired, D1 only", "abl-d1"),
    ("rapm-paired, D2 only", "abl-d2"),
    ("rapm-paired, alternating updates", "abl-alternate"),
    ("rapm-paired, a discriminator update every 4th iteration", "abl-disc4"),
    ("rapm-paired with the paper's hinge loss", "abl-hinge-both"),
    ("rapm-paired with L1", "abl-l1"),
    ("rapm-paired at relative weight 0.5", "abl-rel0.5"),
    ("rapm-paper", "rapm-paper"),
]
_ABL2 = [
    ("relative weight 0.25, no EMA (the base)", "abl-no-ema"),
    ("SFD", "sfd"),
    ("relative weight 0", "abl-rel0"),
    ("relative weight 0.1", "abl-rel0.1"),
    ("relative weight 0.5", "abl-nogan-rel0.5"),
    ("relative weight 1 (rapm-nogan)", "rapm-nogan"),
    ("L1 instead of pseudo-Huber", "abl-l1-rel0.25"),
    ("pseudo-Huber c 0.001 (the preset's is 0.01)", "abl-huber0.001"),
    ("pseudo-Huber c 0.1 (quadratic below the error's scale)", "abl-huber0.1"),
    ("pseudo-Huber c 1 (a scaled L2)", "abl-huber1"),
    ("mean squared error", "abl-l2"),
    ("SFD with the mean squared error", "abl-sfd-l2"),
    ("LR / 10 from 250 on (SFD's step schedule)", "abl-step"),
    ("SFD with it", "abl-sfd-step"),
    ("cosine LR to 0", "abl-cosine"),
    ("SFD with it", "abl-sfd-cosine"),
    ("EMA 0.99 without the warm-up", "abl-ema"),
    ("EMA 0.99 with the warm-up (rapm-rel0.25, the previous default)", "rapm-rel0.25"),
    ("relative weight 0 and the EMA with the warm-up (**rapm**, the default)", "rapm"),
    ("SFD with that EMA", "abl-sfd-ema"),
    ("EMA, and the relative position's frozen student is the EMA (relative_target=ema)", "abl-ema-target"),
    ("the same at relative weight 1", "abl-ema-target-rel1"),
    ("rapm-paper", "rapm-paper"),
    ("rapm-paired", "rapm-paired"),
]
ABLATIONS = [(label, row, 4, 500) for label, row in _ABL4] + [(label, row, 2, 500) for label, row in _ABL2]

# (label, row, N): the small stores, at the last validation of each run
FEW = [
    ("50 trajectories (60 passes): rapm without its EMA (relative weight 0.25)", "abl-few-rapm", 2),
    ("50: relative weight 0 (no EMA)", "abl-few-rel0", 2),
    ("50: relative weight 1 (no EMA)", "abl-few-rel1", 2),
    ("50: sfd (no EMA)", "abl-few-sfd", 2),
    ("50: relative weight 0.25 with the EMA (the previous default)", "abl-few-ema", 2),
    ("50: **rapm** (the default: relative weight 0, the EMA)", "abl-few-rel0-ema", 2),
    (f"50: {SFD_EMA}", "abl-few-sfd-ema", 2),
    ("150 trajectories (20 passes): relative weight 0.25 with the EMA (the previous default)", "abl-t150-ema", 2),
    ("150: **rapm** (the default: relative weight 0, the EMA)", "abl-t150-rel0-ema", 2),
    (f"150: {SFD_EMA}", "abl-t150-sfd-ema", 2),
    ("50 trajectories: relative weight 0.25 with the EMA (the previous default)", "abl-few-ema", 4),
    ("50: **rapm** (the default: relative weight 0, the EMA)", "abl-few-rel0-ema", 4),
    (f"50: {SFD_EMA}", "abl-few-sfd-ema", 4),
    ("150 trajectories: relative weight 0.25 with the EMA (the previous default)", "abl-t150-ema", 4),
    ("150: **rapm** (the default: relative weight 0, the EMA)", "abl-t150-rel0-ema", 4),
    (f"150: {SFD_EMA}", "abl-t150-sfd-ema", 4),
]

# (label, row, N): the closest rows run on to 10,000 iterations (20 passes over the training store)
LONG = [
    (DEFAULT, "long-rapm", 4),
    (SFD_EMA, "long-sfd-ema", 4),
    (OLD, "long-rapm-rel0.25", 4),
    (f"{DEFAULT}, seed 1", "long-rapm-seed1", 4),
    (f"{SFD_EMA}, seed 1", "long-sfd-ema-seed1", 4),
    (f"{OLD}, seed 1", "long-rapm-rel0.25-seed1", 4),
    ("**rapm** (default) with SFD's L1 (SFD + the default's EMA, warm-up included)", "abl-l1-ema", 4),
    ("**rapm** (default) with pseudo-Huber c 0.001 (the preset's is 0.01)", "abl-huber0.001-ema", 4),
    (DEFAULT, "long-rapm", 2),
    (SFD_EMA, "long-sfd-ema", 2),
    (OLD, "long-rapm-rel0.25", 2),
    (f"{DEFAULT}, seed 1", "long-rapm-seed1", 2),
    (f"{SFD_EMA}, seed 1", "long-sfd-ema-seed1", 2),
    (f"{OLD}, seed 1", "long-rapm-rel0.25-seed1", 2),
    ("**rapm** (default) with pseudo-Huber c 0.001 (the preset's is 0.01)", "abl-huber0.001-ema", 2),
]
LONG_AT = (3000, 5000, 7500, 10000)  # the trajectory error, the mean of the three validations up to each

SUMMARY_HEAD = ["| {what} | N | iterations | trajectory error ↓ | last 3 mean ↓ | worst rise | FD to teacher ↓ | s / iteration |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]


def curves(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Each (row, N)'s validations, in iteration order (the teacher's rows, which have no iteration, left out)."""
    out: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("iteration") is not None:
            out[(r["method"], r["steps"])].append(r)
    return {k: sorted(v, key=lambda r: r["iteration"]) for k, v in out.items()}


def up_to(curve: list[dict], iteration: int) -> list[dict] | None:
    """The curve's validations up to ``iteration``, or None where the run has no validation there (not got so far)."""
    head = [r for r in curve if r["iteration"] <= iteration]
    return head if head and head[-1]["iteration"] == iteration else None


def summary_table(spec: list[tuple[str, str, int]], data: dict, what: str) -> list[str]:
    lines = [SUMMARY_HEAD[0].format(what=what), SUMMARY_HEAD[1]]
    for label, row, n in spec:
        curve = data.get((row, n))
        if not curve:
            lines.append(f"| {label} | {n} | not run |  |  |  |  |  |")
            continue
        last = curve[-1]
        lines.append(f"| {label} | {n} | {last['iteration']} | {last['trajectory_error']:.4f} | "
                     f"{fmt(last_mean(curve), '.4f')} | {fmt(worst_rise(curve), '.4f')} | "
                     f"{fmt(last.get('fd_teacher'), '.1f')} | {fmt(last.get('seconds_per_iteration'), '.2f')} |")
    return lines


def seeds_table(data: dict) -> list[str]:
    lines = ["| method | N | seeds | last 3 mean, by seed ↓ | mean | spread | FD to teacher, by seed ↓ | mean |",
             "| --- | --- | ---: | --- | ---: | ---: | --- | ---: |"]
    for n in (4, 2):
        for label, names in SEEDS:
            found = [data.get((name, n)) for name in names]
            if not all(found) or len({c[-1]["iteration"] for c in found}) != 1:
                continue  # a seed missing, or not yet as far as the others
            means = [last_mean(c) for c in found]
            fds = [c[-1].get("fd_teacher") for c in found]
            if None in means or None in fds:
                continue
            lines.append(f"| {label} | {n} | {len(names)} | {' / '.join(f'{m:.4f}' for m in means)} | "
                         f"{sum(means) / len(means):.4f} | {max(means) - min(means):.4f} | "
                         f"{' / '.join(f'{v:.1f}' for v in fds)} | {sum(fds) / len(fds):.1f} |")
    return lines


def ablation_table(data: dict) -> list[str]:
    lines = ["| change | N | trajectory error ↓ | FD to teacher ↓ |", "| --- | --- | ---: | ---: |"]
    for label, row, n, at in ABLATIONS:
        curve = up_to(data.get((row, n), []), at)
        if curve is None:
            lines.append(f"| {label} | {n} | not run |  |")
            continue
        lines.append(f"| {label} | {n} | {curve[-1]['trajectory_error']:.4f} | {fmt(curve[-1].get('fd_teacher'), '.1f')} |")
    return lines


def long_table(data: dict) -> list[str]:
    """Each long row's mean trajectory error over the three validations up to each of LONG_AT (blank where the run
    has not got there), its worst rise and its last FD to the teacher; rows that have not run are left out."""
    lines = ["| method | N | " + " | ".join(f"last 3 mean to {k:,} ↓" for k in LONG_AT) + " | worst rise | "
             "FD to teacher ↓ |", "| --- | --- |" + " ---: |" * (len(LONG_AT) + 2)]
    for label, row, n in LONG:
        curve = data.get((row, n))
        if not curve:
            continue
        cells = [fmt(last_mean(head), ".4f") if (head := up_to(curve, k)) else "" for k in LONG_AT]
        lines.append(f"| {label} | {n} | {' | '.join(cells)} | {fmt(worst_rise(curve), '.4f')} | "
                     f"{fmt(curve[-1].get('fd_teacher'), '.1f')} |")
    return lines


def tables(rows: list[dict]) -> dict[str, list[str]]:
    data = curves(rows)
    return {"main": summary_table(MAIN, data, "method"), "seeds": seeds_table(data),
            "ablations": ablation_table(data), "few": summary_table(FEW, data, "row"), "long": long_table(data)}


BLOCK = re.compile(r"(<!-- convergence:(?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- /convergence:(?P=name) -->)", re.S)


def rewrite(page: str, new: dict[str, list[str]], name: str = "docs/results/convergence.md") -> tuple[str, list[str]]:
    """The page with every marked table replaced, and the names of those that changed. A table of ``new`` with no
    block in the page, or a block with no table, is an error."""
    found = [m.group("name") for m in BLOCK.finditer(page)]
    if sorted(found) != sorted(new):
        raise SystemExit(f"{name}: the convergence blocks are {found}, expected one of each of {sorted(new)} "
                         f"(<!-- convergence:NAME --> ... <!-- /convergence:NAME -->)")
    changed = []

    def sub(m: re.Match) -> str:
        body = "\n".join(new[m.group("name")]) + "\n"
        if body != m.group("body"):
            changed.append(m.group("name"))
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(sub, page), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--page", "--readme", dest="page", type=Path, default=PAGE,
                    help="the page holding the marked tables (default: docs/results/convergence.md)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from the JSON")
    args = ap.parse_args(argv)
    rows = json.loads(args.results.read_text())["rows"]
    text, changed = rewrite(args.page.read_text(), tables(rows), str(args.page))
    if args.check:
        if changed:
            print(f"{args.page}: the convergence tables {changed} differ from {args.results}; rebuild them with "
                  f"`python benchmarks/convergence_readme.py`", file=sys.stderr)
            return 1
        return 0
    if changed:
        tmp = args.page.with_name(args.page.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.page)
    print(f"{args.page}: {', '.join(changed) or 'nothing'} rewritten from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
