"""The repository stands alone: no tracked file points outside it, and every method citation resolves.

A user who clones the repository has nothing but its files, so a reference to a sibling checkout, an
absolute path on a developer's machine or a document that is not shipped is a dead end. Method details
are cited as `docs/method.md §N`; each cited section must exist there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHOD = ROOT / "docs" / "method.md"

# Built from pieces so that this file does not contain (and flag) the strings it looks for.
_OUTSIDE = [
    (re.escape(".." + "/shared"), "a path into a sibling checkout"),
    (r"(?<![\w.])" + re.escape("/" + "work/"), "an absolute path on the development machine"),
    (re.escape("SPEC" + ".md") + "|" + r"\bSPEC" + r"\s*§", "the unshipped method spec (cite docs/method.md §N)"),
    (re.escape("igd" + "-paper"), "the unshipped paper draft (cite docs/method.md §8)"),
    (r"(?<![\w.])/" + r"(?:home|Users)/[A-Za-z0-9_.-]+/", "a home-directory path"),
    (r"(?<![\w.])/" + r"root/", "the root user's home directory"),
]
OUTSIDE = [(re.compile(pattern), why) for pattern, why in _OUTSIDE]

HEADING = re.compile(r"^#{1,6}\s+§(\d+(?:\.\d+)*)\b", re.MULTILINE)
# `docs/method.md §2.2, §9` or `docs/method.md §6.4 and §6.6`, possibly broken across lines (comments).
CITATION = re.compile(r"docs/method\.md[\s#*\"']*(§\d+(?:\.\d+)*(?:\s*(?:,|and|or)\s*§\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files name no paths we could follow


def outside_references(text: str) -> list[tuple[int, str, str]]:
    """(line, matched text, why) for every reference to something outside the repository."""
    found = []
    for pattern, why in OUTSIDE:
        for match in pattern.finditer(text):
            found.append((text.count("\n", 0, match.start()) + 1, match.group(0), why))
    return found


def cited_sections(text: str) -> list[tuple[int, str]]:
    """(line, section number) of every `docs/method.md §N` citation, lists of sections included."""
    out = []
    for match in CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        out += [(line, number) for number in SECTION.findall(match.group(1))]
    return out


def method_sections() -> set[str]:
    return set(HEADING.findall(METHOD.read_text(encoding="utf-8")))


def test_no_tracked_file_points_outside_the_repository():
    problems = []
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for line, matched, why in outside_references(text):
            problems.append(f"{path.relative_to(ROOT)}:{line}: {matched!r} is {why}")
    assert not problems, "\n".join(problems)


def test_every_method_citation_names_an_existing_section():
    assert (ROOT / "docs" / "method.md") in tracked_files(), "docs/method.md is not tracked"
    sections = method_sections()
    assert {str(n) for n in range(1, 10)} <= sections, f"docs/method.md lacks top-level sections: {sorted(sections)}"
    problems, citations = [], 0
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for line, number in cited_sections(text):
            citations += 1
            if number not in sections:
                problems.append(f"{path.relative_to(ROOT)}:{line}: cites docs/method.md §{number}, which does not exist")
    assert citations > 10  # the source cites the method throughout; zero would mean the pattern broke
    assert not problems, "\n".join(problems)


def test_method_cross_references_resolve():
    """Inside docs/method.md a bare `§N.M` refers to its own sections."""
    text = METHOD.read_text(encoding="utf-8")
    sections = method_sections()
    # the paper's own section numbers ("the paper's §4.2.1") are not ours
    own = [m for m in SECTION.finditer(text) if not text[max(0, m.start() - 20):m.start()].rstrip().endswith("paper's")]
    missing = sorted({m.group(1) for m in own} - sections)
    assert not missing, f"docs/method.md refers to missing sections {missing}"


def test_the_patterns_catch_what_they_should_and_spare_legit_text():
    bad = [
        "see " + ".." + "/shared/notes", "/" + "work/main/src", "SPEC" + ".md", "SPEC" + " §4", "igd" + "-paper.txt",
        "/" + "home/alice/data", "/" + "Users/bob/x", "/" + "root/.cache",
    ]
    for text in bad:
        assert outside_references(text), text
    fine = [
        "from ..sources import tables", "~/.cache/igdrec", "runs/demo/work/x", "homework/", "see docs/method.md §4",
        "the specification", "../docs/method.md", "a user's home directory",
    ]
    for text in fine:
        assert not outside_references(text), text
    assert cited_sections("docs/method.md §2.2, §9 and\n# docs/method.md\n# §6.4 and §6.6") == [
        (1, "2.2"), (1, "9"), (2, "6.4"), (2, "6.6")
    ]
