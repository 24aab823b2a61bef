"""The docs match the CLI: every `python cli.py ...` and `mnist-diff ...` command in README.md and docs/*.md
(code blocks and inline code; in prose also the short form `sweep --dry-run`) is parsed by the click commands,
options, values and choices, and nothing runs.
Also: README.md stays a short page, keeps its two set-up commands first, and its relative links resolve."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import click
import pytest
import yaml

import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GROUP = cli.cli
COMMANDS = tuple(GROUP.commands)  # train, sample, evaluate, sweep, report, bench

# What may stand before the command in a shell line and is not part of it.
LAUNCHERS = {"srun", "exec", "time", "nohup", "env"}
# `$VAR` / `${VAR}` in a docs command is a folder the reader has (`$TMPDIR`, `$OUT`): it becomes one here.
VAR_ROOT = "/tmp/mnist-diff-docs-var"
# The first two commands of README.md: the main job and the tests. CI and users run them as written.
SETUP_COMMANDS = (
    "pip install -e . && python cli.py sweep",
    'pip install -e ".[test,dashboard]" && python -m pytest -q',
)


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/grids.md:12"
    text: str  # the shell text it came from
    args: tuple  # what follows `python cli.py` / `mnist-diff`: the subcommand and its options

    def __str__(self):
        return f"{self.where}: {' '.join(map(shlex.quote, ('cli.py',) + self.args))}"


# -- extraction ----------------------------------------------------------------------------------------------


def _is_operator(token: str) -> bool:
    return bool(token) and all(c in "();<>|&" for c in token)


def commands_in_shell(text: str) -> list[tuple]:
    """The argument lists of the `python cli.py` / `python3 cli.py` / `mnist-diff` commands in one shell line
    (continuations already joined): comments dropped, `$VAR` made a folder, the line cut at `|`, `&&`, `;`,
    `>` and the like; a part after a redirection is its target, not a command."""
    if not re.search(r"\bcli\.py\b|(^|[\s;&|(`])mnist-diff(\s|$)", text):
        return []
    text = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: f"{VAR_ROOT}/{m.group(1)}", text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True  # `#` starts a comment (lexer.commenters)
    tokens = list(lexer)  # unbalanced quotes raise ValueError: a broken docs command
    parts, part, after_redirect = [], [], False
    for token in tokens + [";"]:
        if _is_operator(token):
            if part and not after_redirect:
                parts.append(part)
            part, after_redirect = [], any(c in "<>" for c in token)
        else:
            part.append(token)
    found = []
    for part in parts:
        i = 0
        while i < len(part) and (part[i] in LAUNCHERS or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", part[i])):
            i += 1
        if part[i : i + 2] in (["python", "cli.py"], ["python3", "cli.py"]):
            args = part[i + 2 :]
        elif part[i : i + 1] == ["mnist-diff"]:
            args = part[i + 1 :]
        else:
            continue
        if args:  # a bare `python cli.py` / `mnist-diff` in prose names the program: no command line
            found.append(tuple(args))
    return found


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    joined, start, buf = [], None, ""
    for number, line in lines:
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        joined.append((start, buf + line))
        start, buf = None, ""
    if buf:
        joined.append((start, buf))
    return joined


def commands_in_markdown(text: str, name: str) -> list[DocCommand]:
    """Every CLI command of one Markdown page: in fenced blocks line by line (shell lines, `\\` continuations
    joined; in YAML, a `command: ["python", "cli.py", ...]` list) and in inline code spans, which may wrap."""
    found, prose, fence, block = [], [], None, []
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        marker = re.match(r"\s*(```+|~~~+)\s*(\S*)", line)
        if fence is None and marker:
            fence, lang, block = marker.group(1), marker.group(2).lower(), []
            prose.append("")
        elif fence is not None and marker and line.strip() == marker.group(1) and marker.group(1).startswith(fence):
            found += _commands_in_block(block, lang, name)
            fence = None
            prose.append("")
        elif fence is not None:
            block.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    prose_text = "\n".join(prose)
    for m in re.finditer(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", prose_text, flags=re.DOTALL):
        line = prose_text.count("\n", 0, m.start()) + 1
        span = m.group(2).replace("\n", " ").strip()
        if re.match(rf"({'|'.join(COMMANDS)}) -", span):  # the short form in prose: `sweep --dry-run`
            span = f"python cli.py {span}"
        found += [DocCommand(f"{name}:{line}", span, args) for args in commands_in_shell(span)]
    return found


def _commands_in_block(block: list[tuple[int, str]], lang: str, name: str) -> list[DocCommand]:
    found = []
    if lang in ("yaml", "yml", "json"):
        text = "\n".join(line for _, line in block)
        for m in re.finditer(r'\[\s*"python3?"\s*,\s*"cli\.py"[^\]]*\]', text):
            line = block[0][0] + text.count("\n", 0, m.start())
            argv = json.loads(m.group(0))
            found.append(DocCommand(f"{name}:{line}", m.group(0), tuple(argv[2:])))
        return found
    if lang in ("toml", "text", "txt", "python", "py"):
        return found
    for number, line in _join_continuations(block):
        found += [DocCommand(f"{name}:{number}", line, args) for args in commands_in_shell(line)]
    return found


def all_doc_commands() -> list[DocCommand]:
    return [c for page in PAGES for c in commands_in_markdown(page.read_text(), str(page.relative_to(ROOT)))]


# -- checking one command ------------------------------------------------------------------------------------


def _existing_path_params(cmd: click.Command):
    """The command's options that must name an existing path (`click.Path(exists=True)` and its subclasses)."""
    return [p for p in cmd.params if isinstance(p, click.Option) and isinstance(p.type, click.Path) and p.type.exists]


