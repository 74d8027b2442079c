"""Docs that cannot drift from the code: docstring examples run, Args match signatures,
and docs/architecture.md's module map is the package's list of modules."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Any

import pytest

import tbx_lightning

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tbx_lightning"


def modules() -> list[str]:
    names = ["tbx_lightning"]
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="tbx_lightning."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


# ---------------------------------------------------------------------- examples
@pytest.mark.parametrize("name", modules())
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write ``runs/`` write here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    tests = [t for t in finder.find(module, name, module=module) if t.examples]
    for test in tests:
        runner.run(test, clear_globs=True)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring examples of {name} failed"


# ---------------------------------------------------------------------- Args
_SECTION = re.compile(r"^(\s*)(Args|Arguments|Attributes):\s*$")
_ARG = re.compile(r"^\s*(\*{0,2}\w+)(?:\s*\([^)]*\))?:\s")


def documented_args(doc: str) -> list[str]:
    """The names an ``Args:`` section documents, in order (``**kwargs`` kept as written)."""
    lines = doc.splitlines()
    names: list[str] = []
    for i, line in enumerate(lines):
        match = _SECTION.match(line)
        if not match:
            continue
        indent = None
        for item in lines[i + 1 :]:
            if not item.strip():
                continue
            depth = len(item) - len(item.lstrip())
            if depth <= len(match.group(1)):
                break
            if indent is None:
                indent = depth
            if depth == indent:
                arg = _ARG.match(item)
                if arg:
                    names.append(arg.group(1))
        break
    return names


def signature_args(obj: Any) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = list(inspect.signature(target).parameters.values())
    out = []
    for p in params:
        if p.name in ("self", "cls"):
            continue
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        else:
            out.append(p.name)
    return out


def public_callables() -> list[tuple[str, Any]]:
    """Every public class and function of the public namespaces, with its qualified name."""
    found: dict[str, Any] = {}
    spaces = [
        "tbx_lightning",
        "tbx_lightning.monitor",
        "tbx_lightning.projector",
        "tbx_lightning.graph",
    ]
    for space in spaces:
        module = importlib.import_module(space)
        for name in getattr(module, "__all__", []):
            value = getattr(module, name)
            if (inspect.isclass(value) or inspect.isfunction(value)) and not (
                inspect.isclass(value) and issubclass(value, BaseException)
            ):
                found.setdefault(f"{value.__module__}.{value.__qualname__}", value)
    return sorted(found.items())


@pytest.mark.parametrize(
    "obj", [v for _, v in public_callables()], ids=[k for k, _ in public_callables()]
)
def test_public_docstrings_list_every_parameter(obj: Any) -> None:
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{obj.__qualname__} has no docstring"
    if getattr(obj, "_is_protocol", False):
        return  # a Protocol's docstring describes its methods; it takes no arguments
    wanted = signature_args(obj)
    if not wanted:
        return
    documented = documented_args(doc)
    if inspect.isclass(obj) and not documented:
        documented = documented_args(inspect.getdoc(obj.__init__) or "")
    assert documented == wanted, (
        f"{obj.__qualname__}: the docstring's Args list {documented}, the signature has {wanted}"
    )


def test_the_args_parser_reads_google_style() -> None:
    doc = """Does a thing.

    Args:
        first: One.
        second (int): Two, on
            two lines.
        **fields: The rest.

    Returns:
        Nothing.
    """
    assert documented_args(inspect.cleandoc(doc)) == ["first", "second", "**fields"]


# ---------------------------------------------------------------------- architecture
def mapped_modules() -> set[str]:
    """The modules docs/architecture.md's package map names, as paths under the package.

    The map is the first code block: one line per module or folder, indented under its
    folder; a line may name several modules before its description.
    """
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("```", 2)[1]
    paths: set[str] = set()
    folders: list[tuple[int, str]] = []
    for line in block.splitlines()[2:]:  # after the language tag and ``tbx_lightning/``
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        while folders and folders[-1][0] >= indent:
            folders.pop()
        prefix = folders[-1][1] if folders else ""
        for token in line.split():
            if token.endswith("/"):
                folders.append((indent, prefix + token))
                break
            if not token.endswith(".py"):
                break
            paths.add(prefix + token)
    return paths


def package_modules() -> set[str]:
    # A subpackage's __init__ holds its public names; its folder's line stands for it.
    return {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__main__.py", "_version.py")
        and not (p.name == "__init__.py" and p.parent != PACKAGE)
    }


def test_architecture_maps_every_module_and_no_other() -> None:
    mapped, actual = mapped_modules(), package_modules()
    assert mapped - actual == set(), "docs/architecture.md names modules that do not exist"
    assert actual - mapped == set(), "docs/architecture.md leaves these modules out"


def test_readme_and_docs_name_only_modules_and_packages_that_exist() -> None:
    names = {p.stem for p in PACKAGE.rglob("*.py")} | {
        p.name for p in PACKAGE.rglob("*") if p.is_dir()
    }
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for match in re.finditer(r"`tbx_lightning/([\w/]+?)(?:\.py)?/?`", text):
            part = match.group(1).rstrip("/").split("/")[-1]
            assert part in names, (
                f"{doc.name} names tbx_lightning/{match.group(1)}, which does not exist"
            )


def test_version_is_a_string() -> None:
    assert isinstance(tbx_lightning.__version__, str)
