"""Cache hygiene: per-URI locks that die with their process, concurrent builds, list and clear."""
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

import nsagen
from nsagen import cache, codegen
from nsagen.cli import main


def _build_in_child(cache_dir, q):
    os.environ["NSAGEN_CACHE_DIR"] = cache_dir
    import nsagen as n

    spec = n.load_spec("nsa-g4").replace(name="concurrent", window=320)
    op = n.build(spec)
    q.put(str(op.path))


def test_two_processes_build_the_same_spec(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    paths = {q.get(timeout=5), q.get(timeout=5)}
    assert len(paths) == 1
    files = sorted(p.name for p in (tmp_path / "modules").iterdir())
    assert files == [os.path.basename(paths.pop())]  # one module, no temp files


def test_lock_of_a_killed_process_does_not_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    code = ("import os, time, nsagen.cache as c\n"
            f"os.environ['NSAGEN_CACHE_DIR'] = {str(tmp_path)!r}\n"
            "with c.uri_lock('x'):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "NSAGEN_CACHE_DIR": str(tmp_path)})
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(TimeoutError):
        with cache.uri_lock("x", timeout=0.3):
            pass
    child.send_signal(signal.SIGKILL)
    child.wait()
    t0 = time.monotonic()
    with cache.uri_lock("x", timeout=5):
        pass
    assert time.monotonic() - t0 < 2


def test_cache_list_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    specs = [nsagen.load_spec("nsa-g2").replace(name="a", window=200),
             nsagen.load_spec("nsa-g8").replace(name="b", window=200)]
    for s in specs:
        cache.load_module(codegen.module_name(s), codegen.render(s))
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert all(codegen.module_name(s) in out for s in specs)
    spec_file = tmp_path / "a.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(specs[0].to_dict()))
    assert main(["cache", "clear", "--spec", str(spec_file)]) == 0
    left = [e["name"] for e in cache.entries()]
    assert left == [codegen.module_name(specs[1])]
    assert main(["cache", "clear"]) == 0
    assert cache.entries() == []


def test_clear_matches_the_exact_layer_not_a_prefix(tmp_path, monkeypatch):
    """Clearing the window-32 layer must keep the window-320 layer's module and tuned table."""
    from nsagen import tables

    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    w32 = nsagen.load_spec("nsa-g4").replace(name="w32", window=32)
    w320 = w32.replace(name="w320", window=320)
    assert w320.uri.startswith(w32.uri)
    meta = {"gpu": "NVIDIA H200", "capability": "9.0", "sm_count": 132, "triton": "3.6.0",
            "torch": "2.11.0", "nsagen": "0.1.0"}
    for s in (w32, w320):
        name = codegen.module_name(s)
        cache.load_module(name, codegen.render(s))
        tables.save(name, meta, {"T<=1024": {}})
    removed = cache.clear(w32.uri)
    assert len(removed) == 2
    left = sorted(e["name"] for e in cache.entries())
    assert left == [codegen.module_name(w320)] * 2


def test_cache_files_follow_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    spec = nsagen.load_spec("nsa-g8").replace(name="modes", window=96)
    old = os.umask(0o002)
    try:
        _, path, _ = cache.load_module(codegen.module_name(spec), codegen.render(spec))
        cache.atomic_write(tmp_path / "t.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "t.json").stat().st_mode & 0o777 == 0o664


def test_leftovers_of_killed_builds_are_cleaned(tmp_path, monkeypatch):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    spec = nsagen.load_spec("nsa-g8").replace(name="leftovers", window=160)
    name = codegen.module_name(spec)
    mods = tmp_path / "modules"
    mods.mkdir()
    stale = mods / f".{name}.py.k1ll3d.tmp"
    stale.write_text("half a module")
    # a lock file whose holder was killed: unlocked, still on disk
    child = subprocess.run([sys.executable, "-c",
                            "import os, nsagen.cache as c\n"
                            f"with c.uri_lock({name!r}):\n    os._exit(0)\n"],
                           env={**os.environ, "NSAGEN_CACHE_DIR": str(tmp_path)})
    assert child.returncode == 0 and (tmp_path / "locks" / f"{name}.lock").exists()
    cache.load_module(name, codegen.render(spec))
    assert sorted(p.name for p in mods.iterdir()) == [f"{name}.py"]
    assert list((tmp_path / "locks").iterdir()) == []


def test_a_module_that_fails_to_import_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(NameError):
        cache.load_module("broken_module_0000", "X = undefined_name\n")
    assert list((tmp_path / "modules").iterdir()) == []
    assert "broken_module_0000" not in sys.modules


def test_listing_creates_nothing(tmp_path, monkeypatch, capsys):
    root = tmp_path / "absent"
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(root))
    assert cache.entries() == []
    assert main(["cache", "list"]) == 0
    assert not root.exists()
    ro = tmp_path / "ro"
    (ro / "modules").mkdir(parents=True)
    (ro / "modules" / "nsa_x_00000000.py").write_text("X = 1\n")
    os.chmod(ro / "modules", 0o555)
    os.chmod(ro, 0o555)
    try:
        monkeypatch.setenv("NSAGEN_CACHE_DIR", str(ro))
        assert main(["cache", "list"]) == 0
        assert "nsa_x_00000000" in capsys.readouterr().out
    finally:
        os.chmod(ro, 0o755)
        os.chmod(ro / "modules", 0o755)


def test_interpreter_and_compiled_modes_get_their_own_op(monkeypatch):
    """A generated module's kernels are bound to the Triton mode it was imported under: an op
    built with the interpreter off must not be handed out once it is on (that op would launch
    on a GPU driver that a CPU-only machine lacks), and the reverse."""
    spec = nsagen.load_spec("nsa-d128").replace(name="modes", heads_q=2, heads_kv=1, dim_qk=16,
                                                 dim_v=16, cmp_block=8, cmp_stride=4,
                                                 slc_block=8, slc_count=4, window=8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    compiled = nsagen.build(spec)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = nsagen.build(spec)
    assert interpreted is not compiled
    assert interpreted.module_name == compiled.module_name       # one file, one tuning table
    assert interpreted.op_name != compiled.op_name               # two registered ops
    assert nsagen.build(spec) is interpreted
    monkeypatch.delenv("TRITON_INTERPRET")
    assert nsagen.build(spec) is compiled
