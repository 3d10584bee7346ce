"""The docs stay true to the code: every config key is in docs/configuration.md under its
section, the README stays a short page, and every page it links to exists."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from pydantic import BaseModel

from pipeline.core import RunConfig, SandboxSettings

ROOT = Path(__file__).resolve().parents[1]


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    found = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found += _keys(kind, f"{prefix}{name}.")
        else:
            found.append(f"{prefix}{name}")
    return found


def _sections(text: str) -> dict[str, str]:
    """Each `## name` (or `## name, other`) section's text, by every name its heading gives."""
    found: dict[str, str] = {}
    heads = list(re.finditer(r"^## (.+)$", text, flags=re.MULTILINE))
    for at, head in enumerate(heads):
        end = heads[at + 1].start() if at + 1 < len(heads) else len(text)
        for name in re.findall(r"[a-z_]+", head.group(1).split("(")[0]):
            found[name] = text[head.end() : end]
    return found


def test_every_config_key_is_documented_under_its_section() -> None:
    """A key is in its section's table; the sandbox's other settings are documented where
    they are declared (their help, which `wanbatch sandbox --help` shows), and the section
    says so."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    sections = _sections(text)
    doubles = {f.name for f in dataclasses.fields(SandboxSettings)}
    missing = []
    for key in _keys(RunConfig):
        section, _, name = key.rpartition(".")
        where = sections.get(section.split(".")[0], "") if section else text
        if section == "sandbox" and name in doubles and "Any other setting of the double" in where:
            continue
        if f"`{name}`" not in where and f"`{key}`" not in where:
            missing.append(key)
    assert missing == []


def test_the_readme_is_short_and_its_links_lead_somewhere() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 15_000
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert links and all((ROOT / link).is_file() for link in links)


def test_no_link_of_the_docs_leaves_the_repository() -> None:
    pages = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *(ROOT / "docs").glob("*.md")]
    wrong = []
    for page in pages:
        for link in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if link.startswith(("https://", "http://")):
                continue
            target = (page.parent / link).resolve()
            if not target.is_relative_to(ROOT) or not target.exists():
                wrong.append(f"{page.name}: {link}")
    assert wrong == []


def test_what_the_docs_import_from_the_package_is_there() -> None:
    """Every `from pipeline... import X` the docs show names something the package has; the
    root gives what a caller catches (the errors, one per exit code) and RunSummary."""
    import importlib

    import pipeline

    pages = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *(ROOT / "docs").glob("*.md")]
    shown = [
        (match.group(1), name.strip())
        for page in pages
        for match in re.finditer(r"from (pipeline[\w.]*) import ([\w, ]+)", page.read_text())
        for name in match.group(2).split(",")
    ]
    assert shown
    for module, name in shown:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None
    assert pipeline.RowsFailed.exit_code == pipeline.ExitCode.ROWS_FAILED


def test_the_architecture_page_names_what_the_code_has() -> None:
    """Every module (`creates.py`, `core/plan.py`) and every class (`Creator`, `Plan`) the
    architecture page names in code quotes is in the package: a part moved or renamed makes
    the page wrong here first."""
    import ast

    page = (ROOT / "ARCHITECTURE.md").read_text()
    package = ROOT / "pipeline"
    files = [
        p.relative_to(ROOT).as_posix()
        for folder in ("pipeline", "tests", "scripts")
        for p in (ROOT / folder).rglob("*.py")
    ]
    classes = {
        node.name
        for path in package.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    }
    modules = set(re.findall(r"`((?:\w+/)*\w+\.py)`", page))
    named = set(re.findall(r"`([A-Z][a-z]+[A-Za-z]*)`", page))
    assert modules and named
    missing = [m for m in modules if not any(f == m or f.endswith(f"/{m}") for f in files)]
    missing += [c for c in named if c not in classes]
    assert missing == []