def check_cli_args(args, tmp_path: Path, monkeypatch) -> None:
    """Parse `args` as `python cli.py ARGS` would, without running anything: click's UsageError (unknown
    command or option, bad value, missing required option) propagates. An option that must name an existing
    path gets an existing temporary file or folder instead of the docs' example value, and is checked as a
    plain path (not its content): its name is still checked. Environment defaults are ignored."""
    args = list(args)
    for command in GROUP.commands.values():
        for param in command.params:
            for var in [param.envvar] if isinstance(param.envvar, str) else (param.envvar or []):
                monkeypatch.delenv(var, raising=False)
    try:
        ctx = GROUP.make_context("cli", list(args), resilient_parsing=False)
        name, cmd, rest = GROUP.resolve_command(ctx, args)
        rest = list(rest)
        for param in _existing_path_params(cmd):
            stand_in = tmp_path / f"stand-in-{param.name}"
            if param.type.file_okay:
                stand_in.touch()
            else:
                stand_in.mkdir(exist_ok=True)
            plain = click.Path(exists=True, file_okay=param.type.file_okay, dir_okay=param.type.dir_okay)
            monkeypatch.setattr(param, "type", plain)
            for i, word in enumerate(rest):
                for opt in param.opts:
                    if word == opt and i + 1 < len(rest):
                        rest[i + 1] = str(stand_in)
                    elif word.startswith(opt + "="):
                        rest[i] = f"{opt}={stand_in}"
        with cmd.make_context(name, rest, parent=ctx, resilient_parsing=False):
            pass
    except click.exceptions.Exit as done:  # --help
        assert done.exit_code == 0


DOC_COMMANDS = all_doc_commands()


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=lambda c: c.where)
def test_docs_command_is_valid(command, tmp_path, monkeypatch, capsys):
    try:
        check_cli_args(command.args, tmp_path, monkeypatch)
    except click.ClickException as err:
        pytest.fail(f"{command}\n  from: {command.text}\n  the CLI says: {err.format_message()}")


def test_docs_have_commands_of_every_kind():
    """The extraction finds the docs' commands: every subcommand appears, in README.md and in docs/."""
    assert len(DOC_COMMANDS) >= 30, [str(c) for c in DOC_COMMANDS]
    used = {c.args[0] for c in DOC_COMMANDS if c.args}
    assert set(COMMANDS) <= used, set(COMMANDS) - used
    assert any(c.where.startswith("README.md") for c in DOC_COMMANDS)


