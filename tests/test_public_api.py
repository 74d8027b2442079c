"""The public surface: an exact, sorted ``__all__``; every error under TBXError."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import tbx_lightning
from tbx_lightning import errors

REPO = Path(__file__).resolve().parents[1]


def public_names() -> set[str]:
    """Every name the package binds without a leading underscore, submodules aside."""
    for name in tbx_lightning.__all__:
        getattr(tbx_lightning, name)  # load the lazy ones, so they are bound too
    return {
        name
        for name in dir(tbx_lightning)
        if not name.startswith("_") and not inspect.ismodule(getattr(tbx_lightning, name))
    }


def test_all_is_exactly_the_public_names_sorted() -> None:
    assert tbx_lightning.__all__ == sorted(tbx_lightning.__all__)
    assert len(set(tbx_lightning.__all__)) == len(tbx_lightning.__all__)
    assert set(tbx_lightning.__all__) == public_names() | {"__version__"}


def test_every_name_resolves_to_its_definition() -> None:
    for name in tbx_lightning.__all__:
        value = getattr(tbx_lightning, name)
        if name == "__version__":
            assert isinstance(value, str) and value
        else:
            assert value.__name__ == name


def test_every_error_derives_from_tbx_error_and_is_exported() -> None:
    defined = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, BaseException)
    }
    assert set(errors.__all__) == defined
    assert defined <= set(tbx_lightning.__all__)
    for name in defined:
        cls = getattr(tbx_lightning, name)
        assert issubclass(cls, tbx_lightning.TBXError), name
    exported_errors = {
        name
        for name in tbx_lightning.__all__
        if inspect.isclass(getattr(tbx_lightning, name))
        and issubclass(getattr(tbx_lightning, name), BaseException)
    }
    assert exported_errors == defined


def test_errors_keep_the_fitting_builtin_base() -> None:
    assert issubclass(errors.LoggedTypeError, TypeError)
    assert issubclass(errors.LoggedValueError, ValueError)
    assert issubclass(errors.ConfigTypeError, TypeError)
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.RunNotStartedError, RuntimeError)
    assert issubclass(errors.GraphExportError, RuntimeError)
    assert issubclass(errors.UsageError, RuntimeError)


# Built-in exceptions the package may raise itself: the protocol errors of ``__getattr__``
# (Python's own contract for a missing attribute) and the interpreter's control flow.
_BUILTIN_RAISES_ALLOWED = {"AttributeError", "StopIteration", "NotImplementedError"}


def test_the_package_raises_only_its_own_errors() -> None:
    import ast
    import builtins

    builtin_errors = {
        name
        for name, value in vars(builtins).items()
        if inspect.isclass(value) and issubclass(value, BaseException)
    }
    found = []
    for path in sorted((REPO / "tbx_lightning").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = target.id if isinstance(target, ast.Name) else None
            if name in builtin_errors and name not in _BUILTIN_RAISES_ALLOWED:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: raise {name}")
    assert not found, "raise a tbx_lightning.errors class instead:\n" + "\n".join(found)


def test_import_stays_light() -> None:
    code = (
        "import sys, tbx_lightning; "
        "print(sorted(m for m in ('lightning', 'accelerate') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- docs/api.md
def render(cls: type, name: str) -> str:
    """A member as docs/api.md writes it: properties by name, calls with their parameters."""
    if isinstance(inspect.getattr_static(cls, name), property):
        return name
    sig = inspect.signature(cls if name == "__init__" else getattr(cls, name))
    parts: list[str] = []
    star = False
    for param in sig.parameters.values():
        if param.name == "self":
            continue
        if param.kind is param.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if param.kind is param.VAR_POSITIONAL:
            parts.append("*" + param.name)
            star = True
        elif param.kind is param.VAR_KEYWORD:
            parts.append("**" + param.name)
        elif param.default is param.empty:
            parts.append(param.name)
        else:
            parts.append(f"{param.name}={param.default!r}")
    head = cls.__name__ if name == "__init__" else name
    return f"{head}({', '.join(parts)})"


def doc_cells() -> dict[str, list[str]]:
    """The code cells of docs/api.md's tables, per integration column."""
    columns: dict[str, list[str]] = {"TBXLogger": [], "TBXTracker": []}
    in_table = False
    for line in (REPO / "docs" / "api.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[1:] == ["TBXLogger", "TBXTracker"]:
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
        if not in_table or cells[1] == "---":
            continue
        for column, cell in zip(("TBXLogger", "TBXTracker"), cells[1:], strict=True):
            if cell != "—":
                assert cell.startswith("`") and cell.endswith("`"), line
                columns[column].append(cell.strip("`"))
    return columns


def own_members(cls: type) -> set[str]:
    """Public calls and properties the class itself defines (not its host's base class)."""
    names = set()
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property) or callable(value):
            names.add(name)
    return names


def test_api_doc_matches_the_signatures() -> None:
    from tbx_lightning import TBXLogger, TBXTracker

    for cls in (TBXLogger, TBXTracker):
        cells = doc_cells()[cls.__name__]
        documented = set()
        for cell in cells:
            name = cell.split("(", 1)[0]
            member = "__init__" if name == cls.__name__ else name
            assert cell == render(cls, member), f"docs/api.md is out of date for {cls.__name__}"
            documented.add(member)
        assert own_members(cls) - documented == set(), f"{cls.__name__} members missing"
        assert "__init__" in documented
