"""Running the code blocks of the docs with Sybil: what a block is and how each runs.

A fenced block is one of:

- ``python``: run as shown, in one namespace per document (Sybil's own parser);
- ``bash``: commands, run one by one (below);
- ``console``: ``$ command`` lines, each followed by the output it prints; the command
  runs as shown and its standard output must match (numbers within
  :data:`RELATIVE_TOLERANCE`, times and durations not compared, ``...`` for any lines);
- ``text``, ``yaml``, ``toml``, ``ini``: output, layouts and configs, not run.

A ``python`` or ``bash`` block whose first line is a comment starting with
``# excerpt`` (``# 节选`` in Chinese) is a part of a program, shown for reading: it is
not run. Everything runs in a fresh temporary folder per document.

How a ``bash`` command runs:

- ``tbx-lightning fit ...`` and ``tbx-lightning sweep ...`` run in this process on a
  reduced budget (:data:`BUDGET` is added for every key the command does not set), a
  sweep through Hydra's in-process launcher. A sweep that names its launcher
  (``--jobs``, ``hydra/launcher=...``) is composed and checked, every point, without
  running: such launchers start processes or SLURM jobs. A search runs 2 trials.
- other ``tbx-lightning`` commands run as shown;
- ``python examples/NAME.py ...`` runs the example in this process, with its step
  counts divided by :data:`EXAMPLE_STEPS_DIVISOR`;
- ``tensorboard --logdir DIR`` is not started (it serves until stopped), but ``DIR``
  must exist after the commands before it;
- ``pip install`` lines must install from the checkout with extras that exist (there is
  no release to install from a registry) and are not run; ``python -m venv``, ``.
  .venv/bin/activate`` and ``python -m pytest`` (this suite) are not run either;
- anything else fails: mark the block as an excerpt or teach this module the command.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tomllib
from sybil import Document, Example, Sybil
from sybil.example import NotEvaluated
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser

REPO = Path(__file__).resolve().parents[1]

RELATIVE_TOLERANCE = 1e-2
"""Numbers a run prints may move by this much between CPUs (float kernels differ)."""

BUDGET = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
"""Overrides a ``bash`` block's ``fit`` and ``sweep`` commands get in the suite."""

LIGHTER = [
    ("~callbacks.embedding_projector", "callbacks.embedding_projector"),
    ("~callbacks.training_monitor", "callbacks.training_monitor"),
    ("logger.tbx.log_graph=false", "logger.tbx.log_graph"),
]
"""Also left out of a budgeted run, unless the command names them: the extra projector
pass, the monitor and the graph export (``tests/test_templates.py`` runs them)."""

EXAMPLE_STEPS_DIVISOR = 10
"""``python examples/...`` commands run with ``--max-steps`` and ``--nan-from`` divided
by this (60 steps, NaN from 30: 6 steps, NaN from 3), so events keep their order."""

LANGUAGES = {"python", "bash", "console", "text", "yaml", "toml", "ini"}
EXCERPT = re.compile(r"^\s*#\s*(excerpt|Excerpt|节选)")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$", re.MULTILINE)


def is_excerpt(source: str) -> bool:
    first = next((line for line in source.splitlines() if line.strip()), "")
    return bool(EXCERPT.match(first))


def fences(text: str) -> Iterator[tuple[int, str, str]]:
    """``(line, language, source)`` of every fenced block of a Markdown text."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info = match.group("fence"), match.group("info").strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(match.group("indent")) :])
            j += 1
        yield i + 1, info.split()[0] if info else "", "\n".join(body)
        i = j + 1


# ---------------------------------------------------------------------- commands
def commands(source: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments and blanks dropped."""
    joined = re.sub(r"\\\n\s*", " ", source)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        text = shlex.join(words)
        out += [part.strip() for part in text.split(" '&&' ")]
    return out