# -- the checker can fail -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, error, names",
    [
        ("python cli.py sweep --no-such-option", click.NoSuchOption, "no-such-option"),
        ("mnist-diff sweep --no-such-option", click.NoSuchOption, "no-such-option"),
        ("python cli.py train --schedule exp", click.BadParameter, "exp"),
        ("python cli.py sweep --sampler ddpm,plms", click.BadParameter, "plms"),
        ("python cli.py sweep --time-budget soon", click.BadParameter, "soon"),
        ("python cli.py no-such-command", click.UsageError, "no-such-command"),
        ("python cli.py sample --model", click.BadOptionUsage, "--model"),
        ("python cli.py sweep --seeds", click.BadOptionUsage, "--seeds"),
    ],
)
def test_invalid_commands_are_reported(line, error, names, tmp_path, monkeypatch):
    [args] = commands_in_shell(line)
    with pytest.raises(error, match=re.escape(names)):
        check_cli_args(args, tmp_path, monkeypatch)


def test_existing_path_options_are_still_named(tmp_path, monkeypatch):
    """A path that must exist is replaced by one that does, but the option's name is still checked."""
    check_cli_args(["evaluate", "--checkpoint", "runs/nowhere/ema.pt"], tmp_path, monkeypatch)
    check_cli_args(["report", "--results=runs/nowhere.json"], tmp_path, monkeypatch)
    with pytest.raises(click.NoSuchOption):
        check_cli_args(["evaluate", "--checkpoints", "runs/nowhere/ema.pt"], tmp_path, monkeypatch)


def test_markdown_extraction():
    page = "\n".join(
        [
            "Run `python cli.py sweep --preset smoke",
            "--quiet` first; `sweep`, `mnist-diff` and `--out runs/mnist-diff` are no command lines; "
            "`bench --full` is.",
            "```bash",
            "python cli.py train --schedule cosine \\",
            "    --timesteps 200   # a comment",
            'srun python cli.py sweep --out "$TMPDIR/x" --quiet | tee log && mnist-diff report --study s > r.txt',
            "optuna-dashboard postgresql://u@h/optuna",
            "```",
            "```yaml",
            'command: ["python", "cli.py", "sweep",',
            '          "--quiet"]',
            "```",
        ]
    )
    found = [(c.where, c.args) for c in commands_in_markdown(page, "p.md")]
    assert found == [
        ("p.md:4", ("train", "--schedule", "cosine", "--timesteps", "200")),
        ("p.md:6", ("sweep", "--out", f"{VAR_ROOT}/TMPDIR/x", "--quiet")),
        ("p.md:6", ("report", "--study", "s")),
        ("p.md:10", ("sweep", "--quiet")),
        ("p.md:1", ("sweep", "--preset", "smoke", "--quiet")),
        ("p.md:2", ("bench", "--full")),
    ]


# -- MLflow Projects commands in the docs ---------------------------------------------------------------------


def mlflow_run_lines() -> list[tuple[str, list]]:
    """`mlflow run . [-e ENTRY] -P name=value ...` lines of the docs, as (where, argv)."""
    found = []
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        for number, line in enumerate(page.read_text().split("\n"), 1):
            for m in re.finditer(r"mlflow run \.[^`#\n]*", line):
                try:
                    found.append((f"{name}:{number}", shlex.split(m.group(0))))
                except ValueError:
                    found.append((f"{name}:{number}", ["unbalanced quotes", m.group(0)]))
    return found


@pytest.mark.parametrize("where, argv", mlflow_run_lines(), ids=lambda x: x if isinstance(x, str) else "")
def test_docs_mlflow_run_parameters_exist(where, argv):
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    entry = "main"
    for flag, value in pairwise(argv):
        if flag in ("-e", "--entry-point"):
            entry = value
    assert entry in entry_points, f"{where}: no entry point {entry!r}"
    for flag, value in pairwise(argv):
        if flag in ("-P", "--param-list"):
            param = value.split("=", 1)[0]
            assert param in entry_points[entry]["parameters"], f"{where}: {entry} has no parameter {param!r}"


# -- the README's shape -----------------------------------------------------------------------------------------


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the reference belongs in docs/"


def test_readme_starts_with_the_setup_commands():
    """The first two commands of README.md run the main job and the tests, exactly as CI and users type them."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL).group(1)
    first_two = [line.split("#")[0].strip() for line in block.strip().split("\n")[:2]]
    assert tuple(first_two) == SETUP_COMMANDS


def test_relative_links_resolve():
    """Every relative link and image of README.md and docs/*.md names a file that exists."""
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
