"""The documentation stays true to the code: every environment variable the code reads is in the README's one
table or the docs, and every relative link in the README and docs/ leads to a file and heading that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docker" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Read by the code but set by launchers and libraries, not by a user: documented where they matter, or not at all.
NOT_USER_SETTINGS = {"WORLD_SIZE", "ACCELERATE_USE_CPU", "PCM_16", "SC_PAGE_SIZE"}


def variables_read() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tiny_audio").rglob("*.py"):
        code = re.sub(r"__all__ = \[.*?\]", "", path.read_text(), flags=re.DOTALL)  # exported names, not variables
        names |= set(re.findall(r'"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)"', code))
    names |= set(re.findall(r"\$\{?([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)", (ROOT / "docker" / "start.sh").read_text()))
    return names - NOT_USER_SETTINGS - {"APP_DIR", "BASH_SOURCE"}  # start.sh's own locals


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    docs = "".join(page.read_text() for page in PAGES)
    table = readme[readme.index("## Environment variables") :]
    table = table[: table.index("\n## ")]
    names = variables_read()
    assert {"HF_TOKEN", "ON_FINISH", "MAX_COST_USD", "NUM_MACHINES"} <= names  # the scan finds them
    missing = sorted(name for name in names if name not in docs)
    assert not missing, f"read by the code but documented nowhere: {missing}"
    user_facing = {n for n in names if not n.startswith(("TINY_AUDIO_", "PRIMARY_", "NODE_", "NUM_NODES"))}
    user_facing -= {"PYTHON", "START_DRY_RUN", "RUNPOD_API_URL", "WANDB_DIR", "ENTRYPOINT"}
    not_in_table = sorted(name for name in user_facing if name not in table)
    assert not not_in_table, f"missing from the README's table: {not_in_table}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to {target} leads nowhere"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: link to {target}: no such heading"