def _extras() -> set[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return set(data["project"]["optional-dependencies"])


def check_install(words: list[str]) -> str | None:
    """Why a ``pip install`` line would fail, or None."""
    for word in words[2:]:
        if word.startswith("torch=="):
            continue
        if word == "-e":
            continue
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", word)
        if match:
            unknown = set((match.group(1) or "").split(",")) - _extras() - {""}
            if unknown:
                return f"{shlex.join(words)}: no extra {sorted(unknown)} in pyproject.toml"
            continue
        return (
            f"{shlex.join(words)}: install from the checkout (pip install -e '.[EXTRA]'); "
            f"{word!r} is not on a package index"
        )
    return None


class Shell:
    """Runs the commands of one document's blocks in its own folder."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.stderr = io.StringIO()  # what the last command wrote to stderr

    def run(self, command: str) -> tuple[int, str]:
        """Runs one command line; returns its exit status and standard output."""
        words = shlex.split(command)
        if re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            raise AssertionError(f"{command}: environment prefixes are not run; mark an excerpt")
        if words[:2] == ["pip", "install"]:
            problem = check_install(words)
            if problem:
                raise AssertionError(problem)
            return 0, ""
        if words[:3] == ["python", "-m", "venv"] or words[:2] in ([".", ".venv/bin/activate"],):
            return 0, ""
        if words[:3] == ["python", "-m", "pytest"]:
            return 0, ""
        if words[0] == "tensorboard":
            logdir = words[words.index("--logdir") + 1]
            assert (self.cwd / logdir).is_dir(), f"{command}: {logdir} does not exist"
            return 0, ""
        if words[0] == "tbx-lightning":
            return self.tbx_lightning(words[1:])
        if words[0] == "python" and len(words) > 1 and words[1].startswith("examples/"):
            return self.example(words[1], words[2:])
        raise AssertionError(f"{command}: not a command the docs tests run; mark an excerpt")

    @contextlib.contextmanager
    def _captured(self) -> Iterator[io.StringIO]:
        out = io.StringIO()
        self.stderr = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(self.stderr):
            yield out

    def tbx_lightning(self, argv: list[str], *, as_shown: bool = False) -> tuple[int, str]:
        from tbx_lightning import cli

        argv = list(argv)
        if not as_shown and argv and argv[0] in ("fit", "sweep"):
            return self._budgeted(argv)
        with self._captured() as out:
            code = cli.main(argv)
        return code, out.getvalue()

    def _budgeted(self, argv: list[str]) -> tuple[int, str]:
        from tbx_lightning import cli
        from tbx_lightning.cli import _main, _sweep

        given = {w.split("=", 1)[0].lstrip("+~") for w in argv if "=" in w}
        extra = [o for o in BUDGET if o.split("=", 1)[0] not in given]
        named = " ".join(argv)
        for option, key in LIGHTER:
            if key not in named:
                extra.append(option)
        if argv[0] == "fit":
            with self._captured() as out:
                code = cli.main([*argv, *extra])
            return code, out.getvalue()
        launcher = "--jobs" in argv or any(w.startswith("hydra/launcher=") for w in argv)
        if "hydra/sweeper=search" in argv or "quickstart_search" in argv:
            argv = [w for w in argv if not w.startswith("hydra.sweeper.n_trials=")]
            extra.append("hydra.sweeper.n_trials=2")
        if launcher:
            args, rest = _main._parser().parse_known_args([*argv, *extra])
            args.args = [*args.args, *rest]
            _sweep.plan_sweep(args)  # composes and checks every point; raises on a problem
            return 0, ""
        with self._captured() as out:
            code = cli.main([*argv, *extra, "hydra/launcher=basic"])
        return code, out.getvalue()

    def example(self, script: str, argv: list[str]) -> tuple[int, str]:
        path = REPO / script
        argv = _scaled(argv)
        sys.path.insert(0, str(path.parent))
        old = sys.argv
        sys.argv = [str(path), *argv]
        try:
            with self._captured() as out:
                runpy.run_path(str(path), run_name="__main__")
        finally:
            sys.argv = old
            sys.path.remove(str(path.parent))
        return 0, out.getvalue()


def _scaled(argv: list[str]) -> list[str]:
    """An example's step counts divided by :data:`EXAMPLE_STEPS_DIVISOR`, in proportion."""
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        if word in ("--max-steps", "--nan-from"):
            out[i + 1] = str(max(1, int(out[i + 1]) // EXAMPLE_STEPS_DIVISOR))
    if any(word.startswith("--trainer.") for word in out):  # LightningCLI
        out += ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    return out


# ---------------------------------------------------------------------- output
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?%?")
_TIME_COLUMNS = {"seconds", "stalled_since", "time"}


def _cells(line: str) -> list[str]:
    return [c for c in re.split(r"\s{2,}", line.strip()) if c != ""]


def _same_number(expected: str, actual: str) -> bool:
    e, a = float(expected.rstrip("%")), float(actual.rstrip("%"))
    return abs(e - a) <= RELATIVE_TOLERANCE * max(abs(e), abs(a)) + 1e-12


def _same_text(expected: str, actual: str, *, timed: bool = False) -> bool:
    """Text equal but for numbers within the tolerance; with ``timed``, any numbers.

    ``...`` in a line stands for any text (a path, say), as in doctest.
    """
    if "..." in expected:
        pattern = ".*".join(re.escape(part) for part in expected.split("..."))
        return re.fullmatch(pattern, actual) is not None
    e_parts, a_parts = _NUMBER.split(expected), _NUMBER.split(actual)
    e_nums, a_nums = _NUMBER.findall(expected), _NUMBER.findall(actual)
    if [p.strip() for p in e_parts] != [p.strip() for p in a_parts] or len(e_nums) != len(a_nums):
        return False
    if timed:
        return True
    # A number followed by " s" or "ms" is a duration: not compared.
    for i, (e, a) in enumerate(zip(e_nums, a_nums, strict=True)):
        after = e_parts[i + 1].lstrip()
        if re.match(r"(s|ms)\b", after):
            continue
        if not _same_number(e, a):
            return False
    return True


def same_output(expected: str, actual: str, cwd: Path) -> str | None:
    """None when ``actual`` matches the ``expected`` output a doc shows, else why not."""
    actual = actual.replace(str(cwd) + os.sep, "").replace(str(cwd), ".")
    want = [line.rstrip() for line in expected.strip("\n").splitlines()]
    got = [line.rstrip() for line in actual.strip("\n").splitlines()]
    columns: list[str] = []

    def match(i: int, j: int) -> bool:
        nonlocal columns
        if i == len(want):
            return j == len(got)
        if want[i].strip() == "...":
            return any(match(i + 1, k) for k in range(j, len(got) + 1))
        if j == len(got):
            return False
        w, g = want[i], got[j]
        if set(w.replace(" ", "")) <= {"-"} and w:
            return set(g.replace(" ", "")) <= {"-"} and match(i + 1, j + 1)
        if i + 1 < len(want) and set(want[i + 1].replace(" ", "")) == {"-"}:
            columns = _cells(w)  # a table's header
            return _cells(w) == _cells(g) and match(i + 1, j + 1)
        wc, gc = _cells(w), _cells(g)
        if columns and len(wc) == len(columns) == len(gc):
            ok = all(
                _same_text(a, b, timed=name in _TIME_COLUMNS)
                for name, a, b in zip(columns, wc, gc, strict=True)
            )
        else:
            ok = _same_text(w, g)
        return ok and match(i + 1, j + 1)

    if match(0, 0):
        return None
    return "output differs:\n--- shown\n" + "\n".join(want) + "\n--- printed\n" + "\n".join(got)


# ---------------------------------------------------------------------- Sybil
def console_blocks(source: str) -> list[tuple[str, str]]:
    """``(command, expected output)`` pairs of a ``console`` block."""
    pairs: list[tuple[str, list[str]]] = []
    lines = source.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            pairs.append((command, []))
        elif pairs:
            pairs[-1][1].append(line)
        else:
            raise AssertionError(f"a console block starts with output, not a command: {line!r}")
        i += 1
    return [(c, "\n".join(o)) for c, o in pairs]


def _shell(example: Example) -> str | None:
    shell: Shell = example.namespace["__shell__"]
    for command in commands(str(example.parsed)):
        code, _ = shell.run(command)
        if code != 0:
            return f"{command}: exit status {code}"
    return None


def _console(example: Example) -> str | None:
    shell: Shell = example.namespace["__shell__"]
    for command, expected in console_blocks(str(example.parsed)):
        words = shlex.split(command, comments=True)
        assert words[0] == "tbx-lightning", f"{command}: console blocks show tbx-lightning"
        code, out = shell.tbx_lightning(words[1:], as_shown=True)
        if code != 0:
            # A failing command is shown with its error (stderr): bad input, exit status 2.
            out += shell.stderr.getvalue()
            if "error:" not in expected:
                return f"{command}: exit status {code}\n{out}"
        if expected.strip():
            problem = same_output(expected, out, shell.cwd)
            if problem:
                return f"$ {command}\n{problem}"
    return None


def _fresh_accelerate(example: Example) -> None:
    """Each block starts with no Accelerate state, as a new script would."""
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(True)
    raise NotEvaluated()


def _skip_excerpts(example: Example) -> None:
    if is_excerpt(str(example.parsed)):
        return None
    raise NotEvaluated()


def sybil() -> Sybil:
    return Sybil(
        parsers=[
            PythonCodeBlockParser(),
            CodeBlockParser("bash", _shell),
            CodeBlockParser("console", _console),
        ],
    )


def run_document(
    path: Path, cwd: Path, *, setup: Callable[[dict[str, Any]], None] | None = None
) -> None:
    """Runs every block of ``path`` in order, in ``cwd``; raises on the first failure."""
    document: Document = sybil().parse(path)
    document.namespace["__shell__"] = Shell(cwd)
    document.push_evaluator(_fresh_accelerate)
    document.push_evaluator(_skip_excerpts)
    if setup is not None:
        setup(document.namespace)
    for example in document:
        started = time.perf_counter()
        example.evaluate()
        if os.environ.get("TBX_DOCS_TIMES"):
            print(
                f"{path.name}:{example.line}: {time.perf_counter() - started:.1f} s",
                file=sys.__stderr__,
            )


def run_commands(cwd: Path, lines: Sequence[str]) -> list[tuple[int, str]]:
    shell = Shell(cwd)
    return [shell.run(line) for line in lines]
