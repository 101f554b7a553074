"""The verbs: each a thin shell over one library function a user can also call from Python."""

from __future__ import annotations

import os
import sys
import threading
import warnings

# transformers warns, at import, that its image processors fall back to PIL without torchvision: rapm never uses
# them, and the line would sit in the middle of every verb's output. Its errors still show. Set the variable to
# override.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _quiet_optional_imports() -> None:
    """torchao (rapm[quant]), which diffusers imports whenever it is installed, logs at import that its CUDA-only
    extensions do not load on this machine and that torch deprecates one of its registrations, and diffusers that it
    cannot import a torchao tensor type: warnings about code rapm does not run, printed on every verb. Their errors
    still show."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet_optional_imports()

import textwrap  # noqa: E402

import typer  # noqa: E402
import typer.core  # noqa: E402

from rapm.errors import RapmError  # noqa: E402


class _WholeWordsFormatter(typer.Context.formatter_class):  # typer's own (vendored) click HelpFormatter
    """Click's help layout, wrapped at spaces only: an identifier, a path or a hyphenated default
    (``no-overwrite``) moves to the next line whole instead of being cut in two."""

    def write_dl(self, rows, col_max: int = 30, col_spacing: int = 2) -> None:
        rows = list(rows)
        first_col = min(max((len(r[0]) for r in rows), default=0), col_max) + col_spacing
        for first, second in rows:
            self.write(f"{'':>{self.current_indent}}{first}")
            if not second:
                self.write("\n")
                continue
            if len(first) <= first_col - col_spacing:
                self.write(" " * (first_col - len(first)))
            else:
                self.write("\n" + " " * (first_col + self.current_indent))
            lines = textwrap.wrap(second, max(self.width - first_col - 2, 10), break_long_words=False,
                                  break_on_hyphens=False) or [""]
            self.write(lines[0] + "\n")
            for line in lines[1:]:
                self.write(f"{'':>{first_col + self.current_indent}}{line}\n")


class _Context(typer.Context):
    formatter_class = _WholeWordsFormatter


class _Command(typer.core.TyperCommand):
    context_class = _Context


class _Group(typer.core.TyperGroup):
    context_class = _Context


# Plain click help (rich_markup_mode=None): rich's table squeezes the help column and cuts long words and option
# names with an ellipsis at 80 columns.
app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Distill a Stable Diffusion teacher into a 1-to-4-step LoRA student with RAPM on one GPU.",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"rapm {version('rapm')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            import rapm

            typer.echo(f"rapm {rapm.__version__}")
        raise typer.Exit()


@app.callback()
def _root(show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                            help="Print rapm's version and exit.")) -> None:
    pass


def _not_yet(verb: str):
    def command() -> None:
        typer.echo(f"rapm {verb}: not implemented yet in this version of rapm; see the README for what works today.", err=True)
        raise typer.Exit(2)

    return command


# Each verb's options and body live beside the library function it wraps, as ``cli`` in that module;
# this file only registers them, so a verb's code and its flags are read in one place.
# verb: (module, its help, the short help of `rapm --help`'s list, whole at 80 columns)
VERBS = {
    "trajectories": ("rapm.trajectories", "Precompute and store teacher trajectories (prompts -> store).",
                     "Store teacher trajectories (prompts -> store)."),
    "train": ("rapm.train", "Train the student LoRA on a trajectory store (store -> run).",
              "Train the student LoRA on a store (store -> run)."),
    "export": ("rapm.export", "Export the student as LoRA files for diffusers and for ComfyUI / A1111 (run -> lora/).",
               "Export the student's LoRA files (run -> lora/)."),
    "sample": ("rapm.sample", "Generate images with a teacher and an optional student LoRA.",
               "Generate images with a teacher and a student LoRA."),
    "evaluate": ("rapm.evaluate", "Compute metrics for teachers and students on held-out prompts and seeds.",
                 "Measure teachers and students on held-out prompts."),
    "report": ("rapm.report", "Write the HTML/markdown report of a run.", "Write the HTML/markdown report of a run."),
    "convert": ("rapm.convert", "Convert a single-file SD 1.x / 2.x / SDXL checkpoint (A1111, civitai) into a "
                "diffusers folder for --teacher.", "Convert a single-file checkpoint for --teacher."),
    "demo": ("rapm.demo.flow", "The whole flow on the built-in digits teacher, on a CPU.",
             "The whole flow on the built-in digits teacher, on a CPU."),
}


def _register() -> None:
    import importlib

    for verb, (module_name, help_text, short_help) in VERBS.items():
        try:
            command = getattr(importlib.import_module(module_name), "cli", None) or _not_yet(verb)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # the module exists but one of its imports is missing: say so
                raise
            command = _not_yet(verb)
        app.command(verb, help=help_text, short_help=short_help, cls=_Command)(command)


_register()


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """rapm's own warnings (a skipped damaged checkpoint, truncated prompts) as one line, like its errors."""
    if category.__module__.startswith("rapm"):
        return f"warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


_default_format = warnings.formatwarning


def _thread_exception(args) -> None:
    """TensorBoard's writer thread re-raises a failed write (a full disk) after storing it for the next add_scalar,
    which rapm.run.GuardedWriter turns into the run's one error line: the thread's own traceback would be a second."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
        return
    _default_thread_hook(args)


_default_thread_hook = threading.excepthook


def _end_progress_bars() -> None:
    """Close the progress bars a failed verb left open, each kept where it stopped and ended with a newline, so that
    the error starts a line of its own (``grep ^error:`` finds it) instead of following the bar on its line."""
    std = sys.modules.get("tqdm.std")  # no bar was shown if tqdm was never imported
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        try:
            bar.leave = True
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot be drawn must not hide the error
            pass


def main() -> None:
    """Entry point: user errors print as one line, without a traceback; rapm's warnings as one line too."""
    warnings.formatwarning = _warning_line
    threading.excepthook = _thread_exception
    try:
        app()
    except RapmError as e:
        _end_progress_bars()
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
