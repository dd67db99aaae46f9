"""The project as a user installs it: a wheel (not the editable checkout) in a fresh virtual environment."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from conftest import REPO


def test_the_wheel_ships_its_package_data_and_decides_in_a_fresh_venv(tmp_path):
    source = tmp_path / "src"  # built from a copy: the build leaves build/ and egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("visionroute", "flows", "backends"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("visionroute-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "visionroute/decision/prices.yaml" in names and "visionroute/flows/route.py" in names

    # A fresh venv with the wheel, its dependencies taken from this interpreter's site-packages (no download).
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    where = subprocess.run(
        [str(python), "-c", "import visionroute.decision.costs as c; print(c.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not the checkout

    done = subprocess.run(
        [
            str(env_dir / "bin" / "visionroute"),
            "decide",
            str(REPO / "examples" / "tasks" / "invoice-ocr.yaml"),
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert decision["route"] == "vision_api" and decision["costs"]["vision_api"]
