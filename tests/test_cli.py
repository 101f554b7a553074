"""The verbs' help at 80 columns: every option's help whole, required options marked; report takes --run."""

import re

import pytest
import typer
from typer.testing import CliRunner

from rapm.cli import VERBS, app

# Options that a verb needs unless another one is given: click cannot mark them, their help says it.
CONDITIONALLY_REQUIRED = {"trajectories": ["--teacher", "--prompts", "--out"], "train": ["--teacher", "--store", "--out"],
                          "sample": ["--prompt", "--prompts"], "report": ["--run"]}


def _help(*args: str) -> str:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    return result.output


def _words(text: str) -> set[str]:
    return set(text.split())


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_options_help_is_whole_at_80_columns(verb):
    """Checkable form of "not cut": no line is wider than 80 columns, nothing is elided (… or ...), and every
    whitespace-separated word of each option's help text and of each option name appears unbroken on one line."""
    out = _help(verb)
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out
    command = typer.main.get_command(app).commands[verb]
    shown = _words(out)
    for param in command.params:
        for name in param.opts + param.secondary_opts:
            assert name in shown, f"{verb}: option {name} is not shown whole"
        help_text = getattr(param, "help", None) or ""
        missing = [w for w in help_text.split() if w not in shown]
        assert not missing, f"rapm {verb} --help: {param.opts} help cut at {missing}\n{out}"


def test_the_verb_list_is_whole_at_80_columns():
    out = _help()
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out
    assert "..." not in out.split("Commands:")[1]  # click elides a short help that does not fit with "..."
    for verb, (_, _, short) in VERBS.items():
        assert re.search(rf"^  {verb} +{re.escape(short)}$", out, re.M), out


@pytest.mark.parametrize("verb", list(VERBS))
def test_required_options_are_marked(verb):
    out = _help(verb)
    command = typer.main.get_command(app).commands[verb]
    rows = re.split(r"\n(?=  -)", out.split("Options:", 1)[1])
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option":
            continue
        row = next(r for r in rows if r.split() and r.split()[0].split("/")[0] == param.opts[0])
        needed = param.required or param.opts[0] in CONDITIONALLY_REQUIRED.get(verb, [])
        assert ("required" in row) == needed, f"rapm {verb} {param.opts[0]}: {row}"


def test_report_takes_the_run_as_argument_or_as_run(tmp_path, monkeypatch):
    import rapm.report

    seen = []
    monkeypatch.setattr(rapm.report, "report", lambda run, evaluation, out: seen.append(run) or tmp_path / "r.html")
    runner = CliRunner()
    assert runner.invoke(app, ["report", str(tmp_path / "a")]).exit_code == 0
    assert runner.invoke(app, ["report", "--run", str(tmp_path / "b")]).exit_code == 0
    assert seen == [tmp_path / "a", tmp_path / "b"]
    assert "needs the run directory" in str(runner.invoke(app, ["report"]).exception)
    assert "two runs given" in str(runner.invoke(app, ["report", "x", "--run", "y"]).exception)


def test_version_is_the_packages():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"rapm {version('rapm')}\n", result.output


def test_train_help_lists_every_method_of_the_registry():
    from rapm.methods import METHODS

    shown = _help("train").split("--method", 1)[1].split("\n  --", 1)[0]
    assert "rapm-paper" in METHODS and all(re.search(rf"(?<![\w-]){re.escape(m)}(?![\w-])", shown) for m in METHODS), shown
