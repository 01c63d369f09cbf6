"""The README and the pages under docs/ link to files that exist, and the README
links every docs page."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
# [text](target) and ![alt](target "title"); the text may hold `code` and brackets.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())  # code blocks hold commands, not links
    return LINK.findall(text)


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("#")


def test_the_docs_pages_exist():
    names = {p.name for p in PAGES}
    assert {"api.md", "configurations.md", "network.md", "security.md", "device.md",
            "benchmarks.md"} <= names


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    links = [t for t in _links(page) if _relative(t)]
    assert links, f"{page.name} links nothing"
    missing = []
    for target in links:
        path = unquote(target.split("#", 1)[0])
        if not (page.parent / path).resolve().exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / unquote(t.split("#", 1)[0])).resolve()
              for t in _links(README) if _relative(t)}
    unlinked = [p.relative_to(ROOT).as_posix() for p in PAGES if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_the_readme_keeps_the_list_of_differences_from_keras_fit():
    text = README.read_text()
    section = text.split("## Differences from `keras.Model.fit`", 1)[1].split("\n## ", 1)[0]
    for item in ["**Extra**", "**Shuffling**", "**`class_weight`**", "**Generators**",
                 "**Infinite input**", "**`tf.distribute` strategies are refused**",
                 "**Not provided**"]:
        assert item in section


def test_the_link_pattern_reads_what_the_pages_use():
    sample = ('[`notebooks/`](../notebooks/) and ![a [b] c](figures/x.png "t") and '
              "[BENCHMARKS.md](../BENCHMARKS.md#a-b) and [web](https://example.org)")
    assert LINK.findall(sample) == ["../notebooks/", "figures/x.png", "../BENCHMARKS.md#a-b",
                                    "https://example.org"]
