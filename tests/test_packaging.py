"""The built wheel carries templates, specs, tuned tables and generated modules."""
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree")
def test_wheel_installs_and_finds_its_data(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(ROOT)], check=True)
    wheel = next(wheels.glob("nsagen-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                    str(wheel)], check=True)
    script = (
        "import nsagen, pathlib\n"
        "from nsagen.resources import data_dir, shipped_specs\n"
        "assert 'site-packages' in nsagen.__file__, nsagen.__file__\n"
        "spec = nsagen.load_spec('nsa-paper')\n"
        "assert spec.dim_qk == 192\n"
        "assert sorted(shipped_specs()) == sorted(p.stem for p in data_dir('specs').glob('*.yaml'))\n"
        "from nsagen.codegen import render\n"
        "render(spec)\n"
        "assert (data_dir('generated') / 'nsa_paper.py').is_file()\n"
        "print('ok', data_dir('templates'))\n")
    out = subprocess.run([str(py), "-c", script], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert out.stdout.startswith("ok") and "site-packages" in out.stdout
