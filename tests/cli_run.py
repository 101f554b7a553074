"""Running `rapm` as a user's shell does, inside the test process, and the one-error-line check the fault and
bad-input tests share."""

from __future__ import annotations

import io
import sys
import threading
import warnings


def run_main(args) -> tuple[int, str]:
    """`rapm ARGS` through ``rapm.cli.main`` in this process: (exit code, stderr). Any exception but SystemExit is
    a traceback: it fails the test."""
    import rapm.cli

    err = io.StringIO()
    saved = sys.argv, sys.stderr, warnings.formatwarning, threading.excepthook, warnings.filters[:]
    sys.argv, sys.stderr = ["rapm", *map(str, args)], err
    code = 0
    try:
        rapm.cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv, sys.stderr, warnings.formatwarning, threading.excepthook, warnings.filters[:] = saved
    return code, err.getvalue()


def one_error(code: int, err: str, *words: str) -> str:
    """The run failed with exactly one `error:` line, last, holding each of ``words``, and no traceback; warnings
    and progress bars (which end their line before the error, rapm.cli) aside. Returns the line."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:") and "%|" not in line]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def invoke_ok(*args):
    """`rapm ARGS` through typer's CliRunner; any exception is raised as it is, and the verb must succeed."""
    from typer.testing import CliRunner

    from rapm.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result
