"""Import direction: the `edgequant` core never imports the TVM half (`export`, `tvm_schedules`); only `cli.py` knows
both. And every module of the package imports from a plain checkout."""
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _core_modules() -> list[str]:
    import edgequant
    names = [m.name for m in pkgutil.walk_packages(edgequant.__path__, "edgequant.")]
    return sorted(n for n in names if not n.startswith(("edgequant.export", "edgequant.tvm_schedules"))
                  and n != "edgequant.cli")


def test_core_never_imports_the_tvm_half():
    mods = _core_modules()
    assert "edgequant.checkpoint" in mods and "edgequant.calibrate.omniquant.trainer" in mods
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('edgequant.export', 'edgequant.tvm_schedules', "
            "'tvm')))\n"
            "print(bad)\nassert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_module_imports_from_a_plain_checkout(tmp_path):
    """Not through the editable install: a copy of the folders on sys.path, mapped as pyproject.toml maps them."""
    import shutil
    pkg = tmp_path / "edgequant"
    shutil.copytree(ROOT / "edgequant", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "export", pkg / "export", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tvm_schedules", pkg / "tvm_schedules", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import importlib, pkgutil, sys\n"
            "import edgequant\n"
            f"assert edgequant.__file__.startswith({str(tmp_path)!r}), edgequant.__file__\n"
            "names = [m.name for m in pkgutil.walk_packages(edgequant.__path__, 'edgequant.')]\n"
            "for n in names: importlib.import_module(n)\n"
            f"outside = [n for n in names if not sys.modules[n].__file__.startswith({str(tmp_path)!r})]\n"
            "assert not outside, outside\n"
            "print(len(names))\n")
    r = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + code],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert int(r.stdout.split()[-1]) >= 40
