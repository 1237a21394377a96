"""The nsagen command line: exit codes, messages on stderr, and the figures `info` prints."""
import os
from pathlib import Path

import pytest
import torch

from nsagen.cli import build_parser, main
from nsagen.resources import shipped_specs

ROOT = Path(__file__).resolve().parent.parent
GOOD = """\
name: tiny
heads: {q: 4, kv: 2}
head_dim: {qk: 16, v: 16}
compression: {block: 16, stride: 8, kind: mean}
selection: {block: 16, count: 2, initial: 1, local: 1}
window: 32
"""


def test_validate_shipped_specs(capsys):
    specs = shipped_specs()
    assert main(["validate", *map(str, specs.values())]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == len(specs) and all(line.startswith("ok ") for line in lines)
    assert out.err == ""


def test_validate_by_name(capsys):
    assert main(["validate", "nsa-paper"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok nsa-paper nsa_bf16_qk192_v128_h4g16")


def test_validate_reports_every_bad_spec(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD + "windw: 64\n")
    missing = tmp_path / "missing.yaml"
    code = main(["validate", str(bad), str(good), str(missing)])
    assert code == 2
    out = capsys.readouterr()
    assert f"ok {good} " in out.out and str(bad) not in out.out
    assert "windw" in out.err and "unknown key" in out.err
    assert "missing.yaml" in out.err
    assert "Traceback" not in out.err


def test_info_paper_decode_figure(capsys):
    assert main(["info", str(ROOT / "specs" / "nsa-paper.yaml"), "--seq-len", "65536"]) == 0
    out = capsys.readouterr().out
    assert "decode step at T=65536: reads 5631 tokens per KV head of 65536 (11.6x fewer)" in out
    assert "G = 16" in out and "uri = nsa_bf16_qk192_v128_h4g16" in out
    assert "Nc(T) = " in out and "fwd_flops(T, B) = " in out
    assert "at T=8192" not in out


def test_info_defaults_and_batch(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(GOOD)
    assert main(["info", str(spec), "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "at T=8192, B=2:" in out and "at T=65536, B=2:" in out
    assert main(["info", str(spec), "--seq-len", "1", "33", "--seq-len", "7"]) == 0
    out = capsys.readouterr().out
    assert all(f"at T={n}, B=1:" in out for n in (1, 33, 7))


def test_info_bad_spec_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("stride: 8", "stride: 5"))
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "compression.stride" in err and "Traceback" not in err
    assert main(["info", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["info", "nsa-paper", "--seq-len", "0"], ["info"], [],
                                  ["frobnicate"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["validate", "--help"], ["info", "--help"]])
def test_help_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: nsagen" in capsys.readouterr().out


def test_every_subcommand_dispatches_to_a_cmd_function():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.get_default("func").__name__ == f"_cmd_{name}"


def test_generate_explain_builds_module(tmp_path, monkeypatch, capsys):
    import nsagen.ops

    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(nsagen.ops, "_BUILT", {})   # ops built earlier in this process
    import yaml

    layer = nsagen.load_spec("nsa-fla").replace(name="fla-n8", slc_count=8)   # not shipped
    path = tmp_path / "fla-n8.yaml"
    path.write_text(yaml.safe_dump(layer.to_dict()))
    assert main(["generate", str(path), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "graph after the passes" in out and "importance: l = d = l'" in out
    assert str(tmp_path) in out and list((tmp_path / "modules").glob("nsa_*.py"))
    assert main(["generate", "nsa-fla"]) == 0               # shipped: loaded from generated/
    assert "generated/nsa_fla.py" in capsys.readouterr().out


def test_generate_needs_a_spec(capsys):
    assert main(["generate"]) == 2
    assert "give a SPEC or --shipped" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_without_gpu_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "nsa-d128"])
    assert exc.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("spec, rc", [("nsa-g4", 0), ("no-such-spec", 2)])
def test_command_after_compile_threads_exits_with_mains_status(spec, rc):
    """`nsagen` (cli.run) ends a process that ran compile threads without native teardown,
    but only after its output is flushed, and with main's exit status."""
    import subprocess
    import sys

    code = ("import sys\nfrom nsagen import cli\nfrom nsagen.tune.compile import Compiler\nCompiler(2).close()\n"
            f"sys.argv = ['nsagen', 'validate', {spec!r}]\ncli.run()\n"
            "print('not reached')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == rc, p.stderr
    assert "not reached" not in p.stdout
    assert ("ok nsa-g4" in p.stdout) if rc == 0 else ("no-such-spec" in p.stderr)


# ------------------------------------------------------------------------- hostile inputs
HOSTILE = {
    "latin-1.yaml": b"name: caf\xe9\nheads: {q: 4, kv: 2}\nhead_dim: 8\n",
    "utf-16.yaml": GOOD.encode("utf-16"),
    "list-key.yaml": GOOD + "[a, b]: 1\n",
    "deep.yaml": "name: x\nbranches: " + "[" * 5000 + "]" * 5000 + "\n",
    "bomb.yaml": "\n".join(['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
                           + [f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]"
                              for p, c in zip("abcdefghijk", "bcdefghijkl")]) + "\n",
    "big.yaml": GOOD + "#" * 70000 + "\n",
    "long-value.yaml": GOOD.replace("name: tiny", "name: " + "x" * 10000),
    "pow2.yaml": GOOD.replace("selection: {block: 16,", "selection: {block: 24,"),
}


def write_hostile(tmp_path):
    paths = []
    for name, data in HOSTILE.items():
        p = tmp_path / name
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
        paths.append(p)
    d = tmp_path / "a-directory.yaml"
    d.mkdir()
    return paths + [d]


def one_line_errors(err: str) -> list[str]:
    lines = err.splitlines()
    assert "Traceback" not in err
    assert all(line.startswith("nsagen: error: ") and len(line) < 400 for line in lines), err
    return lines


def test_validate_reports_every_file_whatever_the_failure(tmp_path, capsys):
    bad = write_hostile(tmp_path)
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    code = main(["validate", *map(str, bad), str(good), str(tmp_path / "missing.yaml")])
    assert code == 2
    out = capsys.readouterr()
    lines = one_line_errors(out.err)
    assert len(lines) == len(bad) + 1
    for p in bad:
        assert sum(p.name in line for line in lines) == 1, (p.name, lines)
    assert "missing.yaml" in lines[-1]
    assert out.out.splitlines() == [f"ok {good} nsa_bf16_qk16_v16_h2g2_c16s8mean_b16n2i1l1_w32"]


@pytest.mark.parametrize("name", [*HOSTILE, "a-directory.yaml"])
def test_info_on_a_hostile_file_is_one_line(tmp_path, capsys, name):
    write_hostile(tmp_path)
    code = main(["info", str(tmp_path / name)])
    if name == "pow2.yaml":          # the cost model holds for any valid layer
        assert code == 0
        return
    assert code == 2
    assert len(one_line_errors(capsys.readouterr().err)) == 1


def test_generate_refuses_a_spec_the_kernels_cannot_run(tmp_path, capsys):
    write_hostile(tmp_path)
    assert main(["generate", str(tmp_path / "pow2.yaml")]) == 2
    err = capsys.readouterr().err
    assert "selection.block: 24: must be a power of two" in err
    assert len(one_line_errors(err)) == 1


def test_long_arguments_are_not_echoed(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", "nsa-paper", "--seq-len", "x" * 10000])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err) < 1000
    assert main(["info", "/nonexistent/" + "y" * 10000]) == 2
    assert len(one_line_errors(capsys.readouterr().err)) == 1


# ---------------------------------------------------------------------------- the cache
def _unusable_cache(tmp_path, monkeypatch):
    """NSAGEN_CACHE_DIR below a regular file: nothing can be created there, even by root."""
    import nsagen.ops

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(nsagen.ops, "_BUILT", {})   # ops built earlier in this process
    return blocker


def test_an_unwritable_cache_is_one_line(tmp_path, monkeypatch, capsys):
    blocker = _unusable_cache(tmp_path, monkeypatch)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(GOOD)
    assert main(["generate", str(spec)]) == 2
    (line,) = one_line_errors(capsys.readouterr().err)
    assert "cannot write " in line and "not-a-dir/cache" in line and "NSAGEN_CACHE_DIR" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_cache_is_one_line(tmp_path, monkeypatch, capsys):
    import nsagen.ops

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(ro))
    monkeypatch.setattr(nsagen.ops, "_BUILT", {})
    spec = tmp_path / "tiny.yaml"
    spec.write_text(GOOD)
    try:
        assert main(["generate", str(spec)]) == 2
    finally:
        ro.chmod(0o700)
    (line,) = one_line_errors(capsys.readouterr().err)
    assert str(ro) in line and "NSAGEN_CACHE_DIR" in line


def test_info_does_not_write_the_cache(tmp_path, monkeypatch, capsys):
    blocker = _unusable_cache(tmp_path, monkeypatch)
    assert main(["info", "nsa-g4", "--seq-len", "4096"]) == 0
    assert f"cached at {blocker / 'cache' / 'modules'}" in capsys.readouterr().out


# ------------------------------------------------------------------------------ build --arch
def test_arch_under_the_interpreter_is_refused_first(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["build", "no-such-spec", "--arch", "90"]) == 2
    (line,) = one_line_errors(capsys.readouterr().err)
    assert "--arch needs TRITON_INTERPRET unset" in line


@pytest.mark.parametrize("arch", ["7", "70", "91", "1000"])
def test_arch_must_be_one_triton_compiles_for(monkeypatch, capsys, arch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["build", "nsa-g4", "--arch", arch]) == 2
    (line,) = one_line_errors(capsys.readouterr().err)
    assert f"--arch {arch}: " in line
    assert "75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121" in line


# ------------------------------------------------------------------------------ GPU commands
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
@pytest.mark.parametrize("argv,command", [(["tune", "nsa-g4"], "nsagen tune"),
                                          (["bench", "nsa-g4"], "nsagen bench"),
                                          (["bench", "nsa-g4", "--decode"], "nsagen bench")])
def test_gpu_commands_name_themselves_without_a_gpu(capsys, argv, command):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"{command}: needs a CUDA GPU (none found)\n"


def test_dsa_specs_validate_and_generate_bench_refuses_them_by_name(capsys):
    assert main(["validate", "dsa-v32", "dsa-gqa"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == 2 and "decode kernels" in out
    assert main(["generate", "dsa-gqa", "--bench"]) == 2
    err = capsys.readouterr().err
    assert "dsa-gqa is a DSA spec" in err and "nsagen bench SPEC" in err
