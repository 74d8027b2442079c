"""The docs run as written: every code block and command of the guides, the README and
the reference pages, on a reduced budget, with the numbers the guides derive recomputed.

How a block runs is in :mod:`tests.guides`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import re

from tests.guides import LANGUAGES, REPO, commands, fences, is_excerpt, run_document

DOCS = [
    "README.md",
    "docs/guide.md",
    "docs/guide.zh-CN.md",
    "docs/glossary.md",
    "docs/monitor.md",
    "docs/lightning.md",
    "docs/accelerate.md",
    "docs/api.md",
    "docs/hparams.md",
    "docs/templates.md",
    "docs/graph.md",
    "docs/projector.md",
]

pytestmark = [
    pytest.mark.filterwarnings(
        # Lightning's advice on tiny CPU runs, not something the docs are about.
        "ignore:.*does not have many workers.*",
        "ignore:.*log_every_n_steps.*",
        "ignore:.*isinstance.treespec, LeafSpec.*",
    ),
]


RUN = [doc for doc in DOCS if doc != "docs/guide.zh-CN.md"]  # the same blocks as guide.md


@pytest.mark.parametrize("doc", RUN)
def test_code_blocks_run_as_shown(
    doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run_document(REPO / doc, tmp_path)


# ---------------------------------------------------------------------- blocks
@pytest.mark.parametrize("doc", DOCS)
def test_every_block_is_run_or_marked(doc: str) -> None:
    """A block is code that runs, an excerpt, or output/config in a language that says so."""
    for line, language, source in fences((REPO / doc).read_text(encoding="utf-8")):
        where = f"{doc}:{line}"
        assert language in LANGUAGES, f"{where}: give the block a language of {sorted(LANGUAGES)}"
        if language in ("text", "yaml", "toml", "ini"):
            for row in source.splitlines():
                usage = re.search(r"\[[^\]]*[A-Z]{3,}", row)  # a synopsis: fit [EXPERIMENT]
                assert usage or not row.startswith(("$ ", "tbx-lightning ", "pip install")), (
                    f"{where}: a command in a {language} block; use a bash or console block"
                )


def _code(source: str, language: str) -> list[str]:
    """A block's code without comments (the two languages translate only comments)."""
    if language == "python":
        lines = [line.split("  #")[0].rstrip() for line in source.splitlines()]
        return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if language == "bash":
        return commands(source)
    return source.strip().splitlines()


def test_both_guides_run_the_same_code_under_the_same_headings() -> None:
    """The Chinese guide has the English guide's sections and blocks, so running the
    English one runs both; only prose and comments are translated."""
    en = (REPO / "docs/guide.md").read_text(encoding="utf-8")
    zh = (REPO / "docs/guide.zh-CN.md").read_text(encoding="utf-8")

    def numbers(text: str) -> list[str]:
        return re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", text, flags=re.MULTILINE)

    assert numbers(en) == numbers(zh)
    blocks_en = [(lang, _code(src, lang)) for _, lang, src in fences(en)]
    blocks_zh = [(lang, _code(src, lang)) for _, lang, src in fences(zh)]
    assert blocks_en == blocks_zh
    assert [is_excerpt(src) for _, _, src in fences(en)] == [
        is_excerpt(src) for _, _, src in fences(zh)
    ]


def test_glossary_lists_each_term_once_and_the_chinese_guide_keeps_to_it() -> None:
    text = (REPO / "docs/glossary.md").read_text(encoding="utf-8")
    rows = [r.split("|")[1:-1] for r in text.splitlines() if r.startswith("| ") and "---" not in r]
    rows = [[c.strip() for c in r] for r in rows[1:]]
    english = [r[0] for r in rows]
    chinese = [r[1] for r in rows]
    assert len(set(english)) == len(english) and len(set(chinese)) == len(chinese)
    zh = (REPO / "docs/guide.zh-CN.md").read_text(encoding="utf-8")
    for row in rows:
        for avoided in filter(None, (w.strip() for w in row[3].split(","))):
            # "嵌入投影文件" (projector files) is the term plus a word, not "投影文件".
            found = re.search(rf"(?<!{re.escape(row[1][:2])}){re.escape(avoided)}", zh)
            assert not found, f"guide.zh-CN.md uses {avoided!r}; the glossary says {row[1]!r}"
    for guide in ("docs/guide.md", "docs/guide.zh-CN.md"):
        assert "(glossary.md)" in (REPO / guide).read_text(encoding="utf-8")
