"""The package installs from a wheel: the build hook (setup.py) generates the gRPC stubs into
it, and the installed console script runs (`asyncopd --version`, `asyncopd serve cache --help`)
from a fresh virtual environment that sees nothing of this checkout.

The wheel is built from a copy of the sources *without* the generated stubs, so only the hook
can have put them there. The fresh venv gets the wheel with --no-deps and the dev venv's
site-packages as a plain path entry (no .pth processing, so the dev venv's editable asyncopd is
invisible): nothing is downloaded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _run(
    args: list[str | Path], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], check=False, capture_output=True, text=True, timeout=240, env=env, cwd=cwd
    )
    assert result.returncode == 0, f"{args}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


def test_wheel_carries_the_stubs_and_installs_into_a_clean_venv(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "protos", src / "protos")
    shutil.copytree(
        ROOT / "services",
        src / "services",
        ignore=shutil.ignore_patterns("__pycache__", "*_pb2*.py", "*_pb2*.pyi", ".generated", "*.egg-info"),
    )
    assert not list((src / "services" / "asyncopd" / "v1").glob("*_pb2*")), "the copy must lack the stubs"

    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src])
    (wheel,) = dist.glob("asyncopd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("cache_pb2.py", "cache_pb2_grpc.py", "cache_pb2.pyi", "common_pb2.py", "learner_pb2_grpc.py"):
        assert f"asyncopd/v1/{stub}" in names, f"{stub} missing from the wheel"
    assert "asyncopd/py.typed" in names
    assert not any(n.startswith(("tests/", "asyncopd/lab/__pycache__")) for n in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    clean_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONNOUSERSITE": "1"}
    version = _run([venv / "bin" / "asyncopd", "--version"], env=clean_env, cwd=tmp_path).stdout
    assert version.strip() == "asyncopd 0.1.0"
    help_text = _run([venv / "bin" / "asyncopd", "serve", "cache", "--help"], env=clean_env, cwd=tmp_path).stdout
    assert "--config" in help_text and "cache" in help_text
    where = _run(
        [python, "-c", "import asyncopd.cache.main, asyncopd.v1.cache_pb2_grpc as g; print(g.__file__)"],
        env=clean_env,
        cwd=tmp_path,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), f"stubs imported from {where}, not from the installed wheel"
