"""docs/ARCHITECTURE.md names every module of the package, and no module that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "deltatune"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
SECTIONS = {
    "methods": "`methods/`",
    "train": "`train/`",
    "vision": "`vision/`",
    "tasks": "`tasks/`",
    "cli": "`cli/`",
    "utils": "`utils/`",
}


def _modules_section(text: str) -> str:
    return text.split("## Modules", 1)[1].split("\n## ", 1)[0]


def _named_by_package(text: str) -> dict[str, set[str]]:
    """File names in backticks per package paragraph of the Modules section ("" = the top level)."""
    named: dict[str, set[str]] = {}
    current = ""
    for block in _modules_section(text).split("\n\n"):
        for package, marker in SECTIONS.items():
            if block.lstrip().startswith(marker):
                current = package
                break
        else:
            current = "" if block.lstrip().startswith(("Top level", "|")) else current
        named.setdefault(current, set()).update(re.findall(r"`([\w]+\.py)`", block))
    return named


def test_every_module_is_named_and_every_named_module_exists() -> None:
    named = _named_by_package(DOC.read_text(encoding="utf-8"))
    for package in ["", *SECTIONS]:
        folder = PACKAGE / package if package else PACKAGE
        actual = {p.name for p in folder.glob("*.py")}
        listed = named.get(package, set())
        where = package or "the top level"
        assert actual - listed == set(), f"modules of {where} missing from docs/ARCHITECTURE.md"
        assert listed - actual == set(), f"docs/ARCHITECTURE.md names modules {where} does not have"
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(SECTIONS), "a package without its paragraph in docs/ARCHITECTURE.md"


def test_the_check_fails_for_a_module_the_doc_does_not_name(tmp_path: Path) -> None:
    text = DOC.read_text(encoding="utf-8").replace("`_regex.py` ", "")
    assert "_regex.py" not in _named_by_package(text)[""]


def test_no_source_file_over_450_lines() -> None:
    """The house limit (issue 18): a module a reader can hold in their head."""
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450
    }
    assert long == {}, long
