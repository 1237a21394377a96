"""The built wheel carries templates, specs, tuned tables and generated modules.

The wheel is installed into a folder of its own (`pip install --target`) and imported from
there by this same interpreter, so the test sees the dependencies of whatever environment runs
it (a virtual environment, a conda environment or a bare interpreter) and never the source tree.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree")
def test_wheel_installs_and_finds_its_data(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(ROOT)], check=True)
    wheel = next(wheels.glob("nsagen-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
                    "--target", str(site), str(wheel)], check=True)
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "nsagen").rglob("*.py"))
    script = (
        "import sys, nsagen, pathlib, importlib\n"
        f"for rel in {modules!r}:\n"
        f"    assert (pathlib.Path({str(site)!r}) / rel).is_file(), 'missing from the wheel: ' + rel\n"
        "    name = rel[:-3].replace('/', '.').removesuffix('.__init__')\n"
        f"    assert importlib.import_module(name).__file__.startswith({str(site)!r}), name\n"
        "from nsagen.resources import data_dir, shipped_specs\n"
        f"assert pathlib.Path(nsagen.__file__).is_relative_to({str(site)!r}), nsagen.__file__\n"
        "spec = nsagen.load_spec('nsa-paper')\n"
        "assert spec.dim_qk == 192\n"
        "assert sorted(shipped_specs()) == sorted(p.stem for p in data_dir('specs').glob('*.yaml'))\n"
        "from nsagen.codegen import render\n"
        "src = render(spec)\n"
        "assert (data_dir('generated') / 'nsa_paper.py').read_text() == src\n"
        "assert list(data_dir('autotune').glob('*/*.json'))\n"
        "print('ok', data_dir('templates'))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok " + str(site))
