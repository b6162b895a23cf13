"""tools/gpu: the wheels carried to a bare GPU machine cover everything the trainer and the benchmark import."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
# On the lent GPU machines already (their image's package list), so not carried.
ON_THE_MACHINE = {
    *("torch", "numpy", "pyarrow", "pandas", "httpx", "tqdm", "xxhash", "requests", "packaging", "psutil"),
    *("anyio", "h11", "idna", "certifi", "sniffio", "urllib3", "charset-normalizer", "jinja2", "markupsafe"),
    *("typer", "rich", "shellingham", "annotated-doc", "markdown-it-py", "mdurl", "pygments"),
}
# Imported only where the rehearsal does not go: W&B tracking (it runs with tracking.mode=disabled), ZeRO-3 and
# `tiny-audio plot`.
NOT_REACHED = {"wandb", "deepspeed", "matplotlib"}


def imported_distributions(*folders: Path) -> set[str]:
    """The distributions (normalised names) of every third-party module the files under `folders` import."""
    owners = packages_distributions()
    found: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("tiny_audio", "tools", "__future__"):
                        continue
                    found.update(d.lower().replace("_", "-") for d in owners.get(top, [top]))
    return found


def with_requirements(names: set[str]) -> set[str]:
    """`names` and, recursively, what each needs (its unconditional requirements for this Python), stopping at what
    the machine has."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen or name in ON_THE_MACHINE or name in NOT_REACHED:
            continue
        seen.add(name)
        try:
            lines = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in lines:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name.lower().replace("_", "-"))
    return seen


def test_the_carried_wheels_cover_what_the_rehearsal_imports() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu" / "wheels.sh"), "--pins"], capture_output=True, text=True, check=True
    )
    pins = dict(line.split("==") for line in done.stdout.split())
    constraints = (ROOT / "docker" / "constraints.txt").read_text().split()
    assert all(f"{name}=={version}" in constraints for name, version in pins.items())  # the image's versions
    needed = with_requirements(imported_distributions(ROOT / "tiny_audio", ROOT / "tools" / "bench"))
    missing = needed - {n.lower() for n in pins} - ON_THE_MACHINE - NOT_REACHED
    assert not missing, f"add to tools/gpu/wheels.sh: {sorted(missing)}"
    assert {"transformers", "datasets", "soundfile", "jiwer"} <= set(pins)
