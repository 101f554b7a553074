"""The verbs: each a thin shell over one library function a user can also call from Python."""

from __future__ import annotations

import sys

import typer

from rapm.errors import RapmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distill a Stable Diffusion teacher into a 1-to-4-step LoRA student with RAPM on one GPU.",
)


def _not_yet(verb: str) -> None:
    typer.echo(f"rapm {verb}: not implemented yet in this version of rapm; see the README for what works today.", err=True)
    raise typer.Exit(2)


@app.command()
def trajectories() -> None:
    """Precompute and store teacher trajectories (prompts -> store)."""
    _not_yet("trajectories")


@app.command()
def train() -> None:
    """Train the student LoRA on a trajectory store (store -> run)."""
    _not_yet("train")


@app.command()
def export() -> None:
    """Export the student as a diffusers (or kohya) LoRA (run -> lora.safetensors)."""
    _not_yet("export")


@app.command()
def sample() -> None:
    """Generate images with a teacher and an optional student LoRA."""
    _not_yet("sample")


@app.command()
def evaluate() -> None:
    """Compute metrics for teachers and students on held-out prompts and seeds."""
    _not_yet("evaluate")


@app.command()
def report() -> None:
    """Write the HTML/markdown report of a run."""
    _not_yet("report")


@app.command()
def demo() -> None:
    """The whole flow on the built-in digits teacher, on a CPU."""
    _not_yet("demo")


def main() -> None:
    """Entry point: user errors print as one line, without a traceback."""
    try:
        app()
    except RapmError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
