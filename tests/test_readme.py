"""README.md is a user's guide that stays true: every command it shows still parses, every config key it names
exists, and it stays short enough to read top to bottom.

Commands are composed, never run. A Hydra entry point gets the README's overrides with `--cfg job --resolve` (the
config is composed against the typed schema, so an unknown key, a wrong type or a bad group option fails) or
`--help` when it shows none; an argparse script gets `--help`, and every `--option` the README passes must be in
that help. All python commands run in one subprocess (imports paid once), so the whole module takes seconds. Make
targets are checked with `make -n`.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from common.config import AnalysisConfig, SweepConfig
from tests.test_structure import config_keys, documented_keys

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 280
# What the README's placeholders stand for when its commands are checked (a new placeholder must be added here).
PLACEHOLDERS = {
    "<sweep>": "kd_prune-20261207-101500",
    "<n>": "8",
    "<trial_id>": "641040e5",
    "<head>": "10.0.0.1",
    "<bucket>": "my-bucket",
}
PLACEHOLDER = re.compile(r"<[\w-]+>")
FENCE = re.compile(r"^\s*```")
INLINE_CODE = re.compile(r"`([^`\n]+)`")

# Runs each (script, args) as `python script args` would, in one interpreter, and writes [exit code, output] each.
RUNNER = """
import contextlib, io, json, runpy, sys, traceback
commands, out_file = json.loads(sys.argv[1]), sys.argv[2]
results = []
for script, args in commands:
    sys.argv, sys.path[0] = [script, *args], script.rpartition("/")[0]
    buffer, code = io.StringIO(), 0
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            code = 1
            traceback.print_exc()
    results.append([code, buffer.getvalue()])
with open(out_file, "w") as f:
    json.dump(results, f)
"""


def code_lines(text: str) -> list[str]:
    """Lines of fenced and indented code blocks (a trailing backslash joins the next line), and inline code spans."""
    lines, fenced, pending = [], False, ""
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            joined = pending + line.strip()
            if joined.endswith("\\"):
                pending = joined[:-1].rstrip() + " "
                continue
            lines.append(joined)
            pending = ""
        else:
            lines += [span.strip() for span in INLINE_CODE.findall(line)]
    return lines


def readme_commands(text: str) -> list[str]:
    """The `python ...` and `make ...` commands README shows, in order, once each."""
    return list(dict.fromkeys(line for line in code_lines(text) if line.startswith(("python ", "make "))))


def filled(command: str) -> list[str]:
    """The command's words (comment dropped) with its placeholders filled in; an unknown placeholder fails the test."""
    words = shlex.split(command, comments=True)
    unknown = sorted(set(PLACEHOLDER.findall(" ".join(words))) - set(PLACEHOLDERS))
    assert not unknown, f"README command {command!r} uses placeholder(s) {unknown}: add them to PLACEHOLDERS"
    return [PLACEHOLDER.sub(lambda m: PLACEHOLDERS[m[0]], word) for word in words]


def is_hydra(script: Path) -> bool:
    return "@hydra.main" in script.read_text()


def check_args(script: Path, args: list[str]) -> list[str]:
    """The arguments that check a command without running it (module docstring)."""
    if not is_hydra(script) or "--help" in args:
        return ["--help"]
    overrides = [arg for arg in args if not arg.startswith("-")]
    return ["--cfg", "job", "--resolve", *overrides] if overrides else ["--help"]


def missing_options(script: Path, args: list[str], help_text: str) -> list[str]:
    """The `--options` an argparse script is given that its --help does not list (Hydra scripts have none)."""
    if is_hydra(script):
        return []
    return [option for option in (a.split("=")[0] for a in args if a.startswith("--")) if option not in help_text]


def run_python(commands: list[tuple[str, list[str]]]) -> list[tuple[int, str]]:
    """(exit code, output) of each (script, args), in order, from one interpreter: the imports are paid once."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, json.dumps(commands), out.name],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"the command runner itself failed:\n{done.stdout}\n{done.stderr}"
        return [tuple(result) for result in json.loads(Path(out.name).read_text())]


README_TEXT = README.read_text()
COMMANDS = readme_commands(README_TEXT)
PYTHON = [c for c in COMMANDS if c.startswith("python ")]
MAKE = [c for c in COMMANDS if c.startswith("make ")]


@pytest.fixture(scope="module")
def python_results() -> dict[str, tuple[int, str]]:
    """Exit code and output of each runnable README python command (the test of each says why one is not)."""
    runnable = {}
    for command in PYTHON:
        try:
            words = filled(command)
        except AssertionError:
            continue  # its own test reports the unknown placeholder
        script = ROOT / words[1]
        if script.is_file():
            runnable[command] = (str(script), check_args(script, words[2:]))
    return dict(zip(runnable, run_python(list(runnable.values()))))


def test_readme_is_short_enough_to_read():
    lines = len(README_TEXT.splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines (at most {MAX_LINES}): move details to docs/"


def test_readme_shows_the_everyday_commands():
    for needed in (
        "make run",
        "make test",
        "python sweeps/run.py",
        "python analysis/pareto.py",
        "python analysis/evaluate.py",
        "python analysis/export.py",
        "python trainable/train.py",
        "python trainable/teacher.py",
        "python data_prep/build.py",
        "python benchmarks/",
    ):
        assert any(c.startswith(needed) for c in COMMANDS), f"README shows no `{needed}` command"


@pytest.mark.parametrize("command", PYTHON)
@pytest.mark.slow
def test_python_command_parses(command, python_results):
    words = filled(command)
    script = ROOT / words[1]
    assert script.is_file(), f"README command {command!r}: {words[1]} does not exist"
    code, output = python_results[command]
    assert code == 0, f"README command {command!r} does not parse (exit {code}):\n{output[-3000:]}"
    missing = missing_options(script, words[2:], output)
    assert not missing, f"README command {command!r} passes {missing}, which {words[1]} --help does not list"


@pytest.mark.parametrize("command", MAKE)
def test_make_target_exists(command):
    done = subprocess.run(["make", "-n", *filled(command)[1:]], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"README command {command!r}: {done.stderr.strip()}"


def test_config_table_names_only_real_keys():
    """The reverse of tests/test_structure.py's check: no key in README's table is stale or invented."""
    real = config_keys(SweepConfig) | config_keys(AnalysisConfig)
    assert not documented_keys() - real, f"README's 'Config keys' table names unknown keys: {documented_keys() - real}"


@pytest.mark.slow
def test_the_checks_can_fail():
    """A stale override, a missing argparse option and a missing make target are caught."""
    sweep, train, benchmark = ROOT / "sweeps/run.py", ROOT / "trainable/train.py", ROOT / "benchmarks/kd_epoch.py"
    (bad_code, bad_output), (good_code, _), (help_code, help_text) = run_python(
        [
            (str(sweep), check_args(sweep, ["kd.nosuch=1"])),
            (str(train), check_args(train, ["scenario=kd_single"])),
            (str(benchmark), check_args(benchmark, ["--epochs", "2"])),
        ]
    )
    assert bad_code != 0 and "nosuch" in bad_output and good_code == 0 and help_code == 0
    assert missing_options(benchmark, ["--epochs", "2", "--no-such-option"], help_text) == ["--no-such-option"]
    assert readme_commands("```\npython a.py x=1 \\\n  y=2   # note\n```\nrun `make run` here\n") == [
        "python a.py x=1 y=2   # note",
        "make run",
    ]
    assert subprocess.run(["make", "-n", "no-such-target"], cwd=ROOT, capture_output=True).returncode != 0
