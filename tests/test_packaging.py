"""The wheel holds what runs, and only that: the package, its shipped miniatures and the experiment configs; no
build scripts, benchmarks or tests. Installed from the wheel alone, the experiments load."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel .` builds from a clean copy of the tracked files (no build/ or egg-info left over)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", out]
    subprocess.run(command, check=True, capture_output=True, timeout=300, cwd=source)
    return next(out.glob("tiny_audio-*.whl"))


def test_the_wheel_ships_the_configs_and_assets_but_no_build_scripts(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "tiny_audio/configs/experiments/mlp.yaml" in names
    assert "tiny_audio/configs/deepspeed/zero2.json" in names
    assert any(n.startswith("tiny_audio/assets/mini/decoder/") for n in names)
    assert not [n for n in names if n.startswith(("tools/", "tests/", "tiny_audio/bench/"))]
    assert not [n for n in names if "miniatures" in n or n.endswith(("build.py", "pretrain_encoder.py"))]


def test_an_installed_wheel_finds_its_experiments_and_shipped_data(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = (
        "from tiny_audio.config import CONFIG_DIR\n"
        "from tiny_audio.experiments import available_experiments, load_config\n"
        "from tiny_audio.assets import resolve_asset\n"
        "import glob\n"
        "print(CONFIG_DIR)\n"
        "print(' '.join(available_experiments()))\n"
        "pattern = load_config('mini').data.train[0].data_files[0]\n"
        "print(pattern, len(glob.glob(resolve_asset(pattern))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    config_dir, experiments, data = done.stdout.splitlines()
    assert Path(config_dir) == tmp_path / "site" / "tiny_audio" / "configs"
    assert {"mlp", "mosa", "moe", "mini", "tiny"} <= set(experiments.split())
    assert data == "asset://mini/data/train-*.parquet 4"
