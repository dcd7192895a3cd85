"""The installed package, not the checkout: a wheel built from the project holds miss_compile.export
and no top-level `export` package, imports from a plain (non-editable) install, and names the
console script. Built offline (no build isolation) from a copy of the project's files, so the
checkout gets no build/ or egg-info folders from it."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.onnx*")
    for folder in ("miss_compile", "export"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(source)], check=True, cwd=tmp, timeout=600)
    wheels = list((tmp / "dist").glob("miss_compile-*.whl"))
    assert len(wheels) == 1, wheels
    return tmp, wheels[0]


def test_wheel_holds_miss_compile_export_and_no_top_level_export(wheel):
    _, path = wheel
    names = zipfile.ZipFile(path).namelist()
    assert "miss_compile/export/__init__.py" in names
    assert "miss_compile/export/cli.py" in names and "miss_compile/export/inspection.py" in names
    assert "miss_compile/quiet.py" in names
    assert not [name for name in names if name.startswith("export/")]
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"miss_compile"}
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(path).read(entry_points).decode()
    assert "miss-export = miss_compile.export.cli:main" in text


def test_installed_wheel_imports_miss_compile_export_and_not_export(wheel):
    tmp, path = wheel
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(path)], check=True, cwd=tmp, timeout=600)
    assert (site / "miss_compile" / "export" / "__init__.py").is_file() and not (site / "export").exists()
    neutral = tmp / "neutral"
    neutral.mkdir()
    script = ("import importlib.util, miss_compile.export, miss_compile.export.cli\n"
              "print(miss_compile.export.__file__)\n"
              "print(importlib.util.find_spec('export'))\n")
    # -I would drop the venv's site-packages (torch, onnx); -P keeps the cwd and script dir off the path
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, cwd=neutral,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    module_file, export_spec = done.stdout.split("\n")[:2]
    assert Path(module_file).resolve().is_relative_to(site.resolve()), module_file
    assert export_spec == "None"  # no top-level `export` package anywhere on the path
